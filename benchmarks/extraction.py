"""Benchmark 3: extraction throughput, images/s, of a ResNet-50 backbone at 224 (resize 256,
centre crop 224) over a JPEG folder, three ways, timed by :mod:`benchmarks.harness`:

- ``official-style``: the official evaluation loop's pipeline, PIL decoding and torchvision's PIL
  transforms in DataLoader workers, fp32 forward (as ``main_lincls.py`` validates);
- ``ours-plain``: :func:`retrieval.extract.embed_batches` over the plain loader (transforms v2 in
  workers), bf16 autocast and channels_last on CUDA as ``simsiam extract`` (``--precision fp32``
  times ours at the official row's precision, so that a ratio can be told apart from bf16's share);
- ``ours-gpu-decode``: the same function over :class:`simsiam.device_data.EvalBatches` (workers
  only read files; decoding, resizing and cropping on the GPU).

A step is a batch of features handed back on the CPU. Timing: :data:`benchmarks.harness.PROTOCOL`
(every method has DataLoader workers, so N is at least 2 x workers x prefetch_factor); the folder
is listed enough times over that the window holds no epoch end.

    python -m benchmarks.extraction --data /tmp/imagenet-like
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torchvision
from torchvision import transforms

from retrieval.extract import embed_batches
from simsiam import runtime as rt
from simsiam.augment import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from simsiam.backbones import build_resnet, pooled_backbone
from simsiam.data import ImageDataset, make_loader, scan_images
from simsiam.device_data import EvalBatches

from . import our_recipe
from .harness import (PROTOCOL, REPO, CompileTimeout, Method, append_jsonl, checked_inputs, command_line, environment,
                      loader_queue, markdown_section, passes_needed, time_limit, time_steps, write_markdown)

IMAGE_SIZE, RESIZE = 224, 256


def official_style(data: str, device: torch.device, batch_size: int, workers: int, passes: int = 1) -> Method:
    start = time.perf_counter()
    torch.manual_seed(0)
    model = pooled_backbone(build_resnet("resnet50")).to(device).eval()
    torch.backends.cudnn.benchmark = True
    dataset = torchvision.datasets.ImageFolder(data, transforms.Compose([
        transforms.Resize(RESIZE), transforms.CenterCrop(IMAGE_SIZE), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))
    if passes > 1:
        dataset = torch.utils.data.ConcatDataset([dataset] * passes)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    queue = loader_queue(loader)

    @torch.no_grad()
    def epoch():
        for images, _ in loader:
            yield model(images.to(device, non_blocking=True)).cpu()

    return Method("official-style", epoch, lambda features: None, batch_size, time.perf_counter() - start,
                  notes="fp32, PIL decode and transforms in workers", workers=queue[0], queue=queue[1])


def ours(data: str, runtime: rt.Runtime, batch_size: int, workers: int, gpu_decode: bool, passes: int = 1) -> Method:
    start = time.perf_counter()
    torch.manual_seed(0)
    model = pooled_backbone(build_resnet("resnet50")).to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    images = our_recipe.repeat_images(scan_images(data), passes)
    if gpu_decode:
        batches = lambda: EvalBatches(images, IMAGE_SIZE, RESIZE, runtime.device, batch_size, workers)  # noqa: E731
        epoch = lambda: embed_batches(model, None, runtime, batches=batches())  # noqa: E731
        queue = loader_queue(batches().loader)
    else:
        dataset = ImageDataset(images, eval_transform(IMAGE_SIZE, RESIZE))
        epoch = lambda: embed_batches(model, dataset, runtime, batch_size, workers)  # noqa: E731
        queue = loader_queue(make_loader(dataset, batch_size=batch_size, workers=workers))  # as embed_batches makes it
    name = "ours-gpu-decode" if gpu_decode else "ours-plain"
    where = "decode, resize and crop on the device" if gpu_decode else "transforms v2 in workers"
    return Method(name, epoch, lambda features: None, batch_size, time.perf_counter() - start,
                  notes=f"{runtime.precision}, {where}", workers=queue[0], queue=queue[1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2, help="batches")
    parser.add_argument("--steps", type=int, default=12,
                        help="timed batches at least (and at least 2 x workers x prefetch_factor)")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--methods", default="official-style,ours-plain,ours-gpu-decode")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="of our rows (auto: bf16 and channels_last on CUDA from Ampere on, as simsiam extract); "
                             "the official-style row is always fp32")
    parser.add_argument("--deadline", type=float, default=0,
                        help="a time.time() after which no method is started (it is listed as not run), and "
                             "at which a running one is stopped (listed as unfinished)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    parser.add_argument("--results-md", default=None)
    args = parser.parse_args(argv)
    checked_inputs(parser, args.device, args.data)

    runtime = rt.start(args.device, args.precision)
    passes = passes_needed(len(scan_images(args.data)), args.batch_size, args.steps, args.workers)
    builders = {
        "official-style": lambda: official_style(args.data, runtime.device, args.batch_size, args.workers, passes),
        "ours-plain": lambda: ours(args.data, runtime, args.batch_size, args.workers, gpu_decode=False, passes=passes),
        "ours-gpu-decode": lambda: ours(args.data, runtime, args.batch_size, args.workers, gpu_decode=True,
                                        passes=passes),
    }
    rows = []
    for name in args.methods.split(","):
        if args.deadline and time.time() > args.deadline:
            why = "not run: out of time (--deadline)"
            row = {"method": name, "error": why, "notes": why}
            append_jsonl(Path(args.out) / "extraction.jsonl", {"benchmark": "extraction", **row})
            rows.append(row)
            continue
        if runtime.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(runtime.device)
        try:
            # stopped at the deadline (the suite's hard timeout follows it) so that the rows so far reach the table
            with time_limit(args.deadline - time.time() if args.deadline else 0, f"{name}, until the --deadline,"):
                row = time_steps(builders[name](), runtime.device, args.warmup, args.steps)
        except CompileTimeout as err:
            row = {"method": name, "error": f"stopped: {err}", "notes": "stopped at the --deadline, unfinished"}
        except Exception as err:  # recorded, so that one broken method does not hide the others
            row = {"method": name, "error": f"{type(err).__name__}: {err}", "notes": f"{type(err).__name__}: {err}"[:120]}
        append_jsonl(Path(args.out) / "extraction.jsonl", {"benchmark": "extraction", **row})
        print(row, flush=True)
        rows.append(row)
    reference = next((r for r in rows if r["method"] == "official-style" and "images_per_s" in r), None)
    for r in rows:
        if reference and "images_per_s" in r:
            r["x_official"] = round(r["images_per_s"] / reference["images_per_s"], 2)
    for r in rows:
        if "images_per_s_2nd_half" in r:
            r["2nd_half"] = r["images_per_s_2nd_half"]
    columns = ["method", "images_per_s", "2nd_half", "x_official", "step_ms", "steps", "queue", "batch_size",
               "peak_gpu_mib", "setup_s", "first_batch_s", "notes"]
    notes = (f"ResNet-50 backbone, resize {RESIZE}, centre crop {IMAGE_SIZE}; {args.warmup} warm-up batches, "
             f"--steps {args.steps}, {args.workers} DataLoader workers; data: {args.data} ({passes} passes an "
             f"epoch); {PROTOCOL}")
    write_markdown(args.results_md, markdown_section(f"Extraction throughput, batch {args.batch_size}",
                                                     environment(runtime.device), command_line(), columns, rows, notes))


if __name__ == "__main__":
    main()
