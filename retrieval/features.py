"""Feature files: the one module that knows the HDF5 schema of ``simsiam extract``.

Schema (DESIGN.md, "Feature files"), one HDF5 file:

- ``features`` float16 or float32 ``[N, D]``, chunked, row i <-> image i
- ``labels`` int64 ``[N]``, class index, -1 where unlabeled
- ``paths`` UTF-8 strings ``[N]``, relative to the ``root`` attribute
- attributes: ``root``, ``classes`` (JSON list), ``arch``, ``layer``, ``checkpoint``,
  ``checkpoint_sha256``, ``image_size``, ``normalized`` (bool), ``simsiam_version``; we add
  ``resize``, ``precision`` and ``skipped_images``.

Files are written under a temporary name (``.NAME.XXXX.tmp``, hidden) and renamed when complete,
so an interrupted run leaves no file that looks finished. A ``torchrun`` extraction writes one
shard per rank and merges them into one such file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np

from simsiam import __version__
from simsiam.atomic import NOT_A_REGULAR_FILE, discard_temporary, new_temporary, settle_temporary
from simsiam.errors import InputError

DATASETS = ("features", "labels", "paths")
DTYPES = ("float16", "float32")
COMPRESSIONS = ("none", "gzip", "lzf")
CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: HDF5's recommended range, and whole rows per chunk
_STRINGS = h5py.string_dtype("utf-8")


@dataclass
class FeatureSet:
    """The content of a feature file, or of an extraction kept in memory.

    ``attrs`` holds the schema's attributes with ``classes`` decoded to a list.
    """

    features: np.ndarray  # [N, D] float16 or float32
    labels: np.ndarray  # [N] int64, -1 where unlabeled
    paths: list[str]  # [N], relative to attrs["root"]
    attrs: dict = field(default_factory=dict)
    source: str = "<memory>"  # where it was read from, for messages

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        shape = tuple(np.shape(self.features))
        if len(shape) != 2:
            raise InputError(f"{self.source}: features of shape {shape}; expected a [rows, dim] matrix")
        return int(shape[1])

    @property
    def classes(self) -> list[str]:
        return list(self.attrs.get("classes", []))

    @property
    def root(self) -> Path:
        return Path(self.attrs.get("root", "."))


def _chunk_rows(dim: int, itemsize: int) -> int:
    return max(1, CHUNK_BYTES // max(1, dim * itemsize))


def _compression_args(compression: str) -> dict:
    if compression not in COMPRESSIONS:
        raise InputError(f"--compression {compression}: choose one of {', '.join(COMPRESSIONS)}")
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    return {}


def _encode_attr(name: str, value):
    if name == "classes":
        return json.dumps(list(value))
    if value is None:
        return ""
    return value


def printable_name(path: str | os.PathLike) -> str:
    """A file name as the shell spells it: bytes that are not UTF-8 as \\xNN, not a surrogate no terminal shows."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def check_utf8_names(root: str | os.PathLike, paths: Sequence[str]) -> None:
    """Refuse, before any work, images whose path a feature file cannot hold.

    Its paths are UTF-8 strings, which its readers rely on; a Linux file name is any bytes, and
    Python holds those that are not UTF-8 surrogate-escaped, which HDF5 cannot encode.
    """
    def is_utf8(name: str) -> bool:
        try:
            name.encode("utf-8")
            return True
        except UnicodeEncodeError:
            return False

    root = Path(root)
    if not is_utf8(str(root.resolve())):
        raise InputError(f"{printable_name(root.resolve())}: the folder's name is not valid UTF-8; a feature file "
                         "stores it as UTF-8: rename it")
    bad = [p for p in paths if not is_utf8(p)]
    if bad:
        # the first part of the path that is not UTF-8: a (class) folder, or the file itself
        parts = Path(bad[0]).parts
        depth = next(i for i, part in enumerate(parts) if not is_utf8(part)) + 1
        what = "file" if depth == len(parts) else "folder"
        more = f" (and {len(bad) - 1} more image path(s) in {root})" if len(bad) > 1 else ""
        raise InputError(f"{printable_name(root.joinpath(*parts[:depth]))}: the {what} name is not valid UTF-8{more}; "
                         "a feature file stores image paths as UTF-8: rename it")


BYTES_PER_ROW = 8 + 8 + 64  # a label, a string reference, a path: with the features, what a row takes


def feature_file_bytes(rows: int, dim: int, dtype: str) -> int:
    """About the size of an uncompressed feature file of ``rows`` x ``dim`` features."""
    return rows * (dim * np.dtype(dtype).itemsize + BYTES_PER_ROW)


