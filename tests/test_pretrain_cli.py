"""``simsiam pretrain`` end to end through click's CliRunner: a short run and every error case."""

import itertools
import json
import os
from pathlib import Path

import pytest
import torch

from simsiam.checkpoint import load_checkpoint

from cli_runner import assert_resume_refuses_edited, assert_user_error, run
from conftest import make_image_folder

TINY = ["--preset", "cifar", "--no-cifar-stem", "--image-size", "16", "--dim", "64", "--pred-dim", "16", "--batch-size", "8",
        "--epochs", "1", "--workers", "0", "--device", "cpu", "--log-every", "2"]


def no_checkpoints(folder):
    return not folder.exists() or not [p for p in folder.iterdir() if "pth" in p.name]


def test_a_short_run_writes_checkpoints_config_and_metrics(tmp_path, shared_image_folder):
    out = tmp_path / "run"
    result = run("pretrain", shared_image_folder, "--out", out, *TINY, "--epochs", "2", "--save-every-epochs", "1")
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"config.json", "metrics.jsonl", "last.pth.tar",
                                               "checkpoint_0000.pth.tar", "checkpoint_0001.pth.tar"}
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "resnet18" and config["cifar_stem"] is False and config["lr"] == 0.03 and config["wd"] == 5e-4
    assert config["batch_size"] == 8 and config["image_size"] == 16 and config["proj_layers"] == 2
    # and what "auto" and the scaling rule made of them
    assert config["precision"] == "auto" and config["resolved"]["device"] == "cpu"
    assert config["resolved"]["precision"] == "fp32" and config["resolved"]["batch_source"] == "dataloader"
    assert config["resolved"]["init_lr"] == pytest.approx(0.03 * 8 / 256) and config["resolved"]["world_size"] == 1
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if l["kind"] == "step"]
    epochs = [l for l in lines if l["kind"] == "epoch"]
    assert [l["step"] for l in steps] == [2, 4, 6, 8, 10, 12, 14, 16] and len(epochs) == 2
    # epochs count from 1 on both kinds of line: steps 2-8 are the first epoch, whose line says 1
    assert [l["epoch"] for l in steps] == [1, 1, 1, 1, 2, 2, 2, 2] and [l["epoch"] for l in epochs] == [1, 2]
    for line in steps:
        assert {"loss", "lr", "collapse_std", "images_per_s"} <= line.keys()
    # cosine per epoch from lr x batch / 256
    assert epochs[0]["lr"] == pytest.approx(0.03 * 8 / 256) and epochs[1]["lr"] == pytest.approx(0.03 * 8 / 256 / 2)
    checkpoint = load_checkpoint(out / "checkpoint_0001.pth.tar")
    assert checkpoint["epoch"] == 2 and checkpoint["arch"] == "resnet18"
    assert all(k.startswith(("module.encoder.", "module.predictor.")) for k in checkpoint["state_dict"])
    assert len(checkpoint["optimizer"]["param_groups"]) == 2  # encoder, and the predictor at fixed lr
    assert "epoch 2: loss" in result.output


def test_missing_data_folder(tmp_path):
    assert_user_error(run("pretrain", tmp_path / "nowhere", "--out", tmp_path / "run", *TINY),
                      f"DATA {tmp_path / 'nowhere'}: no such folder")
    assert not (tmp_path / "run").exists()


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(run("pretrain", tmp_path / "empty", "--out", tmp_path / "run", *TINY), "empty: no images found")
    assert not (tmp_path / "run").exists()


def test_batch_larger_than_the_dataset(tmp_path, shared_image_folder):
    result = run("pretrain", shared_image_folder, "--out", tmp_path / "run", *TINY, "--batch-size", "128")
    assert_user_error(result, "--batch-size 128: larger than the dataset (64 images)")
    assert not (tmp_path / "run").exists()


@pytest.fixture
def folder_with_bad_images(tmp_path):
    root = make_image_folder(tmp_path / "bad", classes=2, per_class=8, ext="jpg")
    data = (root / "class0" / "c0_000.jpg").read_bytes()
    (root / "class0" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "class1" / "garbage.jpg").write_bytes(b"not a jpeg")
    return root


def test_unreadable_images_are_skipped_and_counted(tmp_path, folder_with_bad_images):
    out = tmp_path / "run"
    result = run("pretrain", folder_with_bad_images, "--out", out, *TINY, "--batch-size", "6")
    assert result.exit_code == 0, result.output
    assert "skipped unreadable image" in result.output and "truncated.jpg" in result.output
    epoch = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][-1]
    # 18 images, batches of 6 over a shuffled order: both bad images fall in the 3 batches
    assert epoch["kind"] == "epoch" and epoch["skipped_images"] == 2


def test_unreadable_image_is_fatal_under_strict(tmp_path, folder_with_bad_images):
    out = tmp_path / "run"
    result = run("pretrain", folder_with_bad_images, "--out", out, *TINY, "--batch-size", "6", "--strict")
    assert_user_error(result, "cannot decode image", "--strict", only_line=False)
    assert "truncated.jpg" in result.output or "garbage.jpg" in result.output
    assert not out.exists()  # refused at step 0: no config.json or metrics.jsonl that look like a run


def test_bad_input_found_during_a_run_leaves_the_folder_as_it_was_unless_a_checkpoint_was_saved(
        tmp_path, folder_with_bad_images):
    nothing_decodes = tmp_path / "nothing_decodes"
    for name in ("a", "b"):
        (nothing_decodes / name).mkdir(parents=True)
        for i in range(4):
            (nothing_decodes / name / f"{i}.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_user_error(run("pretrain", nothing_decodes, "--out", out, *TINY), "every image of a batch at step 0",
                      only_line=False)
    assert os.listdir(out) == ["notes.txt"]
    # a resumed run that fails keeps the files of the run it continues
    assert run("pretrain", folder_with_bad_images, "--out", out, *TINY, "--batch-size", "6").exit_code == 0
    before = sorted(os.listdir(out))
    assert_user_error(run("pretrain", "--resume", out, "--epochs", "2", "--strict"), "cannot decode image",
                      only_line=False)
    assert sorted(os.listdir(out)) == before and (out / "metrics.jsonl").read_text()
    # an --overwrite run refused at its first batch does not cost the run it was to replace
    files = {name: (out / name).read_bytes() for name in before if name != "notes.txt"}
    assert_user_error(run("pretrain", nothing_decodes, "--out", out, *TINY, "--overwrite"),
                      "every image of a batch at step 0", only_line=False)
    assert sorted(os.listdir(out)) == before  # no .replaced-run/ left either
    assert all((out / name).read_bytes() == data for name, data in files.items())


