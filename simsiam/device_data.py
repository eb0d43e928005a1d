"""The fast path's batch sources: images decoded and augmented on the training device.

- :class:`InMemoryBatches` (``--data-on-gpu``, for CIFAR-sized datasets): the whole dataset is
  decoded once into a uint8 tensor ``[N, 3, H, W]`` on the device; each step gathers its images
  and augments both views there. No DataLoader workers in the loop. It needs images of one size:
  a folder of mixed sizes is refused by ``--data-on-gpu`` and left to the other sources by auto.
- :class:`DecodedBatches` (``--gpu-decode``, for ImageNet-sized folders): DataLoader workers only
  read files; each batch is decoded on the device (:mod:`simsiam.device_decode`) and augmented
  there.

Both yield what the plain path's loader yields, ``(((view1, view2), labels, indices), unreadable)``,
for the very batches of :class:`~simsiam.data.GlobalBatchSampler`, and both take the random numbers
of a step from (seed, epoch, step) alone: the draws of the whole global batch, of which each rank
keeps its rows. So a resumed run sees the batches it would have seen, and a DDP run augments
each image as a single process with the same global batch does.
"""

from __future__ import annotations

import torch
from torch.utils.data import BatchSampler
from torchvision.transforms.v2 import functional as TF

from .augment import IMAGENET_MEAN, IMAGENET_STD
from .config import PretrainConfig
from .data import GlobalBatchSampler, ImageList, Unreadable, decode_rgb, derived_seed
from .device_decode import decode_batch, encoded_loader
from .errors import InputError
from .gpu_augment import BatchAugment, ViewDraws
from .runtime import Runtime, to_device

# --data-on-gpu's auto rule: on when the decoded dataset takes at most this share of the GPU's memory
DATA_ON_GPU_MEMORY_FRACTION = 0.25
_DEVICE_AUGMENT_STREAM = 2  # derived_seed stream of the fast path's draws (0, 1: the plain path's)


class MixedImageSizes(InputError):
    """The images of a folder differ in size, so they cannot share one ``[N, 3, H, W]`` tensor."""


class _TwoViewBatches:
    """What both sources share: the sampler's batches and each step's draws for this rank."""

    name = ""

    def __init__(self, sampler: GlobalBatchSampler, augment: BatchAugment, seed: int, device: torch.device):
        if not sampler.drop_last:  # draws() slices full global batches
            raise ValueError("the fast path's batch sources take a sampler that drops the last, incomplete batch")
        self.sampler = sampler
        self.augment = augment
        self.seed = seed
        self.device = device
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sampler)

    def draws(self, step: int) -> tuple[ViewDraws, ViewDraws]:
        """The two views' draws of this rank's rows of global batch ``step`` of the epoch."""
        generator = torch.Generator().manual_seed(
            derived_seed(self.seed, self.epoch, step, _DEVICE_AUGMENT_STREAM))
        size = self.sampler.global_batch_size
        first, second = self.augment.draw(size, generator), self.augment.draw(size, generator)
        rows = slice(self.sampler.rank * self.sampler.local_batch_size,
                     (self.sampler.rank + 1) * self.sampler.local_batch_size)
        return first.rows(rows), second.rows(rows)

    def two_views(self, images, step: int, kept: list[int]):
        """Both views of the kept images, augmented in one call: on a GPU each call launches hundreds
        of small kernels, whatever the batch size, so one call of 2N images costs half of two of N."""
        first, second = self.draws(step)
        both = ViewDraws(torch.cat([first.rows(kept).uniform, second.rows(kept).uniform]))
        pair = torch.cat([images, images]) if isinstance(images, torch.Tensor) else images + images
        return self.augment(pair, both).chunk(2)


class InMemoryBatches(_TwoViewBatches):
    """Two augmented views of each image of a dataset held decoded on the device (see the module
    docstring). Images that failed to decode keep a blank row and are dropped from every batch
    they are drawn into, and reported, as the plain path does."""

    name = "data-on-device"

    def __init__(self, images: ImageList, sampler: GlobalBatchSampler, augment: BatchAugment, seed: int,
                 device: torch.device, workers: int = 0):
        super().__init__(sampler, augment, seed, device)
        self.images = images
        self.data, self.unreadable = load_to_device(images, device, workers)
        self.labels = torch.tensor(images.labels, dtype=torch.long)

    def __iter__(self):
        for step, indices in enumerate(self.sampler, start=self.sampler.start_step):
            kept = [row for row, i in enumerate(indices) if i not in self.unreadable]
            bad = [self.unreadable[i] for i in indices if i in self.unreadable]
            if not kept:
                yield None, bad
                continue
            index = torch.tensor([indices[row] for row in kept])
            images = self.data[to_device(index, self.device)]
            yield (self.two_views(images, step, kept), self.labels[index], index), bad


class DecodedBatches(_TwoViewBatches):
    """Two augmented views of each image of a batch read by DataLoader workers and decoded on the
    device (see the module docstring); images of any size."""

    name = "decode-on-device"

    def __init__(self, images: ImageList, sampler: GlobalBatchSampler, augment: BatchAugment, seed: int,
                 device: torch.device, workers: int = 0):
        super().__init__(sampler, augment, seed, device)
        self.images = images
        self.loader = encoded_loader(images, sampler, workers=workers)

    def __iter__(self):
        for step, batch in enumerate(self.loader, start=self.sampler.start_step):
            decoded, good, bad = _decode_readable(self.images, batch, self.device)
            if not good:
                yield None, bad
                continue
            kept = [batch.positions[j] for j in good]  # rows of this rank's slice of the global batch
            keep = torch.tensor(good)
            views = self.two_views(decoded, step, kept)
            yield (views, batch.labels[keep], batch.indices[keep]), bad


