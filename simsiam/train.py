"""The pretraining loop: one process, or one of many under torchrun (DDP)."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Subset

from . import __version__, runtime as rt
from .atomic import link_atomic
from .augment import TwoViews, eval_transform, pretrain_transform
from .backbones import build_resnet, pooled_backbone
from .checkpoint import (LAST, epoch_checkpoint_name, find_resume_checkpoint, from_official_layout, save_atomic,
                         to_official_layout)
from .config import PretrainConfig, write_json_atomic
from .data import (MEND_UNREADABLE, ONE_CLASS_WARNING, GlobalBatchSampler, ImageDataset, count_training_unreadable, count_unreadable, folder_warnings,
                   labelled_images, make_loader, same_images, scan_images)
from .device_data import pretrain_batches
from .errors import InputError, SimSiamError, TrainingDiverged, agreed, given_as
from .loss import collapse_std, negative_cosine_similarity
from .model import SimSiam
from .run_dir import (CONFIG_FILE, METRICS_FILE, MetricsLog, RunFolder, check_resumable, check_resumed_images,
                      check_resumed_state, check_run_dir, resume_checkpoint, run_in_folder)

Event = Callable[[dict], None]


# The outputs of the fc torchvision's ResNet makes (the projector replaces it): fixed, the official
# --dim, so that the convolutions' initialisation, drawn after that fc's, is the same whatever
# --dim: the one extract --random-init gives as the baseline
CONSTRUCTOR_FC_OUTPUTS = 2048


def build_model(config: PretrainConfig) -> SimSiam:
    encoder = build_resnet(config.arch, num_classes=CONSTRUCTOR_FC_OUTPUTS, cifar_stem=config.cifar_stem,
                           zero_init_residual=True)
    return SimSiam(encoder, config.dim, config.pred_dim, config.proj_layers,
                   config.proj_hidden_dim or None, stop_gradient=config.stop_grad)


def diverged(what: str, last_good: str | None) -> TrainingDiverged:
    """The run's stop when its numbers are no longer finite, naming what it can go on from."""
    return TrainingDiverged(f"{what}; " + (f"the last good checkpoint is {last_good}" if last_good
                                           else "no checkpoint was written yet")
                            + " (a resumed run keeps its --lr: to lower it, start a new run)")


def non_finite_weights(model: nn.Module) -> str | None:
    """The first parameter or buffer holding NaN or infinity, None when all are finite (one
    synchronisation with the GPU). The loss, taken through train-mode BatchNorm, can stay finite
    while the weights under it are not."""
    tensors = [(name, t) for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_floating_point()]
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors])
    if bool(finite.all()):
        return None
    return tensors[int((~finite).nonzero()[0])][0]


def check_weights(model: nn.Module, runtime: rt.Runtime, epoch: int, step: int, last_good: str | None,
                  found: TrainingDiverged | None = None) -> None:
    """Before a checkpoint: every process checks (the same weights on every rank) and agrees, in the
    same collective, on a divergence this process ``found`` already (the kNN monitor's, on rank 0)."""
    bad = non_finite_weights(model) if found is None else None
    rt.agree(runtime, found if bad is None else diverged(
        f"the weights became NaN or infinite by step {step} (epoch {epoch + 1}; {bad})", last_good))


def build_optimizer(model: SimSiam, config: PretrainConfig) -> torch.optim.SGD:
    """SGD as the official script: the predictor in its own group when its lr is fixed."""
    if config.fix_pred_lr:
        groups = [{"params": model.encoder.parameters(), "fix_lr": False},
                  {"params": model.predictor.parameters(), "fix_lr": True}]
    else:
        groups = [{"params": model.parameters(), "fix_lr": False}]
    return torch.optim.SGD(groups, config.init_lr, momentum=config.momentum, weight_decay=config.wd)


def warmup_fraction(config: PretrainConfig, epoch: int) -> float:
    """The share of the lr a warmup epoch runs at (1 after it): a linear ramp of ``warmup_epochs``
    steps whose next step is the cosine's first epoch, at the peak (not a peak held twice)."""
    return (epoch + 1) / (config.warmup_epochs + 1) if epoch < config.warmup_epochs else 1.0


