"""Exact k-nearest-neighbour search by cosine similarity: FAISS (GPU or CPU) or chunked torch.

Both compute, for every query, the k database rows of largest inner product after L2
normalisation, best first, so they agree up to ties and float rounding.

- ``faiss``: exhaustive inner-product search. On GPU (``faiss.knn_gpu`` on one GPU, a flat index
  sharded over all GPUs with ``index_cpu_to_all_gpus`` when there are several) when
  ``faiss.get_num_gpus() > 0``, else ``faiss.knn`` on the CPU. A faiss GPU call in a build or on
  a machine without a GPU aborts the process, so the count is always checked first.
- ``torch``: ``queries @ database.T`` a chunk of queries at a time, then ``topk``, on any
  device; memory is bounded by ``chunk_size x N`` similarities (N: the rows of a block, below).

Both normalise and search the database a block of rows at a time, the best neighbours of each
block merged with those so far: a search holds one float32 block, not a copy of every row.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch

from simsiam.errors import InputError

BACKENDS = ("auto", "faiss", "torch")
DEVICES = ("auto", "cpu", "cuda")
# similarities per chunk when --chunk-size is not given: small on CPU (cache, RAM), large enough
# on a GPU for the matrix product to fill it (a block of 65,536 rows of 2048-d: 8,192 queries a chunk)
CHUNK_BYTES = {"cpu": 1 << 28, "cuda": 1 << 31}
FAISS_GPU_MAX_K = 2048  # faiss's GPU k-selection stops there (GPU_MAX_SELECTION_K); the CPU has no limit
FAISS_MISSING = "faiss is not installed: pip install 'simsiam[cpu]' (faiss-cpu) or 'simsiam[gpu]' (faiss-gpu)"


@dataclass
class Neighbours:
    scores: np.ndarray  # [Q, k] float32 cosine similarities, best first
    indices: np.ndarray  # [Q, k] int64 database rows
    backend: str  # what ran: "faiss-gpu", "faiss-gpu-sharded", "faiss-cpu", "torch-cuda", "torch-cpu"


def import_faiss(needed_by: str = "--backend faiss", otherwise: str = "or use --backend torch"):
    """The faiss module, or an InputError naming the install extra; ``needed_by`` what asked for
    faiss, ``otherwise`` what else the user can do (nothing where it is empty)."""
    try:
        import faiss
    except ImportError:
        raise InputError(f"{needed_by}: {FAISS_MISSING}" + (f", {otherwise}" if otherwise else "")) from None
    return faiss


def faiss_gpu_count(faiss) -> int:
    """GPUs faiss can use: 0 for faiss-cpu builds, which have no GPU functions at all."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None and hasattr(faiss, "StandardGpuResources") else 0


def faiss_placement(gpus: int, device: str) -> str:
    """Where a faiss search runs: ``cpu``, ``gpu`` (one) or ``gpu-sharded`` (the database split over all)."""
    if device == "cpu" or gpus == 0:
        if device == "cuda":
            raise InputError("--backend faiss --device cuda: this faiss has no GPU support (faiss-cpu, or no GPU "
                             "visible); install the [gpu] extra (pip install 'simsiam[gpu]') on a GPU machine, "
                             "or use --backend torch --device cuda")
        return "cpu"
    return "gpu" if gpus == 1 else "gpu-sharded"


