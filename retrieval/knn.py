"""Weighted kNN classification, the protocol of DINO's ``eval_knn.py``.

"We L2-normalize the features, compute the cosine similarity to the training features, take the
k nearest neighbours; each votes for its label with weight exp(sim / T); the class with the most
weight wins" (DINO, Caron et al. 2021, ``knn_classifier``; k = 20, T = 0.07 as there). Top-5 is
whether the label is among the five classes of most weight. Classes of equal weight are ranked
by class index (a stable sort). The backends agree up to neighbours of exactly equal similarity
(duplicate training images): which of those make the k nearest is the backend's choice.
"""

from __future__ import annotations

import csv
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from simsiam.atomic import atomic_write, check_output
from simsiam.image_folders import ONE_CLASS_WARNING, same_images, split_folders_warning, unicode_form_hint
from simsiam.errors import InputError

from .features import FeatureSet, check_compatible, check_usable, labels_in_classes_of
from .neighbours import as_tensor, check_matrices, search

VOTE_CHUNK = 8192  # queries voted at a time: bounds the [chunk, classes] score matrix


@dataclass
class KnnResult:
    k: int
    top1: float
    top5: float
    predictions: np.ndarray  # [N, min(5, k, classes)] class indices, best first


@dataclass
class KnnReport:
    """Results of one evaluation, for every k, with what ran and what looked doubtful."""

    results: list[KnnResult]
    temperature: float
    train_size: int
    val_size: int
    num_classes: int
    backend: str
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  # what predictions index: the training classes
    val_labels: np.ndarray | None = None  # the validation labels in those classes


