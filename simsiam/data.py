"""One data pipeline for pretrain, extract, knn and lincls: scan a folder (:mod:`simsiam.image_folders`),
decode, transform, batch.

Randomness is a pure function of (seed, epoch, image index): the shuffling of an epoch comes from
(seed, epoch) and the augmentation of an image from (seed, epoch, index). A run's batches are
therefore the same whatever the number of DataLoader workers or DDP ranks, and a run resumed in
the middle of an epoch sees exactly the batches it would have seen.
"""

from __future__ import annotations

import os
import re
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from .config import MAX_WORKERS, check_int
from .errors import InputError
# the listing of a folder's images lives without torch in image_folders; named here too, where
# the rest of the pipeline is (simsiam.data was their home)
from .image_folders import (IMAGE_EXTENSIONS, ONE_CLASS_WARNING, ImageList, folder_warnings,  # noqa: F401
                            is_image_name, labelled_images, same_images, scan_images, split_folders_warning,
                            unicode_form_hint)

# torchvision's decoders (libjpeg-turbo, libwebp, giflib); other formats go through PIL. Not PNG:
# torchvision's PNG decoder (0.29) kills the process (SIGSEGV) on a corrupt row, a bad IDAT CRC or
# zlib checksum, where PIL raises, about 20 % slower.
_TORCHVISION_DECODES = (".jpg", ".jpeg", ".webp", ".gif")
# what torchvision says of files it leaves to others: another format under the name, an animated WebP
_NOT_TORCHVISIONS = ("Unsupported image file", "not supported")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# giflib's error codes (gif_lib.h), which torchvision's GIF decoder reports as bare numbers
GIF_ERRORS = {101: "cannot open the file", 102: "reading failed (a truncated file?)", 103: "no screen descriptor",
              104: "not a GIF file", 105: "no image descriptor", 106: "no colour map", 107: "wrong record type",
              108: "image data larger than the image", 109: "not enough memory", 110: "cannot close the file",
              111: "not readable", 112: "image defect", 113: "the file ends too soon"}


def _decoder_reason(message: str) -> str:
    """"decode_jpeg, /path/decode_jpeg.cpp:171, Image is incomplete or truncated" -> the reason only;
    giflib's "DGifSlurp() failed - 102" -> "GIF: cannot read the file"."""
    reason = re.sub(r"^[\w:]+(\(\))?, \S+:\d+, ", "", message.strip())  # "operator(), ...png.cpp:79, " too
    gif = re.search(r"DGif\w*\(\) failed - (\d+)", reason)
    if gif:
        code = int(gif.group(1))
        return f"GIF: {GIF_ERRORS.get(code, f'giflib error {code}')}"
    return reason.split(". ")[0].rstrip(".")


def first_frame(decoded: torch.Tensor) -> torch.Tensor:
    """[3, H, W] uint8 of what torchvision decoded: an animated GIF comes as [frames, 3, H, W]; its
    first frame is the image, as PIL's ``Image.open`` sees it. (torchvision decodes no PNG here, so
    no 16-bit image: PIL takes those, :func:`_pil_rgb`.)"""
    return decoded[0] if decoded.ndim == 4 else decoded


def unreadable_reason(err: Exception, path: str) -> str:
    """Why ``path`` could not be read, without its name, which the messages give first: the OS's
    errors end with it ("No such file or directory: 'x.jpg'"), PIL's too ("cannot identify image file 'x.bmp'")."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return err.strerror
    reason = str(err)
    for spelling in (repr(path), path):
        reason = reason.replace(spelling, "")
    return reason.strip(" :") or type(err).__name__


def decode_rgb(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to a uint8 RGB tensor [3, H, W]; raises OSError with a one-line reason
    that does not repeat the path."""
    path = str(path)
    try:
        if os.path.getsize(path) == 0:  # the decoders' own words for it are about tensors and headers
            raise OSError("empty file: 0 bytes")
        if path.lower().endswith(_TORCHVISION_DECODES):
            # read by Python, not torch.from_file: torch wants a UTF-8 name, and a Linux file name is
            # any bytes (os.walk hands them over surrogate-escaped)
            with open(path, "rb") as f:
                raw = f.read()
            try:  # torchvision tells formats by content: a PNG under another name goes to PIL as PNGs do
                if not raw.startswith(_PNG_SIGNATURE):
                    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
                    return first_frame(decode_image(data, mode=ImageReadMode.RGB))
            except RuntimeError as err:
                if not any(words in str(err) for words in _NOT_TORCHVISIONS):
                    raise OSError(_decoder_reason(str(err))) from None
                # another format under a .jpg name (a BMP, a TIFF; PIL tells formats by content), or an
                # animated WebP (PIL gives its first frame, as for a GIF)
        with Image.open(path) as image:
            return _pil_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise OSError(unreadable_reason(err, path)) from None


