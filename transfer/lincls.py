"""Linear evaluation: a linear classifier trained on the frozen backbone (``simsiam lincls``).

The protocol of the official ``main_lincls.py`` (SimSiam, after MoCo): every backbone parameter
frozen and the backbone kept in eval mode, so BN uses its pretrained running statistics
("switch to train mode" is ``model.eval()`` there); only ``fc`` learns. At the end, the sanity
check of the official script: the backbone's weights must equal the checkpoint's.

Runs in one process or under ``torchrun`` (each rank takes its slice of every global batch, the
validation set is split over the ranks). The pieces of pretraining are reused: the data pipeline
(whose randomness is a function of seed, epoch and image index, so a resumed run sees the very
batches it would have seen), the runtime, atomic checkpoints, the run folder and metrics log.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from simsiam import __version__, runtime as rt
from simsiam.augment import eval_transform, linear_eval_transform
from simsiam.backbones import build_resnet
from simsiam.checkpoint import LAST, BackboneWeights, build_backbone, find_resume_checkpoint, read_backbone, save_atomic
from simsiam.config import write_json_atomic
from simsiam.data import (ONE_CLASS_WARNING, GlobalBatchSampler, ImageDataset, ImageList, count_training_unreadable,
                          count_unreadable, folder_warnings, labelled_images, make_loader)
from simsiam.errors import InputError, SimSiamError, agreed
from simsiam.run_dir import (CONFIG_FILE, METRICS_FILE, MetricsLog, RunFolder, check_resumable,
                             check_resumed_images, check_resumed_state, check_run_dir, resume_checkpoint, run_in_folder)
from simsiam.train import diverged, say_warnings

from .lars import LARS
from .lincls_config import LinearEvalConfig

HEAD_FILE = "linear_head.pth"
# What a training epoch sums: the loss (times the batch), correct top-1, images, unreadable images.
EPOCH_TOTALS = ("loss_sum", "correct", "images", "skipped")
BEST_HEAD_FILE = "linear_head_best.pth"  # the head of the best validation top-1 (model_best.pth.tar there)
Event = Callable[[dict], None]


def build_head(feature_dim: int, num_classes: int) -> nn.Linear:
    """The classifier, initialised as the official script: weight N(0, 0.01), bias 0."""
    head = nn.Linear(feature_dim, num_classes)
    nn.init.normal_(head.weight, mean=0.0, std=0.01)
    nn.init.zeros_(head.bias)
    return head


def build_optimizer(head: nn.Module, config: LinearEvalConfig) -> torch.optim.Optimizer:
    if config.optimizer == "lars":
        return LARS(head.parameters(), config.init_lr, momentum=config.momentum, weight_decay=config.wd,
                    trust_coefficient=config.trust_coefficient)
    return torch.optim.SGD(head.parameters(), config.init_lr, momentum=config.momentum, weight_decay=config.wd)


def learning_rate(config: LinearEvalConfig, epoch: int) -> float:
    """The official ``adjust_learning_rate``: cosine decay per epoch, no warmup."""
    return config.init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))


def feature_dim(arch: str) -> int:
    with torch.device("meta"):  # shapes only
        return build_resnet(arch).fc.in_features


def backbone_unchanged(backbone: nn.Module, pretrained: BackboneWeights) -> bool:
    """The official ``sanity_check``: every backbone tensor still equals the checkpoint's."""
    state = backbone.state_dict()
    return all(torch.equal(state[k].cpu(), v) for k, v in pretrained.backbone.items())