def resolve_search(backend: str, device: str, k: int | None = None) -> tuple[str, str]:
    """``(backend, device)`` to run ``k`` neighbours a query; ``auto`` picks the fastest available.

    On a GPU machine that is faiss on GPU when faiss has GPU support (its k-selection runs fused
    on the tiles of the product, nothing [chunk, N] is materialised), else torch on CUDA. On CPU
    it is faiss when installed: both are bound by the same float32 matrix product, and
    ``faiss.knn`` (BLAS blocks, a heap per query) beat torch's chunked ``topk`` by 3-13% in each
    of three runs at 100,000 x 10,000 x 512 (benchmarks/RESULTS.md); torch otherwise. faiss on GPU
    finds at most 2048 neighbours: beyond that ``auto`` runs torch on the GPU.
    """
    if backend not in BACKENDS:
        raise InputError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise InputError(f"--device {device}: choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available() and backend != "faiss":
        raise InputError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu, or install a CUDA "
                         "build of torch (and the [gpu] extra for faiss-gpu) on a GPU machine")
    if backend == "faiss":
        faiss = import_faiss()
        placement = faiss_placement(faiss_gpu_count(faiss), device)
        if placement != "cpu" and k is not None and k > FAISS_GPU_MAX_K:
            raise InputError(f"-k {k}: faiss on GPU finds at most {FAISS_GPU_MAX_K} neighbours; use --backend torch "
                             "(or auto), or --device cpu")
        return "faiss", "cpu" if placement == "cpu" else "cuda"
    use_gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if backend == "auto":
        try:
            faiss = import_faiss()
        except InputError:
            faiss = None
        if faiss is not None and use_gpu and faiss_gpu_count(faiss) > 0 and (k is None or k <= FAISS_GPU_MAX_K):
            return "faiss", "cuda"
        if faiss is not None and not use_gpu:
            return "faiss", "cpu"
    return "torch", "cuda" if use_gpu else "cpu"


