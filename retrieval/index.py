"""FAISS indexes over a feature file, for image search: exact Flat, HNSW, or IVF-PQ.

Vectors are L2-normalised and compared by inner product, so scores are cosine similarities, as
in kNN. ``auto`` picks by size and memory:

- Flat (exact) for up to ``FLAT_MAX_ROWS`` vectors, when ``rows x dim x 4`` bytes fit;
- HNSW (``HNSW32,Flat``: a graph over the full vectors; fast and accurate, memory a bit above
  Flat) up to ``HNSW_MAX_ROWS`` vectors, when it fits;
- IVF-PQ otherwise (``IVF{nlist},PQ{m}x{bits}``, codes of m bytes per vector, re-ranked with
  8-bit scalar-quantised vectors, ``Refine(SQ8)``, when memory allows).

Search-time settings (``efSearch``; ``nprobe`` and the re-ranking depth ``k_factor_rf``) are
tuned at build time: the cheapest that reaches ``target_recall`` of recall@10 against exact
search, with a sample of the vectors as queries, held out of a trial index of the others (so that
the number holds for new queries; a vector in the index finds itself and its neighbours more
easily); the recall reported is measured again on a second, disjoint sample. The index file is FAISS's own
(``faiss.read_index`` opens it); ``INDEX.json`` beside it names the feature file its rows are the
rows of, the settings and the measured recall.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from simsiam.atomic import NOT_A_REGULAR_FILE, check_output, discard_temporary, new_temporary, settle_temporary
from simsiam.config import check_seed
from simsiam.errors import InputError

from .features import FeatureSet, check_usable, read_features, rows_fingerprint
from .neighbours import check_whole, import_faiss, normalized_float32

KINDS = ("auto", "flat", "hnsw", "ivf-pq")
FLAT_MAX_ROWS = 100_000
HNSW_MAX_ROWS = 1_000_000
HNSW_M = 32  # graph degree; 2M links per vector at the base level
HNSW_EF_CONSTRUCTION = 80
EF_SEARCH_LADDER = (16, 32, 64, 128, 256, 512)
K_FACTOR_LADDER = (1, 2, 4, 8, 16)
RECALL_AT = 10
TRAIN_SAMPLE = 256 * 1024  # vectors k-means trains IVF-PQ on, at least
SIDECAR_FORMAT = "simsiam-index/1"
_MEMORY = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """``"8G"``, ``"512MiB"``, ``"1.5GB"`` or bytes -> bytes (binary units)."""
    match = _MEMORY.match(str(text))
    if not match:
        raise InputError(f"--max-memory {text}: not a size (examples: 512M, 8G, 1.5GiB)")
    value, unit = float(match.group(1)), match.group(2).lower()
    return int(value * 1024 ** " kmgt".index(unit or " "))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@dataclass
class IndexPlan:
    kind: str
    factory: str  # a faiss.index_factory string
    estimated_bytes: int
    reason: str


def _power_of_two_at_most(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1.0, x)))))


def _ivf_pq_plan(rows: int, dim: int, budget: int | None) -> IndexPlan | None:
    """IVF-PQ sized for ``rows`` (k-means wants >= 39 training points per centroid) and the budget:
    the most accurate layout that fits, else the smallest (which the caller refuses); None when
    ``rows`` are too few to train one."""
    nlist = min(_power_of_two_at_most(4 * math.sqrt(rows)), _power_of_two_at_most(rows / 39))
    bits = min(8, int(math.floor(math.log2(rows / 39))) if rows >= 39 * 16 else 0)
    if bits < 4:
        return None
    divisors = [m for m in range(1, dim // 2 + 1) if dim % m == 0 and m <= 64]
    fixed = nlist * dim * 4 + dim * (1 << bits) * 4  # coarse centroids and PQ codebooks
    for refine in (True, False):
        for m in reversed(divisors):
            per_row = math.ceil(m * bits / 8) + 8 + (dim if refine else 0)  # codes, ids, SQ8 copy
            size = fixed + rows * per_row
            if budget is None or size <= budget:
                factory = f"IVF{nlist},PQ{m}x{bits}np" + (",Refine(SQ8)" if refine else "")
                how = "re-ranked with 8-bit vectors" if refine else "no re-ranking (memory)"
                return IndexPlan("ivf-pq", factory, size, f"{m}-byte PQ codes in {nlist} lists, {how}")
    smallest = divisors[0]
    return IndexPlan("ivf-pq", f"IVF{nlist},PQ{smallest}x{bits}np", fixed + rows * (math.ceil(smallest * bits / 8) + 8),
                     "the smallest IVF-PQ layout")


def plan_index(rows: int, dim: int, kind: str = "auto", max_memory: int | None = None) -> IndexPlan:
    """Which index to build for ``rows`` vectors of ``dim`` within ``max_memory`` bytes (None: no limit)."""
    if kind not in KINDS:
        raise InputError(f"--kind {kind}: choose one of {', '.join(KINDS)}")
    flat = IndexPlan("flat", "Flat", rows * dim * 4, "exact search")
    hnsw = IndexPlan("hnsw", f"HNSW{HNSW_M},Flat", rows * (dim * 4 + (2 * HNSW_M + 2) * 4 + 12),
                     f"graph of degree {HNSW_M} over the full vectors")
    ivf_pq = _ivf_pq_plan(rows, dim, max_memory)
    fits = lambda plan: plan is not None and (max_memory is None or plan.estimated_bytes <= max_memory)  # noqa: E731
    limit = f"--max-memory {human_bytes(max_memory)}" if max_memory is not None else ""
    if kind == "auto":
        if rows <= FLAT_MAX_ROWS and fits(flat):
            flat.reason = f"exact search: {rows:,} vectors (Flat up to {FLAT_MAX_ROWS:,})"
            return flat
        if rows <= HNSW_MAX_ROWS and fits(hnsw):
            hnsw.reason = (f"{rows:,} vectors: more than {FLAT_MAX_ROWS:,}, so approximate; " if rows > FLAT_MAX_ROWS
                           else f"Flat ({human_bytes(flat.estimated_bytes)}) exceeds {limit}; ") + hnsw.reason
            return hnsw
        if fits(ivf_pq):
            why = (f"{rows:,} vectors (HNSW up to {HNSW_MAX_ROWS:,})" if rows > HNSW_MAX_ROWS and fits(hnsw)
                   else f"HNSW ({human_bytes(hnsw.estimated_bytes)}) exceeds {limit}" if not fits(hnsw)
                   else f"{rows:,} vectors")
            ivf_pq.reason = f"{why}; {ivf_pq.reason}"
            return ivf_pq
        smallest = min((p for p in (flat, hnsw, ivf_pq) if p is not None), key=lambda p: p.estimated_bytes)
        raise InputError(f"{limit or 'memory'}: too small for any index of {rows:,} x {dim} vectors (the smallest, "
                         f"{smallest.factory}, needs about {human_bytes(smallest.estimated_bytes)})")
    plan = {"flat": flat, "hnsw": hnsw, "ivf-pq": ivf_pq}[kind]
    if plan is None:
        raise InputError(f"--kind ivf-pq: {rows} vectors are too few to train IVF-PQ (needs at least "
                         f"{39 * 16}); use --kind flat")
    if not fits(plan):
        raise InputError(f"--kind {kind}: needs about {human_bytes(plan.estimated_bytes)}, more than {limit}")
    return plan


def recall_at(approximate: np.ndarray, exact: np.ndarray, k: int = RECALL_AT,
              query_ids: np.ndarray | None = None) -> float:
    """Mean fraction of each query's exact top-k found in its approximate top-k.

    With ``query_ids`` (queries drawn from the indexed vectors) each query's own row is dropped
    from both lists first: finding itself is free and would flatter an approximate index, so
    search ``k + 1`` deep.
    """
    found = []
    for row, (a, e) in enumerate(zip(approximate.tolist(), exact.tolist())):
        if query_ids is not None:
            a = [i for i in a if i != query_ids[row]]
            e = [i for i in e if i != query_ids[row]]
        found.append(len(set(a[:k]) & set(e[:k])))
    return float(np.mean(found)) / k


class _RecallSample:
    """Queries held out of the index they measure, with their exact neighbours among its vectors
    (searched once, for every setting tried)."""

    def __init__(self, faiss, indexed: np.ndarray, queries: np.ndarray):
        self.queries = queries
        _, self.exact = faiss.knn(queries, indexed, RECALL_AT, metric=faiss.METRIC_INNER_PRODUCT)

    def recall(self, index) -> float:
        """recall@10 of ``index`` against exact search."""
        _, found = index.search(self.queries, RECALL_AT)
        return recall_at(found, self.exact)


def _nlist(plan: IndexPlan) -> int:
    return int(re.search(r"IVF(\d+)", plan.factory).group(1))


def training_rows(plan: IndexPlan, rows: int) -> int:
    """Vectors IVF-PQ's k-means trains on: the usual sample, or 39 a list where that is more (above ~4M rows)."""
    return min(rows, max(TRAIN_SAMPLE, 39 * _nlist(plan)))