def _pil_rgb(image: Image.Image) -> torch.Tensor:
    """uint8 RGB [3, H, W] of a PIL image. 16-bit grey (a PNG's or TIFF's "I;16"; a 16-bit PGM or an
    integer TIFF as "I", when its values pass 255) keeps its top 8 bits, as every path stores, pads
    and augments uint8: PIL's convert clips it at 255, which turns most of such an image white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        grey = np.asarray(image).astype(np.int64)
        if image.mode != "I" or grey.max() > 255:  # an "I" image of 8-bit values converts as it is
            grey = grey.clip(0, 65535) >> 8
            return torch.from_numpy(grey.astype(np.uint8)).expand(3, -1, -1).contiguous()
    return TF.pil_to_tensor(image.convert("RGB"))


class Unreadable(NamedTuple):
    """Stands in a batch for an image that could not be decoded."""

    path: str
    reason: str


_AUGMENT, _SHUFFLE = 0, 1  # separate random streams


def derived_seed(seed: int, epoch: int, index: int, stream: int = _AUGMENT) -> int:
    """A well-mixed 63-bit seed for one image (or, for ``_SHUFFLE``, the order) of one epoch."""
    # shifted as a Python int: NumPy 1.x has no uint64 >> int (it promotes the pair to float64)
    return int(np.random.SeedSequence([seed, epoch, index, stream]).generate_state(1, np.uint64)[0]) >> 1


class ImageDataset(Dataset):
    """Images of an :class:`ImageList` through ``transform``; yields ``(image, label, index)``.

    With a ``seed``, the transform of image i in epoch e draws its random numbers from a generator
    seeded by (seed, e, i) (see the module docstring); :meth:`set_epoch` moves to another epoch.
    An image that fails to decode comes out as :class:`Unreadable` for the collate function to
    drop and count.
    """

    def __init__(self, images: ImageList, transform: Callable, seed: int | None = None):
        self.images = images
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        path = self.images.root / self.images.paths[index]
        try:
            image = decode_rgb(path)
        except OSError as err:
            return Unreadable(str(path), str(err) or type(err).__name__)
        if self.seed is None:
            return self.transform(image), self.images.labels[index], index
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also seed every CUDA device, 100x slower
            torch.default_generator.manual_seed(derived_seed(self.seed, self.epoch, index))
            return self.transform(image), self.images.labels[index], index


def count_unreadable(unreadable: list[Unreadable], strict: bool, announce: Callable[[Unreadable], None]) -> int:
    """How many images of a batch could not be decoded, each announced; under ``strict`` the first
    one is an :class:`InputError` instead (the ``--strict`` of every command that reads images)."""
    for bad in unreadable:
        if strict:
            raise InputError(f"{bad.path}: cannot decode image ({bad.reason}); drop --strict to skip such images")
        announce(bad)
    return len(unreadable)


def count_training_unreadable(batch, unreadable: list[Unreadable], strict: bool, announce: Callable[[Unreadable], None],
                              folder, step: int, distributed: bool) -> int:
    """:func:`count_unreadable` for a training batch of ``folder``, which must hold a readable image."""
    skipped = count_unreadable(unreadable, strict, announce)
    if batch is None:
        share = "this process's share of " if distributed else ""
        raise InputError(f"{folder}: every image of {share}a batch at step {step} is unreadable; {MEND_UNREADABLE}")
    return skipped


# what to do about unreadable images that stopped a training: removing them changes the image list,
# which a --resume refuses (its batches are those of the list it started with)
MEND_UNREADABLE = ("replace the unreadable images by readable ones of the same names (a --resume checks the names), "
                   "or start again with a larger --batch-size")


def collate_readable(samples: list) -> tuple[object | None, list[Unreadable]]:
    """Collate the decodable samples; return ``(batch or None, unreadable samples)``."""
    unreadable = [s for s in samples if isinstance(s, Unreadable)]
    good = [s for s in samples if not isinstance(s, Unreadable)]
    return (default_collate(good) if good else None), unreadable


class GlobalBatchSampler(Sampler[list[int]]):
    """Shuffled batches of a global size, each rank taking its contiguous slice of every batch.

    The permutation of epoch e comes from (seed, e), so rank r of a W-process run sees rows
    [r*B/W, (r+1)*B/W) of the very batches a single process with batch B sees. The last
    incomplete batch is dropped, as ``main_simsiam.py``'s ``drop_last=True``; with ``drop_last``
    False it is kept, as ``main_lincls.py`` keeps it: each rank takes an equal share of it, made
    up, when the ranks do not divide it, with the epoch's first images (as DistributedSampler pads).
    """

    def __init__(self, num_samples: int, global_batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True):
        if global_batch_size % world_size:
            raise InputError(
                f"--batch-size {global_batch_size}: not divisible by the {world_size} processes"
            )
        if num_samples < global_batch_size:
            raise InputError(
                f"--batch-size {global_batch_size}: larger than the dataset ({num_samples} image"
                f"{'' if num_samples == 1 else 's'})"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_samples // self.global_batch_size
        return -(-self.num_samples // self.global_batch_size)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Move to ``epoch``, skipping its first ``start_step`` batches (a mid-epoch resume)."""
        self.epoch = epoch
        self.start_step = start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self):
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch, 0, _SHUFFLE))
        order = torch.randperm(self.num_samples, generator=generator)
        for step in range(self.start_step, self.steps_per_epoch):
            batch = order[step * self.global_batch_size :][: self.global_batch_size]
            share = self.local_batch_size
            if len(batch) < self.global_batch_size:  # the last, kept (drop_last False)
                share = -(-len(batch) // self.world_size)
                batch = torch.cat([batch, order[: share * self.world_size - len(batch)]])
            yield batch[self.rank * share :][:share].tolist()


def _quiet_when_the_main_process_stops(worker_id: int) -> None:
    """In a worker: when the main process stops on Ctrl-C or SIGTERM while fetching a batch, the
    worker's threads find their pipes to it broken and would print tracebacks after its one-line
    message. multiprocessing reports them through Queue._on_queue_feeder_error (the queue's feeder
    thread) and sys.excepthook (resource_sharer's thread, which gets an EOFError when the main
    process goes in the middle of taking a tensor): both drop just these errors here.
    SIGTERM gets its default action back: the main process's handler is for the main process."""
    import multiprocessing.queues
    import signal
    import sys

    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def broken(error_type) -> bool:
        return issubclass(error_type, (BrokenPipeError, ConnectionResetError, EOFError))

    feeder_error, excepthook = multiprocessing.queues.Queue._on_queue_feeder_error, sys.excepthook
    multiprocessing.queues.Queue._on_queue_feeder_error = staticmethod(
        lambda error, obj: None if broken(type(error)) else feeder_error(error, obj))
    sys.excepthook = lambda kind, value, tb: None if broken(kind) else excepthook(kind, value, tb)


def make_loader(dataset: Dataset, batch_sampler: Sampler | None = None, batch_size: int = 256,
                workers: int = 0, pin_memory: bool = False, collate_fn=collate_readable) -> DataLoader:
    """A DataLoader that drops undecodable images (see :func:`collate_readable`, the default ``collate_fn``).

    Without a ``batch_sampler`` the images come in order, ``batch_size`` at a time (at most all of
    them: a batch size beyond ``sys.maxsize`` would fail in the sampler, one beyond the dataset
    makes the same single batch).
    """
    check_int("--workers", workers, 0, MAX_WORKERS)  # each one is a forked process
    common = dict(num_workers=workers, collate_fn=collate_fn, pin_memory=pin_memory,
                  persistent_workers=False,  # new workers each epoch see the dataset's new epoch
                  worker_init_fn=_quiet_when_the_main_process_stops if workers else None)
    if workers:
        common["prefetch_factor"] = 4
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **common)
    return DataLoader(dataset, batch_size=max(1, min(batch_size, len(dataset))), shuffle=False, **common)
