"""The official SimSiam recipe as the official ``main_simsiam.py`` runs it, rebuilt for timing.

What the official script does on one GPU, and so what this reproduces (from its description, no
code copied): DistributedDataParallel in a process group of one (the script refuses to run
without DDP) with SyncBatchNorm; ``cudnn.benchmark = True``; fp32; an ``ImageFolder`` whose PIL
images go through torchvision's (v1, PIL) transforms, ``RandomResizedCrop(scale 0.2-1)``,
``ColorJitter(0.4, 0.4, 0.4, 0.1)`` with p=0.8, ``RandomGrayscale(0.2)``, a PIL ``GaussianBlur``
with sigma in [0.1, 2] with p=0.5, flip, ``ToTensor``, ``Normalize``, twice per image; a
``DataLoader`` with a ``DistributedSampler``, worker processes, ``pin_memory=True`` and
``drop_last=True``; and a step that copies both views to the GPU, runs the model, takes
``-(cos(p1, z2).mean() + cos(p2, z1).mean()) / 2`` with ``nn.CosineSimilarity``, reads the loss
with ``loss.item()`` for its meter, and does ``zero_grad``, ``backward``, ``step``.

The model is :class:`simsiam.model.SimSiam`, which is laid out as the official builder. The
CIFAR configuration keeps the step and the loader and uses the paper's CIFAR model and
augmentation (App. D: 32x32 crops, no blur), which the official script does not cover.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
import time

import torch
import torch.distributed as dist
import torchvision
from PIL import ImageFilter
from torch import nn
from torchvision import transforms

from simsiam.augment import IMAGENET_MEAN, IMAGENET_STD
from simsiam.train import build_model, build_optimizer

from .harness import Method, loader_queue


class PILGaussianBlur:
    """The official ``loader.GaussianBlur``: PIL's blur with a radius (sigma) uniform in [0.1, 2]."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, image):
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class TwoCrops:
    """The official ``loader.TwoCropsTransform``: two draws of the same augmentation."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return [self.transform(image), self.transform(image)]


def official_augmentation(image_size: int, blur: bool) -> transforms.Compose:
    steps = [transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
             transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
             transforms.RandomGrayscale(p=0.2)]
    if blur:
        steps.append(transforms.RandomApply([PILGaussianBlur()], p=0.5))
    steps += [transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


def _process_group_of_one(device: torch.device) -> None:
    if dist.is_initialized():
        return
    folder = tempfile.mkdtemp()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"file://{os.path.join(folder, 'rendezvous')}", world_size=1, rank=0)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # a process's benchmark leaves no folder behind


def build(config, device: torch.device, passes: int = 1) -> Method:
    """The official pipeline and step for a :class:`simsiam.config.PretrainConfig`'s model,
    augmentation, data, batch size and worker count; the folder's images ``passes`` times over
    in an epoch (for timing: see :func:`benchmarks.harness.passes_needed`)."""
    start = time.perf_counter()
    _process_group_of_one(device)
    torch.manual_seed(0)
    model = build_model(config)
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None)
    criterion = nn.CosineSimilarity(dim=1).to(device)
    optimizer = build_optimizer(model.module, config)
    torch.backends.cudnn.benchmark = True

    dataset = torchvision.datasets.ImageFolder(config.data, TwoCrops(official_augmentation(config.image_size, config.blur)))
    if passes > 1:
        dataset = torch.utils.data.ConcatDataset([dataset] * passes)
    sampler = torch.utils.data.distributed.DistributedSampler(dataset)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=False, num_workers=config.workers,
                                         pin_memory=True, sampler=sampler, drop_last=True)
    epochs = iter(range(10**9))

    def epoch():
        sampler.set_epoch(next(epochs))
        return loader

    def step(batch):
        images, _ = batch
        x1 = images[0].to(device, non_blocking=True)
        x2 = images[1].to(device, non_blocking=True)
        p1, p2, z1, z2 = model(x1=x1, x2=x2)
        loss = -(criterion(p1, z2).mean() + criterion(p2, z1).mean()) * 0.5
        loss.item()  # the official AverageMeter update: one synchronisation a step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss

    model.train()
    workers, queue = loader_queue(loader)
    return Method("official", epoch, step, config.batch_size, setup_s=time.perf_counter() - start,
                  notes="fp32, PIL transforms, DDP of one process", workers=workers, queue=queue)