def test_a_batch_with_fewer_than_two_readable_images_says_how_to_go_on(tmp_path):
    """Removing the unreadable images, as the message once said, changes the image list, which a
    --resume then refuses: the way on is readable images under the same names."""
    folder = make_image_folder(tmp_path / "few", classes=1, per_class=2, size=16, ext="jpg")
    for i in range(4):
        (folder / "class0" / f"bad{i}.jpg").write_bytes(b"not a jpeg")
    # 2 readable images of 6 in two batches of 3: one batch has one readable image, or none
    result = run("pretrain", folder, "--out", tmp_path / "run", *TINY, "--batch-size", "3")
    assert_user_error(result, "replace the unreadable images by readable ones of the same names", only_line=False)
    assert "one readable image in the batch" in result.output or "every image of a batch" in result.output


def test_an_overwrite_run_replaces_the_old_run_at_its_first_checkpoint_or_gives_it_back(tmp_path,
                                                                                        shared_image_folder):
    import simsiam.train
    from simsiam.config import PretrainConfig

    out = tmp_path / "run"
    assert run("pretrain", shared_image_folder, "--out", out, *TINY, "--epochs", "2", "--save-every-epochs", "1",
               "--seed", "1").exit_code == 0
    old = {name: (out / name).read_bytes() for name in os.listdir(out)}
    assert {"checkpoint_0000.pth.tar", "checkpoint_0001.pth.tar", "last.pth.tar"} <= set(old)
    config = PretrainConfig.from_dict(json.loads(old["config.json"]))
    config.seed, config.epochs = 2, 1

    def ctrl_c_at_the_first_step(event):
        if event["event"] == "log":  # before the run's first checkpoint (the epoch's end)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simsiam.train.pretrain(config, overwrite=True, on_event=ctrl_c_at_the_first_step)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == old  # given back, byte for byte

    seen = []

    def look_after_the_first_checkpoint(event):
        if event["event"] == "epoch":
            seen.append(sorted(os.listdir(out)))

    simsiam.train.pretrain(config, overwrite=True, on_event=look_after_the_first_checkpoint)
    assert json.loads((out / "config.json").read_text())["seed"] == 2
    # the old run's checkpoints went with the new run's first one; none of them is left
    assert sorted(os.listdir(out)) == ["checkpoint_0000.pth.tar", "config.json", "last.pth.tar", "metrics.jsonl"]
    assert load_checkpoint(out / "checkpoint_0000.pth.tar")["config"]["seed"] == 2
    assert ".replaced-run" in seen[0]  # kept while the first epoch ran, before its checkpoint


def old_run(out: Path) -> dict:
    out.mkdir()
    for name in ("checkpoint_0000.pth.tar", "checkpoint_0001.pth.tar", "last.pth.tar", "config.json", "metrics.jsonl"):
        (out / name).write_text(f"old {name}")
    return {p.name: p.read_text() for p in out.iterdir()}


def stopping_at(monkeypatch, call: int, how=KeyboardInterrupt):
    """os.replace stopped (Ctrl-C) at its ``call``-th call."""
    replace, calls = os.replace, []

    def stopped(*args):
        calls.append(args)
        if len(calls) == call:
            raise how
        return replace(*args)
    monkeypatch.setattr(os, "replace", stopped)


@pytest.mark.parametrize("call", [2, 3, 5])
def test_an_overwrite_run_stopped_while_moving_the_old_run_aside_gives_it_all_back(tmp_path, monkeypatch, call):
    """The old run's checkpoints not yet moved passed for the new run's first one, and the files
    already moved aside were deleted (Ctrl-C), or deleted by the next start (kill -9)."""
    from simsiam import run_dir

    out = tmp_path / "run"
    old = old_run(out)
    stopping_at(monkeypatch, call)
    with pytest.raises(KeyboardInterrupt):
        with run_dir.locked_run_dir(out) as folder:
            folder.prepare(None)
    monkeypatch.undo()
    assert {p.name: p.read_text() for p in out.iterdir()} == old  # Ctrl-C: given back at once

    stopping_at(monkeypatch, call)
    monkeypatch.setattr(run_dir.RunFolder, "end", lambda self, refused: None)  # kill -9: nothing runs after
    with pytest.raises(KeyboardInterrupt):
        with run_dir.locked_run_dir(out) as folder:
            folder.prepare(None)
    monkeypatch.undo()
    assert (out / ".replaced-run").is_dir()
    run_dir._settle_replaced(out)  # what the next start does first
    assert {p.name: p.read_text() for p in out.iterdir() if p.name != ".lock"} == old


@pytest.mark.parametrize("call", [1, 2, 4])
def test_a_second_ctrl_c_while_the_old_run_comes_back_leaves_the_rest_for_the_next_start(tmp_path, monkeypatch, call):
    from simsiam import run_dir

    out = tmp_path / "run"
    old = old_run(out)
    folder = run_dir.RunFolder(out)
    folder.prepare(None)
    (out / "config.json").write_text("new")  # the new run's, which saved no checkpoint
    (out / "metrics.jsonl").write_text("new")
    stopping_at(monkeypatch, call)
    with pytest.raises(KeyboardInterrupt):
        folder.end(refused=False)
    monkeypatch.undo()
    run_dir._settle_replaced(out)
    assert {p.name: p.read_text() for p in out.iterdir()} == old


@pytest.mark.parametrize("checkpoints", [True, False])
def test_an_empty_replaced_run_folder_is_nothing_to_give_back(tmp_path, checkpoints):
    """Killed just after making .replaced-run/ or just before removing it: the run files in the
    folder are the old run's, and were removed as the new run's."""
    from simsiam import run_dir

    out = tmp_path / "run"
    old = old_run(out)
    if not checkpoints:
        for name in ("checkpoint_0000.pth.tar", "checkpoint_0001.pth.tar", "last.pth.tar"):
            (out / name).unlink()
            del old[name]
    (out / ".replaced-run").mkdir()
    run_dir._settle_replaced(out)
    assert {p.name: p.read_text() for p in out.iterdir()} == old
    (out / ".replaced-run").mkdir()
    folder = run_dir.RunFolder(out)
    folder.started_fresh, folder.replaced = True, out / ".replaced-run"
    folder.end(refused=False)
    assert {p.name: p.read_text() for p in out.iterdir()} == old