def _parameter_ladder(plan: IndexPlan) -> list[str]:
    """Search settings from cheapest to most thorough."""
    if plan.kind == "hnsw":
        return [f"efSearch={ef}" for ef in EF_SEARCH_LADDER]
    if plan.kind == "ivf-pq":
        nlist = _nlist(plan)
        probes = [1 << i for i in range(int(math.log2(nlist)) + 1)]
        factors = K_FACTOR_LADDER if "Refine" in plan.factory else (None,)
        return [f"nprobe={p}" + (f",k_factor_rf={f}" if f else "") for p in probes for f in factors]
    return [""]


@dataclass
class IndexReport:
    path: str
    features: str
    kind: str
    factory: str
    search_parameters: str
    recall_at_10: float
    recall_sample: int
    target_recall: float
    target_reached: bool  # by the recall reported; else the best setting found is kept
    estimated_bytes: int
    reason: str
    rows: int
    dim: int
    seconds: float

    def as_json(self) -> dict:
        """The fields as the sidecar and ``index --json`` write them: recall@10 named as search --eval
        names it, seconds rounded as knn rounds them."""
        fields = asdict(self)
        fields["recall@10"] = fields.pop("recall_at_10")
        fields["seconds"] = round(self.seconds, 3)
        return fields


def sidecar_path(index_path: Path) -> Path:
    return index_path.with_name(index_path.name + ".json")


