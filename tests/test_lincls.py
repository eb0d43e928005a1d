"""``simsiam lincls``: the official linear evaluation, its LARS, resume and error cases."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from simsiam.backbones import build_resnet
from simsiam.checkpoint import load_checkpoint, to_official_layout
from simsiam.errors import InputError
from simsiam.model import SimSiam
from transfer.lars import LARS
from transfer.lincls import HEAD_FILE
from transfer.lincls_config import PRESETS, LinearEvalConfig, preset_linear_config

from conftest import make_image_folder
from cli_runner import assert_resume_refuses_edited, assert_user_error, run

TINY = ["--image-size", "16", "--eval-resize", "0", "--crop-min-scale", "0.6", "--workers", "0", "--device", "cpu",
        "--log-every", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three separable classes (a square of one colour each); train and val drawn independently."""
    root = tmp_path_factory.mktemp("lincls")
    train = make_image_folder(root / "train", classes=3, per_class=16, size=16, seed=0)
    val = make_image_folder(root / "val", classes=3, per_class=8, size=16, seed=1)
    torch.manual_seed(0)
    model = SimSiam(build_resnet("resnet18", num_classes=32), 32, 8)  # random, but informative, features
    # pretrained-looking BN statistics, so that eval-mode BN (and its staying frozen) matters
    for module in model.encoder.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    checkpoint = root / "checkpoint_0099.pth.tar"
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": to_official_layout(model.state_dict())}, checkpoint)
    return checkpoint, train, val


# LARS (the default) moves the weights by trust x lr of their norm a step: on the 90 steps here
# it needs a far larger base lr than over the ~28k steps of the ImageNet recipe.
@pytest.mark.parametrize("optimizer,lr,epochs,least_top1", [("sgd", "1", "8", 95.0), ("lars", "1000", "30", 90.0)])
def test_linear_head_learns_a_separable_task_and_the_backbone_stays_frozen(tmp_path, data, optimizer, lr, epochs,
                                                                           least_top1):
    checkpoint, train, val = data
    out = tmp_path / "lincls"
    result = run("lincls", checkpoint, train, val, "--out", out, *TINY, "--optimizer", optimizer, "--lr", lr,
                 "--batch-size", "16", "--epochs", epochs, "--eval-every", epochs)
    assert result.exit_code == 0, result.output
    head = load_checkpoint(out / HEAD_FILE)
    metrics = head["metrics"]
    assert metrics["top1"] >= least_top1, metrics  # chance is 33.3
    assert metrics["top5"] == 100.0 and metrics["topk"] == 3  # top-k with k = min(5, classes)
    assert metrics["backbone_unchanged"] is True
    assert "checked: the backbone's weights are those of the checkpoint" in result.output
    assert set(head["state_dict"]) == {"fc.weight", "fc.bias"} and head["state_dict"]["fc.weight"].shape == (3, 512)
    assert head["classes"] == ["class0", "class1", "class2"]
    # the head plugs into the torchvision ResNet of the checkpoint (official names)
    from simsiam.checkpoint import read_backbone

    resnet = build_resnet("resnet18", num_classes=3)
    resnet.load_state_dict({**read_backbone(checkpoint).backbone, **head["state_dict"]})
    assert "top-1" in result.output and "linear head in" in result.output


def test_backbone_weights_and_bn_statistics_are_unchanged_after_training(tmp_path, data, monkeypatch):
    """The official sanity check, done here independently of the run's own: frozen, and in eval mode."""
    import transfer.lincls as lincls

    checkpoint, train, val = data
    config = preset_linear_config("cifar", checkpoint=str(checkpoint), train_dir=str(train), val_dir=str(val),
                                  out=str(tmp_path / "run"), image_size=16, batch_size=16, epochs=2, workers=0,
                                  device="cpu")
    before = load_checkpoint(checkpoint)["state_dict"]
    seen = {}
    original = lincls.backbone_unchanged

    def spy(backbone, pretrained):
        seen.update({k: v.detach().clone() for k, v in backbone.state_dict().items()})
        seen["training"] = backbone.training
        return original(backbone, pretrained)

    monkeypatch.setattr(lincls, "backbone_unchanged", spy)
    lincls.linear_eval(config)
    assert seen.pop("training") is False
    assert len(seen) == len([k for k in before if k.startswith("module.encoder.") and ".fc." not in k])
    for name, value in seen.items():  # running_mean/var and num_batches_tracked included
        assert torch.equal(value, before[f"module.encoder.{name}"]), name


def test_official_defaults_and_presets():
    config = LinearEvalConfig()
    assert (config.epochs, config.batch_size, config.lr, config.wd, config.momentum) == (90, 4096, 0.1, 0.0, 0.9)
    assert config.optimizer == "lars" and config.trust_coefficient == 0.001
    assert config.init_lr == pytest.approx(1.6)  # 0.1 x 4096 / 256
    assert (config.image_size, config.eval_resize, config.crop_min_scale) == (224, 256, 0.08)
    assert PRESETS["cifar"]["image_size"] == 32 and PRESETS["cifar"]["eval_resize"] == 0
    assert preset_linear_config("cifar", epochs=3).epochs == 3


