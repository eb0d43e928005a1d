"""Weighted kNN (DINO's protocol) against a plain numpy implementation, for every backend."""

import numpy as np
import pytest
import torch

from retrieval.knn import weighted_knn
from retrieval.neighbours import faiss_placement, resolve_search, search
from simsiam.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")
try:
    import faiss
except ImportError:  # benchmarks/gpu_suite.sh's GPU machine has none: the torch backend's tests still run there
    faiss = None
needs_faiss = pytest.mark.skipif(faiss is None, reason="needs faiss (pip install -e '.[cpu]')")
BACKENDS = [pytest.param("faiss", marks=needs_faiss), "torch"]


def clustered(n: int, centres: np.ndarray, rng: np.random.Generator, noise: float = 1.6):
    """Features around one centre per class, noisy enough that kNN makes mistakes."""
    labels = rng.integers(0, len(centres), n)
    return (centres[labels] + noise * rng.normal(size=(n, centres.shape[1]))).astype(np.float32), labels


def numpy_knn(train, train_labels, val, k, temperature, classes):
    """The protocol written out: normalise, cosine, top-k, exp(sim / T) votes, stable ranking."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    val = val / np.linalg.norm(val, axis=1, keepdims=True)
    sims = val.astype(np.float64) @ train.astype(np.float64).T
    nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    scores = np.zeros((len(val), classes))
    for row, (idx, sim) in enumerate(zip(nearest, np.take_along_axis(sims, nearest, 1))):
        np.add.at(scores[row], train_labels[idx], np.exp(sim / temperature))
    return np.argsort(-scores, axis=1, kind="stable")[:, :min(5, k)]  # DINO: top-5 of k < 5 is top-k


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 32))
    return (*clustered(1500, centres, rng), *clustered(300, centres, rng))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_matches_the_numpy_protocol(data, backend):
    train, train_labels, val, val_labels = data
    for temperature in (0.02, 0.07, 0.5):
        results = weighted_knn(train, train_labels, val, val_labels, ks=(1, 5, 20, 100), temperature=temperature,
                               num_classes=10, backend=backend, chunk_size=128)
        for result in results:
            expected = numpy_knn(train, train_labels, val, result.k, temperature, 10)
            np.testing.assert_array_equal(result.predictions, expected, err_msg=f"k={result.k} T={temperature}")
            # exactly: one division of counts (a float32 mean printed 150/500 as 0.30000001192092896)
            assert result.top1 == (expected[:, 0] == val_labels).mean()
            assert result.top5 == (expected == val_labels[:, None]).any(1).mean()
    # a real task, not a degenerate one: some right, some wrong
    assert 0.3 < results[2].top1 < 0.99
    # one neighbour votes for one class: its top-5 is its top-1, as in DINO (not padded with unvoted classes)
    assert results[0].predictions.shape == (len(val), 1) and results[0].top5 == results[0].top1 < results[1].top5


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_small_temperature_votes_like_the_nearest_neighbour_without_overflow(data, backend):
    # exp(sim / T) is infinite in float32 for T below ~0.012: every vote would tie at inf
    train, train_labels, val, val_labels = data
    nearest = numpy_knn(train, train_labels, val, 1, 1.0, 10)[:, 0]
    for temperature in (1e-3, 1e-6):
        [result] = weighted_knn(train, train_labels, val, val_labels, ks=(20,), temperature=temperature,
                                num_classes=10, backend=backend)
        np.testing.assert_array_equal(result.predictions[:, 0], nearest)


@needs_faiss
def test_tensors_are_taken_as_they_are(data):
    train, train_labels, val, val_labels = data
    arrays = weighted_knn(train, train_labels, val, val_labels, ks=(10,), backend="torch")
    for backend in ("torch", "faiss"):
        tensors = weighted_knn(torch.from_numpy(train), torch.from_numpy(train_labels), torch.from_numpy(val),
                               torch.from_numpy(val_labels), ks=(10,), backend=backend)
        np.testing.assert_array_equal(tensors[0].predictions, arrays[0].predictions)


@needs_faiss
def test_backends_find_the_same_neighbours_from_float16_features(data):
    train, _, val, _ = data
    a = search(train.astype(np.float16), val.astype(np.float16), 10, "faiss", "cpu")
    b = search(train.astype(np.float16), val.astype(np.float16), 10, "torch", "cpu", chunk_size=64)
    assert a.backend == "faiss-cpu" and b.backend == "torch-cpu"
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_database_is_searched_a_block_at_a_time_with_the_same_neighbours(data, backend, monkeypatch):
    """A float32 copy of every database row beside the file's float16 ones took 10 GB more for
    ImageNet's features; a block at a time finds the same neighbours, blocks smaller than k included."""
    import retrieval.neighbours as neighbours

    train, _, val, _ = data
    whole = search(train.astype(np.float16), val, 100, backend, "cpu")
    normalised = []
    unit_rows = neighbours.unit_rows
    monkeypatch.setattr(neighbours, "unit_rows", lambda x: normalised.append(x.shape[0]) or unit_rows(x))
    monkeypatch.setattr(neighbours, "DATABASE_BLOCK_VALUES", 70 * train.shape[1])  # 70 rows: fewer than k
    blocks = search(train.astype(np.float16), val, 100, backend, "cpu")
    # the database 70 rows at a time (1500 = 21 x 70 + 30), the 300 queries whole
    assert normalised.count(70) == 21 and normalised.count(30) == 1 and set(normalised) == {70, 30, len(val)}
    np.testing.assert_array_equal(blocks.indices, whole.indices)
    np.testing.assert_allclose(blocks.scores, whole.scores, atol=1e-6)


