"""Ours, as ``simsiam pretrain`` trains: the plain path (DataLoader workers running the
transforms-v2 recipe on uint8 tensors) and the fast path (data decoded and augmented on the GPU,
``torch.compile``), with the precision and memory format that :mod:`simsiam.runtime` picks (bf16
autocast and channels_last on CUDA). Also the compute bound: the fast path's model and step on
batches that already sit on the GPU, ready to go, so that no data work is left.

The step is the training loop's (``simsiam.train._pretrain``): views to the device, channels_last,
autocast forward and loss, ``zero_grad(set_to_none=True)``, backward, SGD step; the loss stays on
the device (the loop reads it every ``--log-every`` steps, the harness at the end).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from simsiam import runtime as rt
from simsiam.augment import TwoViews, pretrain_transform
from simsiam.data import GlobalBatchSampler, ImageDataset, make_loader, scan_images
from simsiam.device_data import pretrain_batches
from simsiam.loss import negative_cosine_similarity
from simsiam.train import build_model, build_optimizer

from .harness import Method


class _Trainer:
    """The model, optimizer and step of a run, built once and shared by the methods of a process."""

    def __init__(self, config, compile_model: bool):
        self.runtime = rt.start(config.device, config.precision)
        torch.manual_seed(0)
        model = build_model(config)
        self.optimizer = build_optimizer(model, config)
        model.to(self.runtime.device)
        if self.runtime.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model, self.loss_fn = model, negative_cosine_similarity
        if compile_model:
            self.model, self.loss_fn = torch.compile(model), torch.compile(negative_cosine_similarity)
        self.model.train()

    def step(self, batch):
        batch, _ = batch  # (batch, unreadable) as the loaders yield it
        if batch is None:
            return None
        (view1, view2), _, _ = batch
        runtime = self.runtime
        view1 = view1.to(runtime.device, non_blocking=True)
        view2 = view2.to(runtime.device, non_blocking=True)
        if runtime.channels_last:
            view1 = view1.contiguous(memory_format=torch.channels_last)
            view2 = view2.contiguous(memory_format=torch.channels_last)
        with runtime.autocast():
            p1, p2, z1, z2 = self.model(view1, view2)
            loss = self.loss_fn(p1, p2, z1, z2)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def _sampler(config, images) -> GlobalBatchSampler:
    return GlobalBatchSampler(len(images), config.batch_size, config.seed)


def _epochs(source, sampler):
    counter = iter(range(10**9))

    def epoch():
        number = next(counter)
        sampler.set_epoch(number)
        source.set_epoch(number)
        return source
    return epoch


def build_plain(config, device: torch.device) -> list[Method]:
    start = time.perf_counter()
    trainer = _Trainer(config, compile_model=False)
    images = scan_images(config.data)
    sampler = _sampler(config, images)
    transform = TwoViews(pretrain_transform(config.image_size, (config.crop_min_scale, 1.0), config.blur))
    dataset = ImageDataset(images, transform, seed=config.seed)
    loader = make_loader(dataset, sampler, workers=config.workers, pin_memory=device.type == "cuda")
    loader.set_epoch = dataset.set_epoch
    return [Method("ours-plain", _epochs(loader, sampler), trainer.step, config.batch_size,
                   setup_s=time.perf_counter() - start,
                   notes=f"{trainer.runtime.precision}, transforms v2 on uint8 in {config.workers} workers")]


def build_fast(config, device: torch.device, compile_model: bool = True) -> list[Method]:
    """The compute bound first (it also pays for the compilation), then the fast path, on one
    compiled model. ``config.data_on_gpu`` / ``config.gpu_decode`` say which fast source."""
    start = time.perf_counter()
    trainer = _Trainer(config, compile_model)
    built = time.perf_counter() - start
    views = [torch.randn(config.batch_size, 3, config.image_size, config.image_size, device=trainer.runtime.device)
             for _ in range(4)]
    ready = [(((views[i], views[i + 1]), None, None), []) for i in (0, 2)]
    compiled = "compiled" if compile_model else "eager"
    bound = Method("compute-bound", lambda: ready * 50, trainer.step, config.batch_size, setup_s=built,
                   notes=f"{trainer.runtime.precision}, {compiled}, batches already on the GPU")

    start = time.perf_counter()
    images = scan_images(config.data)
    sampler = _sampler(config, images)
    source = pretrain_batches(config, images, sampler, trainer.runtime)
    if source is None:
        raise RuntimeError("the config asks for no fast-path source (data_on_gpu / gpu_decode)")
    fast = Method("ours-fast", _epochs(source, sampler), trainer.step, config.batch_size,
                  setup_s=built + time.perf_counter() - start,
                  notes=f"{trainer.runtime.precision}, {compiled}, {source.name}")
    return [bound, fast]


def fast_config(config):
    """The fast path's source for a config: the dataset on the GPU for CIFAR, GPU decoding else."""
    cifar = config.image_size <= 64
    return dataclasses.replace(config, data_on_gpu=cifar, gpu_decode=not cifar)