def test_a_replaced_run_left_by_a_killed_overwrite_run_is_given_back(tmp_path, shared_image_folder):
    """kill -9 before the new run's first checkpoint: the next start finds the old run in its place."""
    out = tmp_path / "run"
    assert run("pretrain", shared_image_folder, "--out", out, *TINY).exit_code == 0
    old = sorted(os.listdir(out))
    (out / ".replaced-run").mkdir()
    for name in old:
        (out / name).rename(out / ".replaced-run" / name)
    (out / "config.json").write_text("{}")  # the killed run's config and log
    (out / "metrics.jsonl").write_text("")
    assert_user_error(run("pretrain", shared_image_folder, "--out", out, *TINY, "--seed", "5"),
                      "already holds a run", "--overwrite")
    assert sorted(os.listdir(out)) == old and load_checkpoint(out / "last.pth.tar")["epoch"] == 1

    # so does --resume, the first thing one tries after a crash: it continues the old run
    (out / ".replaced-run").mkdir()
    for name in old:
        (out / name).rename(out / ".replaced-run" / name)
    (out / "config.json").write_text("{}")
    (out / "metrics.jsonl").write_text("")
    result = run("pretrain", "--resume", out, "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert load_checkpoint(out / "last.pth.tar")["epoch"] == 2 and not (out / ".replaced-run").exists()


def test_another_crop_size_gets_the_eval_resize_at_the_presets_ratio(tmp_path):
    """--image-size 288 under the imagenet preset: its eval resize 256 would pad the crop; 288 x 256/224 does not.
    --image-size 32: a crop of 32 of 256 would see 1/64 of the image; 37 keeps the preset's 224 of 256."""
    from simsiam.config import preset_config
    from transfer.lincls_config import preset_linear_config

    assert preset_config("imagenet", data=str(tmp_path), image_size=288).eval_resize == 329
    assert preset_config("imagenet", data=str(tmp_path), image_size=160).eval_resize == 183
    assert preset_config("imagenet", data=str(tmp_path), image_size=32).eval_resize == 37
    assert preset_config("imagenet", data=str(tmp_path), image_size=224).eval_resize == 256  # the preset's
    assert preset_linear_config("imagenet", checkpoint="c", train_dir="t", val_dir="v", image_size=64).eval_resize == 73
    assert preset_config("imagenet", data=str(tmp_path), image_size=288, eval_resize=300).eval_resize == 300  # given
    assert preset_config("cifar", data=str(tmp_path), image_size=64).eval_resize == 0  # no resize: nothing to scale
    assert preset_linear_config("imagenet", checkpoint="c", train_dir="t", val_dir="v", image_size=288).eval_resize == 329


def test_resume_leaves_a_replaced_run_alone_while_its_replacing_run_is_alive(tmp_path):
    """The replacing run holds the lock until its first checkpoint: --resume must not put the old run back under it."""
    from simsiam.errors import InputError
    from simsiam.run_dir import locked_run_dir, settle_before_resume

    out = tmp_path / "run"
    with locked_run_dir(out):
        (out / ".replaced-run").mkdir()
        with pytest.raises(InputError, match=f"--resume {out}: another simsiam run is writing in this folder"):
            settle_before_resume(out, wait_s=0.3)
        assert (out / ".replaced-run").is_dir()


def test_resume_settles_a_replaced_run_once_even_when_it_cannot_be_removed(tmp_path, monkeypatch):
    """A .replaced-run/ that stays (a file held open on NFS) must not make --resume settle it forever."""
    from simsiam import run_dir

    out = tmp_path / "run"
    (out / ".replaced-run").mkdir(parents=True)
    calls = []
    monkeypatch.setattr(run_dir, "_settle_replaced", lambda folder: calls.append(folder))  # removes nothing
    run_dir.settle_before_resume(out, wait_s=0.3)
    assert calls == [out] and not (out / ".lock").exists()


def test_nan_loss_stops_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, shared_image_folder, monkeypatch):
    import simsiam.train

    real_loss = simsiam.train.negative_cosine_similarity
    calls = {"n": 0}

    def loss_that_diverges_at_step_11(*args):
        calls["n"] += 1
        loss = real_loss(*args)
        return loss * float("nan") if calls["n"] >= 11 else loss

    monkeypatch.setattr(simsiam.train, "negative_cosine_similarity", loss_that_diverges_at_step_11)
    out = tmp_path / "run"
    result = run("pretrain", shared_image_folder, "--out", out, *TINY, "--epochs", "3")
    assert_user_error(result, "NaN or infinite at step 11 (epoch 2)", "last good checkpoint is", "last.pth.tar",
                      only_line=False)
    checkpoint = load_checkpoint(out / "last.pth.tar")
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 8
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("save_every_steps", [0, 3])
def test_weights_that_are_no_longer_finite_are_not_saved_though_the_loss_is(tmp_path, shared_image_folder, monkeypatch,
                                                                               save_every_steps):
    """The loss goes through train-mode BatchNorm and stayed finite over NaN weights (a bf16 CPU run
    at 16 px, an extreme --lr): the checkpoint held them and the run ended "done"."""
    import simsiam.train

    real_step, calls = simsiam.train.train_step, {"n": 0}

    def step_that_breaks_a_buffer_at_step_10(model, *args):
        calls["n"] += 1
        if calls["n"] == 10:
            model.encoder.bn1.running_var.fill_(float("inf"))  # eval mode would divide by it
        return real_step(model, *args)

    monkeypatch.setattr(simsiam.train, "train_step", step_that_breaks_a_buffer_at_step_10)
    out = tmp_path / "run"
    result = run("pretrain", shared_image_folder, "--out", out, *TINY, "--epochs", "3",
                 "--save-every-steps", str(save_every_steps))
    saved_at = 8 if save_every_steps == 0 else 9  # epoch 1's end (8 steps), or the save at step 9
    step = 16 if save_every_steps == 0 else 12  # epoch 2's end, or the next save
    assert_user_error(result, f"the weights became NaN or infinite by step {step} (epoch 2; encoder.bn1.running_var)",
                      f"the last good checkpoint is {out / 'last.pth.tar'}", "to lower it, start a new run",
                      only_line=False)
    checkpoint = load_checkpoint(out / "last.pth.tar")
    assert checkpoint["global_step"] == saved_at and not (out / "checkpoint_0001.pth.tar").exists()
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


def test_a_knn_monitor_that_meets_non_finite_features_says_the_network_diverged(tmp_path, shared_image_folder,
                                                                               monkeypatch):
    """It said "train features: NaN or infinite values (row 0)", an input error, and that --resume
    would continue: the resumed run failed the same way an epoch later."""
    import numpy as np

    import retrieval.extract

    real_embed = retrieval.extract.embed

    def diverged_embed(*args, **kwargs):
        features, labels, indices = real_embed(*args, **kwargs)
        return np.full_like(features, np.inf), labels, indices

    monkeypatch.setattr(retrieval.extract, "embed", diverged_embed)
    out = tmp_path / "run"
    result = run("pretrain", shared_image_folder, "--out", out, *TINY, "--knn-train", shared_image_folder,
                 "--knn-val", shared_image_folder, "--knn-k", "3")
    assert_user_error(result, "the network gives NaN or infinite features for the --knn-train images of the kNN "
                      "monitor: its weights have diverged (epoch 1); no checkpoint was written yet", only_line=False)
    assert "--resume" not in result.output.splitlines()[-1].split("(a resumed run")[0]
    assert not list(out.glob("*.pth.tar")) if out.exists() else True


