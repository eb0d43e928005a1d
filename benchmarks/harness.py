"""The timing harness every benchmark shares: a method is a batch source and a step; the harness
warms it up, times it, reads peak GPU memory and records where and how the numbers were taken.

Methods (the official recipe, lightly, ours) differ only in what they build, never in how they
are timed: no training loop is repeated per method.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Method:
    """What a benchmark times: ``step(batch)`` over the batches of ``epoch()`` (a fresh iterable
    each time one runs out), ``batch_size`` images a step (two views of an image count once)."""

    name: str
    epoch: Callable[[], Iterable]
    step: Callable[[object], torch.Tensor | None]
    batch_size: int
    setup_s: float = 0.0  # building it: model, dataset (decoding a dataset into GPU memory counts here)
    notes: str = ""
    extra: dict = field(default_factory=dict)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches_forever(method: Method):
    while True:
        yielded = False
        for batch in method.epoch():
            yielded = True
            yield batch
        if not yielded:
            raise RuntimeError(f"{method.name}: an epoch with no batches")


def time_steps(method: Method, device: torch.device, warmup: int, steps: int) -> dict:
    """Run ``warmup`` untimed steps (compilation, cuDNN autotuning, worker start), then time
    ``steps`` steps end to end (waiting for the batches included), synchronising the device only
    at both ends. Returns images/s and the peak GPU memory of the process so far."""
    batches = _batches_forever(method)
    start = time.perf_counter()
    for _ in range(warmup):
        method.step(next(batches))
    synchronize(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        method.step(next(batches))
    synchronize(device)
    elapsed = time.perf_counter() - start
    result = {
        "method": method.name, "batch_size": method.batch_size, "steps": steps, "warmup_steps": warmup,
        "seconds": round(elapsed, 3), "images_per_s": round(steps * method.batch_size / elapsed, 1),
        "step_ms": round(1000 * elapsed / steps, 2), "warmup_s": round(warmup_s, 2), "setup_s": round(method.setup_s, 2),
        "notes": method.notes, **method.extra,
    }
    result.update(peak_memory(device))
    return result


def peak_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2**20),
            "peak_gpu_reserved_mib": round(torch.cuda.max_memory_reserved(device) / 2**20)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """Where the numbers come from: machine, device, date, versions."""
    import torchvision

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{_cpu_model()}, {os.cpu_count()} CPUs",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU only",
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "lightly": _version("lightly"), "simsiam_commit": _commit(),
        "torch_threads": torch.get_num_threads(),
    }
    return {k: v for k, v in env.items() if v is not None}


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "-m", _module_name(), *sys.argv[1:]])


def _module_name() -> str:
    main = Path(sys.argv[0]).resolve()
    try:
        return ".".join(main.relative_to(REPO).with_suffix("").parts)
    except ValueError:
        return str(main)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def markdown_section(title: str, env: dict, command: str, columns: list[str], rows: list[dict], notes: str = "") -> str:
    """A RESULTS.md section: what ran where, then a table of ``columns`` of ``rows``."""
    lines = [f"### {title}", "",
             f"- date: {env.get('date')}; machine: {env.get('machine')}; device: {env.get('device')}",
             "- versions: " + ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "torchvision", "lightly",
                                                                    "simsiam_commit") if k in env),
             f"- command: `{command}`"]
    if notes:
        lines.append(f"- {notes}")
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def write_markdown(path: str | os.PathLike | None, text: str) -> None:
    """Print the section, and append it to ``path`` when given."""
    print(text, flush=True)
    if path:
        with open(path, "a") as f:
            f.write("\n" + text)