def check_free_space(path: Path, needed: int, option: str = "--out") -> None:
    """Refuse before writing when ``path``'s disk cannot hold ``needed`` bytes (and a MiB of headroom)."""
    # the nearest folder that exists (``path`` itself, given a folder): the disk the missing ones will be
    # made on, not the working folder's
    folder = next(p for p in (path.absolute(), *path.absolute().parents) if p.is_dir())
    free = shutil.disk_usage(folder).free
    needed += 1 << 20  # the file's own structures
    if needed > free:
        raise InputError(f"{option} {path}: needs about {needed / 2**20:,.1f} MiB, but its disk has "
                         f"{free / 2**20:,.1f} MiB free")


class FeatureWriter:
    """Streams rows into a new feature file; :meth:`commit` renames it into place.

    Used as a context manager: leaving the block with an exception removes the temporary file,
    so ``path`` is either absent, the previous file, or the complete new one.

    Example:
        >>> with FeatureWriter("feats.h5", dim=512, attrs=attrs) as writer:
        ...     writer.append(features, labels, paths)
        ...     writer.commit()
    """

    def __init__(self, path: str | os.PathLike, dim: int, attrs: dict, dtype: str = "float16",
                 compression: str = "none", expected_rows: int = 0, replace: bool = True):
        if dtype not in DTYPES:
            raise InputError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
        self.path = Path(path)
        self.attrs = {**attrs, "simsiam_version": __version__}
        self.rows = 0
        self.replace = replace  # False: a file written at ``path`` meanwhile is not replaced (settle_temporary)
        self.compressed = compression != "none"
        storage = _compression_args(compression)
        chunk = min(_chunk_rows(dim, np.dtype(dtype).itemsize), max(expected_rows, 1))
        if compression == "none":  # a full disk found by HDF5 mid-write leaves it in a state that can crash at exit
            check_free_space(self.path, feature_file_bytes(expected_rows, dim, dtype))
        self.file = None
        self.tmp = new_temporary(self.path)
        try:
            self.file = h5py.File(self.tmp, "w")
            self.features = self.file.create_dataset("features", shape=(0, dim), maxshape=(None, dim), dtype=dtype,
                                                     chunks=(chunk, dim), **storage)
            self.labels = self.file.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=np.int64,
                                                   chunks=(max(chunk, 1024),), **storage)
            self.paths = self.file.create_dataset("paths", shape=(0,), maxshape=(None,), dtype=_STRINGS,
                                                  chunks=(max(chunk, 1024),), **storage)
        except BaseException:
            self.abort()
            raise

    def append(self, features: np.ndarray, labels: Sequence[int], paths: Sequence[str]) -> None:
        n = len(features)
        shape = tuple(np.shape(features))
        if shape[1:] != self.features.shape[1:] or len(labels) != n or len(paths) != n:
            # h5py would stretch one label or path over every row: a file that names the wrong images
            raise InputError(f"{self.path}: features of shape {shape} with {len(labels)} labels and {len(paths)} "
                             f"paths; expected [rows, {self.features.shape[1]}] features and one label and path a row")
        if not n:
            return
        with np.errstate(over="ignore"):  # an overflow is found just below, and said as a one-line error
            stored = np.asarray(features, dtype=self.features.dtype)
        if not np.isfinite(stored).all() and np.isfinite(features).all():  # finite values made infinite
            raise InputError(f"--dtype {self.features.dtype}: feature values up to {np.abs(features).max():.3g} "
                             f"exceed its range ({np.finfo(stored.dtype).max:.0f}); use --dtype float32 or --normalize")
        if self.compressed:
            # the size of a compressed file is not known ahead (an uncompressed one's disk is checked
            # at the start): each block's room is checked before HDF5 gets it, at most its raw size,
            # and it is flushed. HDF5 that meets a full disk itself leaves a file it cannot close
            # (a traceback, then a segmentation fault as the process exits).
            check_free_space(self.path, stored.nbytes + 8 * n + sum(len(p.encode("utf-8", "surrogateescape"))
                                                                   for p in paths))
        end = self.rows + n
        for dataset in (self.features, self.labels, self.paths):
            dataset.resize(end, axis=0)
        self.features[self.rows:end] = stored
        self.labels[self.rows:end] = np.asarray(labels, dtype=np.int64)
        self.paths[self.rows:end] = list(paths)
        self.rows = end
        if self.compressed:
            self.file.flush()

    def commit(self) -> Path:
        """Write the attributes, close, and rename the file into place."""
        for name, value in self.attrs.items():
            self.file.attrs[name] = _encode_attr(name, value)
        self.file.close()
        settle_temporary(self.tmp, self.path, self.replace)
        return self.path

    def abort(self) -> None:
        try:
            if self.file is not None and self.file.id.valid:
                self.file.close()
        except (OSError, RuntimeError):  # a full disk fails the close too; the file goes all the same
            pass
        finally:
            discard_temporary(self.tmp)

    def __enter__(self) -> "FeatureWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.tmp.exists():
            self.abort()


