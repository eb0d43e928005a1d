"""A contact sheet of search results: each query in a row, beside its k nearest images and their scores.

Drawn with matplotlib's object API (no pyplot state, no display needed). The PNG is exactly
``(1 + k) * CELL_INCHES * DPI`` pixels wide and ``rows * CELL_INCHES * DPI`` high. A neighbour's
title is its similarity, and its class when the database is labelled; with query labels too, its
frame is green when it shares the query's class and red when not.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from simsiam.atomic import atomic_write, check_output
from simsiam.errors import InputError

from .search import SearchResult

CELL_INCHES = 1.6
DPI = 100
MAX_ROWS = 16  # queries drawn; a sheet of thousands of rows helps nobody
THUMBNAIL = 160


def sheet_size(queries: int, k: int, max_rows: int = MAX_ROWS) -> tuple[int, int]:
    """``(width, height)`` in pixels of the sheet of ``queries`` queries with ``k`` neighbours each."""
    return round((1 + k) * CELL_INCHES * DPI), round(min(queries, max_rows) * CELL_INCHES * DPI)


def _thumbnail(path: Path) -> np.ndarray | None:
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            return np.asarray(image)
    except (OSError, ValueError):
        return None  # moved or unreadable since extraction: drawn as an empty cell, not fatal


def _class_of(features, index: int) -> str:
    """" cat": the class of row ``index`` of a labelled feature file, for its cell's title ("" unlabelled)."""
    label = int(features.labels[index])
    if label < 0 or label >= len(features.classes):
        return ""
    name = features.classes[label]
    return " " + (name if len(name) <= 14 else name[:13] + "…")  # a cell is 1.6 inches wide


def _cell(ax, image: np.ndarray | None, title: str, frame: str | None) -> None:
    if image is None:
        ax.set_facecolor("0.85")
        ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes, fontsize=8)
    else:
        ax.imshow(image)
    ax.set_title(title, fontsize=8, pad=2)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(frame is not None)
        if frame is not None:
            spine.set_color(frame)
            spine.set_linewidth(3)


def check_grid_name(out: str | os.PathLike) -> Path:
    """``out`` as a Path; refused unless it ends in .png, the format written."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InputError(f"--grid {out}: must end in .png (the file written is a PNG)")
    return out


def draw_contact_sheet(result: SearchResult, out: str | os.PathLike, max_rows: int = MAX_ROWS) -> list[Path]:
    """Write the PNG contact sheet of ``result`` (the first ``max_rows`` queries); atomic.

    Returns the images that could not be read (drawn as "missing" cells): moved since extraction,
    or a feature file made on another machine.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = check_grid_name(out)
    # the images drawn are read from the folders the files were extracted from: never over or among them
    roots = [features.attrs["root"] for features in (result.database, result.queries) if features.attrs.get("root")]
    check_output(out, "--grid", overwrite=True, inputs=roots)
    rows = min(len(result.queries), max_rows)
    k = result.indices.shape[1]
    figure = Figure(figsize=((1 + k) * CELL_INCHES, rows * CELL_INCHES), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 1 + k, squeeze=False)
    figure.subplots_adjust(left=0.01, right=0.99, top=1 - 0.25 / rows, bottom=0.02 / rows, wspace=0.08, hspace=0.3)
    labelled = result.query_labels >= 0
    missing: list[Path] = []

    def thumbnail(path: Path) -> np.ndarray | None:
        image = _thumbnail(path)
        if image is None and path not in missing:
            missing.append(path)
        return image

    for row in range(rows):
        query_path = result.queries.root / result.queries.paths[row]
        name = result.queries.paths[row]
        _cell(axes[row, 0], thumbnail(query_path), name if len(name) <= 24 else "…" + name[-23:], "black")
        for col in range(k):
            index = int(result.indices[row, col])
            ax = axes[row, col + 1]
            if index < 0:
                _cell(ax, None, "no result", None)
                continue
            frame = None
            if labelled[row]:
                frame = "tab:green" if result.database.labels[index] == result.query_labels[row] else "tab:red"
            _cell(ax, thumbnail(result.database.root / result.database.paths[index]),
                  f"{result.scores[row, col]:.3f}{_class_of(result.database, index)}", frame)
    with atomic_write(out) as f, warnings.catch_warnings():
        # names in scripts the default font lacks (CJK, say) are drawn as boxes: a UserWarning per glyph
        warnings.filterwarnings("ignore", message="Glyph .* missing from", category=UserWarning)
        figure.savefig(f, format="png", dpi=DPI)
    return missing