def learning_rate(config: PretrainConfig, epoch: int) -> float:
    """Cosine decay per epoch, as the official ``adjust_learning_rate``, after optional linear warmup
    (not in the official script, which has none)."""
    if epoch < config.warmup_epochs:
        return config.init_lr * warmup_fraction(config, epoch)
    progress = (epoch - config.warmup_epochs) / (config.epochs - config.warmup_epochs)
    return config.init_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, config: PretrainConfig, epoch: int) -> float:
    lr = learning_rate(config, epoch)
    fixed = config.init_lr * warmup_fraction(config, epoch)  # a fixed lr is not decayed, but is warmed up
    for group in optimizer.param_groups:
        group["lr"] = fixed if group.get("fix_lr") else lr
    return lr


def say_warnings(monitor, emit) -> None:
    """The warnings a monitor (the kNN monitor, lincls's evaluator; or None) has not said yet, as
    warning events."""
    while monitor is not None and monitor.warnings:
        emit({"event": "warning", "message": monitor.warnings.pop(0)})


class KnnMonitor:
    """Weighted-kNN top-1 of the backbone's pooled features on held-out labelled images.

    Every rank embeds its share of the images (every W-th one) and rank 0 scores the gathered
    features, so the monitor takes 1/W of the time it would on one rank and no rank waits long.
    """

    def __init__(self, config: PretrainConfig, runtime: rt.Runtime):
        transform = eval_transform(config.image_size, config.eval_resize or None)
        train, val = labelled_images(config.knn_train, config.knn_val, "--knn-train", "--knn-val")
        self.train, self.val = ImageDataset(train, transform), ImageDataset(val, transform)
        if len(self.train) < config.knn_k:
            raise InputError(f"--knn-k {config.knn_k}: larger than the {len(self.train)} images of "
                             f"--knn-train {config.knn_train}")
        self.config = config
        self.runtime = runtime
        self.warnings = []  # said by the run as they come (simsiam.train.pretrain takes them)
        self.said_unreadable = False
        if same_images(train.root, train.paths, val.root, val.paths):
            self.warnings.append("--knn-train and --knn-val hold the same images: each is its own nearest "
                                 "neighbour, so the kNN top-1 is inflated; give held-out images as --knn-val")
        for option, images in (("--knn-train", train), ("--knn-val", val)):
            self.warnings += folder_warnings(f"{option} {images.root}", images)
        if len(train.classes) == 1:  # as knn and lincls say it
            self.warnings.append(ONE_CLASS_WARNING.format(f"--knn-train {train.root}"))

    def __call__(self, encoder: nn.Module) -> float | None:
        """The top-1 on rank 0; None on the other ranks. Every rank must call it."""
        from retrieval.knn import weighted_knn

        backbone = pooled_backbone(encoder)
        train_x, train_y, train_bad = self._embed_share(backbone, self.train)
        val_x, val_y, val_bad = self._embed_share(backbone, self.val)
        if not self.runtime.is_main:
            return None
        # how many images decode is known only now (checking before training would decode them twice)
        config = self.config
        count_unreadable((train_bad + val_bad)[:1], config.strict, lambda bad: None)  # --strict: the first one
        for option, folder, dataset, labels in (("--knn-train", config.knn_train, self.train, train_y),
                                                ("--knn-val", config.knn_val, self.val, val_y)):
            if not len(labels):
                raise InputError(f"{option} {folder}: none of its {len(dataset)} images could be decoded")
        if len(train_y) < config.knn_k:
            raise InputError(f"--knn-k {config.knn_k}: larger than the {len(train_y)} readable images "
                             f"(of {len(self.train)}) of --knn-train {config.knn_train}")
        if not self.said_unreadable:  # the same images every time: said once, at the first evaluation
            self.said_unreadable = True
            skipped = [f"{len(dataset) - len(labels)} of the {len(dataset)} images of {option} {folder}"
                       for option, folder, dataset, labels in (("--knn-train", config.knn_train, self.train, train_y),
                                                               ("--knn-val", config.knn_val, self.val, val_y))
                       if len(labels) < len(dataset)]
            if skipped:
                self.warnings.append(f"the kNN monitor leaves out {' and '.join(skipped)}: they could not be decoded")
        for option, features in (("--knn-train", train_x), ("--knn-val", val_x)):
            if not np.isfinite(features).all():  # the weights, not the images: weighted_knn would blame the input
                raise TrainingDiverged(f"the network gives NaN or infinite features for the {option} images of the "
                                       "kNN monitor: its weights have diverged")
        num_classes = len(self.train.images.classes)
        [result] = weighted_knn(train_x, train_y, val_x, val_y, (self.config.knn_k,), self.config.knn_temperature,
                                num_classes=num_classes, device=self.runtime.device)
        return result.top1

    def _embed_share(self, backbone: nn.Module, dataset: ImageDataset) -> tuple[np.ndarray, np.ndarray, list]:
        """This rank's features, labels and first unreadable image (a list of at most one
        :class:`Unreadable`); on rank 0, those of every rank (row order does not matter to kNN)."""
        from retrieval.extract import embed

        runtime = self.runtime
        share = Subset(dataset, range(runtime.rank, len(dataset), runtime.world_size))
        unreadable = []
        features, labels, _ = embed(backbone, share, runtime, min(256, self.config.batch_size), self.config.workers,
                                    on_batch=lambda batch, bad: unreadable.extend(bad))
        if not runtime.distributed:
            return features, labels, unreadable[:1]
        shares = [None] * runtime.world_size if runtime.is_main else None
        dist.gather_object((features, labels, unreadable[:1]), shares, dst=0)
        if not runtime.is_main:
            return features, labels, unreadable[:1]
        first_bad = [bad for _, _, share_bad in shares for bad in share_bad][:1]
        shares = [(f, y) for f, y, _ in shares if len(y)]  # a share where nothing decoded has no width
        if not shares:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), first_bad
        return np.concatenate([f for f, _ in shares]), np.concatenate([y for _, y in shares]), first_bad


