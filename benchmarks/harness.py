"""The timing harness every benchmark shares: a method is a batch source and a step; the harness
warms it up, times it, reads peak GPU memory and records where and how the numbers were taken.

Methods (the official recipe, lightly, ours) differ only in what they build, never in how they
are timed: no training loop is repeated per method.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Method:
    """What a benchmark times: ``step(batch)`` over the batches of ``epoch()`` (a fresh iterable
    each time it is called), ``batch_size`` images a step (two views of an image count once)."""

    name: str
    epoch: Callable[[], Iterable]
    step: Callable[[object], torch.Tensor | None]
    batch_size: int
    setup_s: float = 0.0  # building it: model, dataset (decoding a dataset into GPU memory counts here)
    notes: str | Callable[[], str] = ""  # a callable is read after timing (e.g. "compile failed: eager")
    extra: dict = field(default_factory=dict)
    # its DataLoader, if its batches come from one: the worker processes, and the batches they may
    # hold ready ahead of the step (workers x prefetch_factor); 0 for sources without workers
    workers: int = 0
    queue: int = 0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_queue(loader) -> tuple[int, int]:
    """(workers, batches its workers may hold ready) of a ``torch.utils.data.DataLoader``."""
    workers = loader.num_workers
    return workers, workers * (loader.prefetch_factor or 2) if workers else 0


def window_steps(steps: int, workers: int = 0, queue: int = 0) -> int:
    """How many steps the window times: ``steps``, and for a DataLoader at least twice the ``queue``
    of batches its workers may hold ready, rounded up to whole rounds of its ``workers`` (worker
    ``i`` makes batches ``i, i + workers, ...``: started together, they deliver in waves)."""
    if not queue:
        return steps
    wave = max(1, workers)
    return -(-max(steps, 2 * queue) // wave) * wave


PROTOCOL = ("protocol: warm-up steps on one iterator, then dropped; a fresh iterator, its first batch "
            "and step untimed (worker start-up); then N timed steps (steps), end to end, device synchronised "
            "at start, middle (2nd_half rate) and end; N >= --steps and, for DataLoader sources, >= 2 x the "
            "batches its workers may queue ahead (queue = workers x prefetch_factor), in whole worker rounds; "
            "datasets repeated so that no epoch ends (no worker restart) inside the window")


class EpochTooShort(RuntimeError):
    pass


def drop_iterator(iterator) -> None:
    """Stop an iterator's DataLoader workers now (a generator is closed, which releases the
    loader iterator it holds; the last reference going shuts the workers down)."""
    close = getattr(iterator, "close", None)
    if close is not None:
        close()
    del iterator
    gc.collect()


def _batches(method: Method, window: int):
    """Batches of one fresh pass; a source without workers may run into its next epoch (a new
    order, nothing restarts), a DataLoader source must not: that would time a worker restart."""
    while True:
        count = 0
        for batch in method.epoch():
            count += 1
            yield batch
        if not count:
            raise RuntimeError(f"{method.name}: an epoch with no batches")
        if method.queue:
            raise EpochTooShort(f"{method.name}: an epoch of {count} batches is shorter than the {window} "
                                "the timing needs; repeat the dataset (its workers would restart inside the window)")


def time_steps(method: Method, device: torch.device, warmup: int, steps: int) -> dict:
    """Time ``method`` by :data:`PROTOCOL`: ``warmup`` untimed steps on a first iterator, then a
    fresh iterator's first batch and step untimed, then N timed steps (:func:`window_steps`).
    Returns images/s (the whole window and its second half) and the peak GPU memory so far."""
    n = window_steps(steps, method.workers, method.queue)
    warmup_s = 0.0
    if warmup:
        start = time.perf_counter()
        batches = _batches(method, warmup)
        for _ in range(warmup):
            method.step(next(batches))
        synchronize(device)
        drop_iterator(batches)
        warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    batches = _batches(method, n + 1)
    method.step(next(batches))
    synchronize(device)
    first_s = time.perf_counter() - start
    half = n // 2
    start = middle = time.perf_counter()
    for i in range(n):
        if i == half:
            synchronize(device)
            middle = time.perf_counter()
        method.step(next(batches))
    synchronize(device)
    end = time.perf_counter()
    drop_iterator(batches)
    elapsed = end - start
    notes = method.notes() if callable(method.notes) else method.notes
    result = {
        "method": method.name, "batch_size": method.batch_size, "steps": n, "warmup_steps": warmup,
        "seconds": round(elapsed, 3), "images_per_s": round(n * method.batch_size / elapsed, 1),
        "images_per_s_2nd_half": round((n - half) * method.batch_size / (end - middle), 1),
        "step_ms": round(1000 * elapsed / n, 2), "warmup_s": round(warmup_s, 2), "first_batch_s": round(first_s, 2),
        "setup_s": round(method.setup_s, 2), "workers": method.workers, "queue": method.queue,
        "notes": notes, **method.extra,
    }
    result.update(peak_memory(device))
    return result


def passes_needed(images: int, batch_size: int, steps: int, workers: int, prefetch: int = 4) -> int:
    """How many times a dataset of ``images`` must be repeated so that one epoch holds the untimed
    first batch and the longest window :func:`window_steps` gives (for ``prefetch`` up to 4)."""
    window = window_steps(steps, workers, workers * prefetch)
    return max(1, -(-(window + 2) * batch_size // max(1, images)))


class CompileTimeout(BaseException):
    """Compiling (the first steps of a ``torch.compile`` d model) took longer than allowed; also
    what stops an extraction method at its ``--deadline``. A BaseException, as KeyboardInterrupt:
    the library's ``except Exception`` around the compiled augmentation (its eager fallback) would
    otherwise take it for a compile error, redo the batch eager, and leave the model's compiling,
    the one-shot alarm spent, with no limit."""


RING_AGAIN_S = 5.0  # after a CompileTimeout, until disarmed


def arm_alarm(seconds: float, what: str = "compiling") -> bool:
    """Raise :class:`CompileTimeout` in the main thread ``seconds`` from now (SIGALRM); False, and
    nothing armed, off the main thread, without SIGALRM or for ``seconds`` <= 0."""
    if seconds <= 0 or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return False

    def ring(signum, frame):
        # rings again until disarmed: raised where Python ignores exceptions (a weakref callback of
        # dynamo's, seen on a CPU run), it would be lost, and compiling would go on unlimited
        signal.setitimer(signal.ITIMER_REAL, RING_AGAIN_S)
        raise CompileTimeout(f"{what} took over {seconds:.0f} s")

    signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    return True


def disarm_alarm() -> None:
    if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


@contextmanager
def time_limit(seconds: float, what: str = "compiling"):
    armed = arm_alarm(seconds, what)
    try:
        yield
    finally:
        if armed:
            disarm_alarm()


def compile_failure(err: BaseException) -> str:
    """One line for a row's notes on why compiling was given up, with the traceback on stderr."""
    return f"compile failed ({give_up_compiling(err)[:100]}), eager instead"


