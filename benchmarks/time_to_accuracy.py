"""Benchmark 2: CIFAR-10 time to accuracy on one GPU: wall time per epoch, and the weighted-kNN
top-1 (k=20, T=0.07 by default, our protocol; on the 10,000 test images against the 50,000
training images) after a fixed number of epochs, with the learning rate's cosine run over those
epochs.

``--method ours`` runs the real training loop (:func:`simsiam.train.pretrain`, ``--preset cifar``,
batch 512) with the fast path's settings; ``--method lightly`` runs lightly's SimSiam for the same
epochs through the shared harness and scores its backbone the same way. Reference point: lightly
reports 0.764 after 200 epochs at batch 512 in 87.8 min on an RTX A6000 (about 26 s per epoch),
scored with its own kNN setting, k=200 and T=0.1: ``--knn-k 200 --knn-t 0.1`` scores the same way.

    python -m benchmarks.time_to_accuracy --train /data/cifar10/train --test /data/cifar10/test --epochs 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from simsiam.config import preset_config
from simsiam.runtime import resolve_device

from .harness import (REPO, CompileTimeout, append_jsonl, arm_alarm, checked_inputs, command_line, compile_failure,
                      disarm_alarm, environment, markdown_section, peak_memory, write_markdown)


class OutOfTime(Exception):
    """The next epoch would not end before ``--deadline``: the run stops after the last one."""


class EpochClock:
    """``pretrain``'s ``on_event``: per epoch, the training time (the loop's, from its images/s)
    and the wall time since the previous epoch ended (training, the previous epoch's checkpoint
    write, and this epoch's kNN pass when one ran); kNN top-1. Arms the compile alarm from the
    start of the loop to its first log line (compiling happens in the first step), and raises
    :class:`OutOfTime` at an epoch's end when the next epoch would end after ``deadline`` (a
    ``time.perf_counter()``)."""

    def __init__(self, epochs: int, batch_size: int, knn_every: int, deadline: float | None, compile_timeout: float):
        self.epochs, self.batch_size, self.knn_every = epochs, batch_size, knn_every
        self.deadline, self.compile_timeout = deadline, compile_timeout
        self.records: list[dict] = []
        self.start: dict = {}
        self.last = self.rate = None
        self.past_first_step = False

    def __call__(self, event: dict) -> None:
        now = time.perf_counter()
        kind = event["event"]
        if kind == "start":
            self.start = dict(event)
            self.last = now
            arm_alarm(self.compile_timeout, "compiling (the first steps)")
        elif kind in ("log", "epoch") and not self.past_first_step:
            self.past_first_step = True
            disarm_alarm()
        if kind == "log":
            self.rate = event["images_per_s"]
        if kind != "epoch":
            return
        train_s = self.start["steps_per_epoch"] * self.batch_size / event["images_per_s"]
        record = {"epoch": event["epoch"], "train_s": train_s, "wall_s": now - self.last,
                  "knn": "knn_top1" in event, "knn_top1": event.get("knn_top1")}
        self.records.append(record)
        self.last = now
        print(json.dumps({"tta_epoch": {k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()}}),
              flush=True)
        if self.deadline is not None and event["epoch"] < self.epochs and now + self.next_epoch_s() > self.deadline:
            raise OutOfTime(f"stopped after {event['epoch']} of {self.epochs} epochs (time limit)")

    def next_epoch_s(self) -> float:
        """A generous guess at the next epoch's wall time (its checkpoint write and kNN included)."""
        epoch = len(self.records) + 1
        train = self.start["steps_per_epoch"] * self.batch_size / self.rate if self.rate else self.records[-1]["wall_s"]
        extra = [r["wall_s"] - r["train_s"] for r in self.records[1:] if not r["knn"]] or [2.0]
        guess = train + max(extra)
        if epoch % self.knn_every == 0 or epoch == self.epochs:
            knn = [r["wall_s"] - r["train_s"] for r in self.records if r["knn"]]
            guess += max(knn) if knn else 10 + 3 * train
        return 1.2 * guess + 5  # and the last checkpoint write


