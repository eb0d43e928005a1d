"""Pretraining through the fast path (--data-on-gpu, --gpu-decode, --compile), on CPU tensors: the
run, its checkpoints, resume, DDP and unreadable images behave as on the plain path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.main import simsiam
from simsiam.checkpoint import load_checkpoint
from simsiam.config import preset_config
from simsiam.errors import InputError
from simsiam.runtime import resolve_precision
from simsiam.train import pretrain

from conftest import make_image_folder

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "cifar", "--no-cifar-stem", "--image-size", "16", "--dim", "64", "--pred-dim", "16", "--batch-size", "8",
        "--workers", "0", "--device", "cpu", "--seed", "5", "--log-every", "1"]


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """24 JPEGs: 3 steps an epoch at batch 8."""
    return make_image_folder(tmp_path_factory.mktemp("fast") / "images", classes=2, per_class=12, ext="jpg")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(data, out, **overrides):
    values = dict(cifar_stem=False, image_size=16, dim=64, pred_dim=16, proj_hidden_dim=64, batch_size=8, epochs=2, workers=0, device="cpu", seed=5,
                  log_every=1, save_every_steps=1, data_on_gpu=True)
    return preset_config("cifar", data=str(data), out=str(out), **{**values, **overrides})


def test_the_cli_trains_on_device_held_data_and_writes_official_checkpoints(tmp_path, jpeg_folder):
    fast = CliRunner().invoke(simsiam, ["pretrain", str(jpeg_folder), "--out", str(tmp_path / "fast"), *TINY,
                                        "--epochs", "1", "--data-on-gpu"], catch_exceptions=False)
    assert fast.exit_code == 0, fast.output
    config = json.loads((tmp_path / "fast" / "config.json").read_text())
    assert config["data_on_gpu"] is True and config["compile"] is False
    lines = [json.loads(l) for l in (tmp_path / "fast" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["kind"] == "epoch" and lines[-1]["skipped_images"] == 0
    assert all(torch.isfinite(torch.tensor(l["loss"])) for l in lines)
    state = load_checkpoint(tmp_path / "fast" / "last.pth.tar")["state_dict"]
    assert all(k.startswith(("module.encoder.", "module.predictor.")) for k in state)
    assert "module.encoder.fc.0.weight" in state and "module.predictor.3.weight" in state


def test_images_of_mixed_sizes_are_refused_before_the_run_folder_is_made(tmp_path):
    from PIL import Image

    images = make_image_folder(tmp_path / "images", classes=2, per_class=8, ext="jpg")
    Image.new("RGB", (20, 24)).save(images / "class1" / "odd.jpg")
    args = ["pretrain", str(images), "--out", str(tmp_path / "run"), *TINY, "--epochs", "1"]
    refused = CliRunner().invoke(simsiam, [*args, "--data-on-gpu"], catch_exceptions=False)
    assert refused.exit_code == 2 and "--data-on-gpu needs images of one size" in refused.output, refused.output
    assert not (tmp_path / "run").exists()  # so the same command on the plain path is not refused
    plain = CliRunner().invoke(simsiam, args, catch_exceptions=False)
    assert plain.exit_code == 0, plain.output


def test_the_start_event_names_the_batch_source(tmp_path, jpeg_folder):
    events = []
    pretrain(tiny_config(jpeg_folder, tmp_path / "run", epochs=1, data_on_gpu=False, gpu_decode=True),
             on_event=events.append)
    assert events[0]["batch_source"] == "decode-on-device"
    assert [e["event"] for e in events].count("epoch") == 1


class Killed(Exception):
    pass


def test_a_run_stopped_mid_epoch_and_resumed_ends_as_the_uninterrupted_one(tmp_path, jpeg_folder):
    pretrain(tiny_config(jpeg_folder, tmp_path / "reference"))

    def kill_at_step_5(event):  # 3 steps an epoch: mid-epoch 1, before step 5's checkpoint
        if event["event"] == "log" and event["step"] == 5:
            raise Killed

    with pytest.raises(Killed):
        pretrain(tiny_config(jpeg_folder, tmp_path / "victim"), on_event=kill_at_step_5)
    partial = load_checkpoint(tmp_path / "victim" / "last.pth.tar")
    assert (partial["epoch"], partial["step_in_epoch"]) == (1, 1)
    with pytest.raises(InputError, match=r"the run is in epoch 2 of its 2 \(--epochs 1\); pass --epochs N with N > 1"):
        pretrain(tiny_config(jpeg_folder, tmp_path / "victim", epochs=1), resume_from=tmp_path / "victim" / "last.pth.tar")
    # the library refuses what the CLI refuses: settings that decide the saved weights cannot change
    with pytest.raises(InputError, match=r"--lr 0.5: the run being resumed .* used "):
        pretrain(tiny_config(jpeg_folder, tmp_path / "victim", lr=0.5), resume_from=tmp_path / "victim" / "last.pth.tar")
    pretrain(tiny_config(jpeg_folder, tmp_path / "victim"), resume_from=tmp_path / "victim" / "last.pth.tar")
    expected = load_checkpoint(tmp_path / "reference" / "last.pth.tar")
    got = load_checkpoint(tmp_path / "victim" / "last.pth.tar")
    assert got["global_step"] == expected["global_step"] == 6
    for key, value in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key


def test_compile_compiles_the_model_the_loss_and_the_augmentation_and_keeps_the_official_keys(
        tmp_path, jpeg_folder, monkeypatch):
    compiled = []

    def record(function, **options):  # compiling a model for real takes minutes on CPU; the GPU suite does it
        compiled.append(function)
        return function

    monkeypatch.setattr(torch, "compile", record)
    pretrain(tiny_config(jpeg_folder, tmp_path / "run", epochs=1, compile=True))
    names = [getattr(f, "__name__", type(f).__name__) for f in compiled]
    # the augmentation's device part (test_gpu_augment checks that compiled, it computes the same)
    assert names == ["crop_and_photometric", "photometric", "SimSiam", "negative_cosine_similarity"]
    state = load_checkpoint(tmp_path / "run" / "last.pth.tar")["state_dict"]
    assert not any("_orig_mod" in k for k in state)


def test_unreadable_images_are_skipped_and_counted_or_fatal_under_strict(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", classes=1, per_class=7, ext="jpg")
    (folder / "class0" / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    args = ["pretrain", str(folder), *TINY, "--epochs", "1", "--data-on-gpu"]
    skipped = CliRunner().invoke(simsiam, [*args, "--out", str(tmp_path / "a")], catch_exceptions=False)
    assert skipped.exit_code == 0, skipped.output
    epoch = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    assert epoch["skipped_images"] == 1 and "broken.jpg" in skipped.output
    strict = CliRunner().invoke(simsiam, [*args, "--out", str(tmp_path / "b"), "--strict"], catch_exceptions=False)
    assert strict.exit_code == 2 and "broken.jpg: cannot decode image" in strict.output


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_on_the_fast_path(tmp_path, jpeg_folder):
    args = [str(jpeg_folder), *TINY, "--epochs", "1", "--data-on-gpu"]
    single = CliRunner().invoke(simsiam, ["pretrain", *args, "--out", str(tmp_path / "single")], catch_exceptions=False)
    assert single.exit_code == 0, single.output
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "cli", "pretrain", *args, "--out", str(tmp_path / "ddp")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    single = load_checkpoint(tmp_path / "single" / "last.pth.tar")["state_dict"]
    ddp = load_checkpoint(tmp_path / "ddp" / "last.pth.tar")["state_dict"]
    # each rank augments its half of every global batch as the single process does (the draws
    # come from (seed, epoch, step)); the rest is test_ddp.py's argument: same function, float
    # additions in another order: measured ~1e-6 relative after 3 steps on one machine, 1.0e-4 on
    # another (AVX-512: kernels chosen by batch size), against > 1e-2 for a wrong split; 5e-4 as there
    for key, a in single.items():
        if a.is_floating_point():
            # zero-initialised BN weights and running means near 0 have no relative scale (as test_ddp.py)
            assert ((a - ddp[key]).abs().max() / a.abs().max().clamp_min(1e-2)) < 5e-4, key
        else:
            assert torch.equal(a, ddp[key]), key


@pytest.mark.parametrize("capability, auto", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 0), "fp32"), ((7, 5), "fp32")])
def test_auto_precision_is_bf16_only_on_gpus_with_bf16_tensor_cores(monkeypatch, capability, auto):
    """An H100 (9.0) or A100 (8.0) trains in bf16; a V100 (7.0) or T4 (7.5) would emulate it, slower than fp32."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    gpu = torch.device("cuda", 1)
    assert resolve_precision("auto", gpu) == auto and asked == [gpu]
    assert resolve_precision("bf16", gpu) == "bf16"  # asked for, it is kept
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


@pytest.mark.slow  # a minute of compiling on a GPU
@pytest.mark.cuda(reason="the CPU tests above run the same path")
def test_on_a_gpu_auto_holds_cifar_sized_data_there_and_compile_runs(tmp_path, jpeg_folder):
    events = []
    pretrain(tiny_config(jpeg_folder, tmp_path / "gpu", device="cuda", data_on_gpu=None, compile=True, epochs=1),
             on_event=events.append)
    assert events[0]["batch_source"] == "data-on-device"
    assert events[0]["precision"] == resolve_precision("auto", torch.device("cuda", 0))  # bf16 from Ampere on
    assert torch.isfinite(torch.tensor(events[-1]["loss"]))
