"""Embedding images: batches through a network, into memory or into a feature file.

Multi-GPU and multi-node (``torchrun``): rank r embeds the r-th contiguous slice of the images
into its own shard file, and rank 0 merges the shards in rank order, which is dataset order,
into the requested file. No features travel between processes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from simsiam.augment import eval_transform
from simsiam.data import ImageDataset, ImageList, count_unreadable, folder_warnings, make_loader, scan_images
from simsiam.atomic import check_output
from simsiam.config import MAX_IMAGE_SIZE, check_crop_fits, check_int
from simsiam.errors import InputError, agreed, given_as
from simsiam.runtime import Runtime, agreement

from .feature_model import FeatureModel
from .features import FeatureSet, FeatureWriter, check_utf8_names, first_non_finite_row, merge_shards, read_header
from .neighbours import normalized_float32

EventHandler = Callable[[dict], None]


def embed_batches(model: nn.Module, dataset, runtime: Runtime, batch_size: int = 256, workers: int = 0,
                  on_batch=None, batches=None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(features [B, D] float32, labels [B], dataset indices [B])`` of the decodable images, in order.

    ``on_batch(batch, unreadable)`` is called for every batch, also those where nothing decoded.
    The model runs in eval mode (BN uses its running statistics) and in the runtime's precision
    (bf16 autocast on CUDA); it is given back in the mode it was in. ``batches`` replaces the
    DataLoader over ``dataset``: any iterable of ``(batch, unreadable)`` pairs, such as the fast
    path's :class:`simsiam.device_data.EvalBatches` that decodes on the GPU.
    """
    was_training = model.training
    model.eval()
    loader = batches if batches is not None else make_loader(
        dataset, batch_size=batch_size, workers=workers, pin_memory=runtime.device.type == "cuda")
    try:
        with torch.no_grad():
            for batch, unreadable in loader:
                out = None
                if batch is not None:
                    images, labels, indices = batch
                    images = images.to(runtime.device, non_blocking=True)
                    if runtime.channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    with runtime.autocast():
                        features = model(images)
                    out = (features.float().cpu().numpy(), labels.numpy(), indices.numpy())
                if on_batch is not None:
                    on_batch(batch, unreadable)
                if out is not None:
                    yield out
    finally:
        model.train(was_training)