def _pretrain_run(args, compile_model: bool, deadline: float | None) -> dict:
    from simsiam.train import pretrain

    out = tempfile.mkdtemp(prefix="tta-")
    config = preset_config("cifar", data=args.train, out=out, epochs=args.epochs, batch_size=args.batch_size,
                           workers=args.workers,
                           device=args.device, compile=compile_model, data_on_gpu=args.data_on_gpu,
                           knn_train=args.train, knn_val=args.test, knn_every=args.knn_every, knn_k=args.knn_k,
                           knn_temperature=args.knn_t,
                           save_every_epochs=args.epochs, log_every=50)
    clock = EpochClock(args.epochs, config.batch_size, args.knn_every, deadline,
                       args.compile_timeout if compile_model else 0)
    begin, stopped = time.perf_counter(), ""
    try:
        pretrain(config, on_event=clock)
    except OutOfTime as err:
        stopped = str(err)
    except (Exception, CompileTimeout) as err:
        err.past_first_step = clock.past_first_step
        raise
    finally:
        disarm_alarm()
        shutil.rmtree(out, ignore_errors=True)
    return {"batch_source": clock.start.get("batch_source"), "precision": clock.start.get("precision"),
            "compile": "compiled" if compile_model else "eager", "records": clock.records, "stopped": stopped,
            "total_s": time.perf_counter() - begin}


def _perf_deadline(args) -> float | None:
    """``--deadline`` (a ``time.time()``) on the ``time.perf_counter()`` clock; None without one."""
    return time.perf_counter() + (args.deadline - time.time()) if args.deadline else None


def run_ours(args) -> dict:
    """The real training loop; compiled, if compiling fails (or takes over ``--compile-timeout``)
    before the first log line, the run starts over eager and says so."""
    deadline = _perf_deadline(args)
    if args.compile:
        try:
            return _pretrain_run(args, True, deadline)
        except (Exception, CompileTimeout) as err:  # noqa: BLE001 - compile failures come in many types
            if getattr(err, "past_first_step", True):
                raise
            note = compile_failure(err)
        result = _pretrain_run(args, False, deadline)
        result["compile"] = note
        return result
    return _pretrain_run(args, False, deadline)


