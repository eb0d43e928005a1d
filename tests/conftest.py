"""Shared fixtures: tiny image folders made on the fly (the suite never reads ../shared)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.cuda(reason=...)`` skips a test without a CUDA GPU, and names it as CUDA-only:
    benchmarks/gpu_suite.sh selects these by the marker, so a renamed or added one is still run there."""
    if torch.cuda.is_available():
        return
    for item in items:
        marker = item.get_closest_marker("cuda")
        if marker is not None:
            why = marker.kwargs.get("reason") or (marker.args[0] if marker.args else "")
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU" + (f"; {why}" if why else "")))


def make_image_folder(root: Path, classes: int = 2, per_class: int = 16, size: int = 16,
                      labelled: bool = True, seed: int = 0, ext: str = "png") -> Path:
    """Images of class c: a noisy background with a square of colour c at a random place."""
    rng = np.random.default_rng(seed)
    palette = [(220, 40, 40), (40, 200, 40), (40, 60, 230), (230, 200, 30), (200, 40, 200)]
    root.mkdir(parents=True, exist_ok=True)
    for c in range(classes):
        folder = root / f"class{c}" if labelled else root
        folder.mkdir(exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
            side = size // 2
            x, y = rng.integers(0, size - side + 1, 2)
            pixels[y:y + side, x:x + side] = palette[c % len(palette)]
            Image.fromarray(pixels).save(folder / f"c{c}_{i:03d}.{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def shared_image_folder(tmp_path_factory) -> Path:
    """A read-only folder of 64 labelled 16x16 images, made once per session."""
    return make_image_folder(tmp_path_factory.mktemp("shared") / "images", classes=2, per_class=32)


@pytest.fixture(scope="module")
def one_thread():
    """One torch and one faiss thread while a module's tests run. A module asks for it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.

    The tests run tiny networks and searches; on the test machine's shared cores, threads waiting
    for each other at every operation cost several times the work itself. One thread also makes a
    run's float operations the same from run to run (the resume tests rely on it).
    """
    try:
        import faiss
    except ImportError:
        faiss = None
    torch_threads = torch.get_num_threads()
    faiss_threads = faiss.omp_get_max_threads() if faiss else 0
    torch.set_num_threads(1)
    if faiss:
        faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    if faiss:
        faiss.omp_set_num_threads(faiss_threads)
