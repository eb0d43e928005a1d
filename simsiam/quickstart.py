"""The built-in default run: SimSiam on scikit-learn's handwritten digits, on a CPU, in minutes.

``load_digits`` ships 1,797 real 8x8 grey images inside scikit-learn, so the quickstart needs no
download. They are upscaled and written as an ImageFolder, so the run goes through the very
pipeline a user's data does: pretrain, extract, knn, plot, convert-d2.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .atomic import temporary_for
from .config import PretrainConfig, preset_config
from .errors import InputError
from .runtime import Runtime, resolve_device, resolve_precision

DIGITS_IMAGE_SIZE = 32


def write_digits(root: str | os.PathLike, image_size: int = DIGITS_IMAGE_SIZE, test_fraction: float = 0.3) -> tuple[Path, Path]:
    """Write the digits as PNG ImageFolders ``root/train/<digit>/`` and ``root/test/<digit>/``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # values are 0..16
    indices = np.arange(len(pixels))
    train_idx, test_idx = train_test_split(indices, test_size=test_fraction, stratify=digits.target, random_state=0)
    root = Path(root)
    for split, split_idx in (("train", train_idx), ("test", test_idx)):
        for i in split_idx:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(pixels[i], mode="L").resize((image_size, image_size), Image.BICUBIC)
            image.save(folder / f"{i:04d}.png")
    return root / "train", root / "test"


def quickstart_config(data: Path, out: Path, **overrides) -> PretrainConfig:
    """The CIFAR recipe scaled down to a CPU budget of a few minutes.

    The ResNet-18 keeps its ImageNet stem (stride 4 before layer1): at 32x32 that is 16x less
    compute than the CIFAR stem, which two CPU cores need. Crops keep half the digit or more, a
    smaller batch gives more steps, and the higher lr suits the short schedule.
    """
    settings = dict(
        cifar_stem=False, epochs=6, batch_size=64, lr=0.5, image_size=DIGITS_IMAGE_SIZE, crop_min_scale=0.5,
        dim=512, pred_dim=128, proj_hidden_dim=512, save_every_epochs=100, log_every=5,
        workers=0, device="cpu",
    )
    settings.update(overrides)
    config = preset_config("cifar", **settings)
    config.data, config.out = str(data), str(out)
    return config


@dataclass
class QuickstartResult:
    random_init_top1: float
    trained_top1: float
    checkpoint: Path
    train_features: Path
    test_features: Path
    detectron2_weights: Path
    curves: Path
    train_images: int
    test_images: int
    epochs: int  # pretrained for


def _outputs(arch: str) -> set[str]:
    return {"digits", "run", "features", f"{arch}-detectron2.pkl"}


def _own_temporaries(out: Path, arch: str) -> list[Path]:
    """The temporary files of the quickstart's outputs in ``out``, left by one killed while writing."""
    return [p for p in out.glob(".*.tmp") if temporary_for(p.name) in _outputs(arch)]


def check_quickstart_folder(out: Path, arch: str) -> None:
    """Refuse an ``out`` that holds anything but an earlier quickstart's outputs: the quickstart
    replaces what it writes there (its run folder with ``--overwrite``), so a folder of the user's
    own, given by mistake, could lose a run of the same name."""
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"--out {out}: is a file, not a folder")
    ours = _outputs(arch)
    temporaries = _own_temporaries(out, arch)
    others = sorted(p.name for p in out.iterdir() if p.name not in ours and p not in temporaries)
    if others:
        raise InputError(f"--out {out}: holds {others[0]}" + (f" and {len(others) - 1} more" if len(others) > 1 else "")
                         + ", not written by the quickstart, which replaces what it writes there; give a new or "
                         "empty folder")


def _random_init_model(config: PretrainConfig):
    """The encoder pretraining starts from: extract --random-init's baseline (the backbone does not
    depend on the projector's widths), at the quickstart's crop."""
    from retrieval.feature_model import load_feature_model

    baseline = load_feature_model(random_init=True, arch=config.arch, cifar_stem=config.cifar_stem, seed=config.seed)
    return dataclasses.replace(baseline, checkpoint=f"random initialisation (seed {config.seed})",
                               image_size=config.image_size, resize=config.eval_resize)


def run_quickstart(out: str | os.PathLike, on_event=None, **overrides) -> QuickstartResult:
    """The whole workflow on the digits, each step through the library call its command makes.

    ``pretrain`` on the train split; ``extract`` both splits to HDF5 with the pretrained
    backbone; ``knn`` of test against train, and the same for the encoder at its random
    initialisation (in memory); ``plot`` of the training curves; ``convert-d2`` of the backbone.
    """
    from retrieval.extract import extract_features, extract_to_file
    from retrieval.feature_model import load_feature_model
    from retrieval.features import read_features
    from retrieval.knn import evaluate_knn
    from transfer.detectron2_weights import convert_checkpoint, write_detectron2_pickle

    from .train import pretrain
    from .training_curves import plot_training_curves

    out = Path(out)
    config = quickstart_config(out / "digits" / "train", out / "run", **overrides)
    check_quickstart_folder(out, config.arch)
    for stale in _own_temporaries(out, config.arch) if out.is_dir() else []:
        stale.unlink(missing_ok=True)
    train_dir, test_dir = write_digits(out / "digits", config.image_size)
    device = resolve_device(config.device)
    runtime = Runtime(device, resolve_precision(config.precision, device))

    random_model = _random_init_model(config)
    random_sets = [extract_features(random_model, folder, runtime) for folder in (train_dir, test_dir)]
    [random_result] = evaluate_knn(*random_sets, ks=(20,), device=device.type).results

    pretrain(config, overwrite=True, on_event=on_event)
    checkpoint = Path(config.out) / "last.pth.tar"
    trained_model = load_feature_model(checkpoint, "backbone")
    features = out / "features"
    features.mkdir(exist_ok=True)
    files = [features / "train.h5", features / "test.h5"]
    for folder, path in zip((train_dir, test_dir), files):
        extract_to_file(trained_model, folder, path, runtime, overwrite=True)
    [trained_result] = evaluate_knn(*(read_features(f) for f in files), ks=(20,), device=device.type).results

    curves = plot_training_curves(config.out)
    detectron2_weights = write_detectron2_pickle(convert_checkpoint(checkpoint), out / f"{config.arch}-detectron2.pkl",
                                                 overwrite=True)
    return QuickstartResult(random_result.top1, trained_result.top1, checkpoint, files[0], files[1],
                            detectron2_weights, curves, len(random_sets[0]), len(random_sets[1]), config.epochs)