def run_lightly(args) -> dict:
    from retrieval.extract import embed
    from retrieval.knn import weighted_knn
    from simsiam.augment import eval_transform
    from simsiam.data import ImageDataset, scan_images
    from simsiam.runtime import Runtime

    from . import lightly_recipe

    config = preset_config("cifar", data=args.train, batch_size=args.batch_size, workers=args.workers,
                           device=args.device)
    device = resolve_device(args.device)
    method = lightly_recipe.build(config, device)
    model, records, begin = method.model, [], time.perf_counter()
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(method.optimizer, args.epochs)
    runtime = Runtime(device, "fp32")
    deadline = _perf_deadline(args)
    stopped = ""
    for epoch in range(args.epochs):
        started = time.perf_counter()
        for batch in method.epoch():
            method.step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        record = {"epoch": epoch + 1, "train_s": time.perf_counter() - started, "knn": False, "knn_top1": None}
        schedule.step()
        if (epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs:
            backbone = torch.nn.Sequential(model.backbone, torch.nn.Flatten())
            data = [ImageDataset(scan_images(folder), eval_transform(32, None)) for folder in (args.train, args.test)]
            (train_x, train_y, _), (test_x, test_y, _) = [embed(backbone, d, runtime, 256, args.workers) for d in data]
            [result] = weighted_knn(train_x, train_y, test_x, test_y, (args.knn_k,), args.knn_t, num_classes=10,
                                    device=device)
            record.update(knn=True, knn_top1=result.top1)
            model.train()
        record["wall_s"] = time.perf_counter() - started
        records.append(record)
        print(json.dumps({"tta_epoch": record}), flush=True)
        if deadline and epoch + 1 < args.epochs and time.perf_counter() + 2 * record["wall_s"] > deadline:
            stopped = f"stopped after {epoch + 1} of {args.epochs} epochs (time limit)"
            break
    return {"batch_source": "dataloader (PIL)", "precision": "fp32", "compile": "eager", "records": records,
            "stopped": stopped, "total_s": time.perf_counter() - begin}


def summary(result: dict, epochs: int) -> dict:
    """The row: training time per epoch, wall time per epoch with and without what surrounds it."""
    records = result["records"]
    later = records[1:] or records
    plain = [r for r in later if not r["knn"]]
    overhead = statistics.median([r["wall_s"] - r["train_s"] for r in plain]) if plain else 0.0
    knn = [r["wall_s"] - r["train_s"] - overhead for r in records if r["knn"]]
    done = len(records)
    row = {"epochs": f"{done}" if done == epochs else f"{done} of {epochs}",
           "epoch_s": round(statistics.median(r["train_s"] for r in later), 2) if records else None,
           "epoch_wall_s": round(statistics.median(r["wall_s"] for r in plain), 2) if plain else None,
           "all_in_epoch_s": round(statistics.mean(r["wall_s"] for r in later), 2) if records else None,
           "knn_pass_s": round(statistics.mean(knn), 2) if knn else None,
           "first_epoch_s": round(records[0]["wall_s"], 2) if records else None,
           "total_s": round(result["total_s"], 1),
           "knn_top1": " / ".join(f"{r['knn_top1']:.3f} @{r['epoch']}" for r in records if r["knn"]) or None}
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--knn-every", type=int, default=5)
    parser.add_argument("--knn-k", type=int, default=20, help="neighbours (lightly's benchmark: 200)")
    parser.add_argument("--knn-t", type=float, default=0.07, help="temperature (lightly's benchmark: 0.1)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--method", choices=["ours", "lightly"], default="ours")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--compile-timeout", type=float, default=240,
                        help="seconds for compiling (the loop's first steps) before the run starts over eager")
    parser.add_argument("--deadline", type=float, default=0,
                        help="a time.time(): stop after the last epoch that ends before it (0: none)")
    parser.add_argument("--data-on-gpu", dest="data_on_gpu", action="store_true", default=None,
                        help="force the dataset onto the device (default: auto)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    parser.add_argument("--results-md", default=None)
    args = parser.parse_args(argv)
    device = checked_inputs(parser, args.device, args.train, args.test)

    result = run_ours(args) if args.method == "ours" else run_lightly(args)
    notes = ", ".join(x for x in (result["precision"], result["compile"], result["batch_source"], result["stopped"],
                                  f"kNN k={args.knn_k}, T={args.knn_t}") if x)
    row = {"method": args.method, **summary(result, args.epochs), "notes": notes, **peak_memory(device)}
    append_jsonl(Path(args.out) / "time_to_accuracy.jsonl", {"benchmark": "time_to_accuracy", **row, **result})
    columns = ["method", "epochs", "epoch_s", "epoch_wall_s", "all_in_epoch_s", "knn_pass_s", "first_epoch_s",
               "total_s", "knn_top1", "peak_gpu_mib", "notes"]
    notes = ("epoch_s: median training time of an epoch after the first (which includes compiling): the loop "
             "alone, no checkpoint, no kNN; epoch_wall_s: median wall time of the later epochs without a kNN pass, "
             "from one epoch's end to the next: training and the per-epoch checkpoint write; all_in_epoch_s: mean "
             "wall time of the later epochs, checkpoint writes and kNN passes included; knn_pass_s: a kNN "
             f"evaluation (every {args.knn_every} epochs and at the end); first_epoch_s: the first epoch's wall "
             "time (compiling included); total_s: the whole run (loading the data too); kNN top-1 at the "
             "epochs marked @")
    write_markdown(args.results_md, markdown_section(f"CIFAR-10 time to accuracy, batch {args.batch_size}, {args.epochs} epochs",
                                                     environment(device), command_line(), columns, [row], notes))

if __name__ == "__main__":
    main()
