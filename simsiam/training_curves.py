"""Training curves of a run folder: loss, collapse monitor, kNN top-1 and lr, from ``metrics.jsonl``.

``metrics.jsonl`` (written by :mod:`simsiam.train`) holds one JSON object per line: ``"kind":
"step"`` lines (``step``, ``epoch``, ``loss``, ``lr``, ``collapse_std``, ``images_per_s``) and
``"kind": "epoch"`` lines (the epoch's mean ``loss``, ``lr``, ``collapse_std``, and ``knn_top1``
when the kNN monitor ran). Epochs count from 1 on both kinds: a step line names the epoch under
way, an epoch line the epoch just finished. The last line, cut short by a kill, is skipped; any
other line that is not such a record means the file is not one of ours.

The collapse monitor is the std of the L2-normalised projector output times sqrt(d): about 1
when healthy, 0 when the representation has collapsed (the paper's Fig. 2, middle).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .atomic import atomic_write, check_output
from .errors import InputError

METRICS_FILE = "metrics.jsonl"
PANELS = (
    ("loss", "loss (negative cosine)"),
    ("collapse_std", "collapse monitor: std x sqrt(d)"),
    ("knn_top1", "kNN top-1 %"),
    ("lr", "learning rate"),
)
# fractions in metrics.jsonl (as knn --json has them), drawn in percent as every console line shows them
FRACTIONS = frozenset({"knn_top1"})
LINEAR_EVAL_PANELS = (  # a simsiam lincls folder: its metrics.jsonl has train and validation accuracy (%)
    ("loss", "loss (cross-entropy)"),
    ("train_top1", "train top-1 %"),
    ("top1", "validation top-1 %"),
    ("lr", "learning rate"),
)


def panels_for(steps: list[dict], epochs: list[dict]) -> tuple:
    """The panels of a pretraining run, or of a linear evaluation (which logs ``train_top1``)."""
    return LINEAR_EVAL_PANELS if any("train_top1" in r for r in steps + epochs) else PANELS


def read_metrics(run_dir: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """``(step records, epoch records)`` of a run folder's ``metrics.jsonl``."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise InputError(f"{run_dir}: a file; give the run folder that holds {METRICS_FILE}")
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such run folder")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise InputError(f"{run_dir}: no {METRICS_FILE} (not a folder written by simsiam pretrain or lincls)")
    steps, epochs = [], []
    not_ours = f"not a {METRICS_FILE} written by simsiam pretrain or lincls"
    text = path.read_text(errors="replace")  # bytes that are not text: a line that is not JSON
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines) and not text.endswith("\n"):  # the last line, cut short by a kill
                continue
            raise InputError(f"{path}: line {number} is not JSON; {not_ours}") from None
        if not (isinstance(record, dict) and isinstance(record.get("step"), (int, float))):
            raise InputError(f"{path}: line {number} is not a metrics record (a JSON object with a 'step'); "
                             f"{not_ours}")
        (epochs if record.get("kind") == "epoch" else steps).append(record)
    if not steps and not epochs:  # a run that has not logged yet
        raise InputError(f"{path}: holds no metrics yet")
    return steps, epochs


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training_curves(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the four curves of a pretraining or linear-evaluation folder against the global step into
    a PNG (default ``RUN_DIR/curves.png``); atomic."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps, epochs = read_metrics(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / "curves.png"
    if out.suffix.lower() != ".png":
        raise InputError(f"--out {out}: must end in .png (the file written is a PNG)")
    check_output(out, "--out", overwrite=True)
    figure = Figure(figsize=(10, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2, sharex=True).ravel()
    for ax, (key, title) in zip(axes, panels_for(steps, epochs)):
        x, y = _series(steps, key)
        ex, ey = _series(epochs, key)
        if key in FRACTIONS:
            y, ey = [100 * v for v in y], [100 * v for v in ey]
        if x:
            ax.plot(x, y, lw=1, alpha=0.6, label="logging steps")
        if ex:
            ax.plot(ex, ey, "o-", ms=3, label="epoch" if key != "knn_top1" else "evaluation")
        if not x and not ex:
            ax.text(0.5, 0.5, "not recorded" + (" (no --knn-train/--knn-val)" if key == "knn_top1" else ""),
                    ha="center", va="center", transform=ax.transAxes, color="0.4")
        elif x and ex:
            ax.legend(fontsize=8)
        if key == "collapse_std" and (x or ex):
            ax.axhline(1.0, color="0.6", ls="--", lw=0.8)  # the healthy value, 1/sqrt(d) before scaling
            # from 0: a collapse is a fall towards it; up to the finite values (a diverged run's are not)
            ax.set_ylim(0, max([1.1] + [1.05 * v for v in y + ey if math.isfinite(v)]))
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes[2:]:
        ax.set_xlabel("step")
    figure.suptitle(Path(run_dir).resolve().name)
    with atomic_write(out) as f:
        figure.savefig(f, format="png")
    return out