def write_features(path: str | os.PathLike, feature_set: FeatureSet, dtype: str = "float16",
                   compression: str = "none") -> Path:
    """Write a whole :class:`FeatureSet` (atomically, as :class:`FeatureWriter`)."""
    with FeatureWriter(path, feature_set.dim, feature_set.attrs, dtype, compression, len(feature_set)) as writer:
        writer.append(feature_set.features, feature_set.labels, feature_set.paths)
        return writer.commit()


MERGE_ROWS = 16384  # rows copied at a time when shards are merged: bounds the memory of the merge


def merge_shards(path: str | os.PathLike, shards: Sequence[str | os.PathLike], attrs: dict,
                 replace: bool = True) -> Path:
    """One feature file holding the rows of ``shards`` in order (written atomically, as
    :class:`FeatureWriter`).

    Used by multi-process extraction: each rank writes the rows of its contiguous slice of the
    dataset into its own shard, so the shards in rank order are the rows in dataset order. The
    rows are copied in blocks, so no process ever holds all the features, and the result is a
    plain file that any HDF5 reader takes on its own (not virtual datasets that need the shards).
    It is stored as the shards are: the same dtype and compression.
    """
    headers = [read_header(shard) for shard in shards]
    total, dim = sum(rows for rows, _, _ in headers), headers[0][1]
    with h5py.File(shards[0], "r") as f:
        dtype, compression = str(f["features"].dtype), f["features"].compression or "none"
    with FeatureWriter(path, dim, attrs, dtype, compression, total, replace) as writer:
        for shard in shards:
            with h5py.File(shard, "r") as f:
                for start in range(0, f["labels"].shape[0], MERGE_ROWS):
                    block = slice(start, start + MERGE_ROWS)
                    writer.append(f["features"][block], f["labels"][block], f["paths"].asstr()[block])
        return writer.commit()


NOT_OURS = "not a feature file written by simsiam extract"
STRING_ATTRS = ("root", "arch", "layer", "checkpoint", "checkpoint_sha256")
INT_ATTRS = ("image_size", "resize")


def _decode_attrs(raw: h5py.AttributeManager, where: str) -> dict:
    """The attributes as Python values, each one the rest of the toolkit relies on checked for its type:
    a foreign or hand-edited file must fail here, in one line, not deep inside knn or search."""
    attrs = {}
    for name, value in raw.items():
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{where}: its {name!r} attribute is not UTF-8 text; {NOT_OURS}") from None
        elif isinstance(value, np.generic):
            value = value.item()
        attrs[name] = value
    try:
        classes = json.loads(attrs.get("classes") or "[]")
    except (TypeError, ValueError):
        classes = None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise InputError(f"{where}: its 'classes' attribute is not a JSON list of class names; {NOT_OURS}")
    attrs["classes"] = classes
    for names, kind, what in ((STRING_ATTRS, str, "a string"), (INT_ATTRS, int, "an integer")):
        for name in names:
            if name in attrs and (not isinstance(attrs[name], kind) or isinstance(attrs[name], bool)):
                raise InputError(f"{where}: its {name!r} attribute is not {what}; {NOT_OURS}")
    return attrs


def _check_datasets(f: h5py.File, where: Path) -> None:
    """Each dataset of the schema present, a dataset (not a group), of its dtype and of one length."""
    missing = [name for name in DATASETS if name not in f]
    if missing:
        raise InputError(f"{where}: not a simsiam feature file: no dataset {', '.join(repr(m) for m in missing)}")
    for name in DATASETS:
        if not isinstance(f[name], h5py.Dataset):
            raise InputError(f"{where}: {name!r} is not a dataset; {NOT_OURS}")
    _check_shards(f, where)
    shape = f["features"].shape
    if len(shape) != 2 or f["labels"].shape != (shape[0],) or f["paths"].shape != (shape[0],):
        raise InputError(f"{where}: features {shape}, labels {f['labels'].shape} and paths "
                         f"{f['paths'].shape} do not describe the same images")
    if f["features"].dtype.kind != "f":
        raise InputError(f"{where}: features are {f['features'].dtype}, expected float16 or float32")
    _check_stored(f["features"], where)
    if f["labels"].dtype.kind not in "iu":
        raise InputError(f"{where}: labels are {f['labels'].dtype}, expected integers (class indices)")
    if h5py.check_string_dtype(f["paths"].dtype) is None:
        raise InputError(f"{where}: 'paths' is not a dataset of strings; {NOT_OURS}")