def auto_chunk_size(rows: int, device: str = "cpu") -> int:
    return int(max(1, min(8192, CHUNK_BYTES[device] // max(1, 4 * rows))))


def as_tensor(x) -> torch.Tensor:
    """A tensor where it is (a GPU tensor stays there; one that carries gradients, a model's output
    outside ``torch.no_grad``, detached), or a zero-copy view of an array."""
    return x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def as_array(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of float ``x`` scaled to length 1, in place. Each row is first divided by its largest
    magnitude: the squares of values beyond 1.8e19 overflow float32 (and of values below 1e-19
    vanish), so that a plain norm gives rows of 0 or of no fixed length and a wrong kNN."""
    # max and -min rather than abs().amax(): no temporary the size of x (10 GB for ImageNet's features)
    largest = torch.maximum(x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True).neg())
    x /= largest.clamp(min=torch.finfo(x.dtype).tiny)
    return x.div_(torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp(min=1e-12))


def normalized_float32(x) -> np.ndarray:
    """L2-normalised float32 copy (float16 files are upcast first: their squares would overflow)."""
    return unit_rows(torch.from_numpy(np.array(as_array(x), dtype=np.float32, copy=True))).numpy()


# float32 values of the database normalised at a time (512 MB): a search holds one block of it, not
# a float32 copy of every row beside the file's float16 ones (10 GB more for ImageNet's 1.28M x 2048)
DATABASE_BLOCK_VALUES = 1 << 27


def _database_blocks(database, device: torch.device):
    """``(first row, block)`` over the database: its rows L2-normalised, float32, on ``device``."""
    source = as_tensor(database)
    step = max(1, DATABASE_BLOCK_VALUES // max(1, source.shape[1]))
    for start in range(0, source.shape[0], step):
        yield start, unit_rows(source[start:start + step].to(device, torch.float32, copy=True))


def _keep_best(best, scores: torch.Tensor, indices: torch.Tensor, k: int):
    """The k best of the neighbours found so far and those of the next block ([queries, k] each)."""
    if best is not None:
        scores, indices = torch.cat([best[0], scores], dim=1), torch.cat([best[1], indices], dim=1)
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    return top.values, indices.gather(1, top.indices)


def torch_search(database, queries, k: int, device: str = "cpu", chunk_size: int | None = None) -> Neighbours:
    """Exact top-k cosine similarity by chunked matrix products on ``device``, a block of the
    database at a time (each block's best merged with the best so far)."""
    dev = torch.device(device)
    queries = as_tensor(queries)
    best = None
    for first, base in _database_blocks(database, dev):
        chunk = chunk_size or auto_chunk_size(base.shape[0], dev.type)
        scores, indices = [], []
        for start in range(0, queries.shape[0], chunk):
            q = unit_rows(queries[start:start + chunk].to(dev, torch.float32, copy=True))
            top = (q @ base.T).topk(min(k, base.shape[0]), dim=1)
            scores.append(top.values.cpu())
            indices.append(top.indices.cpu() + first)
        best = _keep_best(best, torch.cat(scores), torch.cat(indices), k)
        del base  # before the next block is made: one block at a time
    return Neighbours(best[0].numpy(), best[1].numpy(), f"torch-{dev.type}")


def faiss_search(database, queries, k: int, device: str = "auto") -> Neighbours:
    """Exact top-k inner product of L2-normalised vectors with faiss, on the GPU when faiss has GPUs,
    a block of the database at a time as :func:`torch_search` (faiss's own ``knn_ground_truth`` runs
    so: on the GPU, one block's index is emptied and filled with the next)."""
    faiss = import_faiss()
    placement = faiss_placement(faiss_gpu_count(faiss), device)
    q = normalized_float32(queries)
    if placement == "cpu":
        def block_search(base, k):
            return faiss.knn(q, base, k, metric=faiss.METRIC_INNER_PRODUCT)
    elif placement == "gpu":
        resources = faiss.StandardGpuResources()

        def block_search(base, k):
            return faiss.knn_gpu(resources, q, base, k, metric=faiss.METRIC_INNER_PRODUCT)
    else:  # gpu-sharded
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True  # each GPU holds 1/n of a block; results are merged
        index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(q.shape[1]), co=options)

        def block_search(base, k):
            index.reset()  # the shards number the rows they are given from 0 in one add
            index.add(base)
            return index.search(q, k)
    best = None
    for first, base in _database_blocks(database, torch.device("cpu")):
        scores, indices = block_search(base.numpy(), min(k, base.shape[0]))
        best = _keep_best(best, torch.from_numpy(np.asarray(scores, np.float32)),
                          torch.from_numpy(np.asarray(indices, np.int64)) + first, k)
        del base  # before the next block is made: one block at a time
    return Neighbours(best[0].numpy(), best[1].numpy(), f"faiss-{placement}")


def check_whole(name: str, value) -> int:
    """``value`` as an int: a numpy integer (faiss's SWIG calls take no other), not a float or a string."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} {value!r}: must be a whole number")
    return int(value)


def check_neighbour_count(k, rows: int) -> int:
    """``k`` neighbours of ``rows``, as an int."""
    k = check_whole("-k", k)
    if not 1 <= k <= rows:
        raise InputError(f"-k {k}: must be from 1 to the {rows} database rows")
    return k


def check_matrices(database, queries) -> None:
    """Two [rows, dim] matrices of the same dim (arrays or tensors)."""
    shapes = [tuple(getattr(x, "shape", ())) for x in (database, queries)]
    if len(shapes[0]) != 2 or len(shapes[1]) != 2 or shapes[0][1] != shapes[1][1]:
        raise InputError(f"features of shapes {shapes[0]} and {shapes[1]}: expected [rows, dim] matrices of the same dim")


def search(database, queries, k: int, backend: str = "auto", device: str = "auto",
           chunk_size: int | None = None) -> Neighbours:
    """The k most cosine-similar database rows of every query, best first."""
    check_matrices(database, queries)
    k = check_neighbour_count(k, len(database))
    if chunk_size is not None and check_whole("--chunk-size", chunk_size) < 1:
        raise InputError(f"--chunk-size {chunk_size}: must be at least 1")
    backend, device = resolve_search(backend, device, k)
    if backend == "faiss":
        return faiss_search(database, queries, k, device)
    return torch_search(database, queries, k, device, chunk_size)