@needs_faiss
def test_auto_picks_faiss_on_cpu_and_torch_without_faiss(monkeypatch):
    assert resolve_search("auto", "cpu") == ("faiss", "cpu")
    assert resolve_search("faiss", "auto") == ("faiss", "cpu")  # faiss-cpu reports no GPU
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)
    assert resolve_search("auto", "cpu") == ("torch", "cpu")


@needs_faiss
def test_more_neighbours_than_faiss_finds_on_gpu_go_to_torch_or_are_refused(monkeypatch):
    """faiss-gpu's k-selection stops at 2048 (a RuntimeError traceback from inside faiss beyond)."""
    import retrieval.neighbours as neighbours

    monkeypatch.setattr(neighbours, "faiss_gpu_count", lambda faiss: 1)  # a GPU build on a GPU machine, as seen here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_search("auto", "auto", k=2048) == ("faiss", "cuda")
    assert resolve_search("auto", "auto", k=2049) == ("torch", "cuda")
    assert resolve_search("faiss", "cpu", k=4096) == ("faiss", "cpu")
    with pytest.raises(InputError, match="-k 4096: faiss on GPU finds at most 2048 neighbours"):
        resolve_search("faiss", "cuda", k=4096)


def test_faiss_runs_on_gpu_only_when_it_reports_gpus():
    # faiss-cpu reports none: the search must never reach a GPU call (it would abort the process)
    assert faiss_placement(0, "auto") == "cpu"
    assert faiss_placement(1, "auto") == "gpu"
    assert faiss_placement(4, "cuda") == "gpu-sharded"
    assert faiss_placement(4, "cpu") == "cpu"


@needs_faiss
@pytest.mark.parametrize("gpus", [1, 2])
def test_faiss_on_gpus_searches_the_database_a_block_at_a_time(data, monkeypatch, gpus):
    """faiss-gpu's calls, played here by faiss-cpu's: knn_gpu on one GPU, a sharded index emptied and
    filled again on several. A float32 copy of the whole database was made first (10 GB for ImageNet)."""
    import types

    import retrieval.neighbours as neighbours

    train, _, val, _ = data
    expected = search(train.astype(np.float16), val, 100, "torch", "cpu")
    rows = []

    def knn_gpu(resources, q, base, k, metric):
        rows.append(len(base))
        return faiss.knn(q, base, k, metric=metric)

    class ShardedIndex(faiss.IndexFlatIP):
        def add(self, base):
            assert self.ntotal == 0  # faiss's shards with successive ids take one add
            rows.append(len(base))
            super().add(base)

    monkeypatch.setattr(neighbours, "faiss_gpu_count", lambda faiss: gpus)
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "knn_gpu", knn_gpu, raising=False)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", types.SimpleNamespace, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index, co: co.shard and ShardedIndex(index.d),
                        raising=False)
    monkeypatch.setattr(neighbours, "DATABASE_BLOCK_VALUES", 70 * train.shape[1])  # 70 rows: fewer than k
    found = search(train.astype(np.float16), val, 100, "faiss", "cuda")
    assert found.backend == ("faiss-gpu" if gpus == 1 else "faiss-gpu-sharded")
    assert rows == [70] * 21 + [30]  # 1500 rows
    np.testing.assert_array_equal(found.indices, expected.indices)
    np.testing.assert_allclose(found.scores, expected.scores, atol=1e-5)
    assert found.scores.dtype == np.float32 and found.indices.dtype == np.int64


@pytest.mark.cuda(reason="the CPU tests above cover the protocol")
def test_torch_on_cuda_matches_the_cpu_backend(data):
    train, train_labels, val, val_labels = data
    cpu = weighted_knn(train, train_labels, val, val_labels, ks=(20,), backend="torch", device="cpu")
    gpu = weighted_knn(train, train_labels, val, val_labels, ks=(20,), backend="torch", device="cuda")
    np.testing.assert_array_equal(gpu[0].predictions, cpu[0].predictions)
    on_gpu = [torch.from_numpy(x).cuda() for x in (train, train_labels, val, val_labels)]
    gpu = weighted_knn(*on_gpu, ks=(20,), backend="torch", device="cuda")  # GPU tensors stay on the GPU
    np.testing.assert_array_equal(gpu[0].predictions, cpu[0].predictions)


