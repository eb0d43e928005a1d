"""kNN evaluation of feature files, or of a checkpoint on two image folders in one go."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import h5py

from simsiam.atomic import check_output
from simsiam.image_folders import same_images, scan_images, unicode_form_hint
from simsiam.errors import InputError, given_as
from simsiam.runtime import Runtime

from .features import (FeatureSet, FeatureWriter, check_free_space, check_utf8_names, feature_file_bytes,
                       read_features)
from .knn import KnnReport, check_ks, check_temperature, evaluate_knn
from .neighbours import resolve_search


def evaluate_files(train: str | os.PathLike, val: str | os.PathLike, ks=(20,), temperature: float = 0.07,
                   backend: str = "auto", device: str = "auto",
                   chunk_size: int | None = None) -> tuple[KnnReport, FeatureSet]:
    """Weighted kNN of the feature file ``val`` against ``train``; returns the report and ``val``."""
    ks = check_ks(ks)  # a list: ks may be an iterator
    resolve_search(backend, device, ks[-1])  # refuse what we cannot run before reading gigabytes
    check_temperature(temperature)
    for option, path in (("--train", train), ("--val", val)):
        if Path(path).is_file() and not h5py.is_hdf5(path):
            from simsiam.checkpoint import is_torch_save_file  # torchvision with it: only for a file that is not HDF5

            if is_torch_save_file(path):
                raise InputError(f"{option} {path}: a checkpoint, not a feature file; to embed and evaluate in one "
                                 f"go: simsiam knn {path} --train-dir DIR --val-dir DIR")
    with given_as("--train", train):
        train_set = read_features(train)
    with given_as("--val", val):
        val_set = read_features(val)
    return evaluate_knn(train_set, val_set, ks, temperature, backend, device, chunk_size), val_set


def evaluate_checkpoint(checkpoint: str | os.PathLike, train_dir: str | os.PathLike, val_dir: str | os.PathLike,
                        runtime: Runtime, ks=(20,), temperature: float = 0.07, backend: str = "auto",
                        chunk_size: int | None = None, layer: str = "backbone", image_size: int | None = None,
                        resize: int | None = None, batch_size: int = 256, workers: int = 0,
                        save_features: str | os.PathLike | None = None,
                        on_event=None, overwrite: bool = False) -> tuple[KnnReport, FeatureSet]:
    """Embed two labelled image folders with ``checkpoint`` and evaluate, keeping the features in memory.

    Nothing is written unless ``save_features`` names a folder: then ``train.h5`` and ``val.h5``
    (float32) go there; existing ones are replaced only with ``overwrite``, as by extract.
    """
    if runtime.distributed:
        raise InputError("knn CHECKPOINT runs in one process; under torchrun run simsiam extract for both folders, "
                         "then simsiam knn --train --val")
    ks = check_ks(ks)  # a list: ks may be an iterator
    resolve_search(backend, "cuda" if runtime.device.type == "cuda" else "cpu", ks[-1])
    check_temperature(temperature)  # before embedding, not after
    if Path(checkpoint).is_file() and h5py.is_hdf5(checkpoint):  # before scanning folders: knn's other form
        raise InputError(f"CHECKPOINT {checkpoint}: a feature file, not a checkpoint; to evaluate feature files: "
                         "simsiam knn --train TRAIN.h5 --val VAL.h5")
    # here, not at the top: torchvision takes 2 s to import, which evaluating feature files does without
    from simsiam.checkpoint import check_checkpoint_file

    from .extract import extract_features
    from .feature_model import load_feature_model

    check_checkpoint_file(checkpoint)  # a missing file said before -k or the folders are checked
    if save_features is not None:
        if Path(save_features).exists() and not Path(save_features).is_dir():
            raise InputError(f"--save-features {save_features}: a file, not a folder")
        for name in ("train.h5", "val.h5"):
            check_output(Path(save_features) / name, "--save-features", overwrite)
    scanned = {}
    for name, folder in (("--train-dir", train_dir), ("--val-dir", val_dir)):
        with given_as(name, folder):
            scanned[name] = images = scan_images(folder)
        if not images.labelled:
            raise InputError(f"{name} {folder}: needs class folders (class/*.jpg): kNN needs labels")
        check_utf8_names(images.root, images.paths)  # both folders, before embedding either
        if name == "--train-dir" and max(ks) > len(images):
            raise InputError(f"-k {max(ks)}: larger than the {len(images)} images of --train-dir {folder}")
    # before extracting anything (evaluate_knn would say it too, but only after both passes)
    unknown = [c for c in scanned["--val-dir"].classes if c not in scanned["--train-dir"].classes]
    if unknown:
        raise InputError(f"--val-dir {val_dir}: classes {', '.join(unknown[:3])}{'...' if len(unknown) > 3 else ''} "
                         f"are not among the {len(scanned['--train-dir'].classes)} classes of --train-dir {train_dir}"
                         + unicode_form_hint(unknown, scanned["--train-dir"].classes))
    model = load_feature_model(checkpoint, layer)
    common = dict(image_size=image_size, resize=resize, batch_size=batch_size, workers=workers, on_event=on_event)
    train_images, val_images = scanned["--train-dir"], scanned["--val-dir"]
    with given_as("--train-dir", train_dir):
        train_set = extract_features(model, train_images, runtime, **common, source="--train-dir")
    # the same folder twice (evaluate_knn warns): its features once, not a second pass over it
    same = same_images(train_images.root, train_images.paths, val_images.root, val_images.paths)
    with given_as("--val-dir", val_dir):
        val_set = train_set if same else extract_features(model, val_images, runtime, **common, source="--val-dir")
    report = evaluate_knn(train_set, val_set, ks, temperature, backend, runtime.device.type, chunk_size,
                          names=("--train-dir", "--val-dir"))
    for name, folder, images, features in (("--train-dir", train_dir, train_images, train_set),
                                           ("--val-dir", val_dir, val_images, val_set)):
        if len(features) < len(images):  # said as they came too; this one goes in the report (--json)
            report.warnings.append(f"{name} {folder}: {len(images) - len(features)} of its {len(images)} images could "
                                   "not be decoded and are left out")
    if save_features is not None:
        _write_pair(Path(save_features), train_set, val_set, overwrite)
    return report, val_set


def _write_pair(folder: Path, train_set: FeatureSet, val_set: FeatureSet, overwrite: bool) -> None:
    """train.h5 and val.h5, both written before either is renamed into place: a failure (a full disk)
    or Ctrl-C while writing leaves the folder's pair as it was, never a new train.h5 beside an old val.h5."""
    # the pair's room, before either is written (each writer alone would ask for its own file only)
    needed = sum(feature_file_bytes(len(features), features.dim, "float32") for features in (train_set, val_set))
    check_free_space(folder, needed, "--save-features")
    with contextlib.ExitStack() as stack:
        writers = []
        for name, feature_set in (("train.h5", train_set), ("val.h5", val_set)):
            writer = stack.enter_context(FeatureWriter(folder / name, feature_set.dim, feature_set.attrs, "float32",
                                                       expected_rows=len(feature_set), replace=overwrite))
            writer.append(feature_set.features, feature_set.labels, feature_set.paths)
            writers.append(writer)
        for writer in writers:
            writer.commit()
