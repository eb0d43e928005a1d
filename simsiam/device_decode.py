"""Reading image files as bytes in DataLoader workers, and decoding them in batches on the device.

JPEG files travel undecoded and are decoded together by ``torchvision.io.decode_jpeg`` on the
batch's device (nvjpeg on a GPU). Everything else is decoded on the CPU by the plain path's
:func:`simsiam.data.decode_rgb`: non-JPEG files in the worker that reads them, and in the main
process the JPEG files that the batch decoder rejects (CMYK JPEGs, say, which nvjpeg cannot
decode) or that lack the end-of-image marker (truncated files, which nvjpeg may decode without an
error where the plain path reports them unreadable). An image neither decoder can read is an
:class:`~simsiam.data.Unreadable`, as on the plain path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from .data import ImageList, Unreadable, decode_rgb, first_frame, make_loader, unreadable_reason

JPEG_START, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"


def _is_whole_jpeg(data: torch.Tensor) -> bool:
    return (len(data) > 4 and bytes(data[:3].tolist()) == JPEG_START
            and bytes(data[-2:].tolist()) == JPEG_END)


class EncodedImages(Dataset):
    """Images of an :class:`ImageList` as ``(payload, label, index)``: the payload is the file's
    bytes (uint8 ``[L]``) for a whole JPEG, else the image decoded on the CPU (uint8 ``[3, H, W]``),
    or an :class:`Unreadable` for a file that cannot be read or decoded."""

    def __init__(self, images: ImageList):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        path = self.images.root / self.images.paths[index]
        try:
            # a plain bytearray: memory-mapped storages (torch.from_file, io.read_file) fail to
            # travel from a worker to the main process
            data = torch.frombuffer(bytearray(path.read_bytes()) or bytearray(1), dtype=torch.uint8)
            payload = data if _is_whole_jpeg(data) else decode_rgb(path)
        except (OSError, RuntimeError) as err:
            payload = Unreadable(str(path), unreadable_reason(err, str(path)))
        return payload, self.images.labels[index], index


class EncodedBatch(NamedTuple):
    """A batch of :class:`EncodedImages`: the readable payloads with their labels, dataset indices
    and positions in the batch, then the unreadable files with their dataset indices.

    The JPEG files travel end to end in one tensor: a DataLoader worker hands each tensor to the
    main process through shared memory at a cost of about a millisecond, which one tensor a file
    would pay hundreds of times a batch.
    """

    jpeg_bytes: torch.Tensor  # the batch's JPEG files, end to end
    lengths: list[int]  # per readable image: its length in jpeg_bytes, or 0 when it came decoded
    decoded: list[torch.Tensor]  # the images the worker decoded (not JPEGs), in batch order
    labels: torch.Tensor
    indices: torch.Tensor
    positions: list[int]
    unreadable: list[Unreadable]
    unreadable_indices: list[int]

    @property
    def payloads(self) -> list[torch.Tensor]:
        """Per readable image, in order: its JPEG bytes (uint8 ``[L]``) or its decoded image."""
        files = iter(self.jpeg_bytes.split([n for n in self.lengths if n]))
        decoded = iter(self.decoded)
        return [next(files) if n else next(decoded) for n in self.lengths]


def collate_encoded(samples: list) -> EncodedBatch:
    good = [(p, s) for p, s in enumerate(samples) if not isinstance(s[0], Unreadable)]
    bad = [s for s in samples if isinstance(s[0], Unreadable)]
    jpegs = [s[0] for _, s in good if s[0].dim() == 1]
    return EncodedBatch(
        jpeg_bytes=torch.cat(jpegs) if jpegs else torch.zeros(0, dtype=torch.uint8),
        lengths=[len(s[0]) if s[0].dim() == 1 else 0 for _, s in good],
        decoded=[s[0] for _, s in good if s[0].dim() == 3],
        labels=torch.tensor([s[1] for _, s in good], dtype=torch.long),
        indices=torch.tensor([s[2] for _, s in good], dtype=torch.long),
        positions=[p for p, _ in good],
        unreadable=[s[0] for s in bad],
        unreadable_indices=[s[2] for s in bad],
    )


def encoded_loader(images: ImageList, batch_sampler: Sampler | None = None, batch_size: int = 256,
                   workers: int = 0) -> DataLoader:
    """A DataLoader of :class:`EncodedBatch` es whose workers only read files (and decode the
    non-JPEG ones); in order, ``batch_size`` at a time, without a ``batch_sampler``."""
    return make_loader(EncodedImages(images), batch_sampler, batch_size, workers, collate_fn=collate_encoded)


def _decode_on_cpu(payload: torch.Tensor) -> torch.Tensor:
    try:
        return first_frame(decode_image(payload, mode=ImageReadMode.RGB))
    except RuntimeError as err:
        # torchvision prefixes its messages with the C++ source location; keep the reason
        raise OSError(str(err).rsplit(", ", 1)[-1].strip()) from None


_SIDE_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def _decode_jpegs(payloads: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """``decode_jpeg`` of a list onto ``device``. On CUDA, on a side stream of our own: torchvision
    allocates the images on the current stream but has nvjpeg write them on a stream of its own that
    does not wait for the current one, so the caching allocator can hand it a block freed while
    kernels queued on the current stream still read it, and the decode overwrites their input
    (pytorch/vision#9606; our training loop queues a step ahead). Blocks allocated on the side
    stream are not the current stream's; the current stream then waits for the decode, and each
    image is marked as used there, so that its block is not reused before that use is done."""
    if device.type != "cuda":
        return decode_jpeg(payloads, mode=ImageReadMode.RGB, device=device)
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    current = torch.cuda.current_stream(device)
    side = _SIDE_STREAMS.setdefault(device, torch.cuda.Stream(device))
    with torch.cuda.stream(side):
        images = decode_jpeg(payloads, mode=ImageReadMode.RGB, device=device)
    current.wait_stream(side)
    for image in images:
        image.record_stream(current)
    return images


def decode_batch(payloads: list[torch.Tensor], paths: list[str], device: torch.device):
    """Decode a batch's payloads onto ``device``: ``(images, failed)``, ``images`` holding a uint8
    ``[3, H, W]`` tensor per payload, None where it cannot be decoded, and ``failed`` mapping the
    position of each None to its :class:`Unreadable`."""
    images: list[torch.Tensor | None] = [None] * len(payloads)
    jpeg = [i for i, p in enumerate(payloads) if p.dim() == 1]
    for i, p in enumerate(payloads):
        if p.dim() == 3:
            images[i] = p.to(device, non_blocking=True)
    if jpeg:
        try:
            decoded = _decode_jpegs([payloads[i] for i in jpeg], device)
        except torch.cuda.OutOfMemoryError:  # a RuntimeError too, but not a file's fault
            raise
        except RuntimeError:  # one bad file fails the whole batch: decode one at a time
            decoded = []
            for i in jpeg:
                try:
                    decoded += _decode_jpegs([payloads[i]], device)
                except torch.cuda.OutOfMemoryError:
                    raise
                except RuntimeError:
                    decoded.append(None)
        for i, image in zip(jpeg, decoded):
            images[i] = image
    failed: dict[int, Unreadable] = {}
    for i, image in enumerate(images):
        if image is None:  # the device decoder gave up: the plain path's decoder decides
            try:
                images[i] = _decode_on_cpu(payloads[i]).to(device, non_blocking=True)
            except OSError as err:
                failed[i] = Unreadable(paths[i], str(err) or "cannot decode")
    return images, failed