class Evaluator:
    """Top-1, top-5 (top-k with k = min(5, classes)) and loss on the validation set."""

    def __init__(self, images: ImageList, config: LinearEvalConfig, runtime: rt.Runtime):
        dataset = ImageDataset(images, eval_transform(config.image_size, config.eval_resize or None))
        shard = Subset(dataset, range(runtime.rank, len(dataset), runtime.world_size))
        self.loader = make_loader(shard, batch_size=min(256, config.batch_size), workers=config.workers,
                                  pin_memory=runtime.device.type == "cuda")
        self.topk = min(5, len(images.classes))
        self.runtime = runtime
        self.strict = config.strict
        self.root, self.images = images.root, len(images)
        self.warnings = []  # said by the run as they come
        self.said_unreadable = False

    @torch.no_grad()
    def __call__(self, backbone: nn.Module, head: nn.Module) -> dict:
        device = self.runtime.device
        # correct@1, correct@k, loss, count, unreadable
        totals = torch.zeros(5, dtype=torch.float64, device=device)
        error = None
        for batch, unreadable in self.loader:
            try:
                totals[4] += count_unreadable(unreadable, self.strict, lambda bad: None)
            except InputError as err:  # --strict: the first unreadable image
                error = err
                break
            if batch is None:
                continue
            images, labels, _ = batch
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = classify(backbone, head, images, self.runtime)
            top = logits.topk(self.topk, dim=1).indices
            hits = top == labels[:, None]
            totals[:4] += torch.stack([hits[:, 0].sum(), hits.any(1).sum(),
                                       F.cross_entropy(logits, labels, reduction="sum"),
                                       torch.tensor(len(labels), device=device)]).double()
        rt.agree(self.runtime, error)  # under torchrun: an image one process found unreadable stops them all
        if self.runtime.distributed:
            dist.all_reduce(totals)
        correct1, correctk, loss, count, skipped = totals.tolist()
        if count == 0:
            raise agreed(InputError(f"VAL_DIR {self.root}: none of its {self.images} images could be decoded"))
        if skipped and not self.said_unreadable:  # the same images every time: said once
            self.said_unreadable = True
            self.warnings.append(f"VAL_DIR {self.root}: {int(skipped)} of its {self.images} images could not be "
                                 "decoded; the evaluation leaves them out (--strict stops instead)")
        return {"top1": 100.0 * correct1 / count, "top5": 100.0 * correctk / count, "val_loss": loss / count,
                "topk": self.topk, "val_images": int(count), "val_skipped": int(skipped)}


def classify(backbone: nn.Module, head: nn.Module, images: torch.Tensor, runtime: rt.Runtime) -> torch.Tensor:
    """Logits of the linear head on the frozen backbone's pooled features (no graph through it)."""
    if runtime.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), runtime.autocast():
        features = backbone(images)
    return head(features.float())


def check_backbone_output(backbone: nn.Module, images: torch.Tensor, runtime: rt.Runtime, checkpoint) -> None:
    """At the run's first step: a backbone that gives NaN or infinite features (weights that diverged
    in pretraining) is said to be broken, not left for the head's loss to say "lower --lr"."""
    with torch.no_grad(), runtime.autocast():
        finite = torch.isfinite(backbone(images)).all()
    if not finite:
        raise InputError(f"{checkpoint}: the backbone gives NaN or infinite features; its weights are broken "
                         "(diverged in pretraining?)")