@needs_faiss
@pytest.mark.skipif(getattr(faiss, "get_num_gpus", lambda: 0)() == 0,
                    reason="needs faiss-gpu and a GPU (faiss-cpu is installed here); test_faiss_runs_on_gpu_only_when_"
                           "it_reports_gpus covers the choice on CPU")
def test_faiss_gpu_matches_the_cpu_backends(data):
    train, train_labels, val, val_labels = data
    cpu = weighted_knn(train, train_labels, val, val_labels, ks=(20,), backend="faiss", device="cpu")
    gpu = weighted_knn(train, train_labels, val, val_labels, ks=(20,), backend="faiss", device="cuda")
    np.testing.assert_array_equal(gpu[0].predictions, cpu[0].predictions)
    assert search(train, val, 5, "faiss", "cuda").backend.startswith("faiss-gpu")


def test_ks_are_one_k_or_several_distinct_and_increasing(data):
    from retrieval.knn import check_ks
    from simsiam.errors import InputError

    assert check_ks(5) == [5] and check_ks((20, 1, 20)) == [1, 20]
    for bad in ((), (0, 5), -1):
        with pytest.raises(InputError, match="-k .*: k must be at least 1"):
            check_ks(bad)
    for bad in (2.7, (5, 20.0)):
        with pytest.raises(InputError, match="k must be a whole number"):
            check_ks(bad)
    assert check_ks(np.int64(3)) == [3]
    train, train_labels, val, val_labels = data
    assert [r.k for r in weighted_knn(train, train_labels, val, val_labels, ks=(20, 1, 20))] == [1, 20]


def test_array_inputs_that_cannot_be_voted_on_are_named_errors(data):
    from simsiam.errors import InputError

    train, train_labels, val, val_labels = data
    cases = [((train, train_labels, val[:, :5], val_labels), "expected .rows, dim. matrices of the same dim"),
             ((train, train_labels[:-1], val, val_labels), "train: 1500 feature rows and labels of shape .1499,."),
             ((train, train_labels, val[:0], val_labels[:0]), "at least one row"),
             ((train, np.where(train_labels == 3, -1, train_labels), val, val_labels), "every image labelled")]
    for args, message in cases:
        with pytest.raises(InputError, match=message):
            weighted_knn(*args, ks=(5,), backend="torch")
    with pytest.raises(InputError, match="--device gpu: not a torch device"):
        weighted_knn(train, train_labels, val, val_labels, device="gpu")
    with pytest.raises(InputError, match="-k 0: must be from 1"):
        search(train, val, 0, "torch", "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_library_calls_take_what_a_notebook_has_at_hand(data, backend):
    """A model's output that still carries gradients (Can't call numpy() on Tensor that requires
    grad), a numpy integer k (faiss's SWIG calls refused it), ks as an iterator (used up by the check)."""
    train, train_labels, val, val_labels = data
    expected = weighted_knn(train, train_labels, val, val_labels, ks=(5, 20), backend=backend)
    net = torch.nn.Linear(train.shape[1], train.shape[1])
    with torch.no_grad():
        net.weight.copy_(torch.eye(train.shape[1]))
        net.bias.zero_()
    outputs = [net(torch.from_numpy(x).float()) for x in (train, val)]
    assert outputs[0].requires_grad
    found = weighted_knn(outputs[0], train_labels, outputs[1], val_labels, ks=iter([5, 20]), backend=backend)
    for a, b in zip(found, expected):
        assert (a.k, a.top1, a.top5) == (b.k, b.top1, b.top5)
    by_int, by_numpy = search(train, val, 7, backend), search(train, val, np.int64(7), backend)
    np.testing.assert_array_equal(by_numpy.indices, by_int.indices)


def test_library_calls_refuse_what_they_cannot_use_in_one_line(data):
    train, train_labels, val, val_labels = data
    for k in (3.0, "3", True):
        with pytest.raises(InputError, match="-k .*: must be a whole number"):
            search(train, val, k)
    with pytest.raises(InputError, match="--chunk-size -1: must be at least 1"):
        search(train, val, 3, "torch", chunk_size=-1)
    with pytest.raises(InputError, match=r"features of shapes \(1500,\) and \(300, 32\): expected \[rows, dim\]"):
        weighted_knn(train[:, 0], train_labels, val, val_labels)  # was an IndexError
    with pytest.raises(InputError, match="--temperature 0.07: must be a positive finite number"):
        weighted_knn(train, train_labels, val, val_labels, temperature="0.07")
    # a validation label past the classes counted as a miss, unseen
    wrong = val_labels.copy()
    wrong[0] = 10
    with pytest.raises(InputError, match="labels from 0 to 10: expected class indices from 0 to 9"):
        weighted_knn(train, train_labels, val, wrong, num_classes=10)