def give_up_compiling(err: BaseException) -> str:
    """What made compiling fail, as ``Type: first line``; prints the traceback and resets dynamo."""
    traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    root = err  # dynamo wraps what the backend raised (BackendCompilerFailed(... CompileTimeout ...))
    for _ in range(10):
        inner = getattr(root, "inner_exception", None) or root.__cause__
        if inner is None:
            break
        root = inner
    first = (str(root).strip().splitlines() or [""])[0]
    print(f"== torch.compile failed, going on eager: {type(root).__name__}: {first}", file=sys.stderr, flush=True)
    try:
        import torch._dynamo

        torch._dynamo.reset()
    except Exception:  # noqa: BLE001 - the eager model does not need it
        pass
    return f"{type(root).__name__}: {first[:80]}"


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
    """The commit, with "-dirty" when tracked files differ from it: numbers of uncommitted code say so."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=REPO, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def checked_inputs(parser, device: str, *folders: str) -> torch.device:
    """The device a benchmark runs on, and its image folders listed, before any work: a missing
    GPU or folder is one line (exit 2), not a traceback in every method's process, nor CPU rows
    under --device cuda."""
    from simsiam.data import scan_images
    from simsiam.errors import InputError
    from simsiam.runtime import resolve_device

    try:
        for folder in folders:
            scan_images(folder)
        return resolve_device(device)
    except InputError as err:
        parser.error(str(err))


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
