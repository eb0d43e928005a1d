"""The benchmarks' refusals of bad input, before any work: one line, exit 2, nothing made.
(Their measurements run in benchmarks/, not here; see benchmarks/RESULTS.md.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_image_folder

REPO = Path(__file__).resolve().parents[1]


def bench(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("module, args", [("benchmarks.throughput", ["--config", "cifar-r18", "--data"]),
                                          ("benchmarks.extraction", ["--data"]),
                                          ("benchmarks.time_to_accuracy", ["--test", "{images}", "--train"])])
def test_a_missing_folder_is_one_line_before_any_method_runs(tmp_path, module, args):
    images = make_image_folder(tmp_path / "images", classes=1, per_class=2)
    out = tmp_path / "out"
    done = bench("-m", module, *[a.format(images=images) for a in args], tmp_path / "missing", "--device", "cpu",
                 "--out", out)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(f"{tmp_path / 'missing'}: no such folder"), done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without a GPU")
def test_device_cuda_without_a_gpu_is_refused_not_run_on_the_cpu(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=1, per_class=2)
    done = bench("-m", "benchmarks.throughput", "--config", "cifar-r18", "--data", images, "--device", "cuda",
                 "--methods", "official", "--out", tmp_path / "out")
    assert done.returncode == 2 and "--device cuda: no CUDA GPU is visible" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_make_jpeg_folder_refuses_a_source_too_small_and_leaves_no_folder(tmp_path):
    source = make_image_folder(tmp_path / "cifar", classes=2, per_class=3, ext="jpg")
    done = bench("-m", "benchmarks.make_jpeg_folder", source, tmp_path / "jpeg", "--images", "8")
    assert done.returncode != 0 and "2 class folders of JPEGs (6 images, the smallest class 3)" in done.stderr
    assert not (tmp_path / "jpeg").exists() and not (tmp_path / "jpeg.partial").exists()
    made = bench("-m", "benchmarks.make_jpeg_folder", source, tmp_path / "jpeg", "--images", "4")
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in (tmp_path / "jpeg").iterdir()) == ["class0", "class1"]
    assert not (tmp_path / "jpeg.partial").exists()


def test_knn_speed_refuses_fewer_queries_than_dinos_chunks():
    done = bench("benchmarks/knn_speed.py", "--train", "200", "--val", "50", "--dim", "8", "--classes", "4",
                 "--skip-sklearn")
    assert done.returncode == 2 and "--val 50: at least 100 queries" in done.stderr, done.stderr
