"""Ours, as ``simsiam pretrain`` trains: the plain path (DataLoader workers running the
transforms-v2 recipe on uint8 tensors) and the fast path (data decoded and augmented on the GPU,
``torch.compile``), with the precision and memory format that :mod:`simsiam.runtime` picks (bf16
autocast and channels_last on CUDA). Also the compute bound: the fast path's model and step on
batches that already sit on the GPU, ready to go, so that no data work is left.

The step is the training loop's (``simsiam.train._pretrain``): views to the device, channels_last,
autocast forward and loss, ``zero_grad(set_to_none=True)``, backward, SGD step; the loss stays on
the device (the loop reads it every ``--log-every`` steps, the harness at the end).

With ``compile_model``, a step that fails to compile, or whose compiling takes longer than
``compile_timeout`` seconds, is run eager instead, from then on, and the rows say so.
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
from simsiam.train import build_model, build_optimizer, train_step

from .harness import CompileTimeout, Method, drop_iterator, compile_failure, give_up_compiling, loader_queue, time_limit


class _Trainer:
    """The model, optimizer and step of a run, built once and shared by the methods of a process."""

    def __init__(self, config, compile_model: bool, compile_timeout: float = 0):
        self.runtime = rt.start(config.device, config.precision)
        torch.manual_seed(0)
        model = build_model(config)
        self.optimizer = build_optimizer(model, config)
        model.to(self.runtime.device)
        if self.runtime.channels_last:
            model.to(memory_format=torch.channels_last)
        self.eager = self.model, self.loss_fn = model, negative_cosine_similarity
        self.compiled, self.compile_timeout = compile_model, compile_timeout
        self.compile_note = "compiled" if compile_model else "eager"
        if compile_model:
            self.model, self.loss_fn = torch.compile(model), torch.compile(negative_cosine_similarity)
        self.model.train()

    def step(self, batch):
        """A training step; compiled, the step runs under a time limit (compiling happens in the
        first calls), and on any failure the step is redone eager, as are all later ones."""
        if not self.compiled:
            return self._step(batch)
        try:
            with time_limit(self.compile_timeout):
                return self._step(batch)
        except (Exception, CompileTimeout) as err:  # noqa: BLE001 - whatever compiling raised, eager is the answer
            self.compile_note = compile_failure(err)
            self.compiled = False
            self.model, self.loss_fn = self.eager
            return self._step(batch)

    def _step(self, batch):
        batch, _ = batch  # (batch, unreadable) as the loaders yield it
        if batch is None:
            return None
        (view1, view2), _, _ = batch
        loss, _ = train_step(self.model, self.loss_fn, self.optimizer, self.runtime, view1, view2)
        return loss


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


def repeat_images(images, passes: int):
    """The folder's images listed ``passes`` times over: an epoch as long as that many (see
    :func:`benchmarks.harness.passes_needed`)."""
    if passes <= 1:
        return images
    return dataclasses.replace(images, paths=images.paths * passes, labels=images.labels * passes)


def build_plain(config, device: torch.device, passes: int = 1) -> list[Method]:
    start = time.perf_counter()
    trainer = _Trainer(config, compile_model=False)
    images = repeat_images(scan_images(config.data), passes)
    sampler = _sampler(config, images)
    transform = TwoViews(pretrain_transform(config.image_size, (config.crop_min_scale, 1.0), config.blur))
    dataset = ImageDataset(images, transform, seed=config.seed)
    loader = make_loader(dataset, sampler, workers=config.workers, pin_memory=device.type == "cuda")
    loader.set_epoch = dataset.set_epoch
    workers, queue = loader_queue(loader)
    return [Method("ours-plain", _epochs(loader, sampler), trainer.step, config.batch_size,
                   setup_s=time.perf_counter() - start, workers=workers, queue=queue,
                   notes=f"{trainer.runtime.precision}, transforms v2 on uint8 in {config.workers} workers")]


def build_fast(config, device: torch.device, compile_model: bool = True, passes: int = 1,
               compile_timeout: float = 0) -> list[Method]:
    """The compute bound first (it also pays for the compilation), then the fast path, on one
    compiled model. ``config.data_on_gpu`` / ``config.gpu_decode`` say which fast source; a
    source with DataLoader workers (GPU decoding) lists the images ``passes`` times, one held on
    the device only up to a batch (its epoch ends without restarting anything). Compiled, the fast
    row's setup_s includes compiling the augmentation (on one batch, under the time limit)."""
    start = time.perf_counter()
    trainer = _Trainer(config, compile_model, compile_timeout)
    built = time.perf_counter() - start

    def ready_batches():
        # made for each pass and freed with it, so that the fast row's peak memory does not hold them
        views = [torch.randn(config.batch_size, 3, config.image_size, config.image_size, device=trainer.runtime.device)
                 for _ in range(4)]
        return [(((views[i], views[i + 1]), None, None), []) for i in (0, 2)] * 5000

    precision = trainer.runtime.precision
    # its peak memory includes the fast row's dataset when that is held on the GPU (built below)
    held = (", peak includes the dataset held on the GPU for the fast row"
            if config.data_on_gpu and trainer.runtime.device.type == "cuda" else "")
    where = "on the GPU" if trainer.runtime.device.type == "cuda" else "in memory"
    bound = Method("compute-bound", ready_batches, trainer.step, config.batch_size, setup_s=built,
                   notes=lambda: f"{precision}, {trainer.compile_note}, batches already {where}{held}")

    start = time.perf_counter()
    config = dataclasses.replace(config, compile=compile_model)  # the augmentation compiles with the step
    images = scan_images(config.data)
    # a source held on the device runs into its next epoch without restarting anything; it only
    # needs a batch's worth of images, as the others do with their passes
    images = repeat_images(images, -(-config.batch_size // len(images.paths)) if config.data_on_gpu else passes)
    sampler = _sampler(config, images)
    source = pretrain_batches(config, images, sampler, trainer.runtime)
    if source is None:
        raise RuntimeError("the config asks for no fast-path source (data_on_gpu / gpu_decode)")
    workers, queue = loader_queue(source.loader) if hasattr(source, "loader") else (0, 0)
    epochs = _epochs(source, sampler)
    if compile_model:
        _compile_augmentation(source.augment, epochs, compile_timeout)

    def notes():
        augmentation = f", augmentation eager ({source.augment.eager_because})" if source.augment.eager_because else ""
        return f"{precision}, {trainer.compile_note}{augmentation}, {source.name}"
    fast = Method("ours-fast", epochs, trainer.step, config.batch_size,
                  setup_s=built + time.perf_counter() - start, workers=workers, queue=queue, notes=notes)
    return [bound, fast]


def _compile_augmentation(augment, epochs, seconds: float) -> None:
    """Draw one batch, which compiles the augmentation, under the time limit: the timed loop would
    compile it inside ``next(batches)``, where no limit holds. Past the limit it runs eager."""
    batches = iter(epochs())
    try:
        with time_limit(seconds, "compiling the augmentation"):
            next(batches)
    except CompileTimeout as err:
        augment.run_eager(give_up_compiling(err))
    finally:
        drop_iterator(batches)


def fast_config(config):
    """The fast path's source for a config: the dataset on the GPU for CIFAR, GPU decoding else."""
    cifar = config.image_size <= 64
    return dataclasses.replace(config, data_on_gpu=cifar, gpu_decode=not cifar)