def test_lars_matches_apex_larc_without_clipping():
    """apex LARC(trust_coefficient, clip=False) then SGD: computed by hand for one step."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 3))
    bias = torch.nn.Parameter(torch.zeros(4))  # zero norm: left as it is, as apex does
    grad_w, grad_b = torch.randn(4, 3), torch.randn(4)
    lr, wd, trust = 0.5, 1e-4, 0.001
    optimizer = LARS([weight, bias], lr=lr, momentum=0.9, weight_decay=wd, trust_coefficient=trust)
    w0 = weight.detach().clone()
    weight.grad, bias.grad = grad_w.clone(), grad_b.clone()
    optimizer.step()
    ratio = trust * w0.norm() / (grad_w.norm() + w0.norm() * wd + 1e-8)
    assert torch.allclose(weight, w0 - lr * ratio * (grad_w + wd * w0), atol=1e-7)
    assert torch.allclose(bias, -lr * grad_b)  # no ratio, no weight decay
    assert optimizer.param_groups[0]["weight_decay"] == wd  # restored after the step


def test_lars_with_the_official_lr_trains_a_linear_classifier():
    """LARS from the official initialisation (fc N(0, 0.01), zero bias) at lr 1.6 = 0.1 x 4096 / 256,
    on separable features: the relative steps (lr x trust per step) are enough in a few hundred steps."""
    import torch.nn.functional as F

    from transfer.lincls import build_head

    torch.manual_seed(0)
    centers = torch.randn(3, 64) * 2
    features = torch.cat([c + torch.randn(100, 64) for c in centers]).relu()
    labels = torch.arange(3).repeat_interleave(100)
    head = build_head(64, 3)
    optimizer = LARS(head.parameters(), lr=1.6)
    for step in range(200):
        batch = torch.randint(0, len(labels), (64,))
        loss = F.cross_entropy(head(features[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert (head(features).argmax(1) == labels).all()
        assert F.cross_entropy(head(features), labels) < 0.5


class Stop(Exception):
    """Stands for a kill."""


def stop_at(kind: str, key: str, value: int):
    def on_event(event):
        if event["event"] == kind and event[key] == value:
            raise Stop
    return on_event


def test_resume_continues_exactly_where_the_run_stopped(tmp_path, data):
    from transfer.lincls import linear_eval

    checkpoint, train, val = data
    common = [checkpoint, train, val, *TINY, "--batch-size", "16", "--lr", "1000", "--epochs", "3"]
    assert run("lincls", *common, "--out", tmp_path / "straight").exit_code == 0
    # the same run, killed as its second epoch ends (before that epoch's checkpoint is written) ...
    config = preset_linear_config("imagenet", checkpoint=str(checkpoint), train_dir=str(train), val_dir=str(val),
                                  out=str(tmp_path / "killed"), image_size=16, eval_resize=0, crop_min_scale=0.6,
                                  batch_size=16, lr=1000.0, epochs=3, workers=0, device="cpu", log_every=2)
    with pytest.raises(Stop):
        linear_eval(config, on_event=stop_at("epoch", "epoch", 2))
    assert load_checkpoint(tmp_path / "killed" / "last.pth.tar")["epoch"] == 1
    assert not (tmp_path / "killed" / HEAD_FILE).exists()
    # a resumed run keeps its recipe ...
    assert_user_error(run("lincls", "--resume", tmp_path / "killed", "--batch-size", "8"),
                      "--batch-size 8: the run being resumed", "used 16")
    # ... and, resumed from its folder, ends where the uninterrupted run ends
    resumed = run("lincls", "--resume", tmp_path / "killed")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output and "epoch 2 of 3" in resumed.output
    a = load_checkpoint(tmp_path / "straight" / HEAD_FILE)
    b = load_checkpoint(tmp_path / "killed" / HEAD_FILE)
    for name in a["state_dict"]:
        assert torch.equal(a["state_dict"][name], b["state_dict"][name]), name
    assert a["metrics"]["top1"] == b["metrics"]["top1"]
    lines = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines if line["kind"] == "epoch"] == [1, 2, 3]
    # the same folders in another spelling are the run's own; other ones are refused
    same = run("lincls", Path(os.path.relpath(checkpoint)), train, val, "--resume", tmp_path / "killed")
    assert same.exit_code == 0 and "epochs are done" in same.output, same.output
    assert_user_error(run("lincls", checkpoint, val, val, "--resume", tmp_path / "killed"),
                      f"TRAIN_DIR {val}: 24 images, 24 fewer than the 48 the run being resumed")
    # neither file of a lincls folder is a backbone: the commands that read one say where it is
    for name in (HEAD_FILE, "last.pth.tar"):
        assert_user_error(run("convert-d2", tmp_path / "killed" / name, "--out", tmp_path / "x.pkl"),
                          "a simsiam lincls checkpoint, which holds only the linear head", str(checkpoint))
    assert_user_error(run("lincls", "--resume", tmp_path / "killed", "--overwrite"),
                      "--resume continues the run in", "--overwrite would start it over")
    # the final head is not a checkpoint to resume; fewer epochs than trained are refused
    assert_user_error(run("lincls", "--resume", tmp_path / "killed" / HEAD_FILE),
                      "the finished linear head, not a checkpoint to resume", "last.pth.tar")
    assert_user_error(run("lincls", "--resume", tmp_path / "killed", "--epochs", "2"),
                      "--epochs 2: the run being resumed has reached epoch 3")
    # each command resumes only its own runs, under the preset they started with
    assert_user_error(run("pretrain", "--resume", tmp_path / "killed"), "not a checkpoint of simsiam pretrain")
    assert_user_error(run("lincls", "--resume", checkpoint), "not a checkpoint of simsiam lincls")
    assert_user_error(run("lincls", "--resume", tmp_path / "killed", "--preset", "cifar"),
                      "--preset cifar: the run being resumed used --preset imagenet")
    # a finished run resumed again is evaluated again, says so, and logs that evaluation (only)
    log = (tmp_path / "killed" / "metrics.jsonl").read_text()
    again = run("lincls", "--resume", tmp_path / "killed")
    assert again.exit_code == 0 and "its 3 epochs are done" in again.output, again.output
    assert load_checkpoint(tmp_path / "killed" / HEAD_FILE)["metrics"]["top1"] == a["metrics"]["top1"]
    after = (tmp_path / "killed" / "metrics.jsonl").read_text()
    assert after.startswith(log)
    [evaluation] = [json.loads(line) for line in after.removeprefix(log).splitlines()]
    assert evaluation["kind"] == "epoch" and (evaluation["epoch"], evaluation["step"]) == (3, lines[-1]["step"])
    assert evaluation["top1"] == a["metrics"]["top1"] and "loss" not in evaluation


@pytest.fixture
def ctrl_c_in_epoch_2(monkeypatch):
    """``with ctrl_c_in_epoch_2():`` a lincls run inside is stopped by Ctrl-C as its second epoch starts."""
    from contextlib import contextmanager

    import transfer.lincls

    learning_rate = transfer.lincls.learning_rate

    def interrupted_in_epoch_2(config, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return learning_rate(config, epoch)

    @contextmanager
    def interrupted():
        monkeypatch.setattr(transfer.lincls, "learning_rate", interrupted_in_epoch_2)
        try:
            yield
        finally:
            monkeypatch.setattr(transfer.lincls, "learning_rate", learning_rate)

    return interrupted


def test_a_resume_compares_the_training_image_list_not_the_folder(tmp_path, data, ctrl_c_in_epoch_2):
    import shlex
    import shutil

    checkpoint, _, val = data
    train = make_image_folder(tmp_path / "train", classes=3, per_class=4, size=16)  # 12 images: one step an epoch
    out = tmp_path / "run"
    args = [*TINY, "--batch-size", "12", "--epochs", "1"]
    assert run("lincls", checkpoint, train, val, "--out", out, *args).exit_code == 0
    moved = train.rename(tmp_path / "moved")
    assert_user_error(run("lincls", "--resume", out, "--epochs", "2"),
                      f"its run names TRAIN_DIR as '{train}', which is no longer there; give TRAIN_DIR again")
    # added, removed, renamed: the sampler's batches would not be the uninterrupted run's
    shutil.copy(moved / "class0" / "c0_000.png", moved / "class1" / "added.png")
    assert_user_error(run("lincls", checkpoint, moved, val, "--resume", out, "--epochs", "2"),
                      f"TRAIN_DIR {moved}: 13 images, 1 more than the 12", "images added")
    (moved / "class1" / "added.png").unlink()
    (moved / "class1" / "c1_000.png").rename(moved / "class1" / "renamed.png")
    assert_user_error(run("lincls", checkpoint, moved, val, "--resume", out, "--epochs", "2"),
                      "12 images, as many as", "not the same paths")
    (moved / "class1" / "renamed.png").rename(moved / "class1" / "c1_000.png")
    (moved / "class0" / "c0_000.png").unlink()
    assert_user_error(run("lincls", checkpoint, moved, val, "--resume", out, "--epochs", "2"),
                      "11 images, 1 fewer than the 12")
    shutil.copy(moved / "class0" / "c0_001.png", moved / "class0" / "c0_000.png")  # the same name: the same list
    # the same images elsewhere resume, with another VAL_DIR too (it only decides what is evaluated); a
    # Ctrl-C before the next checkpoint offers the folders again (the checkpoints so far name the old ones)
    other_val = shutil.copytree(val, tmp_path / "val")
    with ctrl_c_in_epoch_2():
        result = run("lincls", checkpoint, moved, other_val, "--resume", out, "--epochs", "2")
    hint = result.output.strip().splitlines()[-1]
    assert hint == (f"interrupted (continue: simsiam lincls --resume {out} --epochs 2 {checkpoint} {moved} "
                    f"{other_val})"), result.output
    result = run(*shlex.split(hint.removeprefix("interrupted (continue: simsiam ").removesuffix(")")))
    assert result.exit_code == 0, result.output
    assert load_checkpoint(out / "last.pth.tar")["epoch"] == 2
    saved = json.loads((out / "config.json").read_text())
    assert (saved["train_dir"], saved["val_dir"]) == (str(moved), str(other_val))
    # a checkpoint of the version before the fingerprint resumes from its own TRAIN_DIR only, as it did
    old = load_checkpoint(out / "last.pth.tar")
    del old["images"]
    torch.save(old, out / "last.pth.tar")
    moved.rename(train)
    assert_user_error(run("lincls", checkpoint, train, val, "--resume", out, "--epochs", "3"),
                      f"TRAIN_DIR {train}: the run being resumed", f"used {moved}")
    assert run("lincls", checkpoint, train.rename(moved), val, "--resume", out, "--epochs", "3").exit_code == 0


def test_a_mid_epoch_checkpoint_resumes_to_the_same_weights(tmp_path, data):
    """``--save-every-steps``: a run killed between epochs' ends resumes from its step."""
    from transfer.lincls import linear_eval

    checkpoint, train, val = data
    common = dict(checkpoint=str(checkpoint), train_dir=str(train), val_dir=str(val), image_size=16, eval_resize=0,
                  batch_size=16, lr=1000.0, workers=0, device="cpu", log_every=1)
    straight = preset_linear_config("imagenet", out=str(tmp_path / "a"), epochs=2, **common)
    linear_eval(straight)

    interrupted = preset_linear_config("imagenet", out=str(tmp_path / "b"), epochs=2, save_every_steps=1, **common)
    with pytest.raises(Stop):
        linear_eval(interrupted, on_event=stop_at("log", "step", 5))
    saved = load_checkpoint(tmp_path / "b" / "last.pth.tar")
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 1)  # 3 steps per epoch: step 4, saved before step 5, is epoch 2's first
    with pytest.raises(InputError, match="--batch-size 8: the run being resumed .* used 16"):  # as the CLI refuses it
        linear_eval(dataclasses.replace(interrupted, batch_size=8), resume_from=tmp_path / "b" / "last.pth.tar")
    linear_eval(interrupted, resume_from=tmp_path / "b" / "last.pth.tar")
    a = load_checkpoint(tmp_path / "a" / HEAD_FILE)["state_dict"]
    b = load_checkpoint(tmp_path / "b" / HEAD_FILE)["state_dict"]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and so are the epochs' lines: the resumed epoch's counts the steps before the interruption too
    epochs = [[{k: v for k, v in json.loads(line).items() if k != "images_per_s"}
               for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines() if '"kind": "epoch"' in line]
              for run in ("a", "b")]
    assert len(epochs[0]) == 2 and epochs[0] == epochs[1]


