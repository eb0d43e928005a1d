"""Augmentation recipes (torchvision transforms v2 on uint8 image tensors)."""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# MoCo v2's recipe, which SimSiam uses; the batched fast path (gpu_augment.py) reads the same values
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect ratio range
JITTER_STRENGTH = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
JITTER_P, GRAYSCALE_P, BLUR_P, FLIP_P = 0.8, 0.2, 0.5, 0.5
BLUR_SIGMA = (0.1, 2.0)
# PIL's GaussianBlur(radius=sigma) in the official recipe has no kernel size; 2*ceil(3*sigma)+1
# covers +-3 sigma of the widest blur, so nothing is cut off.
BLUR_KERNEL = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1


def _to_normalized_float() -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def pretrain_transform(image_size: int, crop_scale: tuple[float, float] = (0.2, 1.0), blur: bool = True) -> v2.Compose:
    """One view of MoCo v2's augmentation, which SimSiam uses (Sec. 4, "Baseline settings").

    RandomResizedCrop(scale 0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale with
    p=0.2, Gaussian blur sigma 0.1-2 with p=0.5 (left out for CIFAR, App. D), horizontal flip.
    """
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(image_size, scale=crop_scale, ratio=CROP_RATIO, antialias=True),
        v2.RandomApply([v2.ColorJitter(*JITTER_STRENGTH)], p=JITTER_P),
        v2.RandomGrayscale(p=GRAYSCALE_P),
    ]
    if blur:
        steps.append(v2.RandomApply([v2.GaussianBlur(BLUR_KERNEL, sigma=BLUR_SIGMA)], p=BLUR_P))
    steps.append(v2.RandomHorizontalFlip(p=FLIP_P))
    return v2.Compose(steps + _to_normalized_float())


def eval_transform(image_size: int, resize: int | None) -> v2.Compose:
    """Resize the short side to ``resize`` (skipped when None), center crop ``image_size``."""
    steps: list[v2.Transform] = []
    if resize:
        steps.append(v2.Resize(resize, antialias=True))
    steps.append(v2.CenterCrop(image_size))
    return v2.Compose(steps + _to_normalized_float())


class TwoViews:
    """Two independent draws of the same transform: the query and key views of one image."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return [self.transform(image), self.transform(image)]

    def __repr__(self) -> str:
        return f"TwoViews({self.transform!r})"


def linear_eval_transform(image_size: int, crop_scale: tuple[float, float] = (0.08, 1.0)) -> v2.Compose:
    """Training images of the linear evaluation (the official ``main_lincls.py``, as MoCo's).

    RandomResizedCrop (torchvision's default scale 0.08-1) and a horizontal flip, nothing else;
    validation uses :func:`eval_transform` (resize 256, center crop 224).
    """
    return v2.Compose([v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True),
                       v2.RandomHorizontalFlip(), *_to_normalized_float()])