@dataclass
class EpochTotals:
    """Running totals of the epoch under way: loss summed over steps, steps, unreadable images."""

    loss_sum: float = 0.0
    steps: int = 0
    skipped: int = 0

    def add(self, loss_sum: float, steps: int, skipped: int) -> None:
        self.loss_sum += loss_sum
        self.steps += steps
        self.skipped += skipped

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.steps, 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _reduce_interval(loss_sum: torch.Tensor, diverged_at: torch.Tensor, skipped: int,
                     runtime: rt.Runtime) -> tuple[float, int, int]:
    """The interval's loss sum (averaged over ranks), the first step whose loss was not finite on
    any rank (-1: none) and the unreadable images of all ranks, with one transfer from the device."""
    packed = torch.stack([loss_sum.double(), torch.tensor(float(skipped), dtype=torch.float64, device=loss_sum.device),
                          torch.where(diverged_at < 0, float("inf"), diverged_at.double())])
    if runtime.distributed:
        dist.all_reduce(packed[:2])
        dist.all_reduce(packed[2:], op=dist.ReduceOp.MIN)
    loss, skipped, first_bad = packed.tolist()
    return loss / runtime.world_size, -1 if first_bad == float("inf") else int(first_bad), int(skipped)


def train_step(model: nn.Module, loss_fn, optimizer: torch.optim.Optimizer, runtime: rt.Runtime,
               view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on a batch of two views (moved to the device here); returns the loss and the
    first view's projections z1 (for the collapse monitor), detached. The benchmarks time it."""
    view1 = view1.to(runtime.device, non_blocking=True)
    view2 = view2.to(runtime.device, non_blocking=True)
    if runtime.channels_last:
        view1 = view1.contiguous(memory_format=torch.channels_last)
        view2 = view2.contiguous(memory_format=torch.channels_last)
    with runtime.autocast():
        p1, p2, z1, z2 = model(view1, view2)
        loss = loss_fn(p1, p2, z1, z2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), z1.detach()


def _checkpoint(config, images, model, optimizer, epoch, step_in_epoch, global_step, metrics) -> dict:
    return {
        "epoch": epoch,  # epochs completed (official meaning); the epoch under way when step_in_epoch > 0
        "step_in_epoch": step_in_epoch,
        "global_step": global_step,
        "arch": config.arch,
        "cifar_stem": config.cifar_stem,
        "state_dict": to_official_layout(model.state_dict()),
        "optimizer": optimizer.state_dict(),
        "config": config.to_dict(),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "metrics": metrics,
        "images": images,  # the ImageList.fingerprint() of DATA: a resume needs the same images (check_resumed_images)
        "simsiam_version": __version__,
    }


def pretrain(config: PretrainConfig, resume_from: str | os.PathLike | None = None, overwrite: bool = False,
             on_event: Event | None = None) -> dict:
    """Train SimSiam as ``config`` says; returns the last metrics.

    ``resume_from``: a checkpoint to continue from exactly (model, optimizer, epoch, step, RNG), or a
    run folder (its newest checkpoint).
    ``on_event``: called with ``{"event": "start" | "log" | "epoch" | "unreadable" | "end", ...}``
    on the main process, for progress display.
    """
    if resume_from is not None:  # a run folder: its newest checkpoint, as --resume takes it
        resume_from = find_resume_checkpoint(resume_from)
    return run_in_folder(config, overwrite, lambda runtime, run_folder: _pretrain(
        config, runtime, run_folder, resume_from, overwrite, on_event or (lambda event: None)))


def _pretrain(config, runtime: rt.Runtime, run_folder: RunFolder, resume_from, overwrite, on_event: Event) -> dict:
    emit = on_event if runtime.is_main else (lambda event: None)
    out = Path(config.out)
    # every process checks, then they agree (rt.agree): a check that fails on some only (a file one
    # node lacks) stops every process, before rank 0 changes the folder
    with rt.agreement(runtime):
        check_run_dir(out, resume_from, overwrite, "pretrain")
        checkpoint = resume_checkpoint(config, resume_from)
        if checkpoint is not None:
            with torch.device("meta"):  # shapes only
                shapes = build_model(config)
            check_resumable(checkpoint, resume_from)
            check_resumed_state(checkpoint, resume_from, from_official_layout, shapes, build_optimizer(shapes, config))
        if checkpoint is not None and checkpoint["epoch"] >= config.epochs:  # its next epoch (from 1) is past the end
            planned = (checkpoint.get("config") or {}).get("epochs")  # the run's own total, not the one given
            of = f" of its {planned}" if isinstance(planned, int) and planned > checkpoint["epoch"] else ""
            where = (f"is in epoch {checkpoint['epoch'] + 1}{of}" if checkpoint.get("step_in_epoch")
                     else f"has done {checkpoint['epoch']}{of} epochs" if of
                     else f"has finished its {checkpoint['epoch']} epochs")
            raise InputError(f"--resume {resume_from}: the run {where} (--epochs {config.epochs}); "
                             f"pass --epochs N with N > {checkpoint['epoch']} to train on")
        with given_as("DATA", config.data):
            images = scan_images(config.data)
        for warning in folder_warnings(f"DATA {images.root}", images, labels_used=False):  # before a refusal it explains
            emit({"event": "warning", "message": warning})
        fingerprint = images.fingerprint()
        if checkpoint is not None:
            check_resumed_images(checkpoint, fingerprint, config, "data", resume_from)
        sampler = GlobalBatchSampler(len(images), config.batch_size, config.seed, runtime.rank, runtime.world_size)
        knn = KnnMonitor(config, runtime) if config.knn_train else None
        # the batch source: the fast path's (decoding and augmenting on the device) when the config asks
        # for it or auto picks it, else DataLoader workers; both yield the same batches for the sampler.
        # Made before the folder changes: the fast path refuses images of mixed sizes.
        dataset = loader = pretrain_batches(config, images, sampler, runtime)
        if loader is None:
            transform = TwoViews(pretrain_transform(config.image_size, (config.crop_min_scale, 1.0), config.blur))
            dataset = ImageDataset(images, transform, seed=config.seed)
            loader = make_loader(dataset, sampler, workers=config.workers, pin_memory=runtime.device.type == "cuda")
    if runtime.is_main:
        run_folder.prepare(resume_from)
    runtime.barrier()

    torch.manual_seed(config.seed)
    model = build_model(config).to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    # built after the move, so that a resumed optimizer's state lands on the parameters' device
    optimizer = build_optimizer(model, config)
    start_epoch = start_step = global_step = 0
    if checkpoint is not None:
        model.load_state_dict(from_official_layout(checkpoint["state_dict"]))
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch = checkpoint["epoch"]
        start_step = checkpoint.get("step_in_epoch", 0)
        global_step = checkpoint.get("global_step", start_epoch * sampler.steps_per_epoch + start_step)
        if "rng" in checkpoint:
            torch.set_rng_state(checkpoint["rng"]["torch"])
            if len(checkpoint["rng"].get("cuda", [])) == torch.cuda.device_count() > 0:
                torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    model = rt.sync_batchnorm(model, runtime)
    # raw: the model whose state dict is saved; model: what the step runs (DDP-wrapped in parallel runs)
    raw, model = model, rt.data_parallel(model, runtime)

    loss_fn = negative_cosine_similarity
    if config.compile:  # raw stays uncompiled: its state dict keys are the official ones
        model, loss_fn = torch.compile(model), torch.compile(loss_fn)
    total_steps = config.epochs * sampler.steps_per_epoch
    resolved = {"images": len(images), "steps_per_epoch": sampler.steps_per_epoch, "total_steps": total_steps,
                "world_size": runtime.world_size, "batch_per_process": config.batch_size // runtime.world_size,
                "init_lr": config.init_lr, "device": str(runtime.device),
                "precision": runtime.precision, "channels_last": runtime.channels_last,
                "batch_source": getattr(loader, "name", "dataloader")}
    if runtime.is_main:  # the settings as given, and what "auto" and the scaling rules made of them
        write_json_atomic({**config.to_dict(), "resolved": resolved}, out / CONFIG_FILE)
    # after config.json, which marks the folder's files as a simsiam run's (check_run_dir)
    metrics_log = MetricsLog(out / METRICS_FILE, runtime.is_main, global_step if checkpoint else None)
    emit({"event": "start", **resolved, "global_step": global_step, "epoch": start_epoch,
          "resumed_from": str(resume_from) if checkpoint is not None else None})
    say_warnings(knn, emit)

    last_good = str(resume_from) if checkpoint is not None else None  # named when the loss diverges
    # an epoch's running totals; a mid-epoch checkpoint carries them so that a resumed epoch's
    # summary line is the one the uninterrupted run writes
    totals = EpochTotals(**checkpoint.get("epoch_totals", {})) if checkpoint is not None and start_step else EpochTotals()
    del checkpoint
    metrics: dict = {}
    announce = lambda bad: emit({"event": "unreadable", "path": bad.path, "reason": bad.reason})  # noqa: E731
    model.train()
    first_batch = True
    for epoch in range(start_epoch, config.epochs):
        lr = set_learning_rate(optimizer, config, epoch)
        sampler.set_epoch(epoch, start_step if epoch == start_epoch else 0)
        dataset.set_epoch(epoch)
        if epoch != start_epoch:
            totals = EpochTotals()
        # sums since the last log line, kept on the device so that steps do not wait for the GPU
        loss_sum = torch.zeros((), device=runtime.device)
        diverged_at = torch.full((), -1, dtype=torch.long, device=runtime.device)
        skipped = 0
        interval_steps, interval_start = 0, time.perf_counter()
        timed_steps, epoch_start = 0, time.perf_counter()
        for step, (batch, unreadable) in enumerate(loader, start=sampler.start_step):
            # the run's first batch is agreed on (one collective), as the checks before it: where one
            # process's share of it is unreadable, every process stops with one Error line and the
            # fresh run's files go. A later batch's error ends the others by their lost connection.
            with rt.agreement(runtime, when=first_batch):
                skipped += count_training_unreadable(batch, unreadable, config.strict, announce, config.data,
                                                     global_step, runtime.distributed)
                (view1, view2), _, _ = batch
                if len(view1) < 2 and runtime.world_size == 1:
                    raise InputError(f"{config.data}: one readable image in the batch of step {global_step}, and "
                                     f"BatchNorm needs two; {MEND_UNREADABLE}")
            first_batch = False
            loss, z1 = train_step(model, loss_fn, optimizer, runtime, view1, view2)

            global_step += 1
            interval_steps += 1
            loss_sum += loss
            diverged_at = torch.where((diverged_at < 0) & ~torch.isfinite(loss), global_step, diverged_at)
            end_of_epoch = step + 1 == sampler.steps_per_epoch
            save_now = config.save_every_steps and global_step % config.save_every_steps == 0 and not end_of_epoch
            if global_step % config.log_every and not end_of_epoch and not save_now:
                continue

            # a logging step: one synchronisation for the loss, the divergence check and the counts
            mean_loss, bad_step, skipped = _reduce_interval(loss_sum, diverged_at, skipped, runtime)
            if bad_step >= 0:  # every process reduced the same losses
                raise agreed(diverged(f"the loss became NaN or infinite at step {bad_step} (epoch {epoch + 1})",
                                      last_good))
            now = time.perf_counter()
            mean_loss /= interval_steps
            metrics = {
                "kind": "step", "step": global_step, "epoch": epoch + 1, "loss": mean_loss, "lr": lr,
                "collapse_std": collapse_std(z1, dist.all_reduce if runtime.distributed else None).item()
                * math.sqrt(z1.shape[1]),
                "images_per_s": interval_steps * config.batch_size / (now - interval_start),
            }
            metrics_log.write(metrics)
            emit({"event": "log", **metrics})
            totals.add(mean_loss * interval_steps, interval_steps, skipped)
            timed_steps += interval_steps
            loss_sum.zero_()
            skipped, interval_steps, interval_start = 0, 0, now

            if save_now:
                check_weights(raw, runtime, epoch, global_step, last_good)
                if runtime.is_main:
                    state = _checkpoint(config, fingerprint, raw, optimizer, epoch, step + 1, global_step, metrics)
                    save_atomic({**state, "epoch_totals": totals.to_dict()}, out / LAST)
                    run_folder.saved()
                last_good = str(out / LAST)

        epoch_metrics = {
            "kind": "epoch", "step": global_step, "epoch": epoch + 1, "loss": totals.mean_loss,
            "lr": lr, "collapse_std": metrics.get("collapse_std"), "skipped_images": totals.skipped,
            "images_per_s": timed_steps * config.batch_size / (time.perf_counter() - epoch_start),
        }

        knn_failure = None
        if knn is not None and ((epoch + 1) % config.knn_every == 0 or epoch + 1 == config.epochs):
            try:
                top1 = knn(raw.encoder)  # every rank embeds its share
                say_warnings(knn, emit)
                if runtime.is_main:
                    epoch_metrics["knn_top1"] = top1
            except Exception as err:
                # raised once the trained epoch's line and checkpoint (without a kNN top-1) are
                # saved, so that --resume continues once the monitor's images are fixed
                knn_failure = err

        # a network that diverged is not saved: the monitor's features (rank 0's) or the weights
        found = diverged(f"{knn_failure} (epoch {epoch + 1})", last_good) if isinstance(knn_failure,
                                                                                        TrainingDiverged) else None
        check_weights(raw, runtime, epoch, global_step, last_good, found)
        metrics_log.write(epoch_metrics)
        emit({"event": "epoch", **epoch_metrics})
        if runtime.is_main:
            state = _checkpoint(config, fingerprint, raw, optimizer, epoch + 1, 0, global_step, epoch_metrics)
            if (epoch + 1) % config.save_every_epochs == 0 or epoch + 1 == config.epochs:
                numbered = out / epoch_checkpoint_name(epoch)
                save_atomic(state, numbered)
                link_atomic(numbered, out / LAST)
            else:
                save_atomic(state, out / LAST)
            run_folder.saved()
        if isinstance(knn_failure, InputError):
            # after the last epoch a plain --resume has nothing left to train: say what does help
            then = (f"--resume {out} continues" if epoch + 1 < config.epochs else
                    f"the run's last; simsiam knn {out / LAST} --train-dir DIR --val-dir DIR evaluates it")
            knn_failure = InputError(f"{knn_failure} (epoch {epoch + 1} is saved; {then})")
        if knn_failure is not None and not isinstance(knn_failure, SimSiamError):
            raise knn_failure
        rt.agree(runtime, knn_failure)  # the epoch's barrier; rank 0 alone scores the monitor, every process stops
        last_good = str(out / LAST)
        metrics = epoch_metrics

    emit({"event": "end", **metrics})
    return metrics
