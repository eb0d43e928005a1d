"""kNN evaluation speed: ours against scikit-learn and a straightforward torch implementation.

Same data, same machine, one run each. The data are clustered random features (one centre per
class, Gaussian noise), so the kNN makes a realistic share of mistakes and agreement of
predictions means something. Every method implements the same protocol (DINO's weighted kNN,
k = 20, T = 0.07):

- ours: :func:`retrieval.knn.weighted_knn` (``--backend``: auto, faiss or torch);
- scikit-learn: ``KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine")`` with
  weights ``exp((1 - cosine distance) / T)``, i.e. the same votes;
- straightforward torch: DINO's ``knn_classifier`` as published (chunks of 100 queries,
  ``mm``, ``topk``, one-hot votes).

    CPU (default):  python benchmarks/knn_speed.py
    GPU:            python benchmarks/knn_speed.py --gpu     # 1,281,167 x 50,000 x 2048, torch backend

Prints a Markdown block for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.knn import weighted_knn  # noqa: E402
from retrieval.neighbours import resolve_search  # noqa: E402


def clustered_features(train: int, val: int, dim: int, classes: int, noise: float, seed: int, device: str):
    """Train and val features around the same class centres (generated on ``device``: 10 GB on a GPU is fast)."""
    generator = torch.Generator(device).manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator, device=device)

    def draw(n: int):
        labels = torch.randint(0, classes, (n,), generator=generator, device=device)
        features = centres[labels] + noise * torch.randn(n, dim, generator=generator, device=device)
        return features, labels

    return (*draw(train), *draw(val))


@torch.no_grad()
def dino_knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes=1000):
    """DINO's eval_knn.knn_classifier, as published (features L2-normalised by the caller)."""
    top1, top5, total = 0.0, 0.0, 0
    train_features = train_features.t()
    num_test_images, num_chunks = test_labels.shape[0], 100
    imgs_per_chunk = num_test_images // num_chunks
    retrieval_one_hot = torch.zeros(k, num_classes).to(train_features.device)
    predictions = []
    for idx in range(0, num_test_images, imgs_per_chunk):
        features = test_features[idx : min((idx + imgs_per_chunk), num_test_images), :]
        targets = test_labels[idx : min((idx + imgs_per_chunk), num_test_images)]
        batch_size = targets.shape[0]
        similarity = torch.mm(features, train_features)
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        candidates = train_labels.view(1, -1).expand(batch_size, -1)
        retrieved_neighbors = torch.gather(candidates, 1, indices)
        retrieval_one_hot.resize_(batch_size * k, num_classes).zero_()
        retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
        distances_transform = distances.clone().div_(T).exp_()
        probs = torch.sum(torch.mul(retrieval_one_hot.view(batch_size, -1, num_classes),
                                    distances_transform.view(batch_size, -1, 1)), 1)
        _, prediction = probs.sort(1, True)
        correct = prediction.eq(targets.data.view(-1, 1))
        top1 = top1 + correct.narrow(1, 0, 1).sum().item()
        top5 = top5 + correct.narrow(1, 0, min(5, k)).sum().item()
        total += targets.size(0)
        predictions.append(prediction[:, 0])
    return top1 * 100.0 / total, top5 * 100.0 / total, torch.cat(predictions)


def sklearn_knn(train, train_labels, val, k, T):
    from sklearn.neighbors import KNeighborsClassifier

    classifier = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine",
                                      weights=lambda distance: np.exp((1.0 - distance) / T))
    classifier.fit(train, train_labels)
    return classifier.predict(val)


