"""Image search: the nearest database images of query images, by cosine similarity of their features.

The database is a feature file (searched exactly) or an index built by ``simsiam index`` over
one. Queries are images, embedded on the fly with a checkpoint through the same layer and
evaluation transform as the database (read from its attributes), or a feature file. A query
that is one of the database's images (the same file under the same folder, whether the queries
are the database file itself, a copy or another extraction of it, or the images it was extracted
from) does not find itself: its own row is left out of its results and of its relevant images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from simsiam.config import MAX_IMAGE_SIZE, check_int
from simsiam.image_folders import ImageList, scan_images
from simsiam.errors import InputError, given_as
from simsiam.runtime import Runtime

from .features import FeatureSet, check_compatible, check_utf8_names, check_usable, labels_in_classes_of, file_rows_fingerprint, read_features
from .index import LoadedIndex, load_index, sidecar_path
from .metrics import retrieval_metrics
from .neighbours import check_whole, normalized_float32, search

EVAL_DEPTH = 10  # recall@1/5/10 need ten results per query


@dataclass
class Database:
    """What is searched: the feature file's labels, paths and attributes, and its vectors or index."""

    features: FeatureSet  # features are empty when an index holds the vectors
    index: LoadedIndex | None
    path: Path  # the file given

    @property
    def file(self) -> Path:
        return Path(self.features.source)


