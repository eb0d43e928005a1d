"""The pretraining augmentation of :func:`simsiam.augment.pretrain_transform`, for a whole batch at
once on the batch's device (GPU, or CPU for tests), each image with its own random parameters.

It is MoCo v2's recipe that SimSiam uses (Sec. 4, "Baseline settings"), step for step as
torchvision implements it: RandomResizedCrop (scale 0.2-1, ratio 3/4-4/3, 10 tries, then the
centre-crop fallback), ColorJitter(0.4, 0.4, 0.4, 0.1) with its four adjustments in a random order
per image, applied with p=0.8, grayscale with p=0.2, Gaussian blur sigma 0.1-2 with p=0.5 (off
for CIFAR, App. D; PIL's blur, as the official loader's), horizontal flip, ImageNet normalisation.

The random numbers of a view are drawn on the CPU (:meth:`BatchAugment.draw`) and depend only on
the generator, not on the images or the device: a batch source draws those of a whole global batch
and gives each DDP rank its rows, so a run's augmentations do not depend on the number of ranks.

Between the crop and the normalisation a view is held as the CPU recipe holds it, in uint8 levels
(float32 values 0-255): each step computes in float and truncates to a whole level where
torchvision's uint8 kernels truncate (the jitter's blends, the grays, grayscale, the hue's way
back) and rounds where they round (the resize, the blur). The official PIL loader truncates its
blends too. Kept in float throughout, views came out about 1.2 levels brighter on average.
"""

from __future__ import annotations

import math
import warnings

import torch

from .augment import (BLUR_P, BLUR_SIGMA, CROP_RATIO, FLIP_P, GRAYSCALE_P, IMAGENET_MEAN, IMAGENET_STD, JITTER_P,
                      JITTER_STRENGTH, blur_like_pil)
from .runtime import to_device

CROP_TRIES = 10  # RandomResizedCrop tries 10 boxes before falling back to a centre crop
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # ColorJitter's fn_idx numbering

# Columns of the uniform numbers a view draws per image (one [N, DRAWN] matrix, one draw call).
_SCALE = slice(0, CROP_TRIES)
_LOG_RATIO = slice(CROP_TRIES, 2 * CROP_TRIES)
_TOP = slice(2 * CROP_TRIES, 3 * CROP_TRIES)
_LEFT = slice(3 * CROP_TRIES, 4 * CROP_TRIES)
_JITTER, _ORDER, _FACTORS = 40, slice(41, 45), slice(45, 49)
_GRAY, _BLUR, _SIGMA, _FLIP = 49, 50, 51, 52
DRAWN = 53

# Columns of the per-image settings sent to the device (one float32 [N, 12] copy).
_P_ORDER, _P_FACTORS, _P_GRAY, _P_BLUR, _P_SIGMA, _P_FLIP = slice(0, 4), slice(4, 8), 8, 9, 10, 11


class ViewDraws:
    """The uniform random numbers of one view of N images (float64, CPU), one row per image."""

    def __init__(self, uniform: torch.Tensor):
        self.uniform = uniform

    def __len__(self) -> int:
        return self.uniform.shape[0]

    def rows(self, index) -> "ViewDraws":
        """The draws of some images: a DDP rank's slice, or the readable images of a batch."""
        return ViewDraws(self.uniform[index])