def test_out_folder_holding_another_run_is_refused_unless_overwrite(tmp_path, shared_image_folder):
    out = tmp_path / "run"
    assert run("pretrain", shared_image_folder, "--out", out, *TINY).exit_code == 0
    before = (out / "last.pth.tar").stat().st_mtime_ns
    assert_user_error(run("pretrain", shared_image_folder, "--out", out, *TINY, "--seed", "5"),
                      "already holds a run", "--resume", "--overwrite")
    # the first thing checked, before the data: not a complaint about the batch or the images
    assert_user_error(run("pretrain", shared_image_folder, "--out", out, *TINY, "--batch-size", "100000"),
                      "already holds a run")
    assert_user_error(run("pretrain", tmp_path / "nowhere", "--out", out, *TINY), "already holds a run")
    assert (out / "last.pth.tar").stat().st_mtime_ns == before
    result = run("pretrain", shared_image_folder, "--out", out, *TINY, "--seed", "5", "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["seed"] == 5


def test_resume_of_a_finished_run_with_more_epochs_continues_it(tmp_path, shared_image_folder):
    out = tmp_path / "run"
    assert run("pretrain", shared_image_folder, "--out", out, *TINY).exit_code == 0
    result = run("pretrain", "--resume", out, "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert f"resuming {out / 'last.pth.tar'}: epoch 2 of 2, step 8 of 16" in result.output  # 8 steps an epoch
    assert load_checkpoint(out / "last.pth.tar")["epoch"] == 2
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    # what decides the saved weights and optimizer cannot change under a resumed run
    before = (out / "last.pth.tar").stat().st_mtime_ns
    assert_user_error(run("pretrain", "--resume", out, "--epochs", "3", "--batch-size", "4"),
                      "--batch-size 4: the run being resumed", "used 8")
    assert_user_error(run("pretrain", "--resume", out, "--epochs", "3", "--lr", "0.1"), "--lr 0.1", "used 0.03")
    for flag in ("--blur", "--no-stop-grad"):  # flags as typed: not "--blur True: ... used False"
        assert_user_error(run("pretrain", "--resume", out, "--epochs", "3", flag),
                          f"{flag}: the run being resumed ({out / 'last.pth.tar'}) did not use it")
    other_images = make_image_folder(tmp_path / "other_images", classes=2, per_class=4)
    assert_user_error(run("pretrain", other_images, "--resume", out, "--epochs", "3"),
                      f"DATA {other_images}: 8 images, 56 fewer than the 64 the run being resumed")
    assert (out / "last.pth.tar").stat().st_mtime_ns == before
    # a run resumed into another --out folder must not write over the run held there
    other = tmp_path / "other"
    assert run("pretrain", shared_image_folder, "--out", other, *TINY, "--seed", "3").exit_code == 0
    assert_user_error(run("pretrain", "--resume", out, "--out", other, "--epochs", "3"),
                      f"--out {other}: already holds a run")
    assert json.loads((other / "config.json").read_text())["seed"] == 3
    # ... unless told to: the resumed run then replaces it
    result = run("pretrain", "--resume", out, "--out", other, "--epochs", "3", "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((other / "config.json").read_text())["seed"] != 3
    assert load_checkpoint(other / "last.pth.tar")["epoch"] == 3


def test_the_library_resumes_from_a_run_folder_as_the_cli_does(tmp_path, shared_image_folder):
    """pretrain(resume_from=folder) said the folder "already holds a run; pass --resume" (what was
    passed), or "is a folder, not a checkpoint file"."""
    from simsiam.config import PretrainConfig
    from simsiam.errors import InputError
    from simsiam.train import pretrain

    out = tmp_path / "run"
    assert run("pretrain", shared_image_folder, "--out", out, *TINY).exit_code == 0
    config = PretrainConfig.from_dict({**json.loads((out / "config.json").read_text()), "epochs": 2})
    pretrain(config, resume_from=out)
    assert load_checkpoint(out / "last.pth.tar")["epoch"] == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="the folder holds no checkpoint to resume from"):
        pretrain(config, resume_from=tmp_path / "empty")


def test_a_run_starting_removes_its_own_leftover_temporaries_not_another_commands(tmp_path, shared_image_folder):
    """An extract writing features into the run folder lost its temporary file when a run started
    there, and failed after all its work naming a hidden file."""
    out = tmp_path / "run"
    assert run("pretrain", shared_image_folder, "--out", out, *TINY).exit_code == 0
    own = [out / ".last.pth.tar.k2x9q1zt.tmp", out / ".checkpoint_0007.pth.tar.ab12cd34.tmp",
           out / ".metrics.jsonl.4321.tmp"]  # left by a run killed while writing
    others = [out / ".feats.h5.en4bebl7.tmp", out / ".curves.png.x1y2z3w4.tmp", out / ".notes.tmp"]
    for path in own + others:
        path.write_bytes(b"half")
    assert run("pretrain", "--resume", out, "--epochs", "2").exit_code == 0
    assert [p for p in own if p.exists()] == [] and [p for p in others if not p.exists()] == []


def test_a_resume_refuses_a_checkpoint_without_what_it_loads(tmp_path, shared_image_folder):
    # e.g. a checkpoint whose optimizer state was dropped to save space: a KeyError traceback before
    out = tmp_path / "run"
    assert run("pretrain", shared_image_folder, "--out", out, *TINY).exit_code == 0
    edits = [
        (lambda c: c.pop("optimizer"), "holds no 'optimizer', which resuming a run loads"),
        (lambda c: [c.pop("epoch"), c.pop("state_dict")], "holds no 'epoch' or 'state_dict'"),
        (lambda c: c.update(epoch="1"), "its 'epoch' is '1', not a count of epochs"),
        (lambda c: c["state_dict"].pop("module.predictor.0.weight"), "does not fit the run's model (no predictor.0.weight)"),
        (lambda c: c["state_dict"].update(extra=torch.zeros(1)), "does not fit the run's model (an unexpected extra)"),
        (lambda c: c["state_dict"].update({"module.predictor.0.weight": torch.zeros(16, 63)}),
         "(predictor.0.weight of shape [16, 63], not [16, 64])"),
        (lambda c: c["optimizer"]["param_groups"].pop(), "its 'optimizer' is not the saved state of the run's optimizer"),
    ]
    assert_resume_refuses_edited("pretrain", out / "last.pth.tar", tmp_path, edits)


def test_a_resume_compares_the_image_list_not_the_folder(tmp_path, monkeypatch):
    import shutil

    import simsiam.train

    data = make_image_folder(tmp_path / "data", classes=2, per_class=4)  # 8 images: one step an epoch
    out = tmp_path / "run"
    assert run("pretrain", data, "--out", out, *TINY).exit_code == 0
    moved = data.rename(tmp_path / "moved")
    assert_user_error(run("pretrain", "--resume", out, "--epochs", "2"),
                      f"its run names DATA as '{data}', which is no longer there; give DATA again")
    # added, removed, renamed: the sampler's batches would not be the uninterrupted run's
    shutil.copy(moved / "class0" / "c0_000.png", moved / "class1" / "added.png")
    assert_user_error(run("pretrain", "--resume", out, moved, "--epochs", "2"),
                      f"DATA {moved}: 9 images, 1 more than the 8", "images added")
    (moved / "class1" / "added.png").unlink()
    (moved / "class1" / "c1_000.png").rename(moved / "class1" / "renamed.png")
    assert_user_error(run("pretrain", "--resume", out, moved, "--epochs", "2"), "8 images, as many as",
                      "not the same paths")
    (moved / "class1" / "renamed.png").rename(moved / "class1" / "c1_000.png")
    (moved / "class0" / "c0_000.png").unlink()
    assert_user_error(run("pretrain", "--resume", out, moved, "--epochs", "2"), "7 images, 1 fewer than the 8")
    shutil.copy(moved / "class0" / "c0_001.png", moved / "class0" / "c0_000.png")  # the same name: the same list
    # the same images elsewhere resume, and the run goes on from there; a Ctrl-C before its next checkpoint
    # offers DATA again (the checkpoints so far name the old folder)
    set_learning_rate = simsiam.train.set_learning_rate

    def interrupted_in_epoch_2(optimizer, config, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return set_learning_rate(optimizer, config, epoch)

    monkeypatch.setattr(simsiam.train, "set_learning_rate", interrupted_in_epoch_2)
    result = run("pretrain", "--resume", out, moved, "--epochs", "2")
    assert result.output.strip().splitlines()[-1] == (f"interrupted (continue: simsiam pretrain --resume {out} "
                                                      f"--epochs 2 {moved})"), result.output
    monkeypatch.setattr(simsiam.train, "set_learning_rate", set_learning_rate)
    result = run("pretrain", "--resume", out, moved, "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert load_checkpoint(out / "last.pth.tar")["epoch"] == 2
    assert json.loads((out / "config.json").read_text())["data"] == str(moved)
    # a checkpoint of the version before the fingerprint resumes from its own folder only, as it did
    old = load_checkpoint(out / "last.pth.tar")
    del old["images"]
    torch.save(old, out / "last.pth.tar")
    moved.rename(data)
    assert_user_error(run("pretrain", "--resume", out, data, "--epochs", "3"),
                      f"DATA {data}: the run being resumed", f"used {moved}")
    assert run("pretrain", "--resume", out, "--epochs", "3", data.rename(moved)).exit_code == 0


def test_the_ctrl_c_hint_of_a_resume_that_grew_the_epochs_continues_it(tmp_path, shared_image_folder, monkeypatch):
    import shlex

    import simsiam.train

    out = tmp_path / "run"
    assert run("pretrain", shared_image_folder, "--out", out, *TINY).exit_code == 0
    set_learning_rate = simsiam.train.set_learning_rate

    def interrupted_in_epoch_2(optimizer, config, epoch):
        if epoch == 1:  # before any checkpoint of the resumed run: the newest still says --epochs 1
            raise KeyboardInterrupt
        return set_learning_rate(optimizer, config, epoch)

    monkeypatch.setattr(simsiam.train, "set_learning_rate", interrupted_in_epoch_2)
    result = run("pretrain", "--resume", out, "--epochs", "3")
    assert result.exit_code == 130
    hint = result.output.strip().splitlines()[-1]
    assert hint == f"interrupted (continue: simsiam pretrain --resume {out} --epochs 3)", result.output
    monkeypatch.setattr(simsiam.train, "set_learning_rate", set_learning_rate)
    continued = run(*shlex.split(hint.removeprefix("interrupted (continue: simsiam ").removesuffix(")")))
    assert continued.exit_code == 0, continued.output
    assert load_checkpoint(out / "last.pth.tar")["epoch"] == 3


def test_a_run_started_with_relative_paths_resumes_from_any_folder(tmp_path, shared_image_folder, monkeypatch):
    import shutil

    shutil.copytree(shared_image_folder, tmp_path / "project" / "data")
    monkeypatch.chdir(tmp_path / "project")
    assert run("pretrain", "data", "--out", "runs/a", *TINY).exit_code == 0
    assert json.loads(Path("runs/a/config.json").read_text())["data"] == str(tmp_path / "project" / "data")
    assert_user_error(run("pretrain", "--resume", "runs/a", "--epochs", "2", "--overwrite"),
                      "--overwrite: --resume continues the run in runs/a and --overwrite would start it over")
    monkeypatch.chdir(tmp_path)
    # DATA in another spelling of the same folder is the same DATA
    result = run("pretrain", "project/data", "--resume", "project/runs/a", "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "project" / "runs" / "a" / "last.pth.tar")["epoch"] == 2
    assert_user_error(run("pretrain", "--resume", "project/runs/a", "--epochs", "1"), "the run has finished its 2 epochs")


def test_resumed_paths_match_by_the_folder_they_name_and_old_relative_ones_are_asked_for(tmp_path, monkeypatch):
    from simsiam.config import PretrainConfig, preset_config
    from simsiam.errors import InputError

    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    saved = preset_config("cifar", data=str(tmp_path / "data")).to_dict()
    assert PretrainConfig.for_resume(saved, {"data": str(tmp_path / "link")}, "ckpt").data == str(tmp_path / "link")
    # another folder is taken: the run compares its image list with the checkpoint's (check_resumed_images)
    assert PretrainConfig.for_resume(saved, {"data": str(tmp_path)}, "ckpt").data == str(tmp_path)
    # config.json of an older version: "data" as typed, relative to a folder no longer known
    old = {**saved, "data": "data"}
    monkeypatch.chdir(tmp_path / "data")
    with pytest.raises(InputError, match="its run names DATA as 'data', relative to the folder it was started from"):
        PretrainConfig.for_resume(old, {}, "ckpt")
    assert PretrainConfig.for_resume(old, {"data": "."}, "ckpt").data == str(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert PretrainConfig.for_resume(old, {}, "ckpt").data == str(tmp_path / "data")  # found from here, as before


def test_resume_of_a_folder_without_checkpoints(tmp_path):
    (tmp_path / "run").mkdir()
    assert_user_error(run("pretrain", "--resume", tmp_path / "run"), "holds no checkpoint to resume from")


def test_unknown_arch_and_bad_values(tmp_path, shared_image_folder):
    assert_user_error(run("pretrain", shared_image_folder, "--out", tmp_path / "r", *TINY, "--arch", "vit_b_16"),
                      "--arch vit_b_16: not a torchvision ResNet")
    assert_user_error(run("pretrain", shared_image_folder, "--out", tmp_path / "r", *TINY, "--epochs", "0"),
                      "--epochs 0: must be at least 1")
    assert_user_error(run("pretrain", shared_image_folder, "--out", tmp_path / "r", *TINY, "--epochs", str(10**20)),
                      f"--epochs {10**20}: must be at most 100000")  # ran until stopped
    for option, value, message in (("--lr", "nan", "--lr nan: must be a finite number"),
                                   ("--lr", "inf", "--lr inf: must be a finite number"),
                                   ("--momentum", "2", "--momentum 2.0: must be in [0, 1)"),
                                   ("--momentum", "-1", "--momentum -1.0: must be in [0, 1)"),
                                   ("--proj-hidden-dim", "-1", "--proj-hidden-dim -1: must be at least 0"),
                                   ("--eval-resize", "-3", "--eval-resize -3: must be at least 0"),
                                   ("--eval-resize", "12", "--eval-resize 12: smaller than --image-size 16, the centre "
                                    "crop would be padded with black; resize to at least 16"),
                                   ("--warmup-epochs", "-1", "--warmup-epochs -1: must be at least 0"),
                                   ("--batch-size", "1", "--batch-size 1: BatchNorm needs at least 2"),
                                   ("--seed", "-1", "--seed -1: must be from 0 to"),
                                   ("--seed", str(2**64), f"--seed {2**64}: must be from 0 to")):
        assert_user_error(run("pretrain", shared_image_folder, "--out", tmp_path / "r", *TINY, option, value), message)
    assert not (tmp_path / "r").exists()


BIG = str(10**20)  # click passes it on as an int; beyond int64, it was an overflow in torch


@pytest.mark.parametrize("args,message", [
    (["--lr", "1e300"], "--lr 1e+300: must be at most 3.403e+38 (float32, the weights' type)"),  # was a traceback
    (["--wd", "1e300"], "--wd 1e+300: must be at most 3.403e+38"),
    # the base lr fits float32, the optimizer's lr x batch / 256 does not
    (["--lr", "3e38", "--batch-size", "512"], "--lr 3e+38: the optimizer's lr, lr x batch / 256 = 6e+38, must be at most"),
    (["--image-size", BIG], f"--image-size {BIG}: must be at most 4096"),
    (["--eval-resize", BIG], f"--eval-resize {BIG}: must be at most 4096"),
    (["--dim", BIG], f"--dim {BIG}: must be at most 65536"),
    (["--pred-dim", BIG], f"--pred-dim {BIG}: must be at most 65536"),
    (["--proj-hidden-dim", BIG], f"--proj-hidden-dim {BIG}: must be at most 65536"),
    (["--workers", "99999999999"], "--workers 99999999999: must be at most 128"),  # was forking until the OOM killer
])
def test_absurd_values_are_refused_before_anything_is_written(tmp_path, shared_image_folder, args, message):
    assert_user_error(run("pretrain", shared_image_folder, "--out", tmp_path / "r", *TINY, *args), message)
    assert not (tmp_path / "r").exists()


def test_the_smallest_crops_train(tmp_path):
    """1 pixel, with the blur or without: the ResNet's padded convolutions and pooling keep a 1x1 map,
    and the blur repeats edge pixels as PIL's does (torchvision's reflection needed 7)."""
    images = make_image_folder(tmp_path / "images", classes=2, per_class=2, size=8)
    for size, blur in (("1", "--blur"), ("1", "--no-blur")):
        result = run("pretrain", images, "--out", tmp_path / blur, *TINY, "--batch-size", "4", "--image-size", size, blur)
        assert result.exit_code == 0, result.output


def test_a_second_run_into_a_folder_being_written_is_refused(tmp_path, shared_image_folder):
    from simsiam.run_dir import locked_run_dir

    out = tmp_path / "run"
    with locked_run_dir(out):  # as a first run holds it while it trains
        assert_user_error(run("pretrain", shared_image_folder, "--out", out, *TINY),
                          f"--out {out}: another simsiam run is writing in this folder")
        assert os.listdir(out) == [".lock"]  # the first run's folder, untouched
    result = run("pretrain", shared_image_folder, "--out", out, *TINY)
    assert result.exit_code == 0, result.output
    # a run that fails before writing anything leaves no folder behind
    assert_user_error(run("pretrain", tmp_path / "missing", "--out", tmp_path / "new", *TINY), "no such folder")
    assert not (tmp_path / "new").exists()


def test_the_run_folder_lock_is_on_the_file_at_its_name_and_failed_runs_leave_no_folders(tmp_path, monkeypatch):
    import fcntl

    from simsiam import run_dir
    from simsiam.errors import InputError

    out = tmp_path / "run"
    out.mkdir()
    real_flock, calls = fcntl.flock, []

    def previous_holder_ends_meanwhile(file, operation):  # opened .lock, then its holder deleted it and left
        calls.append(operation)
        if len(calls) == 1:
            (out / ".lock").unlink()
        return real_flock(file, operation)

    monkeypatch.setattr(run_dir.fcntl, "flock", previous_holder_ends_meanwhile)
    with run_dir.locked_run_dir(out):
        monkeypatch.setattr(run_dir.fcntl, "flock", real_flock)
        with pytest.raises(InputError, match="another simsiam run is writing"):  # held: the lock at the name
            with run_dir.locked_run_dir(out):
                pass
    assert len(calls) == 2 and os.listdir(out) == []
    # missing parent folders are made, and removed again when the run fails before writing
    with pytest.raises(RuntimeError):
        with run_dir.locked_run_dir(tmp_path / "a" / "b" / "c"):
            raise RuntimeError("failed at once")
    assert not (tmp_path / "a").exists()


def test_a_run_that_failed_before_its_first_checkpoint_can_be_started_again(tmp_path, shared_image_folder):
    out = tmp_path / "run"
    out.mkdir()
    # what a run stopped before its first checkpoint leaves
    (out / "config.json").write_text(json.dumps({"preset": "cifar", "batch_size": 16, "epochs": 3}))
    (out / "metrics.jsonl").write_text('{"kind": "step", "step": 2}\n')
    result = run("pretrain", shared_image_folder, "--out", out, *TINY)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["batch_size"] == 8
    assert '{"kind": "step", "step": 2}' not in (out / "metrics.jsonl").read_text()
    # a finished run resumed as it is: nothing to do, said before anything is written
    assert_user_error(run("pretrain", "--resume", out, "--out", tmp_path / "elsewhere"),
                      "has finished its 1 epochs", "--epochs N with N > 1")
    assert not (tmp_path / "elsewhere").exists()
    # a run of more epochs stopped there: "finished its 1 epochs" read as if 1 were the run's total
    last = torch.load(out / "last.pth.tar", weights_only=True)
    last["config"]["epochs"] = 3
    torch.save(last, out / "last.pth.tar")
    assert_user_error(run("pretrain", "--resume", out, "--epochs", "1"), "the run has done 1 of its 3 epochs (--epochs 1)",
                      "--epochs N with N > 1")
    # but a config.json that is not a run's is someone else's file: left alone
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text('{"my": "settings"}')
    assert_user_error(run("pretrain", shared_image_folder, "--out", project, *TINY),
                      "holds config.json not written by simsiam")
    assert (project / "config.json").read_text() == '{"my": "settings"}'


def test_knn_monitor_matches_validation_classes_by_name(tmp_path, shared_image_folder):
    """A --knn-val folder with some of the classes (its labels must mean the training classes)."""
    import shutil

    val = tmp_path / "val"
    shutil.copytree(shared_image_folder / "class1", val / "class1")  # class index 0 in val, 1 in train
    result = run("pretrain", shared_image_folder, "--out", tmp_path / "run", *TINY, "--knn-train",
                 shared_image_folder, "--knn-val", val, "--knn-k", "1")
    assert result.exit_code == 0, result.output
    epoch = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert epoch["knn_top1"] == 1.0  # the val images are training images: their nearest neighbour is themselves
    assert "hold the same images" not in result.output  # some of them, in another folder: not the same set
    other = make_image_folder(tmp_path / "other", classes=1, per_class=2)
    (other / "class0").rename(other / "zebra")
    assert_user_error(run("pretrain", shared_image_folder, "--out", tmp_path / "run2", *TINY, "--knn-train",
                          shared_image_folder, "--knn-val", other), "--knn-val", "classes not in --knn-train: zebra")


def test_knn_monitor_logs_top1_each_epoch(tmp_path, shared_image_folder):
    out = tmp_path / "run"
    result = run("pretrain", shared_image_folder, "--out", out, *TINY, "--epochs", "2",
                 "--knn-train", shared_image_folder, "--knn-val", shared_image_folder, "--knn-k", "5", "--json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [l for l in lines if l["kind"] == "epoch"]
    assert len(epochs) == 2 and all(0.0 <= e["knn_top1"] <= 1.0 for e in epochs)
    # --json: the last line is the last epoch's metrics, as metrics.jsonl has them
    assert json.loads(result.output.splitlines()[-1]) == {"out": str(out), **{name: value for name, value in
                                                                               epochs[-1].items() if name != "kind"}}
    # metrics.jsonl holds a fraction (as knn --json); the console shows it in percent (as the knn table)
    assert f"knn top-1 {100 * epochs[-1]['knn_top1']:.2f}%" in result.output
    # the same folder as both: said once, as simsiam knn says it
    assert result.output.count("warning: --knn-train and --knn-val hold the same images") == 1


def test_a_knn_monitor_of_one_class_says_its_top1_means_nothing(tmp_path, shared_image_folder):
    """It printed knn top-1 100.00% without the warning knn and lincls give for one class."""
    one = make_image_folder(tmp_path / "one", classes=1, per_class=6, ext="jpg")
    result = run("pretrain", shared_image_folder, "--out", tmp_path / "run", *TINY, "--knn-train", one,
                 "--knn-val", one, "--knn-k", "3")
    assert result.exit_code == 0, result.output
    assert result.output.count(f"warning: --knn-train {one} has one class: every image is classified as it") == 1


def test_an_out_folder_that_is_or_is_inside_a_folder_the_run_reads_is_refused(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=4)
    knn = make_image_folder(tmp_path / "knn", classes=2, per_class=4)
    knn_options = ["--knn-train", data, "--knn-val", knn, "--knn-k", "2"]
    for out, message in ((data, f"--out {data}: is DATA {data}"),
                         (data / "run", f"--out {data / 'run'}: is inside DATA {data}"),
                         (knn / "class0" / "run", f"--out {knn / 'class0' / 'run'}: is inside --knn-val {knn}")):
        assert_user_error(run("pretrain", data, "--out", out, *TINY, *knn_options), message, "choose an --out outside")
    assert not (data / "run").exists() and not [p for p in tmp_path.rglob("*") if p.suffix in (".json", ".jsonl", ".tar")]
    # the images inside the run folder are harmless: a run writes only its own names at its top
    result = run("pretrain", data, "--out", tmp_path, *TINY, "--overwrite")
    assert result.exit_code == 0, result.output
    assert len(list(data.rglob("*.png"))) == 8


def test_knn_monitor_needs_labelled_folders(tmp_path, shared_image_folder):
    flat = make_image_folder(tmp_path / "flat", classes=1, per_class=8, labelled=False)
    result = run("pretrain", shared_image_folder, "--out", tmp_path / "run", *TINY,
                 "--knn-train", shared_image_folder, "--knn-val", flat)
    assert_user_error(result, "--knn-val", "needs class folders")
    assert not (tmp_path / "run").exists()
    # a folder that is not there: which of the two (the message named the path alone)
    for option in ("--knn-train", "--knn-val"):
        folders = {"--knn-train": shared_image_folder, "--knn-val": shared_image_folder, option: tmp_path / "none"}
        result = run("pretrain", shared_image_folder, "--out", tmp_path / "run", *TINY, *itertools.chain(*folders.items()))
        assert_user_error(result, f"{option} {tmp_path / 'none'}: no such folder")
    assert not (tmp_path / "run").exists()


def test_knn_k_larger_than_knn_train_is_refused_before_training(tmp_path, shared_image_folder):
    knn_train = make_image_folder(tmp_path / "knn_train", classes=2, per_class=3)
    result = run("pretrain", shared_image_folder, "--out", tmp_path / "run", *TINY,
                 "--knn-train", knn_train, "--knn-val", knn_train, "--knn-k", "7")
    assert_user_error(result, "--knn-k 7: larger than the 6 images of --knn-train", str(knn_train))
    assert not (tmp_path / "run").exists()


def _unreadable_images(folder, count):
    for i in range(count):
        (folder / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        (folder / f"class{i % 2}" / f"bad{i}.jpg").write_bytes(os.urandom(200))
    return folder


@pytest.mark.parametrize("case", ["val", "k"])
def test_knn_images_that_do_not_decode_fail_in_one_line_after_saving_the_epoch(tmp_path, case):
    """How many kNN images decode is known only at the first evaluation: the error names the option
    and folder, and the trained epoch is kept (its line, its checkpoint) for --resume."""
    data = make_image_folder(tmp_path / "data", classes=2, per_class=4)  # 8 images: one step an epoch
    if case == "val":  # a --knn-val where nothing decodes
        options = ["--knn-train", data, "--knn-val", _unreadable_images(tmp_path / "bad", 6), "--knn-k", "3"]
        fragments = ["--knn-val", str(tmp_path / "bad"), "none of its 6 images could be decoded"]
    else:  # 12 --knn-train images, of which 8 decode
        knn_train = _unreadable_images(make_image_folder(tmp_path / "knn_train", classes=2, per_class=4), 4)
        options = ["--knn-train", knn_train, "--knn-val", data, "--knn-k", "10"]
        fragments = ["--knn-k 10: larger than the 8 readable images", f"--knn-train {knn_train}"]
    out = tmp_path / "run"
    epochs = "2" if case == "val" else "1"
    result = run("pretrain", data, "--out", out, *TINY, "--epochs", epochs, *options)
    # after the run's last epoch a plain --resume would only say that the run is finished
    then = (f"--resume {out} continues" if case == "val" else
            f"the run's last; simsiam knn {out / 'last.pth.tar'} --train-dir DIR --val-dir DIR evaluates it")
    assert_user_error(result, *fragments, f"(epoch 1 is saved; {then})", only_line=False)
    assert load_checkpoint(out / "last.pth.tar")["epoch"] == 1  # (numbered too when it is the run's last)
    assert (out / "checkpoint_0000.pth.tar").exists() == (epochs == "1")
    [epoch] = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"epoch"' in l[:20]]
    assert epoch["epoch"] == 1 and "knn_top1" not in epoch
    if case == "val":  # the monitor's images fixed, the run goes on from its epoch
        result = run("pretrain", "--resume", out, "--knn-val", data)
        assert result.exit_code == 0, result.output
        assert "knn_top1" in json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a GPU; this one has one")
def test_device_cuda_without_a_gpu(tmp_path, shared_image_folder):
    result = run("pretrain", shared_image_folder, "--out", tmp_path / "run", *TINY, "--device", "cuda")
    assert_user_error(result, "--device cuda: no CUDA GPU is visible", "--device cpu")
    assert not (tmp_path / "run").exists()


def test_every_preset_value_can_be_overridden(tmp_path, shared_image_folder):
    out = tmp_path / "run"
    result = run("pretrain", shared_image_folder, "--out", out, *TINY, "--proj-layers", "3", "--proj-hidden-dim", "32",
                 "--momentum", "0.8", "--crop-min-scale", "0.5", "--blur", "--eval-resize", "20", "--wd", "1e-3",
                 "--no-fix-pred-lr", "--warmup-epochs", "0", "--lr", "0.1")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["proj_layers"], config["proj_hidden_dim"], config["momentum"], config["crop_min_scale"]) == (3, 32, 0.8, 0.5)
    assert config["blur"] is True and config["eval_resize"] == 20 and config["wd"] == 1e-3 and not config["fix_pred_lr"]
    checkpoint = load_checkpoint(out / "last.pth.tar")
    assert checkpoint["state_dict"]["module.encoder.fc.0.weight"].shape == (32, 512)
    assert checkpoint["state_dict"]["module.encoder.fc.6.weight"].shape == (64, 32)
    [group] = checkpoint["optimizer"]["param_groups"]  # one group: the predictor's lr is not fixed
    assert group["momentum"] == 0.8 and group["weight_decay"] == 1e-3 and group["lr"] == pytest.approx(0.1 * 8 / 256)


def test_library_runs_need_their_paths_set_not_the_current_folder(tmp_path, monkeypatch):
    from simsiam.config import preset_config
    from simsiam.errors import InputError
    from simsiam.train import pretrain
    from transfer.lincls import linear_eval
    from transfer.lincls_config import preset_linear_config

    monkeypatch.chdir(tmp_path)  # where "" would have trained and written
    with pytest.raises(InputError, match="data, out: not set"):
        pretrain(preset_config("cifar", device="cpu"))
    with pytest.raises(InputError, match="out: not set"):
        pretrain(preset_config("cifar", data=str(tmp_path), device="cpu"))
    with pytest.raises(InputError, match="checkpoint, train_dir, val_dir, out: not set"):
        linear_eval(preset_linear_config("cifar", device="cpu"))
    assert os.listdir(tmp_path) == []


def test_whether_a_checkpoint_was_saved_since_never_raises_for_one_replaced_meanwhile(tmp_path, monkeypatch):
    from simsiam import run_dir

    (tmp_path / "last.pth.tar").write_bytes(b"")
    assert run_dir.saved_since(tmp_path, 0) and not run_dir.saved_since(tmp_path, 4e9)
    # listed, then gone before its time is read (an atomic replace, a start over)
    monkeypatch.setattr(run_dir, "checkpoint_files", lambda folder: [folder / "gone.pth.tar", folder / "last.pth.tar"])
    assert run_dir.saved_since(tmp_path, 0)
    monkeypatch.setattr(run_dir, "checkpoint_files", lambda folder: [folder / "gone.pth.tar"])
    assert not run_dir.saved_since(tmp_path, 0)


def test_knn_monitor_folders_holding_split_folders_are_warned_about(tmp_path, shared_image_folder):
    splits = make_image_folder(tmp_path / "dataset", classes=2, per_class=3)
    (splits / "class0").rename(splits / "train")
    (splits / "class1").rename(splits / "test")
    result = run("pretrain", shared_image_folder, "--out", tmp_path / "run", *TINY, "--epochs", "1",
                 "--knn-train", splits, "--knn-val", splits, "--knn-k", "2")
    assert result.exit_code == 0, result.output
    assert f"warning: --knn-train {splits}: its class folders (test, train) are dataset splits" in result.output
    assert f"warning: --knn-val {splits}: its class folders (test, train) are dataset splits" in result.output


def test_knn_monitor_images_that_do_not_decode_are_said_once(tmp_path, shared_image_folder):
    """Left out of every evaluation, silently, they made the kNN top-1 one of fewer images than given."""
    knn_val = make_image_folder(tmp_path / "val", classes=2, per_class=3)
    (knn_val / "class1" / "broken.png").write_bytes(b"not a png")
    result = run("pretrain", shared_image_folder, "--out", tmp_path / "run", *TINY, "--epochs", "2",
                 "--knn-train", shared_image_folder, "--knn-val", knn_val, "--knn-k", "2", "--knn-every", "1")
    assert result.exit_code == 0, result.output
    assert result.output.count(f"warning: the kNN monitor leaves out 1 of the 7 images of --knn-val {knn_val}: they "
                               "could not be decoded") == 1, result.output
    assert "--knn-train" not in result.output.split("leaves out")[1].splitlines()[0]
    # --strict stops at it instead, once the epoch is saved, as at an unreadable training image
    result = run("pretrain", shared_image_folder, "--out", tmp_path / "strict", *TINY, "--strict",
                 "--knn-train", shared_image_folder, "--knn-val", knn_val, "--knn-k", "2")
    assert_user_error(result, f"{knn_val / 'class1' / 'broken.png'}: cannot decode image", "drop --strict",
                      "(epoch 1 is saved", only_line=False)