def _paths(images: ImageList, indices: torch.Tensor) -> list[str]:
    return [str(images.root / images.paths[i]) for i in indices.tolist()]


def _decode_readable(images: ImageList, batch, device: torch.device):
    """Decode an encoded batch: ``(decoded images, their rows in the batch, unreadable samples)``."""
    decoded, failed = decode_batch(batch.payloads, _paths(images, batch.indices), device)
    good = [j for j, image in enumerate(decoded) if image is not None]
    return [decoded[j] for j in good], good, batch.unreadable + list(failed.values())


def load_to_device(images: ImageList, device: torch.device, workers: int = 0):
    """Decode every image into one uint8 tensor ``[N, 3, H, W]`` on ``device``.

    Returns ``(tensor, unreadable)``, ``unreadable`` mapping the index of each image that could
    not be decoded (its row stays zero) to its :class:`Unreadable`. Raises
    :class:`MixedImageSizes` when the images differ in size.
    """
    data = None
    unreadable: dict[int, Unreadable] = {}
    for batch in encoded_loader(images, batch_size=1024, workers=workers):
        unreadable.update(zip(batch.unreadable_indices, batch.unreadable))
        decoded, failed = decode_batch(batch.payloads, _paths(images, batch.indices), device)
        unreadable.update((int(batch.indices[j]), item) for j, item in failed.items())
        for i, image in zip(batch.indices.tolist(), decoded):
            if image is None:
                continue
            if data is None:
                data = torch.zeros((len(images), *image.shape), dtype=torch.uint8, device=device)
            if image.shape != data.shape[1:]:
                raise MixedImageSizes(
                    f"{images.root / images.paths[i]}: {image.shape[2]}x{image.shape[1]} pixels (width x height), "
                    f"but the first image is {data.shape[3]}x{data.shape[2]}; --data-on-gpu needs images of one size "
                    "(use --no-data-on-gpu, with --gpu-decode to decode on the GPU)")
            data[i] = image
    if data is None:
        raise InputError(f"{images.root}: no image could be decoded")
    return data, unreadable


def fits_on_device(images: ImageList, device: torch.device, fraction: float = DATA_ON_GPU_MEMORY_FRACTION) -> bool:
    """Whether the decoded dataset, estimated from its first readable image, would take at most
    ``fraction`` of the GPU's memory (never on a CPU: there the plain path is the default)."""
    if device.type != "cuda":
        return False
    for path in images.paths[:16]:
        try:
            first = decode_rgb(images.root / path)
        except OSError:
            continue
        total = torch.cuda.get_device_properties(device).total_memory
        return len(images) * first.numel() <= fraction * total
    return False


def pretrain_batches(config: PretrainConfig, images: ImageList, sampler: GlobalBatchSampler,
                     runtime: Runtime) -> _TwoViewBatches | None:
    """The fast path's batch source of a run, or None for the plain path's DataLoader.

    ``config.data_on_gpu``: True gives :class:`InMemoryBatches` (images of mixed sizes are an
    :class:`InputError`); None (auto) gives it when :func:`fits_on_device`, falling back when the
    sizes turn out mixed; False never. Otherwise ``config.gpu_decode`` gives
    :class:`DecodedBatches`.
    """
    augment = BatchAugment(config.image_size, (config.crop_min_scale, 1.0), config.blur, compile=config.compile)
    sources = (images, sampler, augment, config.seed, runtime.device, config.workers)
    if config.data_on_gpu or (config.data_on_gpu is None and fits_on_device(images, runtime.device)):
        try:
            return InMemoryBatches(*sources)
        except MixedImageSizes:
            if config.data_on_gpu:
                raise
    if config.gpu_decode:
        return DecodedBatches(*sources)
    return None


class EvalBatches:
    """Extraction's batches, decoded on the device and put through
    :func:`simsiam.augment.eval_transform` there (resize the short side, centre crop, normalise),
    image by image with torchvision's own functions, so the pixels are the plain path's on a CPU.
    On CUDA they differ by a level or two on some pixels: nvjpeg's decoder is not libjpeg's, and
    torchvision resizes uint8 through float there (on a CPU with a uint8 kernel).

    Yields ``((images, labels, indices), unreadable)`` in dataset order, ``batch_size`` at a time,
    as ``make_loader(ImageDataset(images, eval_transform(image_size, resize)))`` does; images
    already on ``device``. ``indices``: only these images (a torchrun rank's slice), in this order.
    """

    def __init__(self, images: ImageList, image_size: int, resize: int | None, device: torch.device,
                 batch_size: int = 256, workers: int = 0, indices: list[int] | None = None):
        self.images = images
        self.image_size = image_size
        self.resize = resize
        self.device = device
        # at most all of them in a batch, as make_loader does: the sampler fails beyond sys.maxsize
        batches = None if indices is None else BatchSampler(indices, max(1, min(batch_size, len(indices))),
                                                            drop_last=False)
        self.loader = encoded_loader(images, batches, batch_size=batch_size, workers=workers)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            decoded, good, bad = _decode_readable(self.images, batch, self.device)
            if not good:
                yield None, bad
                continue
            crops = TF.to_dtype(torch.stack([self._crop(image) for image in decoded]), torch.float32, scale=True)
            keep = torch.tensor(good)
            yield (TF.normalize(crops, IMAGENET_MEAN, IMAGENET_STD), batch.labels[keep], batch.indices[keep]), bad

    def _crop(self, image: torch.Tensor) -> torch.Tensor:
        if self.resize:
            image = TF.resize(image, [self.resize], antialias=True)
        return TF.center_crop(image, [self.image_size])
