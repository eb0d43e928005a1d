"""The built-in default run: SimSiam on scikit-learn's handwritten digits, on a CPU, in minutes.

``load_digits`` ships 1,797 real 8x8 grey images inside scikit-learn, so the quickstart needs no
download. They are upscaled and written as an ImageFolder, so the run goes through the very
pipeline (``scan_images`` → ``pretrain`` → ``embed`` → ``weighted_knn``) a user's data does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .augment import eval_transform
from .backbones import build_resnet, pooled_backbone
from .checkpoint import build_backbone, read_backbone
from .config import PretrainConfig, preset_config
from .data import ImageDataset, scan_images
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
        cifar_stem=False, epochs=8, batch_size=64, lr=0.5, image_size=DIGITS_IMAGE_SIZE, crop_min_scale=0.5,
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
    train_images: int
    test_images: int


def knn_top1(encoder: torch.nn.Module, train: ImageDataset, test: ImageDataset, runtime: Runtime, k: int = 20) -> float:
    from retrieval.extract import embed
    from retrieval.knn import weighted_knn

    backbone = pooled_backbone(encoder).to(runtime.device)
    train_x, train_y, _ = embed(backbone, train, runtime, batch_size=256)
    test_x, test_y, _ = embed(backbone, test, runtime, batch_size=256)
    [result] = weighted_knn(train_x, train_y, test_x, test_y, (k,), 0.07, num_classes=len(train.images.classes))
    return result.top1


def run_quickstart(out: str | os.PathLike, on_event=None, **overrides) -> QuickstartResult:
    """Pretrain on the digits' train split; kNN top-1 on the test split, before and after."""
    from .train import pretrain

    out = Path(out)
    config = quickstart_config(out / "digits" / "train", out / "run", **overrides)
    train_dir, test_dir = write_digits(out / "digits", config.image_size)
    device = resolve_device(config.device)
    runtime = Runtime(device, resolve_precision(config.precision, device))
    transform = eval_transform(config.image_size, None)
    train_set = ImageDataset(scan_images(train_dir), transform)
    test_set = ImageDataset(scan_images(test_dir), transform)

    torch.manual_seed(config.seed)  # the same initialisation pretrain() starts from
    random_encoder = build_resnet(config.arch, num_classes=config.dim, cifar_stem=config.cifar_stem,
                                  zero_init_residual=True)
    random_top1 = knn_top1(random_encoder, train_set, test_set, runtime)

    pretrain(config, overwrite=True, on_event=on_event)
    checkpoint = Path(config.out) / "last.pth.tar"
    trained_top1 = knn_top1(build_backbone(read_backbone(checkpoint)), train_set, test_set, runtime)
    return QuickstartResult(random_top1, trained_top1, checkpoint, len(train_set), len(test_set))