class BatchAugment:
    """``pretrain_transform(image_size, crop_scale, blur)``, batched: see the module docstring.

    ``augment(images, augment.draw(len(images), generator))`` gives the normalised float32 views
    ``[N, 3, image_size, image_size]`` on the images' device. ``images`` is a uint8 tensor
    ``[N, 3, H, W]``, or a list of uint8 ``[3, H_i, W_i]`` tensors of any sizes. With ``compile``,
    the device's part runs through ``torch.compile`` (the same operations, fused).
    """

    def __init__(self, image_size: int, crop_scale: tuple[float, float] = (0.2, 1.0), blur: bool = True,
                 compile: bool = False):
        self.image_size = image_size
        self.crop_scale = crop_scale
        self.blur = blur
        # Eager, a call launches some 500 small kernels whatever the batch size, which on a GPU
        # costs more host time than a CIFAR-sized training step; compiled, a few fused ones.
        self._on_device = torch.compile(crop_and_photometric, dynamic=None) if compile else crop_and_photometric
        self._photometric = torch.compile(photometric, dynamic=None) if compile else photometric
        self.eager_because: str | None = None  # why a compiled augmentation went eager

    def __repr__(self) -> str:
        return f"BatchAugment(image_size={self.image_size}, crop_scale={self.crop_scale}, blur={self.blur})"

    def draw(self, n: int, generator: torch.Generator) -> ViewDraws:
        return ViewDraws(torch.rand(n, DRAWN, generator=generator, dtype=torch.float64))

    def __call__(self, images, draws: ViewDraws) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            heights = torch.full((len(draws),), images.shape[-2])
            widths = torch.full((len(draws),), images.shape[-1])
            device = images.device
        else:
            heights = torch.tensor([image.shape[-2] for image in images])
            widths = torch.tensor([image.shape[-1] for image in images])
            device = images[0].device
        boxes = crop_boxes(draws, heights, widths, self.crop_scale)
        # one copy to the device for both (box sides are integers, exact in float32)
        params = to_device(torch.cat([boxes.float(), per_image_settings(draws, self.blur)], dim=1), device)
        boxes, settings = params[:, :4].long(), params[:, 4:]
        if isinstance(images, torch.Tensor):
            return self._run("_on_device", images, boxes, settings, self.image_size, self.blur)
        # images of mixed sizes: padded in groups of similar sizes for the crops (eager), then the batched rest
        return self._run("_photometric", resized_crops(images, boxes, self.image_size), settings, self.blur)

    def _run(self, part: str, *args) -> torch.Tensor:
        """``part`` (``_on_device`` or ``_photometric``), compiled or eager; when the compiled one
        fails, both go eager for good, with a warning, and this call is redone eager."""
        try:
            return getattr(self, part)(*args)
        except Exception as err:  # noqa: BLE001  whatever compiling raised, the eager functions are the answer
            if self._on_device is crop_and_photometric:
                raise
            because = f"{type(err).__name__}: {str(err).strip()[:200]}"
            warnings.warn(f"torch.compile of the GPU augmentation failed ({because}); it runs eager from now on",
                          RuntimeWarning, stacklevel=3)
            self.run_eager(because)
            return getattr(self, part)(*args)

    def run_eager(self, because: str) -> None:
        """The eager functions from now on, when compiling failed (or, in the benchmarks, took too long)."""
        self._on_device, self._photometric = crop_and_photometric, photometric
        self.eager_because = because


def crop_and_photometric(images: torch.Tensor, boxes: torch.Tensor, settings: torch.Tensor, size: int,
                         blur: bool) -> torch.Tensor:
    """Everything that runs on the device, for images of one size (what ``compile`` compiles)."""
    return photometric(resized_crops(images, boxes, size), settings, blur)


def photometric(views: torch.Tensor, settings: torch.Tensor, blur: bool) -> torch.Tensor:
    """Colour jitter, grayscale, blur, flip and normalisation of the resized crops ``[N, 3, S, S]``
    (float, 0-1), in uint8 levels from the crop on (see the module docstring)."""
    views = torch.round(views * 255)  # torchvision's uint8 resize rounds to the nearest level
    views = color_jitter(views, settings[:, _P_ORDER], settings[:, _P_FACTORS])
    views = grayscale(views, settings[:, _P_GRAY] > 0)
    if blur:
        views = gaussian_blur(views, settings[:, _P_SIGMA], settings[:, _P_BLUR] > 0)
    views = horizontal_flip(views, settings[:, _P_FLIP] > 0)
    return normalize(views)


_CONSTANTS: dict = {}