def vote(neighbour_sims: torch.Tensor, neighbour_labels: torch.Tensor, k: int, temperature: float,
         num_classes: int) -> torch.Tensor:
    """Class scores [B, C]: each of the k most similar neighbours (columns best first) adds exp(sim / T).

    Computed as exp((sim - best sim) / T): the same ranking (every score of a row is scaled by
    exp(-best / T)), but no vote overflows to infinity when T is small.
    """
    sims = neighbour_sims[:, :k].float()
    weights = ((sims - sims[:, :1]) / temperature).exp()
    scores = torch.zeros(neighbour_sims.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return scores.scatter_add_(1, neighbour_labels[:, :k], weights)


def ranked_classes(scores: torch.Tensor, top: int = 5) -> torch.Tensor:
    """The ``top`` classes of most weight, ties broken by the lower class index."""
    return scores.sort(dim=1, descending=True, stable=True).indices[:, :min(top, scores.shape[1])]


def correct(scores: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, int, int]:
    """``(top-5 predictions, top-1 correct, top-5 correct)`` of the class scores of k neighbours:
    counts, so that the accuracy is one exact division however many chunks there are.

    As DINO's ``eval_knn.py``: only the first min(5, k) classes count, since k neighbours vote for
    at most k classes and the rest would be filled with classes no neighbour voted for.
    """
    predictions = ranked_classes(scores, min(5, k))
    hits = predictions == labels[:, None]
    return predictions, int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


def check_ks(ks) -> list[int]:
    """The distinct k of ``ks`` (one k or several), in increasing order; each at least 1."""
    ks = [ks] if isinstance(ks, numbers.Number) else list(ks)
    wrong = [k for k in ks if not isinstance(k, numbers.Integral)]
    if wrong:
        raise InputError(f"-k {wrong[0]}: k must be a whole number")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise InputError(f"-k {ks[0] if ks else '(none)'}: k must be at least 1")
    return ks


def check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not 0 < temperature < float("inf"):  # NaN compares false
        raise InputError(f"--temperature {temperature}: must be a positive finite number")


def weighted_knn(train_features, train_labels, val_features, val_labels, ks=(20,), temperature: float = 0.07,
                 num_classes: int | None = None, device: str | torch.device = "cpu", chunk_size: int | None = None,
                 backend: str = "auto", check_finite: bool = True) -> list[KnnResult]:
    """Weighted kNN top-1/top-5 of ``val`` against ``train``: one result per distinct k of ``ks``, in
    increasing k.

    The neighbours are searched once for the largest k (``backend``: see
    :mod:`retrieval.neighbours`; ``device`` "cuda:1" etc. pins the torch backend to a GPU).
    ``check_finite=False`` where the caller has refused NaN and infinite features already (feature
    files: ``check_usable``); the check reads every value (27 s on a CPU for ImageNet's float16 ones).
    """
    ks = check_ks(ks)
    check_temperature(temperature)
    check_matrices(train_features, val_features)
    # voting runs on the CPU: [queries, k] neighbours are small next to the search
    train_labels = as_tensor(train_labels).cpu().long()
    val_labels = as_tensor(val_labels).cpu().long()
    for name, labels, features in (("train", train_labels, train_features), ("val", val_labels, val_features)):
        if labels.shape != (len(features),) or not len(labels):
            raise InputError(f"{name}: {len(features)} feature rows and labels of shape {tuple(labels.shape)}; "
                             "expected one label per row, and at least one row")
        # as the files' check_usable: NaN similarities would rank neighbours arbitrarily
        bad = first_non_finite(as_tensor(features)) if check_finite else None
        if bad is not None:
            raise InputError(f"{name} features: NaN or infinite values (row {bad})")
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), val_labels.max().item())) + 1
    lowest, highest = min(train_labels.min(), val_labels.min()), max(train_labels.max(), val_labels.max())
    if lowest < 0 or highest >= num_classes:  # a val label past the classes would count as a miss, unseen
        raise InputError(f"labels from {lowest} to {highest}: expected class indices from 0 to {num_classes - 1} "
                         "(every image labelled)")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    # a device with an index (the training loop's cuda:N) is torch's: faiss picks its GPUs itself
    backend = "torch" if device.index is not None else backend
    neighbours = search(train_features, val_features, ks[-1], backend, device.type, chunk_size)
    sims = torch.from_numpy(neighbours.scores)
    labels = train_labels[torch.from_numpy(neighbours.indices)]
    results = []
    for k in ks:
        predictions, top1_hits, top5_hits = [], 0, 0
        for start in range(0, len(val_labels), VOTE_CHUNK):
            part = slice(start, start + VOTE_CHUNK)
            scores = vote(sims[part], labels[part], k, temperature, num_classes)
            chunk_predictions, top1, top5 = correct(scores, val_labels[part], k)
            predictions.append(chunk_predictions)
            top1_hits += top1
            top5_hits += top5
        results.append(KnnResult(k, top1_hits / len(val_labels), top5_hits / len(val_labels),
                                 torch.cat(predictions).numpy()))
    return results


FINITE_CHECK_VALUES = 1 << 24  # values a block of the finiteness check holds