def embed(model: nn.Module, dataset: ImageDataset | None, runtime: Runtime, batch_size: int = 256,
          workers: int = 0, on_batch=None, batches=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features [N, D] float32, labels [N] and dataset indices [N] of the decodable images, in order.

    ``model`` is put in eval mode for the pass and given back in the mode it was in; ``batches``:
    see :func:`embed_batches`.
    """
    parts = list(embed_batches(model, dataset, runtime, batch_size, workers, on_batch, batches))
    if not parts:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    features, labels, indices = zip(*parts)
    return np.concatenate(features), np.concatenate(labels), np.concatenate(indices)


@dataclass
class ExtractSummary:
    path: Path
    images: int  # rows written
    skipped: int  # unreadable images left out
    dim: int
    processes: int  # that embedded the images: torchrun's world size, else 1


def _notify(on_event: EventHandler | None, event: dict) -> None:
    if on_event is not None:
        on_event(event)


class _Extraction:
    """What one call extracts: the images (this rank's slice of them), the transform, the attributes."""

    def __init__(self, model: FeatureModel, data, runtime: Runtime, image_size: int | None, resize: int | None,
                 normalize: bool, strict: bool, gpu_decode: bool = False, check_crop: bool = True,
                 source: str = "DATA"):
        if isinstance(data, ImageList):
            self.images = data
        else:
            with given_as(source, data):  # "DATA /x: no such folder", as the user gave it
                self.images = scan_images(data)
        self.source = source  # what the user gave the images as, for warnings
        check_utf8_names(self.images.root, self.images.paths)
        self.image_size = model.image_size if image_size is None else image_size
        self.resize = model.resize if resize is None else resize
        # a size not given comes from the checkpoint: name it, not an option the user did not type
        labels = {option: option if given is not None else f"{model.checkpoint}: its {option[2:]}"
                  for option, given in (("--image-size", image_size), ("--resize", resize))}
        check_int(labels["--image-size"], self.image_size, 1, MAX_IMAGE_SIZE)
        check_int(labels["--resize"], self.resize, 0, MAX_IMAGE_SIZE)
        if check_crop:
            check_crop_fits(labels["--resize"], self.resize, labels["--image-size"], self.image_size)
        dataset = ImageDataset(self.images, eval_transform(self.image_size, self.resize or None))
        # contiguous slices in rank order: the shards concatenated are the images in order
        mine = np.array_split(np.arange(len(dataset)), runtime.world_size)[runtime.rank]
        self.mine = mine.tolist() if runtime.distributed else None
        self.dataset = Subset(dataset, self.mine) if runtime.distributed else dataset
        self.gpu_decode = gpu_decode
        self.model = model
        self.runtime = runtime
        self.normalize = normalize
        self.strict = strict
        self.skipped = 0
        self.attrs = {
            "root": str(self.images.root.resolve()), "classes": self.images.classes, "arch": model.arch,
            "layer": model.layer, "checkpoint": model.checkpoint, "checkpoint_sha256": model.checkpoint_sha256,
            "image_size": self.image_size, "resize": self.resize, "normalized": normalize,
            "precision": runtime.precision,
        }

    def batches(self, batch_size: int, workers: int, on_event: EventHandler | None):
        """``(features, labels, paths)`` per batch, counting (or, with ``strict``, refusing) unreadable images."""
        def on_batch(batch, unreadable):
            self.skipped += count_unreadable(unreadable, self.strict, lambda bad: _notify(
                on_event, {"event": "unreadable", "path": bad.path, "reason": bad.reason}))
            done = (0 if batch is None else len(batch[2])) + len(unreadable)
            _notify(on_event, {"event": "batch", "images": done})

        module = self.model.module.to(self.runtime.device)
        if self.runtime.channels_last:  # as embed_batches lays out the images (CUDA): no conversion per layer
            module.to(memory_format=torch.channels_last)
        _notify(on_event, {"event": "start", "images": len(self.dataset), "total_images": len(self.images),
                           "rank": self.runtime.rank, "world_size": self.runtime.world_size,
                           "device": str(self.runtime.device), "precision": self.runtime.precision})
        for warning in folder_warnings(f"{self.source} {self.images.root}", self.images):
            _notify(on_event, {"event": "warning", "message": warning})
        batches = None
        if self.gpu_decode:  # the fast path's decoding on the device (simsiam.device_data.EvalBatches)
            from simsiam.device_data import EvalBatches

            batches = EvalBatches(self.images, self.image_size, self.resize or None, self.runtime.device,
                                  batch_size, workers, indices=self.mine)
        for features, labels, indices in embed_batches(module, self.dataset, self.runtime, batch_size, workers,
                                                        on_batch, batches):
            row = first_non_finite_row(features)
            if row is not None:  # broken weights: no feature file of NaNs that only fails later
                raise InputError(f"{self.model.checkpoint}: the network gives NaN or infinite features "
                                 f"(first for {self.images.paths[indices[row]]}); its weights are broken")
            if self.normalize:
                features = normalized_float32(features)
            yield features, labels, [self.images.paths[i] for i in indices]


def extract_features(model: FeatureModel, data: str | os.PathLike | ImageList, runtime: Runtime, image_size: int | None = None,
                     resize: int | None = None, batch_size: int = 256, workers: int = 0, normalize: bool = False,
                     strict: bool = False, on_event: EventHandler | None = None, gpu_decode: bool = False,
                     check_crop: bool = True, source: str = "DATA") -> FeatureSet:
    """Embed the images of ``data`` (an ImageFolder, a flat folder, or an ImageList) into memory (float32).
    ``check_crop`` False takes a resize smaller than the crop (queries made as an older database was);
    ``source`` names the images in warnings as the user gave them (``--train-dir``)."""
    if runtime.distributed:
        raise InputError("in-memory extraction runs in one process; under torchrun use simsiam extract --out")
    job = _Extraction(model, data, runtime, image_size, resize, normalize, strict, gpu_decode, check_crop, source)
    parts = list(job.batches(batch_size, workers, on_event))
    if not parts:
        raise InputError(f"{job.images.root}: none of its {len(job.images)} images could be decoded")
    features, labels, paths = zip(*parts)
    attrs = {**job.attrs, "skipped_images": job.skipped}
    return FeatureSet(np.concatenate(features), np.concatenate(labels),
                      [p for chunk in paths for p in chunk], attrs, str(job.images.root))


def shard_path(out: Path, rank: int, world_size: int) -> Path:
    return out.with_name(f"{out.name}.shards") / f"rank{rank:05d}-of-{world_size:05d}.h5"


def _remove_shards(out: Path) -> None:
    """The shards of ``out``: merged, or left by an interrupted multi-process extraction."""
    folder = shard_path(out, 0, 1).parent
    if not folder.is_dir():
        return
    for shard in folder.glob("rank*-of-*.h5"):
        shard.unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()


def _remove_shard(shard: Path) -> None:
    """One rank's shard, and the shards' folder once empty (the other ranks may still be using it)."""
    shard.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        shard.parent.rmdir()


def extract_to_file(model: FeatureModel, data: str | os.PathLike, out: str | os.PathLike, runtime: Runtime,
                    image_size: int | None = None, resize: int | None = None, dtype: str = "float16",
                    compression: str = "none", batch_size: int = 256, workers: int = 0, normalize: bool = False,
                    strict: bool = False, overwrite: bool = False,
                    on_event: EventHandler | None = None, gpu_decode: bool = False) -> ExtractSummary:
    """Embed the images of ``data`` into the feature file ``out`` (schema: :mod:`retrieval.features`).

    Written under a temporary name and renamed when complete. Under ``torchrun`` every rank
    writes its shard (``OUT.shards/rankRRRRR-of-WWWWW.h5``), then rank 0 merges them into ``out``
    and removes them; every rank returns once ``out`` is in place.
    """
    with agreement(runtime):  # under torchrun: every process checks, and all stop when one fails (rt.agree)
        out = check_output(out, "--out", overwrite, inputs=[data])  # never over one of the images it reads
        job = _Extraction(model, data, runtime, image_size, resize, normalize, strict, gpu_decode)
    def write(path: Path, replace: bool = True) -> int:
        """This process's images into the feature file ``path``; its rows."""
        with FeatureWriter(path, model.dim, job.attrs, dtype, compression, len(job.dataset), replace) as writer:
            for features, labels, paths in job.batches(batch_size, workers, on_event):
                writer.append(features, labels, paths)
            if writer.rows == 0 and not runtime.distributed:  # a rank's empty shard: _merge decides
                raise InputError(f"{data}: none of its {len(job.images)} images could be decoded")
            writer.attrs["skipped_images"] = job.skipped
            writer.commit()
        return writer.rows

    if not runtime.distributed:
        rows = write(out, replace=overwrite)
        _remove_shards(out)  # left by an interrupted multi-process extraction
        return ExtractSummary(out, rows, job.skipped, model.dim, 1)

    shard = shard_path(out, runtime.rank, runtime.world_size)
    try:
        write(shard)
        return _merge(out, data, job, runtime, model.dim, overwrite)
    except BaseException:
        # this rank or another failed (another's error reaches this one as a lost connection, or as
        # torchrun's SIGTERM, maybe while this shard is still being written): no shard is left
        # behind, nor the shards' folder, each rank removing its own
        _remove_shard(shard)
        raise


def _merge(out: Path, data, job: _Extraction, runtime: Runtime, dim: int, overwrite: bool = True) -> ExtractSummary:
    """Under torchrun, once this rank's shard is written: rank 0 merges every rank's into ``out``."""
    shards = [shard_path(out, rank, runtime.world_size) for rank in range(runtime.world_size)]
    runtime.barrier()  # every shard is complete
    headers = [read_header(shard) for shard in shards]
    rows = sum(h[0] for h in headers)
    skipped = sum(int(h[2].get("skipped_images", 0)) for h in headers)
    if not rows:  # every rank sees it, so none is left waiting at the barrier below
        raise agreed(InputError(f"{data}: none of its {len(job.images)} images could be decoded"))
    if runtime.is_main:
        merge_shards(out, shards, {**job.attrs, "skipped_images": skipped}, replace=overwrite)
        _remove_shards(out)
    runtime.barrier()  # ``out`` is in place for every rank
    return ExtractSummary(out, rows, skipped, dim, runtime.world_size)
