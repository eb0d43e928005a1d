"""Benchmark 2: CIFAR-10 time to accuracy on one GPU: wall time per epoch, and the weighted-kNN
top-1 (k=20, T=0.07, on the 10,000 test images against the 50,000 training images) after a
fixed number of epochs, with the learning rate's cosine run over those epochs.

``--method ours`` runs the real training loop (:func:`simsiam.train.pretrain`, ``--preset cifar``,
batch 512) with the fast path's settings; ``--method lightly`` runs lightly's SimSiam for the same
epochs through the shared harness and scores its backbone the same way. Reference point: lightly
reports 0.764 after 200 epochs at batch 512 in 87.8 min on an RTX A6000 (about 26 s per epoch).

    python -m benchmarks.time_to_accuracy --train /data/cifar10/train --test /data/cifar10/test --epochs 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from simsiam.config import preset_config

from .harness import REPO, append_jsonl, command_line, environment, markdown_section, peak_memory, write_markdown


def run_ours(args) -> dict:
    from simsiam.train import pretrain

    out = tempfile.mkdtemp(prefix="tta-")
    config = preset_config("cifar", data=args.train, out=out, epochs=args.epochs, batch_size=args.batch_size,
                           workers=args.workers,
                           device=args.device, compile=args.compile, data_on_gpu=args.data_on_gpu,
                           knn_train=args.train, knn_val=args.test, knn_every=args.knn_every,
                           save_every_epochs=args.epochs, log_every=50)
    epochs, knn, start = [], {}, {}

    def on_event(event):
        if event["event"] == "start":
            start.update(event, time=time.perf_counter())
        elif event["event"] == "epoch":
            # the epoch's training time, without its kNN evaluation (images/s is taken before it)
            epochs.append(start["steps_per_epoch"] * config.batch_size / event["images_per_s"])
            if "knn_top1" in event:
                knn[event["epoch"]] = event["knn_top1"]

    begin = time.perf_counter()
    pretrain(config, on_event=on_event)
    return {"batch_source": start.get("batch_source"), "precision": start.get("precision"),
            "compiled": config.compile, "epoch_s": epochs, "knn_top1": knn, "total_s": time.perf_counter() - begin}


def run_lightly(args) -> dict:
    from retrieval.extract import embed
    from retrieval.knn import weighted_knn
    from simsiam.augment import eval_transform
    from simsiam.data import ImageDataset, scan_images
    from simsiam.runtime import Runtime

    from . import lightly_recipe

    config = preset_config("cifar", data=args.train, batch_size=args.batch_size, workers=args.workers,
                           device=args.device)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    method = lightly_recipe.build(config, device)
    model, epochs, knn, begin = method.model, [], {}, time.perf_counter()
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(method.optimizer, args.epochs)
    runtime = Runtime(device, "fp32")
    for epoch in range(args.epochs):
        started = time.perf_counter()
        for batch in method.epoch():
            method.step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epochs.append(time.perf_counter() - started)
        schedule.step()
        if (epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs:
            backbone = torch.nn.Sequential(model.backbone, torch.nn.Flatten())
            data = [ImageDataset(scan_images(folder), eval_transform(32, None)) for folder in (args.train, args.test)]
            (train_x, train_y, _), (test_x, test_y, _) = [embed(backbone, d, runtime, 256, args.workers) for d in data]
            [result] = weighted_knn(train_x, train_y, test_x, test_y, (20,), 0.07, num_classes=10, device=device)
            knn[epoch + 1] = result.top1
            model.train()
    return {"batch_source": "dataloader (PIL)", "precision": "fp32", "compiled": False, "epoch_s": epochs,
            "knn_top1": knn, "total_s": time.perf_counter() - begin}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--knn-every", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--method", choices=["ours", "lightly"], default="ours")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--data-on-gpu", dest="data_on_gpu", action="store_true", default=None,
                        help="force the dataset onto the device (default: auto)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    parser.add_argument("--results-md", default=None)
    args = parser.parse_args(argv)

    result = run_ours(args) if args.method == "ours" else run_lightly(args)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    later = result["epoch_s"][1:] or result["epoch_s"]
    row = {"method": args.method, "epochs": args.epochs, "first_epoch_s": round(result["epoch_s"][0], 2),
           "epoch_s": round(statistics.median(later), 2), "total_s": round(result["total_s"], 1),
           "knn_top1": " / ".join(f"{v:.3f} @{k}" for k, v in sorted(result["knn_top1"].items())),
           "notes": f"{result['precision']}, {'compiled' if result['compiled'] else 'eager'}, {result['batch_source']}",
           **peak_memory(device)}
    append_jsonl(Path(args.out) / "time_to_accuracy.jsonl", {"benchmark": "time_to_accuracy", **row, **result})
    columns = ["method", "epochs", "epoch_s", "first_epoch_s", "total_s", "knn_top1", "peak_gpu_mib", "notes"]
    notes = ("epoch_s: median training time of an epoch after the first (which includes compiling), "
             "kNN evaluations left out; total_s includes everything; kNN top-1 at the epochs marked @")
    write_markdown(args.results_md, markdown_section(f"CIFAR-10 time to accuracy, batch {args.batch_size}, {args.epochs} epochs",
                                                     environment(device), command_line(), columns, [row], notes))


if __name__ == "__main__":
    main()