def _is_description(path: Path) -> bool:
    """Whether ``path`` is the sidecar of an index beside it (the index's name plus .json)."""
    if not (path.name.endswith(".json") and path.is_file() and path.with_name(path.name[:-len(".json")]).is_file()):
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == SIDECAR_FORMAT
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not an object
        return False


def build_index(features_path: str | os.PathLike, out: str | os.PathLike, kind: str = "auto",
                max_memory: int | str | None = None, target_recall: float = 0.95, recall_sample: int = 1000,
                seed: int = 0, on_event: Callable[[str], None] | None = None, overwrite: bool = False) -> IndexReport:
    """Build, tune and write an index over the feature file ``features_path`` (see the module docstring).

    Written atomically: both files under temporary names, then renamed, the sidecar last (:func:`_write_pair`).
    Existing ones are replaced only with ``overwrite``, and never the feature file itself.
    """
    out = Path(out)
    if _is_description(out):  # --overwrite would turn that index's description into an index
        raise InputError(f"--out {out}: is the description of the index {out.with_name(out.name[:-len('.json')])}; "
                         "give the index its own name")
    for path in (out, sidecar_path(out)):  # before any work
        check_output(path, "--out", overwrite, inputs=[features_path])
    faiss = import_faiss("simsiam index", "")  # an index is faiss's: no other backend builds one
    say = on_event or (lambda message: None)
    out = Path(out)
    if not 0 < target_recall <= 1:
        raise InputError(f"--target-recall {target_recall}: must be in (0, 1]")
    check_seed(seed)
    recall_sample = check_whole("--recall-sample", recall_sample)  # an int: it goes into the JSON sidecar
    if recall_sample < 1:
        raise InputError(f"--recall-sample {recall_sample}: must be at least 1")
    if isinstance(max_memory, str):  # "8G", as --max-memory takes it
        max_memory = parse_memory(max_memory)
    elif max_memory is not None:
        max_memory = check_whole("--max-memory", max_memory)
    start = time.perf_counter()
    feature_set: FeatureSet = read_features(features_path)
    check_usable(feature_set, "FEATURES")
    rows, dim = len(feature_set), feature_set.dim
    if rows <= RECALL_AT:
        raise InputError(f"{features_path}: {rows} vectors; an index needs at least {RECALL_AT + 1}")
    plan = plan_index(rows, dim, kind, max_memory)
    attrs = feature_set.attrs
    stored = feature_set.features
    rows_digest = rows_fingerprint(feature_set.paths, stored.__getitem__)
    vectors = normalized_float32(stored)
    del feature_set, stored  # the float32 copy is all that is needed from here on

    say(f"building {plan.factory} over {rows:,} x {dim} vectors: {plan.reason}")
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "hnsw":
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = vectors[np.sort(rng.choice(rows, training_rows(plan, rows), replace=False))]
        index.train(sample)
        del sample  # up to 262,144 rows: 2 GB of 2048-d vectors

    space = faiss.ParameterSpace()
    if plan.kind == "flat":  # exact by definition: nothing to tune, no recall to measure
        chosen, recall, per_sample = "", 1.0, 0
        index.add(vectors)
    else:
        chosen, recall, per_sample, index = _tune(faiss, space, index, plan, vectors, target_recall, recall_sample,
                                                  seed, say)
    if chosen:
        space.set_index_parameters(index, chosen)

    report = IndexReport(str(out), str(Path(features_path)), plan.kind, plan.factory, chosen, recall, per_sample,
                         target_recall, recall >= target_recall, plan.estimated_bytes, plan.reason, rows, dim, time.perf_counter() - start)
    sidecar = {"format": SIDECAR_FORMAT, **report.as_json(),
               "features": os.path.relpath(Path(features_path).resolve(), out.resolve().parent),
               "features_absolute": str(Path(features_path).resolve()),
               "layer": attrs.get("layer"), "arch": attrs.get("arch"),
               "checkpoint_sha256": attrs.get("checkpoint_sha256"), "rows_sha256": rows_digest,
               "metric": "cosine (inner product of L2-normalised vectors)"}
    del sidecar["path"]
    _write_pair(faiss, index, out, json.dumps(sidecar, indent=2) + "\n", overwrite)
    return report


