"""Benchmark 1: training throughput, images/s (two views of an image count once), of the official
recipe, lightly's SimSiam and ours (plain path, fast path, and the compute bound), on one machine
in one run, each method in a process of its own, all timed by :mod:`benchmarks.harness`.

    python -m benchmarks.throughput --config cifar-r18 --data /data/cifar10/train
    python -m benchmarks.throughput --config r50-224 --data /data/imagenet-like-jpegs

Configurations: ``cifar-r18`` (ResNet-18 with the CIFAR stem, 32x32, batch 512, the paper's
App. D recipe) and ``r50-224`` (ResNet-50, 224x224, batch 256, the official ImageNet recipe).
Each result is a line of ``--out``/throughput.jsonl; the table, with ratios, is printed and
appended to ``--results-md``.

Timing (:data:`benchmarks.harness.PROTOCOL`): warm-up steps on one iterator, then a fresh
iterator whose first batch is untimed, then N timed steps, N at least ``--steps`` and, for the
methods fed by DataLoader workers (official, lightly, ours-plain, ours-fast on a JPEG folder),
at least 2 x workers x prefetch_factor batches; every dataset is listed enough times over that
no epoch ends inside the window. With ``--compile``, a fast path whose compiling fails or takes
over ``--compile-timeout`` seconds runs eager, and its rows say so: the model's, in each step,
and the augmentation's, on one batch drawn before the timing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch

from .harness import (PROTOCOL, REPO, CompileTimeout, append_jsonl, checked_inputs, command_line, environment,
                      markdown_section, passes_needed, time_steps, write_markdown)

CONFIGS = {"cifar-r18": ("cifar", 512), "r50-224": ("imagenet", 256)}
METHODS = ("official", "lightly", "plain", "fast")


def pretrain_config(args):
    from simsiam.config import preset_config

    preset, batch = CONFIGS[args.config]
    return preset_config(preset, data=args.data, batch_size=args.batch_size or batch, workers=args.workers,
                         device=args.device)


def data_passes(args) -> int:
    """The folder listed this many times over in an epoch, so that no timed window holds an epoch end."""
    from simsiam.data import scan_images

    config = pretrain_config(args)
    return passes_needed(len(scan_images(config.data)), config.batch_size, args.steps, config.workers)


def build(method: str, args):
    from simsiam.runtime import resolve_device

    config = pretrain_config(args)
    device = resolve_device(config.device)
    passes = data_passes(args)
    if method == "official":
        from . import official_recipe
        return [official_recipe.build(config, device, passes)], device
    if method == "lightly":
        from . import lightly_recipe
        return [lightly_recipe.build(config, device, passes)], device
    from . import our_recipe
    if method == "plain":
        return our_recipe.build_plain(config, device, passes), device
    if method == "fast":
        return our_recipe.build_fast(our_recipe.fast_config(config), device, compile_model=args.compile, passes=passes,
                                     compile_timeout=args.compile_timeout), device
    raise SystemExit(f"unknown method {method}")


def data_only(method):
    """The method's batches without its model: the data pipeline's own throughput."""
    method.step = lambda batch: None
    method.name += " (data only)"
    return method


def run_child(method: str, args) -> None:
    """Build one method (which may time several variants) and append its results."""
    base = {"benchmark": "throughput", "config": args.config, "run": args.run}
    try:
        methods, device = build(method, args)
        if args.data_only:
            methods = [data_only(m) for m in methods if m.name != "compute-bound"]
        for variant in methods:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            result = time_steps(variant, device, args.warmup, args.steps)
            append_jsonl(Path(args.out) / "throughput.jsonl", {**base, **result})
            print(json.dumps(result), flush=True)
    except (Exception, CompileTimeout) as err:  # recorded, so that one broken method does not hide the others
        append_jsonl(Path(args.out) / "throughput.jsonl", {**base, "method": method, "error": f"{type(err).__name__}: {err}"})
        raise


def summarise(args, command: str, device: torch.device) -> None:
    rows = [r for r in map(json.loads, (Path(args.out) / "throughput.jsonl").read_text().splitlines())
            if r.get("run") == args.run]
    by_name = {r["method"].removesuffix(" (data only)"): r for r in rows if "images_per_s" in r}
    for reference in ("official", "lightly"):
        if reference in by_name:
            for r in rows:
                if "images_per_s" in r:
                    r[f"x_{reference}"] = round(r["images_per_s"] / by_name[reference]["images_per_s"], 2)
    if "compute-bound" in by_name:
        for r in rows:
            if "images_per_s" in r:
                r["of_bound"] = round(r["images_per_s"] / by_name["compute-bound"]["images_per_s"], 2)
    for r in rows:
        if "error" in r:
            r["notes"] = r["error"][:120]
    for r in rows:
        if "images_per_s_2nd_half" in r:
            r["2nd_half"] = r["images_per_s_2nd_half"]
    columns = ["method", "images_per_s", "2nd_half", "x_official", "x_lightly", "of_bound", "step_ms", "steps", "queue",
               "batch_size", "peak_gpu_mib", "setup_s", "warmup_s", "first_batch_s", "notes"]
    what = "Data pipeline throughput (no model)" if args.data_only else "Training throughput"
    title = f"{what}, {args.config}, batch {args.batch_size or CONFIGS[args.config][1]}"
    notes = (f"{args.warmup} warm-up steps, --steps {args.steps}, {args.workers} DataLoader workers; data: "
             f"{args.data} (listed {data_passes(args)} times over an epoch where workers feed it); {PROTOCOL}")
    write_markdown(args.results_md, markdown_section(title, environment(device), command, columns, rows, notes))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--data", required=True, help="an ImageFolder (class/*.jpg)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--batch-size", type=int, default=0, help="0: the configuration's (512 or 256)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15,
                        help="timed steps at least; DataLoader methods time at least 2 x workers x prefetch_factor")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="the fast path without torch.compile")
    parser.add_argument("--compile-timeout", type=float, default=240,
                        help="seconds a compiled step may take (compiling included) before the fast path goes eager")
    parser.add_argument("--data-only", action="store_true",
                        help="time the batches alone (decoding and augmenting), without the model's step")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per method")
    parser.add_argument("--deadline", type=float, default=0,
                        help="a time.time() after which no method is started (each runs at most until then)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    parser.add_argument("--results-md", default=None, help="append the table to this markdown file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args.child, args)
    device = checked_inputs(parser, args.device, args.data)

    command = command_line()
    args.run = uuid.uuid4().hex[:8]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    forwarded = [a for a in sys.argv[1:]]
    for method in args.methods.split(","):
        started = time.perf_counter()
        timeout = min(args.timeout, args.deadline - time.time()) if args.deadline else args.timeout
        failure = {"benchmark": "throughput", "config": args.config, "run": args.run, "method": method}
        if timeout < 20:
            append_jsonl(Path(args.out) / "throughput.jsonl", {**failure, "error": "not run: out of time (--deadline)"})
            print(f"== {args.config}: {method} not run, out of time", flush=True)
            continue
        print(f"== {args.config}: {method}", flush=True)
        try:
            done = subprocess.run([sys.executable, "-m", "benchmarks.throughput", *forwarded, "--child", method,
                                   "--run", args.run], cwd=REPO, timeout=timeout)
            status = f"exit {done.returncode}"
        except subprocess.TimeoutExpired:
            status = "timed out"
            append_jsonl(Path(args.out) / "throughput.jsonl", {**failure, "error": f"timed out after {timeout:.0f} s"})
        print(f"== {method}: {status} in {time.perf_counter() - started:.0f} s", flush=True)
    summarise(args, command, device)


if __name__ == "__main__":
    main()