def first_non_finite(features: torch.Tensor) -> int | None:
    """The first row holding NaN or infinity, None when none does; a block of rows at a time: the
    whole matrix's isfinite took 2.5 times the features' own memory (13 GB for ImageNet's)."""
    step = max(1, FINITE_CHECK_VALUES // max(1, features.shape[1]))
    for start in range(0, len(features), step):
        finite = torch.isfinite(features[start:start + step]).all(dim=1)
        if not finite.all():
            return start + int(finite.logical_not().nonzero()[0])
    return None


def check_knn_inputs(train: FeatureSet, val: FeatureSet, ks,
                     names: tuple[str, str] = ("--train", "--val")) -> tuple[int, list[str], np.ndarray]:
    """Refuse what the protocol cannot evaluate; return ``(number of classes, warnings, validation
    labels in the training classes)``. ``names``: the options that gave the two sets, for the messages."""
    train_name, val_name = names
    warnings = check_compatible(train, train_name, val, val_name)
    for name, features in ((train_name, train), (val_name, val)):
        if len(features) == 0:
            raise InputError(f"{name} {features.source}: holds no features")
        if (features.labels < 0).any():
            raise InputError(f"{name} {features.source}: {int((features.labels < 0).sum())} image(s) without a label; "
                             "kNN needs labelled images (an ImageFolder: class/*.jpg)")
    if max(ks) > len(train):
        unreadable = int(train.attrs.get("skipped_images", 0) or 0)
        raise InputError(f"-k {max(ks)}: larger than the {len(train)} training images of {train_name} {train.source}"
                         + (f" ({unreadable} more could not be decoded)" if unreadable else ""))
    val_labels = val.labels
    if train.classes and val.classes and train.classes != val.classes:
        unknown = [name for name in val.classes if name not in train.classes]
        if unknown:
            raise InputError(f"{val_name} {val.source}: classes {', '.join(unknown[:3])}"
                             f"{'...' if len(unknown) > 3 else ''} are not among the {len(train.classes)} classes of "
                             f"{train_name} {train.source}{unicode_form_hint(unknown, train.classes)}")
        # a validation set with some of the classes (or in another order): match them by name
        val_labels = labels_in_classes_of(val, train)
        some = (f"the classes of {train_name} in another order" if len(val.classes) == len(train.classes)
                else f"{len(val.classes)} of the {len(train.classes)} classes of {train_name}")
        warnings.append(f"{val_name} has {some}; labels matched by class name")
    check_usable(train, train_name)
    check_usable(val, val_name)
    for name, features in ((train_name, train), (val_name, val)):
        root = features.attrs.get("root") or features.source
        split_warning = split_folders_warning(f"{name} {features.source}", root, features.classes)
        if split_warning:
            warnings.append(split_warning)
    if same_images(train.attrs.get("root", ""), train.paths, val.attrs.get("root", ""), val.paths):
        warnings.append(f"{train_name} and {val_name} hold the same images: each is its own nearest neighbour, so the "
                        "accuracy is inflated; evaluate on held-out images")
    num_classes = max(len(train.classes), len(val.classes),
                      int(max(train.labels.max(), val_labels.max())) + 1)
    if num_classes == 1:
        warnings.append(ONE_CLASS_WARNING.format(train_name))
    return num_classes, warnings, val_labels


def evaluate_knn(train: FeatureSet, val: FeatureSet, ks=(20,), temperature: float = 0.07, backend: str = "auto",
                 device: str = "auto", chunk_size: int | None = None,
                 names: tuple[str, str] = ("--train", "--val")) -> KnnReport:
    """The weighted kNN of ``val`` against ``train`` (feature sets from files or an extraction, given
    by the options ``names``)."""
    import time

    from .neighbours import resolve_search

    ks = check_ks(ks)
    num_classes, warnings, val_labels = check_knn_inputs(train, val, ks, names)
    chosen, chosen_device = resolve_search(backend, device, ks[-1])
    start = time.perf_counter()
    results = weighted_knn(train.features, train.labels, val.features, val_labels, ks, temperature, num_classes,
                           chosen_device, chunk_size, chosen, check_finite=False)  # check_usable read them
    return KnnReport(results, temperature, len(train), len(val), num_classes, f"{chosen}-{chosen_device}",
                     time.perf_counter() - start, warnings, list(train.classes or val.classes), val_labels)


def write_predictions(path: str | os.PathLike, val: FeatureSet, report: KnnReport, inputs=()) -> Path:
    """One CSV row per validation image and k: ``path,label,class,k,prediction,predicted_class,top5,correct``.

    Written under a temporary name and renamed when complete; an existing file is replaced, but
    never the validation feature file or one of ``inputs``.
    """
    path = Path(path)
    check_output(path, "--predictions", overwrite=True, inputs=[p for p in (val.source, *inputs) if p])
    classes = report.classes
    labels = report.val_labels if report.val_labels is not None else val.labels

    def name(index: int) -> str:
        return classes[index] if 0 <= index < len(classes) else str(index)

    with atomic_write(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "class", "k", "prediction", "predicted_class", "top5", "correct"])
        for result in report.results:
            for image, label, top in zip(val.paths, labels, result.predictions):
                writer.writerow([image, int(label), name(int(label)), result.k, int(top[0]), name(int(top[0])),
                                 " ".join(str(int(c)) for c in top), int(top[0] == label)])
    return path