def _constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A small constant tensor, made once per device: each ``torch.tensor(..., device=cuda)`` is a
    copy that waits for the GPU. (Compiled, it is a constant of the graph.)"""
    if torch.compiler.is_compiling():
        return torch.tensor(values, device=device)
    if (values, device) not in _CONSTANTS:
        _CONSTANTS[values, device] = torch.tensor(values, device=device)
    return _CONSTANTS[values, device]


def crop_boxes(draws: ViewDraws, heights: torch.Tensor, widths: torch.Tensor,
               scale: tuple[float, float], ratio: tuple[float, float] = CROP_RATIO) -> torch.Tensor:
    """RandomResizedCrop's boxes ``[N, 4]`` (top, left, height, width), as its ``make_params``.

    Each image tries 10 (area, log-aspect) pairs, uniform in ``scale`` x area and in the log of
    ``ratio``; the first that fits is placed uniformly; when none fits, the centre crop of the
    largest box with an aspect ratio in ``ratio``. All vectorised, on the CPU.
    """
    u = draws.uniform
    height, width = heights.double()[:, None], widths.double()[:, None]
    target_area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, _SCALE])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, _LOG_RATIO])
    # Python's round() and torch.round() both round half to even
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # argmax gives the first of equal maxima
    h, w = h.gather(1, first), w.gather(1, first)
    # torch.randint(0, n) is uniform on 0..n-1, as floor(u * n); min() guards u*n rounding up to n
    top = torch.minimum(torch.floor(u[:, _TOP].gather(1, first) * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u[:, _LEFT].gather(1, first) * (width - w + 1)), width - w)

    in_ratio = width / height
    fallback_w = torch.where(in_ratio > max(ratio), torch.round(height * max(ratio)), width)
    fallback_h = torch.where(in_ratio < min(ratio), torch.round(width / min(ratio)), height)
    fallback_top = torch.div(height - fallback_h, 2, rounding_mode="floor")
    fallback_left = torch.div(width - fallback_w, 2, rounding_mode="floor")

    found = fits.any(dim=1, keepdim=True)
    boxes = torch.cat([torch.where(found, top, fallback_top), torch.where(found, left, fallback_left),
                       torch.where(found, h, fallback_h), torch.where(found, w, fallback_w)], dim=1)
    return boxes.long()


def per_image_settings(draws: ViewDraws, blur: bool) -> torch.Tensor:
    """The photometric settings of each image, float32 ``[N, 12]``: jitter order (4), factors (4),
    grayscale, blur, sigma, flip. An image left without jitter gets neutral factors."""
    u = draws.uniform
    jittered = u[:, _JITTER] < JITTER_P
    order = u[:, _ORDER].argsort(dim=1)  # a uniformly random permutation, as ColorJitter's randperm(4)
    b, c, s, hue = JITTER_STRENGTH
    low = torch.tensor([1 - b, 1 - c, 1 - s, -hue], dtype=torch.float64)
    high = torch.tensor([1 + b, 1 + c, 1 + s, hue], dtype=torch.float64)
    factors = low + (high - low) * u[:, _FACTORS]
    factors = torch.where(jittered[:, None], factors, torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    gray = u[:, _GRAY] < GRAYSCALE_P
    blurred = (u[:, _BLUR] < BLUR_P) & blur
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, _SIGMA]
    flip = u[:, _FLIP] < FLIP_P
    columns = [order.double(), factors, gray[:, None], blurred[:, None], sigma[:, None], flip[:, None]]
    return torch.cat([c.double() for c in columns], dim=1).float()


def resample_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """``[N, out_size, in_size]`` rows of torchvision's antialiased bilinear resize of the window
    ``[start, start + length)`` of an axis: PIL's triangle filter, widened by the downscaling
    factor, normalised over the pixels of the window (which also clamps at its edges)."""
    device = start.device
    start, length = start.float()[:, None, None], length.float()[:, None, None]
    step = length / out_size
    centre = start + (torch.arange(out_size, device=device).float()[None, :, None] + 0.5) * step
    pixel = torch.arange(in_size, device=device).float()[None, None, :] + 0.5
    weights = (1 - (pixel - centre).abs() / step.clamp(min=1)).clamp(min=0)
    weights = weights * ((pixel > start) & (pixel < start + length))
    return weights / weights.sum(dim=-1, keepdim=True)


def resized_crops(images, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each image's box resized to ``size`` x ``size``, float32 in [0, 1]: torchvision's
    ``resized_crop(..., antialias=True)``, written as two resampling matrices per image.

    ``images``: uint8 ``[N, 3, H, W]`` or a list of N uint8 ``[3, H_i, W_i]``; ``boxes`` ``[N, 4]``
    (top, left, height, width) on the images' device.
    """
    top, left, height, width = boxes.unbind(dim=1)
    if isinstance(images, torch.Tensor):
        rows = resample_weights(top, height, images.shape[-2], size) / 255  # [N, size, H]
        cols = resample_weights(left, width, images.shape[-1], size)  # [N, size, W]
        return rows[:, None] @ images.float() @ cols[:, None].transpose(-1, -2)
    # Mixed sizes: images of similar sizes zero-padded to their group's largest, then batched
    # products as above. A window lies inside its image, so the padding gets zero weight. (One
    # product per image costs ~0.1 ms of host time each: 50 ms for ImageNet's 512 views of a step.)
    # An image listed twice (the two views of a step) is padded once. Padding the whole batch to its
    # largest image would take GBs for one multi-megapixel photo among ImageNet's.
    unique, index = _distinct(images)
    views_of: list[list[int]] = [[] for _ in unique]
    for view, image in enumerate(index):
        views_of[image].append(view)
    out = torch.empty(len(index), 3, size, size, device=unique[0].device)
    for group in _size_groups([image.shape[-2:] for image in unique], PAD_BUDGET):
        padded = unique[0].new_zeros(len(group), 3, max(unique[u].shape[-2] for u in group),
                                     max(unique[u].shape[-1] for u in group))
        for slot, u in zip(padded, group):
            slot[:, : unique[u].shape[-2], : unique[u].shape[-1]] = unique[u]
        views = [view for u in group for view in views_of[u]]
        local = [slot for slot, u in enumerate(group) for _ in views_of[u]]
        views, local = to_device(torch.tensor([views, local]), padded.device)  # one copy for both
        rows = resample_weights(top[views], height[views], padded.shape[-2], size) / 255
        cols = resample_weights(left[views], width[views], padded.shape[-1], size)
        # in chunks, so that the float copies stay near 512 MB whatever the batch
        chunk = max(1, PAD_BUDGET // padded[0].numel())
        for begin in range(0, len(views), chunk):
            part = slice(begin, begin + chunk)
            out[views[part]] = rows[part, None] @ padded[local[part]].float() @ cols[part, None].transpose(-1, -2)
    return out


PAD_BUDGET = 1 << 27  # values: a group's padded uint8 images (128 MB), and its float views at a time (512 MB)


def _size_groups(sizes: list[tuple[int, int]], budget: int) -> list[list[int]]:
    """Indices of ``sizes`` (height, width) in groups of similar sizes, in increasing area, each
    group's images padded to its largest height and width holding at most ``budget`` values (a
    group of one image may hold more)."""
    groups: list[list[int]] = []
    height = width = 0
    for i in sorted(range(len(sizes)), key=lambda i: (sizes[i][0] * sizes[i][1], i)):
        h, w = max(height, sizes[i][0]), max(width, sizes[i][1])
        if groups and (len(groups[-1]) + 1) * 3 * h * w <= budget:
            groups[-1].append(i)
            height, width = h, w
        else:
            groups.append([i])
            height, width = sizes[i]
    return groups


def _distinct(images: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """The distinct tensors of ``images`` (by identity) and, per image, its position among them."""
    slots: dict[int, int] = {}
    unique, index = [], []
    for image in images:
        if id(image) not in slots:
            slots[id(image)] = len(unique)
            unique.append(image)
        index.append(slots[id(image)])
    return unique, index


def _gray_levels(x: torch.Tensor) -> torch.Tensor:
    """The luma of uint8-level images ``[N, 1, H, W]``, truncated to a level, as torchvision's uint8
    ``rgb_to_grayscale`` (and the jitter's contrast and saturation partners) give it."""
    r, g, b = x.unbind(dim=1)
    return torch.floor(GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b)[:, None]


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` of uint8 images: clamped to the range, truncated to a level."""
    return torch.floor((ratio * x + (1 - ratio) * other).clamp(0, 255))


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_hue`` of float images (0-1) with a per-image shift ``[N, 1, 1, 1]``: to
    HSV (the hexcone model, as PIL and torchvision), shift the hue modulo 1, back to RGB."""
    r, g, b = x.unbind(dim=1)
    value, _ = x.max(dim=1)
    chroma = value - x.min(dim=1).values
    gray = chroma == 0
    saturation = chroma / torch.where(value == 0, 1, value)
    safe = torch.where(gray, 1, chroma)
    # the same precedence as torchvision when two channels tie for the maximum: red, green, blue
    hue = torch.where(value == r, ((g - b) / safe) % 6,
                      torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(gray, 0, hue / 6)
    hue = (hue[:, None] + shift) % 1.0
    # back to RGB: channel n (5, 3, 1 for R, G, B) is v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    k = (_constant((5.0, 3.0, 1.0), x.device)[None, :, None, None] + hue * 6) % 6
    return value[:, None] - (value * saturation)[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def color_jitter(x: torch.Tensor, order: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """ColorJitter of uint8-level images with per-image factors ``[N, 4]`` applied in per-image
    ``order`` ``[N, 4]``, each step truncated to a level as torchvision's uint8 kernels do.

    Brightness, contrast and saturation are each a blend of the image with black, its mean gray
    level or its grayscale version (torchvision's ``_blend``); at each of the 4 positions one blend
    serves every image, with its own ratio and partner. Neutral factors (1, 1, 1, 0) leave an image
    as it is.
    """
    ratio_at = lambda op: factors.gather(1, op[:, None].long())[:, :, None, None]
    shift = factors[:, HUE, None, None, None]
    for position in range(4):
        op = order[:, position][:, None, None, None]
        gray = _gray_levels(x)
        partner = torch.where(op == BRIGHTNESS, 0.0, torch.where(op == CONTRAST, gray.mean(dim=(1, 2, 3), keepdim=True), gray))
        ratio = torch.where(op == HUE, 1.0, ratio_at(order[:, position]))
        x = _blend(x, partner, ratio)
        # torchvision's way there and back: levels * (1/255), and float * 255.999 truncated. A zero
        # shift (an image left without jitter) skips it: the round trip's float error could lose a level.
        hued = torch.floor((adjust_hue(x * (1 / 255), shift) * (255 + 1 - 1e-3)).clamp(0, 255))
        x = torch.where((op == HUE) & (shift != 0), hued, x)
    return x


def grayscale(x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """RandomGrayscale of uint8-level images: the luma in all three channels (truncated to a level,
    as torchvision's uint8 kernel), for the images where ``apply``."""
    return torch.where(apply[:, None, None, None], _gray_levels(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """The CPU recipe's blur of uint8-level images (PIL's GaussianBlur,
    :func:`simsiam.augment.blur_like_pil`, rounded to a level) with a per-image sigma, for the images
    where ``apply``."""
    return torch.where(apply[:, None, None, None], torch.round(blur_like_pil(x, sigma)).clamp(0, 255), x)


def horizontal_flip(x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    return torch.where(apply[:, None, None, None], x.flip(-1), x)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8-level images to the network's input: ToDtype(float32, scale=True), then Normalize."""
    mean = _constant(tuple(IMAGENET_MEAN), x.device)[None, :, None, None]
    std = _constant(tuple(IMAGENET_STD), x.device)[None, :, None, None]
    return (x * (1 / 255) - mean) / std