def _check_stored(features: h5py.Dataset, where: Path) -> None:
    """Refuse a features dataset whose shape claims more values than the file stores: a damaged
    header (one flipped byte made a 40 x 512 file claim 40 x 4,278,190,088 features, 638 GiB to
    read), or a writer that stopped before writing them all. Chunked: each chunk of the shape must
    be allocated; contiguous: all its bytes."""
    if features.is_virtual:
        return
    rows, dim = features.shape
    if features.chunks:
        expected = math.ceil(rows / features.chunks[0]) * math.ceil(dim / features.chunks[1])
        stored = features.id.get_num_chunks()
    else:
        expected, stored = rows * dim * features.dtype.itemsize, features.id.get_storage_size()
    if stored < expected:
        raise InputError(f"{where}: damaged: its 'features' claim {rows:,} x {dim:,} values, more than the file "
                         "stores")


def _decode_paths(raw: np.ndarray, where: Path) -> list[str]:
    paths = []
    for row, path in enumerate(raw):
        try:
            paths.append(path.decode("utf-8"))
        except UnicodeDecodeError:
            raise InputError(f"{where}: 'paths' row {row} is not UTF-8 text; {NOT_OURS}") from None
    return paths


def _check_shards(f: h5py.File, where: Path) -> None:
    """Files of earlier versions hold virtual datasets over shard files (a torchrun extraction);
    one with a shard missing would silently read as zeros: refuse it instead."""
    for name in DATASETS:
        for source in f[name].virtual_sources() if f[name].is_virtual else ():
            shard = Path(source.file_name)
            if not (shard if shard.is_absolute() else where.parent / shard).is_file():
                raise InputError(f"{where}: its shard {source.file_name} is missing (written by an earlier version "
                                 "over a shard folder; keep that folder beside it, or extract again)")


@contextmanager
def _open_checked(path: Path):
    """The feature file ``path`` open for reading, its datasets checked (:func:`_check_datasets`);
    whatever is wrong with it is an InputError naming it."""
    if not path.exists():
        raise InputError(f"{path}: no such feature file")
    if not path.is_file():
        raise InputError(f"{path}: {'not a file' if path.is_dir() else NOT_A_REGULAR_FILE}")
    if not h5py.is_hdf5(path):
        from simsiam.checkpoint import is_torch_save_file

        if is_torch_save_file(path):
            raise InputError(f"{path}: a checkpoint, not a feature file; simsiam extract CHECKPOINT DATA --out FILE "
                             "writes one")
        raise InputError(f"{path}: not an HDF5 file (expected a feature file written by simsiam extract)")
    try:
        with h5py.File(path, "r") as f:
            _check_datasets(f, path)
            yield f
    except InputError:  # a ValueError too: said as it is
        raise
    except (OSError, KeyError, RuntimeError, ValueError, TypeError) as err:
        # what HDF5's errors become in h5py when the file's structures are damaged: "message type not
        # found" (KeyError), "wrong B-tree signature" (RuntimeError), an impossible dtype (ValueError)...
        reason = str(err.args[0] if err.args else err).strip().splitlines()
        raise InputError(f"{path}: unreadable HDF5 file ({reason[0] if reason else type(err).__name__})") from None


def read_features(path: str | os.PathLike, with_features: bool = True) -> FeatureSet:
    """Read and check a feature file; ``with_features=False`` reads labels, paths and attributes only."""
    path = Path(path)
    with _open_checked(path) as f:
        attrs = _decode_attrs(f.attrs, str(path))
        labels = f["labels"][:].astype(np.int64)
        paths = _decode_paths(f["paths"][:], path)
        dim = f["features"].shape[1]
        features = f["features"][:] if with_features else np.empty((0, dim), f["features"].dtype)
    absent = [name for name in ("layer", "arch") if name not in attrs]
    if absent:
        raise InputError(f"{path}: not a simsiam feature file: no attribute {', '.join(absent)}")
    classes = attrs.get("classes") or []
    if len(labels) and (labels.min() < -1 or (classes and labels.max() >= len(classes))):
        raise InputError(f"{path}: labels from {labels.min()} to {labels.max()} do not index its "
                         f"{len(classes)} classes (-1: no label)")
    return FeatureSet(features, labels, paths, attrs, str(path))