def open_database(path: str | os.PathLike) -> Database:
    """A feature file (``.h5``, exact search) or a FAISS index written by ``simsiam index``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such index or feature file")
    if path.is_dir():
        raise InputError(f"{path}: a folder, not a feature file or an index (simsiam extract CHECKPOINT DATA --out "
                         "FILE writes a feature file to search)")
    if path.is_file() and h5py.is_hdf5(path):
        features = read_features(path)
        check_usable(features, "DATABASE")
        return Database(features, None, path)
    if path.is_file() and not sidecar_path(path).is_file():  # no index of ours: a checkpoint, a CSV, ...
        from simsiam.checkpoint import is_torch_save_file  # here: torchvision with it, which searching does without

        if is_torch_save_file(path):
            raise InputError(f"{path}: a checkpoint, not a feature file or an index; simsiam extract CHECKPOINT "
                             "DATA --out FILE writes a feature file to search")
        index = path.with_name(path.name.removesuffix(".json"))
        if index != path and index.is_file() and sidecar_path(index) == path:
            raise InputError(f"{path}: the description of the index {index}, not the index; search {index}")
        raise InputError(f"{path}: neither a feature file (HDF5) nor an index from simsiam index (no "
                         f"{sidecar_path(path).name} beside it)")
    loaded = load_index(path)
    if not loaded.features_path.is_file():
        raise InputError(f"{path}: its feature file {loaded.meta['features']} is missing (the index holds vectors, "
                         "the feature file their paths and labels)")
    features = read_features(loaded.features_path, with_features=False)
    if len(features) != loaded.index.ntotal:
        raise InputError(f"{path}: {loaded.index.ntotal} vectors, but {loaded.features_path} has {len(features)} rows; "
                         "rebuild the index")
    expected = loaded.meta.get("rows_sha256")
    if expected and expected != file_rows_fingerprint(loaded.features_path, features.paths):
        raise InputError(f"{path}: {loaded.features_path} is not the feature file it was built over (other images "
                         "or another order); rebuild the index")
    return Database(features, loaded, path)


def single_image_list(path: Path) -> ImageList:
    return ImageList(root=path.parent, paths=[path.name], labels=[-1], classes=[])


def embed_query_images(query: str | os.PathLike, checkpoint: str | os.PathLike, database: FeatureSet,
                       runtime: Runtime, batch_size: int = 64, workers: int = 0, on_event=None,
                       evaluate: bool = False) -> FeatureSet:
    """Embed an image or a folder of images the way the database was: same layer, same transform.

    Every query must decode: an image the user asked about is never skipped silently. With
    ``evaluate``, query images without a class the database knows are refused before embedding.
    """
    # here, not at the top: torchvision takes 2 s to import, which searching with features does without
    from .extract import extract_features
    from .feature_model import load_feature_model

    query = Path(query)
    if not query.exists():
        raise InputError(f"--query {query}: no such image or folder")
    if query.is_file() and h5py.is_hdf5(query):
        raise InputError(f"--query {query}: a feature file, not an image; search with its features: --query-h5 {query}")
    # the layer is the database's: the user chooses the checkpoint, or another database
    hint = (f"the database {database.source} holds projector features: give --checkpoint the checkpoint they "
            f"were extracted from ({database.attrs.get('checkpoint')}), or search a feature file written by "
            "simsiam extract --layer backbone")
    with given_as("--checkpoint", checkpoint):
        model = load_feature_model(checkpoint, layer=database.attrs.get("layer", "backbone"), projector_hint=hint)
    if model.dim != database.dim:  # before embedding: another network than the database's
        raise InputError(f"--checkpoint {checkpoint}: {model.arch} gives {model.dim}-d features, but the database "
                         f"{database.source} has {database.dim}-d (embedded with {database.attrs.get('checkpoint')})")
    with given_as("--query", query):
        images = scan_images(query) if query.is_dir() else single_image_list(query)
    check_utf8_names(images.root, images.paths)  # (extraction checks it too) before naming classes below
    if evaluate:  # the metrics need labels: said before embedding, not after
        if not images.labelled:
            raise InputError("--eval: the --query images have no labels; give a folder of class folders "
                             "(class/*.jpg) named as the database's classes")
        if database.classes and not set(images.classes) & set(database.classes):
            raise InputError(f"--eval: none of the --query classes ({', '.join(images.classes[:3])}"
                             f"{'...' if len(images.classes) > 3 else ''}) is a class of the database "
                             f"{database.source}; the metrics need labels it shares")

    def refuse_unreadable(event: dict) -> None:
        if event["event"] == "unreadable":
            raise InputError(f"--query {event['path']}: cannot decode the image ({event['reason']})")
        if on_event is not None:
            on_event(event)

    image_size = int(database.attrs.get("image_size") or model.image_size)
    resize = int(database.attrs.get("resize", model.resize))
    # the database's transform, which the queries must share: a broken value is the file's, not an option's
    check_int(f"{database.source}: its image_size", image_size, 1, MAX_IMAGE_SIZE)
    check_int(f"{database.source}: its resize", resize, 0, MAX_IMAGE_SIZE)
    # the queries must share it even when its resize is smaller than its crop (a file made before
    # extract refused that): padded alike, they match its rows
    return extract_features(model, images, runtime, image_size, resize, batch_size, workers,
                            on_event=refuse_unreadable, check_crop=False, source="--query")


@dataclass
class SearchResult:
    queries: FeatureSet  # paths, labels, root of the queries (features dropped after the search)
    database: FeatureSet  # paths, labels, root, classes of the database
    scores: np.ndarray  # [Q, k] cosine similarities, best first
    indices: np.ndarray  # [Q, k] database rows; -1 where an approximate index found fewer than k
    query_labels: np.ndarray  # [Q] query labels in the database's class numbering, -1 where unknown
    excluded_self: int  # queries that are database images, left out of their own results
    backend: str
    metrics: dict | None = None
    warnings: list[str] = field(default_factory=list)


def _search_rows(database: Database, queries: np.ndarray, k: int, backend: str, device: str) -> tuple:
    if database.index is None:
        found = search(database.features.features, queries, k, backend, device)
        return found.scores, found.indices, found.backend
    scores, indices = database.index.index.search(normalized_float32(queries), k)
    return scores, indices.astype(np.int64), f"faiss index {database.index.meta.get('factory')}"


def own_rows(queries: FeatureSet, database: FeatureSet) -> np.ndarray:
    """The database row of each query's own image, -1 where the database does not hold it.

    An image is its path under its folder's real path (symlinks resolved, as ``same_images``), so
    a copy of the database file, another extraction of the same folder, and the image folder
    itself all match; only what the two roots name is resolved, not every path.
    """
    own = np.full(len(queries), -1, np.int64)
    roots = [features.attrs.get("root") for features in (queries, database)]
    if not all(roots):
        return own
    query_root, database_root = (os.path.realpath(root) for root in roots)
    relative = [os.path.relpath(os.path.join(query_root, p), database_root) for p in queries.paths]
    if all(r.startswith(os.pardir + os.sep) for r in relative):  # no query lies under the database's folder
        return own
    row_of = {os.path.normpath(p): row for row, p in enumerate(database.paths)}
    own[:] = [row_of.get(r, -1) for r in relative]
    return own


def _drop_self(scores: np.ndarray, indices: np.ndarray, k: int, own: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own database row (``own``, -1 for none) from its k + 1 results."""
    found = (indices == own[:, None]) & (own[:, None] >= 0)
    keep = ~found
    keep[~found.any(axis=1), -1] = False  # not among them: drop the last instead
    return scores[keep].reshape(len(scores), k), indices[keep].reshape(len(indices), k)