def timed(function, *args, sync: bool = False, **kwargs):
    """Seconds of one call (the caller warms up first: thread pools, allocator, first-touch page faults)."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    if sync:
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def versions() -> str:
    import sklearn

    try:
        import faiss

        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = "absent"
    return (f"Python {platform.python_version()}, torch {torch.__version__}, faiss {faiss_version}, "
            f"scikit-learn {sklearn.__version__}, numpy {np.__version__}")


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
    if hasattr(os, "getloadavg"):
        text += f", load average before the run {os.getloadavg()[0]:.1f}"
    if device == "cuda":
        text += f"; GPU {torch.cuda.get_device_name()}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=100_000)
    parser.add_argument("--val", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=3.5, help="Noise / centre scale: sets how hard the task is.")
    parser.add_argument("-k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--backend", default="auto", choices=["auto", "faiss", "torch"], help="Ours.")
    parser.add_argument("--both-backends", action="store_true", help="Also time our other backend (faiss or torch).")
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--gpu", action="store_true",
                        help="The ImageNet-sized GPU configuration: 1,281,167 x 50,000 x 2048 on CUDA, torch backend, "
                             "no scikit-learn (CPU-only: hours at this size).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = "cpu"
    if args.gpu:
        if not torch.cuda.is_available():
            parser.error("--gpu: no CUDA GPU is visible to PyTorch")
        args.train, args.val, args.dim, args.backend, args.skip_sklearn, device = (
            1_281_167, 50_000, 2048, "torch", True, "cuda")

    if args.val < 100:  # DINO's knn_classifier, as published, splits the queries into 100 chunks (a zero step below)
        parser.error(f"--val {args.val}: at least 100 queries (DINO's classifier takes them in 100 chunks)")
    args.backend = resolve_search(args.backend, device)[0]  # "auto" named as what it picked, and not timed twice
    header = machine(device)
    train, train_labels, val, val_labels = clustered_features(args.train, args.val, args.dim, args.classes,
                                                              args.noise, args.seed, device)
    rows = []
    # warm-up, untimed: 1% of the queries through each method, so no method pays the one-time costs
    warm = slice(0, max(100, args.val // 100))
    for backend in {args.backend, *(("faiss", "torch") if args.both_backends else ())}:
        weighted_knn(train, train_labels, val[warm], val_labels[warm], (args.k,), args.temperature, args.classes,
                     device, None, backend)
    dino_knn_classifier(torch.nn.functional.normalize(train, dim=1), train_labels,
                        torch.nn.functional.normalize(val[warm], dim=1), val_labels[warm], args.k, args.temperature,
                        args.classes)
    if not args.skip_sklearn:
        sklearn_knn(train.numpy(), train_labels.numpy(), val[warm].numpy(), args.k, args.temperature)

    ours, seconds = timed(weighted_knn, train, train_labels, val, val_labels, (args.k,), args.temperature,
                          args.classes, device, None, args.backend, sync=device == "cuda")
    ours_prediction = ours[0].predictions[:, 0]
    rows.append((f"ours, weighted_knn --backend {args.backend}", seconds, ours[0].top1, 1.0))
    for other in ("faiss", "torch") if args.both_backends else ():
        if other == args.backend:
            continue
        mine, seconds = timed(weighted_knn, train, train_labels, val, val_labels, (args.k,), args.temperature,
                              args.classes, device, None, other, sync=device == "cuda")
        rows.append((f"ours, weighted_knn --backend {other}", seconds, mine[0].top1,
                     float((mine[0].predictions[:, 0] == ours_prediction).mean())))

    def dino():
        normalized_train = torch.nn.functional.normalize(train, dim=1)
        normalized_val = torch.nn.functional.normalize(val, dim=1)
        return dino_knn_classifier(normalized_train, train_labels, normalized_val, val_labels, args.k,
                                   args.temperature, args.classes)

    (top1, _, prediction), seconds = timed(dino, sync=device == "cuda")
    rows.append(("straightforward torch (DINO knn_classifier)", seconds, top1 / 100,
                 float((prediction.cpu().numpy() == ours_prediction).mean())))

    if not args.skip_sklearn:
        predicted, seconds = timed(sklearn_knn, train.numpy(), train_labels.numpy(), val.numpy(), args.k,
                                   args.temperature)
        rows.append(('scikit-learn KNeighborsClassifier(algorithm="brute", metric="cosine")', seconds,
                     float((predicted == val_labels.numpy()).mean()), float((predicted == ours_prediction).mean())))

    ours_seconds = rows[0][1]
    print(f"### kNN evaluation, {args.train:,} train x {args.val:,} val x {args.dim}-d, {args.classes} classes, "
          f"k={args.k}, T={args.temperature} ({device.upper()})\n")
    print(f"- date: {datetime.date.today().isoformat()}")
    print(f"- machine: {header}")
    print(f"- versions: {versions()}")
    print(f"- command: `python {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}`\n")
    print("| method | seconds | top-1 | time / ours | top-1 predictions equal to ours |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, seconds, top1, agreement in rows:
        print(f"| {name} | {seconds:.2f} | {top1:.4f} | {seconds / ours_seconds:.2f}x | {100 * agreement:.2f}% |")


if __name__ == "__main__":
    main()