def read_header(path: str | os.PathLike) -> tuple[int, int, dict]:
    """``(rows, dim, attributes)`` of a feature file, without reading its datasets."""
    with _open_checked(Path(path)) as f:
        rows, dim = f["features"].shape
        return int(rows), int(dim), _decode_attrs(f.attrs, str(path))


ROWS_FINGERPRINT_SAMPLE = 64


def rows_fingerprint(paths: Sequence[str], row: Callable[[int], np.ndarray]) -> str:
    """A fingerprint of a feature file's rows: its image paths in order, and the stored vectors
    (``row(i)``) of ``ROWS_FINGERPRINT_SAMPLE`` evenly spaced rows. An index built over one file
    must not be used with another of the same length: the same images in another order, or
    another extraction of the same images."""
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode("utf-8") + b"\0")
    for i in sorted({int(i) for i in np.linspace(0, len(paths) - 1, ROWS_FINGERPRINT_SAMPLE)}):
        digest.update(np.ascontiguousarray(row(i), dtype=np.float32).tobytes())
    return digest.hexdigest()


def file_rows_fingerprint(path: str | os.PathLike, paths: Sequence[str]) -> str:
    """:func:`rows_fingerprint` of a feature file, reading only the sampled rows."""
    with _open_checked(Path(path)) as f:
        return rows_fingerprint(paths, lambda i: f["features"][i])


def first_non_finite_row(block: np.ndarray) -> int | None:
    """The index of the first row of ``block`` holding NaN or infinity; None when every value is finite."""
    finite = np.isfinite(block).all(axis=1)
    return None if finite.all() else int(np.argmin(finite))


def check_usable(feature_set: FeatureSet, name: str) -> None:
    """Refuse features cosine similarity cannot use: NaN/inf, or all-zero rows (no direction)."""
    features = feature_set.features
    if len(feature_set) == 0:
        raise InputError(f"{name} {feature_set.source}: holds no features")
    step = max(1, (1 << 26) // max(1, features.shape[1]))  # bounded temporary memory
    for start in range(0, len(features), step):
        block = np.asarray(features[start:start + step], dtype=np.float32)
        bad = first_non_finite_row(block)
        if bad is not None:
            row = start + bad
            raise InputError(f"{name} {feature_set.source}: NaN or infinite features (row {row}, "
                             f"{feature_set.paths[row] if row < len(feature_set.paths) else '?'})")
        zero = ~block.any(axis=1)
        if zero.any():
            row = start + int(np.argmax(zero))
            raise InputError(f"{name} {feature_set.source}: all-zero feature vector (row {row}, "
                             f"{feature_set.paths[row] if row < len(feature_set.paths) else '?'}); "
                             "cosine similarity is undefined for it")


def labels_in_classes_of(features: FeatureSet, reference: FeatureSet) -> np.ndarray:
    """``features``' labels renumbered into ``reference``'s classes by class name (-1 where it has no
    such class); unchanged when either file has no class names."""
    if features.classes and reference.classes:
        position = {name: i for i, name in enumerate(reference.classes)}
        table = np.array([position.get(name, -1) for name in features.classes] + [-1])
        return table[np.where(features.labels >= 0, features.labels, len(features.classes))]
    return features.labels.copy()


def check_compatible(a: FeatureSet, a_name: str, b: FeatureSet, b_name: str) -> list[str]:
    """Refuse pairs that cannot be compared (dimension, layer); return warnings for doubtful ones."""
    if a.dim != b.dim:
        raise InputError(f"{b_name} {b.source}: {b.dim}-d features, but {a_name} {a.source} has {a.dim}-d")
    if a.attrs.get("layer") != b.attrs.get("layer"):
        raise InputError(f"{b_name} {b.source}: features of layer {b.attrs.get('layer')!r}, but {a_name} "
                         f"{a.source} has layer {a.attrs.get('layer')!r}")
    warnings = []
    sha_a, sha_b = a.attrs.get("checkpoint_sha256"), b.attrs.get("checkpoint_sha256")
    # the file's hash decides when both have one; a random-init baseline has only its description
    different = sha_a != sha_b if (sha_a and sha_b) else a.attrs.get("checkpoint") != b.attrs.get("checkpoint")
    if different:
        warnings.append(f"{a_name} and {b_name} come from different checkpoints "
                        f"({a.attrs.get('checkpoint')!r} vs {b.attrs.get('checkpoint')!r})")
    for key in ("image_size", "resize"):  # the same network sees other pixels: comparable, but doubtful
        if key in a.attrs and key in b.attrs and a.attrs[key] != b.attrs[key]:
            warnings.append(f"{a_name} and {b_name} were extracted with different {key} "
                            f"({a.attrs[key]} vs {b.attrs[key]})")
    return warnings