def backbone_fingerprint(weights: BackboneWeights) -> str:
    """sha256 of the backbone's tensors (weights and BN statistics), by name: what the head is trained on."""
    digest = hashlib.sha256()
    for name in sorted(weights.backbone):
        tensor = weights.backbone[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_resumed_backbone(checkpoint: dict, fingerprint: str, config: LinearEvalConfig, where) -> None:
    """Refuse to resume on another backbone than the one the run trained its head on: the
    fingerprint (``backbone_sha256``) is compared, not the file, so a moved or renamed CHECKPOINT
    resumes. A checkpoint without the fingerprint (of an older version) is compared by its file,
    as that version did."""
    saved = checkpoint.get("backbone_sha256")
    old = checkpoint.get("config", {}).get("checkpoint")
    same_file = not old or not os.path.isabs(old) or os.path.realpath(old) == os.path.realpath(config.checkpoint)
    if saved is None:
        if not same_file:
            raise InputError(f"CHECKPOINT {config.checkpoint}: the run being resumed ({where}) used {old}; a resumed "
                             "run continues with its own settings")
        return
    if saved != fingerprint:
        why = "the file changed since" if same_file else f"the run trained on {old}"
        raise InputError(f"CHECKPOINT {config.checkpoint}: its backbone is not the one the run being resumed "
                         f"trained its head on ({why}); start a new run (another --out, or --overwrite)")


def resumed_best(checkpoint: dict, val_list: dict, best_head: Path) -> tuple[dict, float | None]:
    """The best so far that a resumed run goes on from, and the best top-1 it drops (None: kept).

    Accuracies measured on different validation images do not compare: when VAL_DIR, given anew,
    lists other images (``ImageList.fingerprint()``) than the best top-1 was measured on, the best
    starts anew, so that the next evaluation is the best so far and its head replaces
    ``linear_head_best.pth``. A checkpoint of an older version, without the list, keeps its best
    whatever VAL_DIR is, as that version did.
    """
    top1 = checkpoint.get("best_top1", 0.0)
    if "best_val_images" in checkpoint:
        measured_on = checkpoint["best_val_images"]
    else:  # as that version: nothing measured yet only when its best is 0 and it kept no best head
        measured_on = val_list if top1 > 0 or best_head.exists() else None
    if measured_on is not None and measured_on != val_list:
        return {"best_top1": 0.0, "best_val_images": None}, top1
    return {"best_top1": top1, "best_val_images": measured_on}, None


def _checkpoint(config, head, optimizer, classes, images, weights, epoch, step_in_epoch, global_step, metrics, best,
                fingerprint) -> dict:
    return {
        "epoch": epoch,  # epochs completed; the epoch under way when step_in_epoch > 0
        "step_in_epoch": step_in_epoch,
        "global_step": global_step,
        "arch": weights.arch,
        "state_dict": {f"fc.{k}": v for k, v in head.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "classes": classes,
        "images": images,  # TRAIN_DIR's ImageList.fingerprint(): a resume needs the same images (check_resumed_images)
        "config": config.to_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "metrics": metrics,
        **best,  # best_top1 and best_val_images, the VAL_DIR image list it was measured on (see resumed_best)
        "backbone_sha256": fingerprint,  # a resume refuses another backbone
        "simsiam_version": __version__,
    }


def _head_file(config, head, classes, weights, metrics) -> dict:
    """A trained head alone: ``fc.*`` under torchvision's names, with what it classifies and how well."""
    return {"state_dict": {f"fc.{k}": v.cpu() for k, v in head.state_dict().items()}, "classes": classes,
            "arch": weights.arch, "cifar_stem": weights.cifar_stem, "checkpoint": str(config.checkpoint),
            "metrics": metrics, "config": config.to_dict(), "simsiam_version": __version__}


def _head_names(state_dict: dict) -> dict:
    """The head's own names of its weights, saved as torchvision's classifier (``fc.weight``)."""
    return {k.removeprefix("fc."): v for k, v in state_dict.items()}


def linear_eval(config: LinearEvalConfig, resume_from: str | os.PathLike | None = None, overwrite: bool = False,
                on_event: Event | None = None) -> dict:
    """Train and evaluate the linear classifier as ``config`` says; returns the final metrics.

    Writes ``config.out``: ``last.pth.tar`` (for ``resume_from``, which also takes the run folder), ``metrics.jsonl``,
    ``config.json`` and, at the end, ``linear_head.pth`` (``fc.weight``, ``fc.bias`` in
    torchvision's names, the class names, the metrics).
    """
    if resume_from is not None:  # a run folder: its newest checkpoint, as --resume takes it
        resume_from = find_resume_checkpoint(resume_from)
    return run_in_folder(config, overwrite, lambda runtime, run_folder: _linear_eval(
        config, runtime, run_folder, resume_from, overwrite, on_event or (lambda event: None)))


def _linear_eval(config: LinearEvalConfig, runtime: rt.Runtime, run_folder: RunFolder, resume_from, overwrite,
                 on_event: Event) -> dict:
    emit = on_event if runtime.is_main else (lambda event: None)
    announce = lambda bad: emit({"event": "unreadable", "path": bad.path, "reason": bad.reason})  # noqa: E731
    out = Path(config.out)
    # every process checks, then they agree (rt.agree): a check that fails on some only (a file one
    # node lacks) stops every process, before rank 0 changes the folder
    with rt.agreement(runtime):
        check_run_dir(out, resume_from, overwrite, "lincls")
        checkpoint = resume_checkpoint(config, resume_from)
        if checkpoint is not None and "optimizer" not in checkpoint:  # linear_head.pth: it holds a config too
            raise InputError(f"--resume {resume_from}: the finished linear head, not a checkpoint to resume; give the "
                             f"run folder or its {LAST}")
        if checkpoint is not None:
            check_resumable(checkpoint, resume_from, also=("global_step", "rng"))
        # a finished run resumed with its own --epochs is evaluated again; fewer epochs than it has reached
        reached = checkpoint["epoch"] + (1 if checkpoint.get("step_in_epoch") else 0) if checkpoint is not None else 0
        if reached > config.epochs:
            raise InputError(f"--epochs {config.epochs}: the run being resumed has reached epoch {reached}; "
                             f"pass --epochs N with N >= {reached}")
        weights = read_backbone(config.checkpoint)
        fingerprint = backbone_fingerprint(weights)
        if checkpoint is not None:
            check_resumed_backbone(checkpoint, fingerprint, config, resume_from)
        train_images, val_images = labelled_images(config.train_dir, config.val_dir, "TRAIN_DIR", "VAL_DIR")
        if checkpoint is not None and checkpoint.get("classes") != train_images.classes:
            raise InputError(f"--resume {resume_from}: its classes differ from those of TRAIN_DIR {config.train_dir}")
        if checkpoint is not None:
            with torch.device("meta"):  # shapes only
                shapes = build_head(feature_dim(weights.arch), len(train_images.classes))
            # compared in the names the checkpoint saves (fc.weight), so that a refusal names what is there
            check_resumed_state(checkpoint, resume_from, lambda state: state, nn.ModuleDict({"fc": shapes}),
                                build_optimizer(shapes, config))
        image_list = train_images.fingerprint()  # not "images": the training loop's batches have that name
        val_list = val_images.fingerprint()
        if checkpoint is not None:
            check_resumed_images(checkpoint, image_list, config, "train_dir", resume_from)
        # every training image every epoch: main_lincls.py's loader keeps the last, incomplete batch
        sampler = GlobalBatchSampler(len(train_images), config.batch_size, config.seed, runtime.rank,
                                     runtime.world_size, drop_last=False)
    if runtime.is_main:
        run_folder.prepare(resume_from, also=(HEAD_FILE, BEST_HEAD_FILE))  # a run started over: its heads too
    runtime.barrier()

    torch.manual_seed(config.seed)
    backbone = build_backbone(weights).requires_grad_(False).eval().to(runtime.device)
    if runtime.channels_last:
        backbone.to(memory_format=torch.channels_last)
    # on the device before the optimizer exists, so that a resumed optimizer's state lands there too
    head = build_head(feature_dim(weights.arch), len(train_images.classes)).to(runtime.device)
    optimizer = build_optimizer(head, config)
    start_epoch = start_step = global_step = 0
    resumed_totals = [0.0] * len(EPOCH_TOTALS)  # the EPOCH_TOTALS of a resumed epoch's steps before the checkpoint
    # the best validation top-1 so far and VAL_DIR's image list it was measured on (None: no evaluation yet)
    best, dropped_best = {"best_top1": 0.0, "best_val_images": None}, None
    if checkpoint is not None:
        head.load_state_dict(_head_names(checkpoint["state_dict"]))
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch, start_step = checkpoint["epoch"], checkpoint.get("step_in_epoch", 0)
        resumed_totals = [float(checkpoint.get("epoch_totals", {}).get(name, 0.0)) for name in EPOCH_TOTALS]
        global_step = checkpoint["global_step"]
        best, dropped_best = resumed_best(checkpoint, val_list, out / BEST_HEAD_FILE)
        torch.set_rng_state(checkpoint["rng"]["torch"])
    model = rt.data_parallel(head, runtime)  # what the step runs; the checkpoint saves ``head``

    if runtime.is_main:
        write_json_atomic(config.to_dict(), out / CONFIG_FILE)
    metrics_log = MetricsLog(out / METRICS_FILE, runtime.is_main, global_step if checkpoint else None)
    dataset = ImageDataset(train_images, linear_eval_transform(config.image_size, (config.crop_min_scale, 1.0)),
                           seed=config.seed)
    loader = make_loader(dataset, sampler, workers=config.workers, pin_memory=runtime.device.type == "cuda")
    evaluate = Evaluator(val_images, config, runtime)
    emit({"event": "start", "images": len(train_images), "val_images": len(val_images),
          "classes": len(train_images.classes), "steps_per_epoch": sampler.steps_per_epoch,
          "total_steps": config.epochs * sampler.steps_per_epoch, "global_step": global_step, "epoch": start_epoch,
          "world_size": runtime.world_size, "device": str(runtime.device), "precision": runtime.precision,
          "arch": weights.arch, "resumed_from": str(resume_from) if checkpoint is not None else None,
          "dropped_best_top1": dropped_best})
    for name, images in (("TRAIN_DIR", train_images), ("VAL_DIR", val_images)):
        for warning in folder_warnings(f"{name} {images.root}", images):
            emit({"event": "warning", "message": warning})
    if len(train_images.classes) == 1:
        emit({"event": "warning", "message": ONE_CLASS_WARNING.format(f"TRAIN_DIR {train_images.root}")})
    del checkpoint

    def keep_best(metrics: dict) -> None:
        """Adds the best top-1 so far to an evaluation's ``metrics``, saving the head when it is the best."""
        # a first evaluation at top-1 0 is still the best so far (the official script keeps none)
        is_best = best["best_val_images"] is None or metrics["top1"] > best["best_top1"]
        if is_best:
            best.update(best_top1=metrics["top1"], best_val_images=val_list)
        metrics["best_top1"] = best["best_top1"]
        if is_best and runtime.is_main:  # the official script's model_best; kept before the resume point
            save_atomic(_head_file(config, head, train_images.classes, weights, metrics), out / BEST_HEAD_FILE)

    metrics: dict = {}
    first_batch = True
    last_good = str(resume_from) if resume_from is not None else None  # named when the loss diverges
    for epoch in range(start_epoch, config.epochs):
        lr = learning_rate(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sampler.set_epoch(epoch, start_step if epoch == start_epoch else 0)
        dataset.set_epoch(epoch)
        # since the last log line: the loss and correct sums on the device (a step does not wait for
        # it), the images and unreadable ones as counts (no copy to the device each step)
        sums, counts = torch.zeros(2, device=runtime.device), [0, 0]
        diverged_at = torch.full((), -1, dtype=torch.long, device=runtime.device)  # the first step, not the log step
        interval_start = time.perf_counter()
        # the epoch's, of every rank: the sums of its log lines. A mid-epoch checkpoint carries them, so
        # that a resumed epoch's line is the uninterrupted run's (its log lines fall on the same steps)
        epoch_totals = resumed_totals if epoch == start_epoch and start_step else [0.0] * len(EPOCH_TOTALS)
        for step, (batch, unreadable) in enumerate(loader, start=sampler.start_step):
            # the run's first batch is agreed on, as the checks before it (see pretrain's loop)
            with rt.agreement(runtime, when=first_batch):
                skipped = count_training_unreadable(batch, unreadable, config.strict, announce, config.train_dir,
                                                    global_step, runtime.distributed)
                images, labels, _ = batch
                images = images.to(runtime.device, non_blocking=True)
                if first_batch:
                    check_backbone_output(backbone, images, runtime, config.checkpoint)
            first_batch = False
            labels = labels.to(runtime.device, non_blocking=True)
            logits = classify(backbone, model, images, runtime)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            global_step += 1
            diverged_at = torch.where((diverged_at < 0) & ~torch.isfinite(loss.detach()), global_step, diverged_at)
            sums += torch.stack([loss.detach() * len(labels), (logits.argmax(1) == labels).sum()]).float()
            counts = [counts[0] + len(labels), counts[1] + skipped]
            end_of_epoch = step + 1 == sampler.steps_per_epoch
            save_now = config.save_every_steps and global_step % config.save_every_steps == 0 and not end_of_epoch
            if global_step % config.log_every and not end_of_epoch and not save_now:
                continue
            interval = torch.cat([sums, torch.tensor(counts, dtype=sums.dtype, device=sums.device)])  # EPOCH_TOTALS
            first_bad = torch.where(diverged_at < 0, float("inf"), diverged_at.double())[None]
            if runtime.distributed:
                dist.all_reduce(interval)
                dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
            interval, first_bad = interval.tolist(), first_bad.item()
            epoch_totals = [total + value for total, value in zip(epoch_totals, interval)]
            loss_sum, correct, count, _ = interval
            if not math.isfinite(loss_sum) or first_bad != float("inf"):  # every process reduced the same
                bad_step = int(first_bad) if math.isfinite(first_bad) else global_step  # else: the sum overflowed
                raise agreed(diverged(f"the loss became NaN or infinite at step {bad_step} (epoch {epoch + 1})",
                                      last_good))
            now = time.perf_counter()
            step_metrics = {"kind": "step", "step": global_step, "epoch": epoch + 1, "loss": loss_sum / count,
                            "train_top1": 100.0 * correct / count, "lr": lr,
                            "images_per_s": count / (now - interval_start)}
            metrics_log.write(step_metrics)
            emit({"event": "log", **step_metrics})
            sums.zero_()
            counts = [0, 0]
            interval_start = now
            if save_now and runtime.is_main:
                state = _checkpoint(config, head, optimizer, train_images.classes, image_list, weights, epoch, step + 1,
                                    global_step, step_metrics, best, fingerprint)
                save_atomic({**state, "epoch_totals": dict(zip(EPOCH_TOTALS, epoch_totals))}, out / LAST)
                run_folder.saved()
            if save_now:
                last_good = str(out / LAST)

        loss_sum, correct, count, skipped = epoch_totals
        metrics = {"kind": "epoch", "step": global_step, "epoch": epoch + 1, "loss": loss_sum / max(count, 1),
                   "train_top1": 100.0 * correct / max(count, 1), "lr": lr, "skipped_images": int(skipped)}
        failure = None
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            try:
                metrics.update(evaluate(backbone, head))
                say_warnings(evaluate, emit)
            except Exception as err:
                # raised once the trained epoch's line and checkpoint (without validation numbers) are
                # saved, so that --resume continues once VAL_DIR is fixed (as pretrain's kNN monitor)
                failure = err
            else:
                keep_best(metrics)
        metrics_log.write(metrics)
        emit({"event": "epoch", **metrics})
        if runtime.is_main:
            save_atomic(_checkpoint(config, head, optimizer, train_images.classes, image_list, weights, epoch + 1, 0,
                                    global_step, metrics, best, fingerprint), out / LAST)
            run_folder.saved()
        last_good = str(out / LAST)
        if isinstance(failure, InputError):
            saved = InputError(f"{failure} (epoch {epoch + 1} is saved; --resume {out} continues)")
            saved.agreed = failure.agreed
            raise saved
        if failure is not None:
            raise failure
        runtime.barrier()

    if not metrics:  # resumed a finished run: evaluate it again (its last evaluation may have failed)
        rng = torch.get_rng_state()  # before the evaluation's loader draws from it
        metrics = {"kind": "epoch", "step": global_step, "epoch": config.epochs, **evaluate(backbone, head)}
        say_warnings(evaluate, emit)
        keep_best(metrics)
        metrics_log.write(metrics)  # after the last epoch's own line: the evaluation alone, no training numbers
        torch.set_rng_state(rng)
        if runtime.is_main:  # the checkpoint names this VAL_DIR and its best, as config.json; training state unchanged
            save_atomic(_checkpoint(config, head, optimizer, train_images.classes, image_list, weights, config.epochs,
                                    0, global_step, metrics, best, fingerprint), out / LAST)
    metrics["backbone_unchanged"] = backbone_unchanged(backbone, weights)
    if not metrics["backbone_unchanged"]:
        raise agreed(SimSiamError("sanity check failed: the backbone's weights changed during linear evaluation"))
    if runtime.is_main:
        save_atomic(_head_file(config, head, train_images.classes, weights, metrics), out / HEAD_FILE)
    emit({"event": "end", **metrics})
    return metrics
