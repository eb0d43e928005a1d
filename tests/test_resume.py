"""A run killed with SIGKILL at any moment and resumed ends with the weights of an uninterrupted run."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from simsiam.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--preset", "cifar", "--no-cifar-stem", "--image-size", "16", "--dim", "64", "--pred-dim", "16", "--batch-size", "16",
        "--epochs", "3", "--workers", "0", "--device", "cpu", "--seed", "11", "--log-every", "1",
        "--save-every-steps", "1", "--save-every-epochs", "1"]


def start(*args) -> subprocess.Popen:
    # one thread per process: both runs then do the same float operations in the same order
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "cli", "pretrain", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def metric_lines(run: Path) -> int:
    try:
        return len((run / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def kill_when(process: subprocess.Popen, run: Path, lines: int, extra_delay: float) -> None:
    """SIGKILL once metrics.jsonl has ``lines`` lines, plus a random delay (mid-step or mid-write)."""
    while metric_lines(run) < lines:
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.01)
    time.sleep(extra_delay)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path, shared_image_folder):
    reference = start(shared_image_folder, "--out", tmp_path / "reference", *ARGS)
    victim_dir = tmp_path / "victim"
    victim = start(shared_image_folder, "--out", victim_dir, *ARGS)
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    # 64 images / 16 = 4 steps an epoch, 12 in all, 15 metrics lines; kill twice, at random moments
    kill_when(victim, victim_dir, rng.randint(2, 6), rng.uniform(0, 0.5))
    first_kill_lines = metric_lines(victim_dir)
    victim = start("--resume", victim_dir)
    kill_when(victim, victim_dir, first_kill_lines + rng.randint(1, 5), rng.uniform(0, 0.5))
    victim = start("--resume", victim_dir)
    assert victim.wait(timeout=600) == 0, victim.stdout.read()
    assert reference.wait(timeout=600) == 0, reference.stdout.read()

    expected = load_checkpoint(tmp_path / "reference" / "last.pth.tar")
    got = load_checkpoint(victim_dir / "last.pth.tar")
    assert got["epoch"] == expected["epoch"] == 3 and got["global_step"] == 12
    for key, value in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), f"{key} differs (kill schedule seed {seed})"
    for (k, a), b in zip(expected["optimizer"]["state"].items(), got["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"]), f"momentum {k} differs (seed {seed})"
    # the metrics log holds each step once, as the uninterrupted run's
    ref_lines = (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()
    got_lines = (victim_dir / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [l.split('"images_per_s"')[0] for l in lines]
    assert strip(got_lines) == strip(ref_lines)
    assert not list(victim_dir.glob(".*.tmp"))