def test_an_overwrite_run_refused_at_its_first_batch_gives_the_replaced_run_back(tmp_path, data):
    checkpoint, train, val = data
    out = tmp_path / "run"
    args = [*TINY, "--batch-size", "48", "--epochs", "1"]
    assert run("lincls", checkpoint, train, val, "--out", out, *args).exit_code == 0
    old = {name: (out / name).read_bytes() for name in os.listdir(out)}
    assert {"last.pth.tar", "linear_head.pth", "linear_head_best.pth"} <= set(old)
    broken = tmp_path / "broken"
    for name in ("class0", "class1", "class2"):  # TRAIN_DIR's classes, not one image decodes
        (broken / name).mkdir(parents=True)
        for i in range(16):
            (broken / name / f"{i}.png").write_bytes(b"not a png")
    assert_user_error(run("lincls", checkpoint, broken, val, "--out", out, *args, "--overwrite"),
                      "every image", only_line=False)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == old  # heads included


def test_a_folder_holding_a_pretraining_run_is_named_as_such_not_offered_to_resume(tmp_path, data):
    checkpoint, train, val = data
    out = tmp_path / "pretrained"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"data": str(train), "preset": "cifar", "batch_size": 8, "epochs": 1}))
    (out / "last.pth.tar").write_bytes(b"a pretraining checkpoint")
    result = run("lincls", checkpoint, train, val, "--out", out, *TINY, "--batch-size", "16", "--epochs", "1")
    assert_user_error(result, f"--out {out}: already holds a simsiam pretrain run; choose another --out, or pass "
                              "--overwrite to replace it")