def _tune(faiss, space, index, plan: IndexPlan, vectors: np.ndarray, target_recall: float, recall_sample: int,
          seed: int, say) -> tuple[str, float, int, object]:
    """``(search setting, recall@10, queries, index of every vector)``: the cheapest setting of the
    ladder that reaches ``target_recall`` (else the best), the recall it gives new queries, and
    ``index`` (trained, empty) filled with ``vectors``.

    Two disjoint samples are held out of a trial index of the other vectors: one picks the setting,
    the other measures the recall reported, so the number is not tuned on the queries that report
    it, and holds for new queries: an indexed vector as its own query is found more easily (an HNSW
    index tuned so reported 0.989, and gave 0.940 to held-out queries). The held-out rows are
    swapped to the end of ``vectors`` for the trial (the rest is a view, not a copy of every vector)
    and swapped back before the index is filled. An HNSW trial is completed with the held-out vectors
    and its entries put in the rows' order: its graph, the costly part of the build, is built once.
    """
    rows = len(vectors)
    rng = np.random.default_rng(seed + 1)
    per_sample = max(1, min(recall_sample, (rows - RECALL_AT) // 2))
    sampled = rng.choice(rows, 2 * per_sample, replace=False)
    kept = rows - len(sampled)
    held = np.zeros(rows, dtype=bool)
    held[sampled] = True
    outside, inside = np.flatnonzero(held[:kept]), np.flatnonzero(~held[kept:]) + kept
    position = np.arange(rows)  # where each sampled row lies while swapped
    position[outside], position[inside] = inside, outside
    swap = np.concatenate([outside, inside]), np.concatenate([inside, outside])
    vectors[swap[0]] = vectors[swap[1]]
    try:
        indexed = vectors[:kept]
        say(f"measuring recall@{RECALL_AT} against exact search: {per_sample:,} held-out vectors as queries to "
            f"tune, {per_sample:,} others to report, on an index of the remaining {kept:,}")
        trial = faiss.clone_index(index)  # trained, empty: the index as it will be, less the queries
        trial.add(indexed)
        chosen, best = "", -1.0
        tuning = _RecallSample(faiss, indexed, vectors[position[np.sort(sampled[:per_sample])]])
        for parameters in _parameter_ladder(plan):
            if parameters:
                space.set_index_parameters(trial, parameters)
            measured = tuning.recall(trial)
            if measured > best:
                chosen, best = parameters, measured
            if measured >= target_recall:
                chosen = parameters
                break
        if chosen:
            space.set_index_parameters(trial, chosen)
        recall = _RecallSample(faiss, indexed, vectors[position[np.sort(sampled[per_sample:])]]).recall(trial)
        if plan.kind == "hnsw":
            trial.add(vectors[kept:])  # the held-out rows, as they lie swapped
            holds = np.arange(rows)  # the row each entry holds
            holds[swap[0]] = swap[1]
            trial.permute_entries(np.argsort(holds))  # entry r takes the old entry holding row r
            filled = trial
        else:  # an IVF index fills cheaply (its training is the costly part): anew, in the rows' order
            del trial  # before the index of every vector: one index in memory at a time
            filled = None
    finally:
        vectors[swap[0]] = vectors[swap[1]]  # the same swaps undo themselves
    if filled is None:
        index.add(vectors)
        filled = index
    return chosen, recall, per_sample, filled


@contextmanager
def _renames_alone(folder: Path):
    """Hold an ``flock`` on ``folder`` (its directory, no lock file) for the pair's renames: two builds
    to the same --out at once interleaved them, and could leave one's index beside the other's
    sidecar, which search believed (the same row count)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_pair(faiss, index, out: Path, description: str, overwrite: bool = True) -> None:
    """Write the index and its sidecar (``description``) under temporary names, then rename both into place.

    A failure while writing (a full disk) removes the temporaries and leaves an existing pair untouched.
    The renames come last, one build's at a time: the old sidecar is removed (with ``overwrite``;
    without it, an index another build wrote meanwhile refuses this one's, its pair left whole), the
    index renamed, the sidecar renamed. An
    interruption between them leaves an index without a sidecar, which load_index refuses ("no OUT.json
    beside it"); the other orders could leave an index beside the other one's sidecar, which its checks
    miss when both hold as many rows.
    """
    sidecar = sidecar_path(out)
    temporaries = []
    try:
        temporaries.append(new_temporary(out))
        faiss.write_index(index, str(temporaries[0]))
        temporaries.append(new_temporary(sidecar))
        temporaries[1].write_text(description)
        for tmp in temporaries:  # on disk before the renames: a crash after them leaves whole files
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        with _renames_alone(out.parent):
            if overwrite:
                sidecar.unlink(missing_ok=True)
            settle_temporary(temporaries[0], out, overwrite)  # without --overwrite: not over another build's
            settle_temporary(temporaries[1], sidecar)
    except BaseException as err:
        for tmp in reversed(temporaries):  # the sidecar's first: the index's made the folders
            discard_temporary(tmp)
        reason = err.strerror if isinstance(err, OSError) else _faiss_os_reason(err)
        if reason:
            raise InputError(f"--out {out}: {reason}") from None
        raise


def _faiss_os_reason(err: BaseException) -> str | None:
    """The operating system's reason in faiss's I/O errors, e.g. RuntimeError("... write error in X: 10 !=
    20 (No space left on device)") or ("... could not open X for writing: Permission denied")."""
    if not isinstance(err, RuntimeError):
        return None
    match = re.search(r"write error in .*\((.+)\)\s*$|for writing: (.+)$", str(err).strip())
    return (match.group(1) or match.group(2)).strip() if match else None


@dataclass
class LoadedIndex:
    index: object  # a faiss.Index, search parameters applied
    meta: dict  # the sidecar
    features_path: Path


def load_index(path: str | os.PathLike) -> LoadedIndex:
    """An index written by :func:`build_index`, with its tuned search parameters and its feature file."""
    faiss = import_faiss(f"{path}", "or search the feature file it was built from (.h5) with --backend torch")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {NOT_A_REGULAR_FILE if path.exists() else 'no such index file'}")
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        raise InputError(f"{path}: no {sidecar.name} beside it (simsiam index writes it; it names the feature file "
                         "the index rows belong to)")
    try:
        meta = json.loads(sidecar.read_text())
        # a hand-edited or foreign sidecar: every field read below is checked for its type here
        if (not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT
                or not isinstance(meta.get("features"), str) or not isinstance(meta.get("rows"), int)
                or not isinstance(meta.get("search_parameters", ""), str)
                or not isinstance(meta.get("features_absolute", ""), str)):
            raise ValueError
    except ValueError:  # UnicodeDecodeError and JSONDecodeError among them
        raise InputError(f"{sidecar}: not an index description written by simsiam index") from None
    try:
        index = faiss.read_index(str(path))
    except RuntimeError:
        raise InputError(f"{path}: not a FAISS index file") from None
    # another index beside this one's description (copied, swapped): its vectors would be searched as
    # if they were the feature file's, or its settings fail inside FAISS
    if index.ntotal != meta.get("rows"):
        raise InputError(f"{path}: holds {index.ntotal} vectors but {sidecar.name} says {meta.get('rows')}")
    if index.d != meta.get("dim") or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise InputError(f"{path}: not the index {sidecar.name} describes (vectors of {index.d} dimensions by "
                         f"{'inner product' if index.metric_type == faiss.METRIC_INNER_PRODUCT else 'another metric'}; "
                         f"it says {meta.get('dim')} by inner product)")
    if meta.get("search_parameters"):
        try:
            faiss.ParameterSpace().set_index_parameters(index, meta["search_parameters"])
        except RuntimeError:  # FAISS: "could not set parameter efSearch" on an index of another kind
            raise InputError(f"{path}: not the index {sidecar.name} describes (its search settings "
                             f"{meta['search_parameters']} do not apply to it)") from None
    # relative to the index's real folder (as the build wrote it): "../h5/x.h5" joined to a resolved
    # folder and normalised names the same file, and reads as a path, not as idx/../h5/x.h5
    features = Path(os.path.normpath(path.resolve().parent / meta["features"]))
    if not features.is_file() and Path(meta.get("features_absolute", "")).is_file():
        features = Path(meta["features_absolute"])
    return LoadedIndex(index, meta, features)
