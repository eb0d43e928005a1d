"""Augmentation recipes (torchvision transforms v2 on uint8 image tensors)."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# MoCo v2's recipe, which SimSiam uses; the batched fast path (gpu_augment.py) reads the same values
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect ratio range
JITTER_STRENGTH = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
JITTER_P, GRAYSCALE_P, BLUR_P, FLIP_P = 0.8, 0.2, 0.5, 0.5
BLUR_SIGMA = (0.1, 2.0)


def _box_radius(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(whole part, fraction) of the radius of each of the three box blurs PIL's GaussianBlur(radius=
    sigma) runs: Pillow's ``_gaussian_blur_radius`` (BoxBlur.c, after Gwosdek et al., SSVM 2011),
    whose boxes have a variance of sigma^2 / 3 each."""
    variance = sigma**2 / 3
    whole = torch.floor((torch.sqrt(12 * variance + 1) - 1) / 2)
    fraction = (2 * whole + 1) * (whole * (whole + 1) - 3 * variance) / (6 * (variance - (whole + 1) ** 2))
    return whole, fraction


BOX_REACH = int(_box_radius(torch.tensor(BLUR_SIGMA[1]))[0]) + 1  # the widest box's last (fractional) tap: 2


def pil_box_kernels(sigma: torch.Tensor) -> torch.Tensor:
    """``[N, 2 * BOX_REACH + 1]``: the box (fractional ends) that PIL's ``GaussianBlur(radius=sigma)``
    runs three times along each axis, for ``[N]`` sigmas."""
    whole, fraction = (v[:, None] for v in _box_radius(sigma.float()))
    distance = torch.arange(-BOX_REACH, BOX_REACH + 1, device=sigma.device).abs()[None]
    box = torch.where(distance <= whole, 1.0, torch.where(distance == whole + 1, fraction, 0.0))
    return box / (2 * (whole + fraction) + 1)


def blur_like_pil(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` float images blurred as PIL's ``GaussianBlur(radius=sigma[i])``, the official
    recipe's blur: three box blurs along each axis, each pass repeating the edge pixels, as PIL's
    box blur does (PIL also rounds to uint8 after every pass, which this leaves out).

    torchvision's GaussianBlur samples a Gaussian at the pixels instead, and for sigma under about
    0.6 blurs far less than PIL (at 0.2 not at all, where PIL moves 2 % of a pixel to each side).
    """
    box = pil_box_kernels(sigma).to(x)[:, :, None, None, None]  # [N, taps, 1, 1, 1], x's dtype and device
    for axis, pad in ((3, [BOX_REACH, BOX_REACH, 0, 0]), (2, [0, 0, BOX_REACH, BOX_REACH])):
        for _ in range(3):
            # a weighted sum of shifted copies: on a CPU several times faster than a grouped convolution
            padded = F.pad(x, pad, mode="replicate")
            x = sum(box[:, tap] * padded.narrow(axis, tap, x.shape[axis]) for tap in range(2 * BOX_REACH + 1))
    return x


class PILGaussianBlur(v2.GaussianBlur):
    """torchvision's GaussianBlur (its draw of sigma in ``sigma``, so the same random numbers), but
    blurring as the official recipe's PIL ``GaussianBlur(radius=sigma)``: see :func:`blur_like_pil`."""

    def __init__(self, sigma: tuple[float, float] = BLUR_SIGMA):
        if sigma[1] > BLUR_SIGMA[1]:
            raise ValueError(f"sigma {sigma}: the boxes reach {BOX_REACH} pixels, enough up to {BLUR_SIGMA[1]}")
        super().__init__(2 * 3 * BOX_REACH + 1, sigma)  # the kernel size is torchvision's to check; not used

    def _blur(self, inpt, params: dict):
        if not isinstance(inpt, torch.Tensor):  # the recipe runs on uint8 tensors; a PIL image would need PIL's own
            raise TypeError(f"PILGaussianBlur takes image tensors, not {type(inpt).__name__}")
        image = inpt if inpt.is_floating_point() else inpt.float()
        sigma = torch.tensor([params["sigma"][0]], device=image.device)
        blurred = blur_like_pil(image.reshape(-1, *image.shape[-3:]), sigma)
        blurred = blurred.reshape(image.shape)
        if not inpt.is_floating_point():  # uint8 in, uint8 out, rounded as torchvision's kernels round
            blurred = blurred.round_().clamp_(0, 255).to(inpt.dtype)
        return tv_tensors.wrap(blurred, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else blurred


# torchvision 0.21 renamed a v2 transform's _get_params and _transform to make_params and transform;
# pyproject allows 0.19
V2_TRANSFORM_METHOD = "transform" if hasattr(v2.Transform, "make_params") else "_transform"
setattr(PILGaussianBlur, V2_TRANSFORM_METHOD, PILGaussianBlur._blur)


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
        steps.append(v2.RandomApply([PILGaussianBlur(BLUR_SIGMA)], p=BLUR_P))
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