def check_k(k: int, evaluate: bool, rows: int, same: bool = False) -> int:
    """The neighbours to search for each query: k, at least ten with ``evaluate`` (recall@10);
    ``same``: queries are database images, so each finds one image fewer (its own is left out)."""
    k = check_whole("-k", k)
    if k < 1:
        raise InputError(f"-k {k}: must be at least 1")
    depth = max(k, EVAL_DEPTH) if evaluate else k
    if depth + int(same) > rows:
        # -k as given, or --eval's recall@10, which asks for more
        asked = (f"-k {k}: larger than" if depth == k else
                 f"--eval: recall@{EVAL_DEPTH} needs {EVAL_DEPTH} neighbours per query, more than")
        raise InputError(f"{asked} the {rows - int(same)} database images"
                         + (" a query can find (its own image is left out)" if same else ""))
    return depth


def search_database(database: Database, queries: FeatureSet, k: int = 10, evaluate: bool = False,
                    backend: str = "auto", device: str = "auto", query_option: str = "--query") -> SearchResult:
    """The k nearest database images of every query, and with ``evaluate`` recall@1/5/10 and mAP@k.
    ``query_option`` names the queries in messages."""
    check_k(k, evaluate, len(database.features))
    warnings = check_compatible(database.features, "the database", queries, query_option)
    check_usable(queries, query_option)
    own = own_rows(queries, database.features)
    same = bool((own >= 0).any())
    depth = check_k(k, evaluate, len(database.features), same)
    scores, indices, used = _search_rows(database, queries.features, depth + int(same), backend, device)
    if same:
        scores, indices = _drop_self(scores, indices, depth, own)
    short = int((indices[:, :k] < 0).any(axis=1).sum())
    if short:  # an IVF index searches only nprobe of its lists, which may hold fewer than k vectors
        settings = database.index.meta.get("search_parameters") if database.index is not None else ""
        warnings.append(f"the index found fewer than {k} neighbours for {short} of the {len(indices)} queries"
                        f"{f' (at {settings})' if settings else ''}; their lists end early" +
                        (", and --eval's mAP is over what was found" if evaluate else ""))
    query_labels = labels_in_classes_of(queries, database.features)
    result = SearchResult(FeatureSet(queries.features[:0], queries.labels, queries.paths, queries.attrs,
                                     queries.source),
                          database.features, scores[:, :k], indices[:, :k], query_labels, int((own >= 0).sum()),
                          used, warnings=warnings)
    if evaluate:
        neighbour_labels = np.where(indices >= 0, database.features.labels[indices.clip(min=0)], -1)
        result.metrics = retrieval_metrics(query_labels, neighbour_labels, database.features.labels,
                                           map_k=k, self_in_database=own >= 0)
    return result


def find_neighbours(database_path: str | os.PathLike, k: int = 10, query: str | os.PathLike | None = None,
                    checkpoint: str | os.PathLike | None = None, query_h5: str | os.PathLike | None = None,
                    evaluate: bool = False, backend: str = "auto", device: str = "auto", precision: str = "auto",
                    batch_size: int = 64, workers: int = 0, on_event=None) -> SearchResult:
    """Search ``database_path`` (feature file or index) with query images (``query`` + ``checkpoint``) or ``query_h5``."""
    from simsiam.runtime import resolve_device, resolve_precision

    if (query is None) == (query_h5 is None):
        raise InputError("give --query IMAGE_OR_DIR (with --checkpoint) or --query-h5 FILE, one of them")
    if query is not None and checkpoint is None:
        raise InputError(f"--query {query}: needs --checkpoint to embed the query images")
    if query_h5 is not None and checkpoint is not None:
        raise InputError(f"--checkpoint {checkpoint}: embeds --query images; --query-h5 holds features already")
    database = open_database(database_path)
    check_k(k, evaluate, len(database.features))  # before embedding the queries
    if database.index is not None and backend != "auto":
        raise InputError(f"--backend {backend}: an index searches itself; --backend is for a feature file")
    if database.index is not None and device == "cuda" and query_h5 is not None:  # it was ignored, in silence
        raise InputError("--device cuda: an index is searched by FAISS on the CPU; --device picks where a feature "
                         "file is searched, and where --query images are embedded")
    if query_h5 is not None:
        with given_as("--query-h5", query_h5):
            queries = read_features(query_h5)
    else:
        dev = resolve_device(device)
        runtime = Runtime(dev, resolve_precision(precision, dev))
        queries = embed_query_images(query, checkpoint, database.features, runtime, batch_size, workers, on_event,
                                     evaluate)
    return search_database(database, queries, k, evaluate, backend, device,
                           "--query-h5" if query_h5 is not None else "--query")