def test_without_a_preset_a_cifar_stem_checkpoint_gets_the_cifar_recipe(tmp_path, data):
    # as extract and knn take a checkpoint's evaluation transform: not 32-px images upsampled to 224
    _, train, val = data
    torch.manual_seed(0)
    model = SimSiam(build_resnet("resnet18", num_classes=32, cifar_stem=True), 32, 8)
    cifar = tmp_path / "cifar.pth.tar"
    torch.save({"arch": "resnet18", "state_dict": to_official_layout(model.state_dict())}, cifar)
    args = ["--workers", "0", "--device", "cpu", "--batch-size", "16", "--epochs", "1"]
    result = run("lincls", cifar, train, val, "--out", tmp_path / "c", *args, "--json")
    assert result.exit_code == 0, result.output
    # --json: the final metrics as the run's files have them, the last line (progress goes to stderr)
    report = json.loads(result.output.splitlines()[-1])
    final = load_checkpoint(tmp_path / "c" / HEAD_FILE)["metrics"]
    assert report == {"out": str(tmp_path / "c"), "head": str(tmp_path / "c" / HEAD_FILE),
                      **{name: value for name, value in final.items() if name != "kind"}}
    assert report["epoch"] == 1 and 0 <= report["top1"] <= 100 and report["backbone_unchanged"] is True
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert (config["preset"], config["image_size"], config["eval_resize"]) == ("cifar", 32, 0)
    assert run("lincls", cifar, train, val, "--out", tmp_path / "i", *args, *TINY, "--preset", "imagenet").exit_code == 0
    assert json.loads((tmp_path / "i" / "config.json").read_text())["preset"] == "imagenet"  # when asked


def test_one_class_is_warned_about_as_an_accuracy_that_means_nothing(tmp_path, data):
    checkpoint, _, _ = data
    train = make_image_folder(tmp_path / "train", classes=1, per_class=8, size=16)
    val = make_image_folder(tmp_path / "val", classes=1, per_class=4, size=16, seed=1)
    result = run("lincls", checkpoint, train, val, "--out", tmp_path / "o", *TINY, "--batch-size", "4", "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert f"TRAIN_DIR {train} has one class: every image is classified as it" in result.output


def test_errors(tmp_path, data):
    checkpoint, train, val = data
    args = [*TINY, "--batch-size", "16", "--epochs", "1"]
    assert_user_error(run("lincls", tmp_path / "none.pth", train, val, "--out", tmp_path / "o", *args),
                      "none.pth", "no such checkpoint")
    flat = tmp_path / "flat"
    make_image_folder(flat, classes=1, per_class=4, size=16, labelled=False)
    assert_user_error(run("lincls", checkpoint, train, flat, "--out", tmp_path / "o", *args), "VAL_DIR", "class folders")
    other = make_image_folder(tmp_path / "other", classes=5, per_class=2, size=16)
    assert_user_error(run("lincls", checkpoint, train, other, "--out", tmp_path / "o", *args),
                      "classes not in TRAIN_DIR", "class3")
    assert_user_error(run("lincls", checkpoint, train, val, "--out", tmp_path / "o", *args[:-2], "--epochs", "0"),
                      "--epochs 0")
    assert_user_error(run("lincls", checkpoint, train, val, "--out", tmp_path / "o", *args[:-2], "--epochs",
                          str(10**20)), f"--epochs {10**20}: must be at most 100000")  # ran until stopped
    assert_user_error(run("lincls", checkpoint, train, val, "--out", tmp_path / "o", *TINY, "--batch-size", "4096"),
                      "--batch-size 4096", "larger than the dataset")
    for option, value, message in (("--momentum", "5", "--momentum 5.0: must be in [0, 1)"),
                                   ("--lr", "nan", "--lr nan: must be a finite number, not negative"),
                                   ("--lr", "1e300", "--lr 1e+300: must be at most 3.403e+38"),  # was a traceback
                                   ("--wd", "1e300", "--wd 1e+300: must be at most 3.403e+38"),  # was a traceback
                                   ("--image-size", str(10**20), f"--image-size {10**20}: must be at most 4096"),
                                   ("--eval-resize", str(10**20), f"--eval-resize {10**20}: must be at most 4096"),
                                   ("--workers", "99999999999", "--workers 99999999999: must be at most 128"),
                                   ("--save-every-steps", "-1", "--save-every-steps -1: must be at least 0")):
        assert_user_error(run("lincls", checkpoint, train, val, "--out", tmp_path / "o", *args, option, value), message)
    assert_user_error(run("lincls", checkpoint, train, val, "--out", tmp_path / "o", *args, "--seed", "-1"),
                      "--seed -1: must be from 0 to")
    assert_user_error(run("lincls", "--resume", tmp_path / "nothing"), "--resume")
    from simsiam.run_dir import locked_run_dir

    with locked_run_dir(tmp_path / "busy"):  # another run writing there
        assert_user_error(run("lincls", checkpoint, train, val, "--out", tmp_path / "busy", *args),
                          "another simsiam run is writing in this folder")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*.pth*"))



def test_a_resume_refuses_a_checkpoint_without_what_it_loads(tmp_path, data):
    # a KeyError or load_state_dict traceback before
    checkpoint, train, val = data
    out = tmp_path / "run"
    assert run("lincls", checkpoint, train, val, "--out", out, *TINY, "--batch-size", "16", "--epochs", "1").exit_code == 0
    edits = [
        (lambda c: c.pop("global_step"), "holds no 'global_step', which resuming a run loads"),
        (lambda c: c.pop("rng"), "holds no 'rng'"),
        (lambda c: c.update(epoch=-1), "its 'epoch' is -1, not a count of epochs"),
        (lambda c: c["state_dict"].update({"fc.bias": torch.zeros(4)}), "(fc.bias of shape [4], not [3])"),
        (lambda c: c["state_dict"].pop("fc.weight"), "does not fit the run's model (no fc.weight)"),
        (lambda c: c.update(optimizer={"state": {}}), "its 'optimizer' is not the saved state of the run's optimizer"),
    ]
    assert_resume_refuses_edited("lincls", out / "last.pth.tar", tmp_path, edits)


@pytest.mark.parametrize("epochs", [2, 1])
def test_a_val_dir_where_nothing_decodes_fails_in_one_line_after_saving_the_epoch(tmp_path, data, epochs):
    """How many VAL_DIR images decode is known only at the first evaluation, after an epoch of
    training: that epoch is kept (its line, its checkpoint) and --resume goes on once VAL_DIR is
    fixed, also when it was the last epoch (then only the evaluation is left to do)."""
    from transfer.lincls import BEST_HEAD_FILE

    checkpoint, train, val = data
    broken = tmp_path / "broken"
    for name in ("class0", "class1", "class2"):
        (broken / name).mkdir(parents=True)
        (broken / name / "x.jpg").write_bytes(b"not an image")
    out = tmp_path / "run"
    failed = run("lincls", checkpoint, train, broken, "--out", out, *TINY, "--batch-size", "16", "--epochs", epochs)
    assert_user_error(failed, only_line=False)
    assert failed.output.strip().splitlines()[-1] == (f"Error: VAL_DIR {broken}: none of its 3 images could be "
                                                      f"decoded (epoch 1 is saved; --resume {out} continues)")
    assert load_checkpoint(out / "last.pth.tar")["epoch"] == 1 and not (out / BEST_HEAD_FILE).exists()
    [line] = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "epoch"' in l]
    assert line["epoch"] == 1 and "top1" not in line
    resumed = run("lincls", checkpoint, train, val, "--resume", out)
    assert resumed.exit_code == 0, resumed.output
    final = load_checkpoint(out / HEAD_FILE)["metrics"]
    assert final["epoch"] == epochs and final["best_top1"] == final["top1"]
    assert load_checkpoint(out / BEST_HEAD_FILE)["metrics"]["top1"] == final["top1"]


def test_unreadable_val_dir_images_are_said_once_or_stop_the_run_under_strict(tmp_path, data):
    # they were left out of every evaluation silently, --strict or not
    checkpoint, train, val = data
    flawed = tmp_path / "flawed"
    shutil.copytree(val, flawed)
    (flawed / "class1" / "broken.jpg").write_bytes(b"not an image")
    args = [*TINY, "--batch-size", "16", "--epochs", "2"]
    result = run("lincls", checkpoint, train, flawed, "--out", tmp_path / "run", *args)
    assert result.exit_code == 0, result.output
    assert result.output.count(f"warning: VAL_DIR {flawed}: 1 of its 25 images could not be decoded; the evaluation "
                               "leaves them out") == 1, result.output
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"top1"' in l]
    assert [(line["val_images"], line["val_skipped"]) for line in lines] == [(24, 1), (24, 1)]
    result = run("lincls", checkpoint, train, flawed, "--out", tmp_path / "strict", *args, "--strict")
    assert_user_error(result, f"{flawed / 'class1' / 'broken.jpg'}: cannot decode image", "drop --strict",
                      f"(epoch 1 is saved; --resume {tmp_path / 'strict'} continues)", only_line=False)


def test_an_out_folder_among_the_inputs_is_refused(tmp_path, data):
    import shutil

    checkpoint, train, val = data
    args = [*TINY, "--batch-size", "16", "--epochs", "1"]
    assert_user_error(run("lincls", checkpoint, train, val, "--out", val / "lincls", *args),
                      f"--out {val / 'lincls'}: is inside VAL_DIR {val}")
    assert_user_error(run("lincls", checkpoint, train, val, "--out", train, *args), f"--out {train}: is TRAIN_DIR {train}")
    assert not (val / "lincls").exists()
    # a pretraining run's folder: --overwrite would remove the checkpoint being evaluated
    pretraining = tmp_path / "run"
    pretraining.mkdir()
    shutil.copy(checkpoint, pretraining / "checkpoint_0000.pth.tar")
    assert_user_error(run("lincls", pretraining / "checkpoint_0000.pth.tar", train, val, "--out", pretraining, *args,
                          "--overwrite"), "--overwrite: would remove CHECKPOINT", "checkpoint_0000.pth.tar")
    assert os.listdir(pretraining) == ["checkpoint_0000.pth.tar"]


def test_every_training_image_is_seen_every_epoch_the_last_batch_included(tmp_path, data, monkeypatch):
    """As main_lincls.py's loader (no drop_last): 48 images at batch 20 are 3 steps, the last of 8."""
    import types

    import torch.nn.functional as F

    import transfer.lincls
    from transfer.lincls import linear_eval

    checkpoint, train, val = data
    seen, cross_entropy = [], F.cross_entropy

    def counting(logits, labels, **kwargs):
        if logits.requires_grad:  # a training step, not the evaluation
            seen.append(len(labels))
        return cross_entropy(logits, labels, **kwargs)

    monkeypatch.setattr(transfer.lincls.F, "cross_entropy", counting)
    clock = iter(range(10**6))  # a second between the readings: images/s is the images of the interval
    monkeypatch.setattr(transfer.lincls, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    events = []
    config = preset_linear_config("imagenet", checkpoint=str(checkpoint), train_dir=str(train), val_dir=str(val),
                                  out=str(tmp_path / "run"), image_size=16, eval_resize=0, batch_size=20, epochs=2,
                                  workers=0, device="cpu", log_every=1)
    linear_eval(config, on_event=events.append)
    assert events[0]["steps_per_epoch"] == 3 and seen == [20, 20, 8] * 2
    assert [e["images_per_s"] for e in events if e["event"] == "log"] == [20, 20, 8] * 2


def test_the_head_of_the_best_validation_top1_is_kept_apart(tmp_path, data, monkeypatch):
    """As the official model_best.pth.tar: the first epoch of the highest top-1, not the last epoch."""
    import transfer.lincls as lincls
    from transfer.lincls import BEST_HEAD_FILE

    checkpoint, train, val = data
    scripted, heads, evaluate = iter([40.0, 90.0, 70.0, 90.0]), [], lincls.Evaluator.__call__

    def scored(self, backbone, head):
        heads.append({k: v.clone() for k, v in head.state_dict().items()})
        return {**evaluate(self, backbone, head), "top1": next(scripted)}

    monkeypatch.setattr(lincls.Evaluator, "__call__", scored)
    config = preset_linear_config("imagenet", checkpoint=str(checkpoint), train_dir=str(train), val_dir=str(val),
                                  out=str(tmp_path / "run"), image_size=16, eval_resize=0, batch_size=16, epochs=4,
                                  lr=1000.0, workers=0, device="cpu", eval_every=1)
    final = lincls.linear_eval(config)
    best = load_checkpoint(tmp_path / "run" / BEST_HEAD_FILE)
    assert final["top1"] == 90.0 and final["best_top1"] == 90.0 and best["metrics"]["epoch"] == 2
    assert best["metrics"]["top1"] == 90.0 and best["classes"] == ["class0", "class1", "class2"]
    for name, value in heads[1].items():  # the weights evaluated in epoch 2, not those of epoch 4
        assert torch.equal(best["state_dict"][f"fc.{name}"], value), name
        assert not torch.equal(value, heads[3][name]), name
    # a run started over in the same folder does not keep the old run's best head
    monkeypatch.setattr(lincls.Evaluator, "__call__", evaluate)
    lincls.linear_eval(dataclasses.replace(config, epochs=1, eval_every=1), overwrite=True)
    assert load_checkpoint(tmp_path / "run" / BEST_HEAD_FILE)["metrics"]["epoch"] == 1


def test_a_resume_refuses_a_checkpoint_whose_backbone_changed(tmp_path, data):
    """Evaluating a last.pth.tar that pretraining has since rewritten: the head would mix two backbones."""
    import shutil

    checkpoint, train, val = data
    mine = shutil.copy(checkpoint, tmp_path / "last.pth.tar")
    args = [*TINY, "--batch-size", "16", "--lr", "1000"]
    assert run("lincls", mine, train, val, "--out", tmp_path / "run", *args, "--epochs", "1").exit_code == 0
    saved = torch.load(mine, weights_only=True)
    torch.save({**saved, "note": "saved again, same weights"}, mine)  # another file, the same backbone: fine
    again = run("lincls", "--resume", tmp_path / "run", "--epochs", "2")
    assert again.exit_code == 0, again.output
    saved["state_dict"]["module.encoder.layer1.0.bn1.running_mean"] += 0.5  # BN statistics count too
    torch.save(saved, mine)
    assert_user_error(run("lincls", "--resume", tmp_path / "run", "--epochs", "3"),
                      f"CHECKPOINT {mine}: its backbone is not the one the run being resumed trained its head on")


def test_a_moved_checkpoint_resumes_when_its_backbone_is_the_same(tmp_path, data, ctrl_c_in_epoch_2):
    """CHECKPOINT is compared by its backbone's fingerprint, not its path (as TRAIN_DIR by its image list)."""
    import shlex
    import shutil

    checkpoint, _, val = data
    train = make_image_folder(tmp_path / "train", classes=3, per_class=4, size=16)  # 12 images: one step an epoch
    mine = shutil.copy(checkpoint, tmp_path / "checkpoint_0099.pth.tar")
    out = tmp_path / "run"
    args = [*TINY, "--batch-size", "12", "--lr", "1000"]
    assert run("lincls", mine, train, val, "--out", out, *args, "--epochs", "1").exit_code == 0
    moved = Path(shutil.move(mine, tmp_path / "elsewhere.pth.tar"))
    # given alone, before TRAIN_DIR and VAL_DIR; a Ctrl-C before the next checkpoint offers it again
    with ctrl_c_in_epoch_2():
        hint = run("lincls", moved, "--resume", out, "--epochs", "2").output.strip().splitlines()[-1]
    assert hint == f"interrupted (continue: simsiam lincls --resume {out} --epochs 2 {moved} {train} {val})", hint
    resumed = run(*shlex.split(hint.removeprefix("interrupted (continue: simsiam ").removesuffix(")")))
    assert resumed.exit_code == 0, resumed.output
    assert load_checkpoint(out / "last.pth.tar")["config"]["checkpoint"] == str(moved)
    assert load_checkpoint(out / HEAD_FILE)["checkpoint"] == str(moved)
    # another backbone under another name is refused, naming the file the run trained on
    saved = torch.load(moved, weights_only=True)
    saved["state_dict"]["module.encoder.conv1.weight"] += 0.1
    other = tmp_path / "other.pth.tar"
    torch.save(saved, other)
    assert_user_error(run("lincls", other, train, val, "--resume", out, "--epochs", "3"),
                      f"CHECKPOINT {other}: its backbone is not the one the run being resumed trained its head on",
                      f"the run trained on {moved}")
    # a checkpoint of the version before the fingerprint resumes from its own CHECKPOINT file only, as it did
    old = load_checkpoint(out / "last.pth.tar")
    del old["backbone_sha256"]
    torch.save(old, out / "last.pth.tar")
    shutil.copy(moved, tmp_path / "copy.pth.tar")
    assert_user_error(run("lincls", tmp_path / "copy.pth.tar", train, val, "--resume", out, "--epochs", "3"),
                      f"CHECKPOINT {tmp_path / 'copy.pth.tar'}: the run being resumed", f"used {moved}")
    assert run("lincls", "--resume", out, "--epochs", "3").exit_code == 0


def test_a_resume_on_other_validation_images_starts_the_best_anew(tmp_path, data, monkeypatch):
    """Top-1s measured on different VAL_DIR images do not compare: the best kept is of the current images."""
    import shutil

    import transfer.lincls as lincls
    from transfer.lincls import BEST_HEAD_FILE

    checkpoint, _, val = data
    train = make_image_folder(tmp_path / "train", classes=3, per_class=4, size=16)  # 12 images: one step an epoch
    other_val = make_image_folder(tmp_path / "other_val", classes=3, per_class=2, size=16, seed=5)
    scripted, evaluate = [], lincls.Evaluator.__call__
    monkeypatch.setattr(lincls.Evaluator, "__call__",
                        lambda self, backbone, head: {**evaluate(self, backbone, head), "top1": scripted.pop(0)})
    out = tmp_path / "run"
    args = [*TINY, "--batch-size", "12", "--lr", "1000"]

    def lincls_run(*arguments, top1s):
        scripted[:] = top1s
        result = run("lincls", *arguments)
        assert result.exit_code == 0 and not scripted, result.output
        best = load_checkpoint(out / BEST_HEAD_FILE)["metrics"]
        assert load_checkpoint(out / HEAD_FILE)["metrics"]["best_top1"] == best["top1"]
        return " ".join(result.output.split()), best  # rich wraps long lines at the terminal's width

    _, best = lincls_run(checkpoint, train, val, "--out", out, *args, "--epochs", "2", top1s=[90.0, 80.0])
    assert (best["top1"], best["epoch"]) == (90.0, 1)
    # VAL_DIR given anew with other images: epoch 3's 50% is the best, not VAL_DIR's old 90%
    output, best = lincls_run(checkpoint, train, other_val, "--resume", out, "--epochs", "3", top1s=[50.0])
    assert "VAL_DIR holds other images than the best top-1 so far (90.00%) was measured on" in output
    assert (best["top1"], best["epoch"], best["val_images"]) == (50.0, 3, 6)
    assert load_checkpoint(out / "last.pth.tar")["best_val_images"]["count"] == 6
    # the same images, from the run's own VAL_DIR or another folder: the best is kept
    output, best = lincls_run("--resume", out, top1s=[40.0])  # a finished run: evaluated again
    assert "best starts anew" not in output and (best["top1"], best["epoch"]) == (50.0, 3)
    _, best = lincls_run(checkpoint, train, shutil.copytree(other_val, tmp_path / "copy"), "--resume", out,
                         top1s=[45.0])
    assert best["top1"] == 50.0
    # back to the first VAL_DIR: a finished run re-evaluated there starts the best anew too, and
    # its checkpoint remembers it, so that the next plain resume evaluates that VAL_DIR
    output, best = lincls_run(checkpoint, train, val, "--resume", out, top1s=[30.0])
    assert "(50.00%) was measured on: the best starts anew" in output and best["top1"] == 30.0
    saved = load_checkpoint(out / "last.pth.tar")
    assert saved["config"]["val_dir"] == str(val) and saved["best_top1"] == 30.0
    _, best = lincls_run("--resume", out, top1s=[35.0])
    assert (best["top1"], best["val_images"]) == (35.0, 24)
    # a checkpoint of the version before the list keeps its best on any VAL_DIR, as it did
    old = load_checkpoint(out / "last.pth.tar")
    del old["best_val_images"]
    torch.save(old, out / "last.pth.tar")
    output, best = lincls_run(checkpoint, train, other_val, "--resume", out, top1s=[20.0])
    assert "best starts anew" not in output and best["top1"] == 35.0


def test_a_missing_folder_is_named_as_train_dir_or_val_dir(tmp_path, data):
    checkpoint, train, val = data
    for folders, named in (((tmp_path / "none", val), "TRAIN_DIR"), ((train, tmp_path / "none"), "VAL_DIR")):
        assert_user_error(run("lincls", checkpoint, *folders, "--out", tmp_path / "out", *TINY),
                          f"{named} {tmp_path / 'none'}: no such folder")
    assert not (tmp_path / "out").exists()
    # one left out: that one is named (all three were)
    result = run("lincls", checkpoint, train, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "Missing argument: VAL_DIR (needed unless --resume is given)" in result.output
    assert "Missing arguments: CHECKPOINT TRAIN_DIR VAL_DIR" in run("lincls").output
    assert not (tmp_path / "out").exists()


def test_split_folders_taken_for_classes_are_warned_about(tmp_path, data):
    checkpoint, _, _ = data
    splits = make_image_folder(tmp_path / "dataset", classes=2, per_class=4, size=16)
    (splits / "class0").rename(splits / "train")
    (splits / "class1").rename(splits / "val")
    result = run("lincls", checkpoint, splits, splits, "--out", tmp_path / "o", *TINY, "--batch-size", "8",
                 "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert f"warning: TRAIN_DIR {splits}: its class folders (train, val) are dataset splits" in result.output


def test_a_diverging_loss_names_its_first_step_and_the_checkpoint_kept(tmp_path, data, monkeypatch):
    """It named the next logging step (step 5 with --log-every 10 for a loss NaN from step 3), not the
    checkpoint it kept, and said "lower --lr" where a resumed run cannot."""
    import torch.nn.functional as F

    import transfer.lincls as lincls

    checkpoint, train, val = data
    real, calls = F.cross_entropy, {"n": 0}

    def cross_entropy_nan_from_step_6(*args, **kwargs):
        loss = real(*args, **kwargs)
        if not torch.is_grad_enabled():  # the validation's
            return loss
        calls["n"] += 1
        return loss * float("nan") if calls["n"] >= 6 else loss

    monkeypatch.setattr(lincls.F, "cross_entropy", cross_entropy_nan_from_step_6)
    out = tmp_path / "run"
    result = run("lincls", checkpoint, train, val, "--out", out, *TINY, "--batch-size", "16", "--epochs", "3",
                 "--log-every", "10")  # 3 steps an epoch: the loss goes NaN at step 6, the last of epoch 2
    assert_user_error(result, "the loss became NaN or infinite at step 6 (epoch 2); the last good checkpoint is "
                      f"{out / 'last.pth.tar'}", "to lower it, start a new run", only_line=False)
    assert load_checkpoint(out / "last.pth.tar")["epoch"] == 1


def test_a_backbone_that_gives_non_finite_features_is_said_to_be_broken(tmp_path, data):
    """Its head's loss was NaN from the first step: "lower --lr", of no help."""
    checkpoint, train, val = data
    saved = load_checkpoint(checkpoint)
    saved["state_dict"]["module.encoder.layer4.1.conv2.weight"][0, 0, 1, 1] = float("nan")  # diverged in pretraining
    broken = tmp_path / "broken.pth.tar"
    torch.save(saved, broken)
    result = run("lincls", broken, train, val, "--out", tmp_path / "run", *TINY, "--batch-size", "16", "--epochs", "1")
    assert_user_error(result, f"{broken}: the backbone gives NaN or infinite features; its weights are broken",
                      only_line=False)
    assert not (tmp_path / "run").exists()
