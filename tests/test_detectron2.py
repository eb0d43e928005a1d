"""With Detectron2 installed: the shipped configs, converted weights in a real model, a toy run.

Skipped where Detectron2 is absent (CI: it is not on PyPI and takes long to build). Run them in an
environment with Detectron2 built from source (README.md, "Detection transfer").
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

pytest.importorskip("detectron2", reason="Detectron2 is not installed (it is not on PyPI; see README.md, "
                                         "Detection transfer); these tests need a real Detectron2 build")

from click.testing import CliRunner  # noqa: E402

from cli.main import simsiam  # noqa: E402
from simsiam.augment import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from simsiam.backbones import build_resnet  # noqa: E402
from simsiam.checkpoint import build_backbone, read_backbone, to_official_layout  # noqa: E402
from simsiam.errors import InputError  # noqa: E402
from simsiam.model import SimSiam  # noqa: E402
from transfer.detection import plan_detection  # noqa: E402
from transfer.detectron2_config import CONFIG_DIR, load_config  # noqa: E402
from transfer.detectron2_weights import convert_checkpoint, write_detectron2_pickle  # noqa: E402
from transfer.toy_voc import make_toy_voc  # noqa: E402

VOC_TRAIN_SIZES = tuple(range(480, 801, 32))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    """An official-layout SimSiam ResNet-50 checkpoint with non-trivial BN, and its convert-d2 pickle."""
    folder = tmp_path_factory.mktemp("r50")
    torch.manual_seed(0)
    model = SimSiam(build_resnet("resnet50", num_classes=64), 64, 16)
    for module in model.encoder.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # pretrained-looking statistics and affine weights
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    checkpoint = folder / "checkpoint_0099.pth.tar"
    torch.save({"epoch": 100, "arch": "resnet50", "state_dict": to_official_layout(model.state_dict())}, checkpoint)
    pickle_path = write_detectron2_pickle(convert_checkpoint(checkpoint), folder / "r50.pkl")
    return checkpoint, pickle_path


@pytest.fixture(scope="module")
def r50_c4_detector(tmp_path_factory):
    """A whole voc-r50-c4 detector, saved as training saves it (random weights): what detect eval takes."""
    from detectron2.modeling import build_model

    path = tmp_path_factory.mktemp("detector") / "model_final.pth"
    torch.save({"model": build_model(load_config("voc-r50-c4", ["MODEL.DEVICE", "cpu"])).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    make_toy_voc(root, train_images=4, test_images=20, width=64, height=48)
    return root


def test_voc_r50_c4_is_moco_s_protocol():
    cfg = load_config("voc-r50-c4")
    assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" and not cfg.MODEL.MASK_ON
    assert cfg.MODEL.BACKBONE.NAME == "build_resnet_backbone" and cfg.MODEL.RESNETS.OUT_FEATURES == ["res4"]
    assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm" and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 20
    assert (cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.BACKBONE.FREEZE_AT, cfg.MODEL.RESNETS.NORM) == (50, 0, "naiveSyncBN")
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False and cfg.INPUT.FORMAT == "RGB"
    assert cfg.MODEL.PIXEL_MEAN == [123.675, 116.280, 103.530] and cfg.MODEL.PIXEL_STD == [58.395, 57.120, 57.375]
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == VOC_TRAIN_SIZES and cfg.INPUT.MIN_SIZE_TEST == 800
    assert tuple(cfg.DATASETS.TRAIN) == ("voc_2007_trainval", "voc_2012_trainval")
    assert tuple(cfg.DATASETS.TEST) == ("voc_2007_test",)
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER) == (16, 0.02, 24000)
    assert tuple(cfg.SOLVER.STEPS) == (18000, 22000) and cfg.SOLVER.WARMUP_ITERS == 100
    assert cfg.TEST.PRECISE_BN.ENABLED is True
    assert (cfg.MODEL.RPN.PRE_NMS_TOPK_TEST, cfg.MODEL.RPN.POST_NMS_TOPK_TEST) == (6000, 1000)


@pytest.mark.parametrize("name,iterations,steps", [("coco-r50-c4-1x", 90000, (60000, 80000)),
                                                   ("coco-r50-c4-2x", 180000, (120000, 160000)),
                                                   ("coco-r50-fpn-1x", 90000, (60000, 80000))])
def test_coco_schedules(name, iterations, steps):
    cfg = load_config(name)
    assert cfg.MODEL.MASK_ON and tuple(cfg.DATASETS.TRAIN) == ("coco_2017_train",)
    assert tuple(cfg.DATASETS.TEST) == ("coco_2017_val",)
    assert cfg.SOLVER.MAX_ITER == iterations and tuple(cfg.SOLVER.STEPS) == steps
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(range(640, 801, 32))
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False and cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.BACKBONE.FREEZE_AT == 0


def test_fpn_configs_build_and_take_the_converted_backbone(r50, caplog):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    _, weights = r50
    for name in ("voc-r50-fpn", "coco-r50-fpn-1x"):
        cfg = load_config(name, ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN",
                                 "MODEL.ROI_BOX_HEAD.NORM", "BN", "MODEL.ROI_MASK_HEAD.NORM", "BN"])
        model = build_model(cfg)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            DetectionCheckpointer(model).load(str(weights))
        assert "backbone.bottom_up." not in caplog.text  # nothing of the ResNet reported missing


def test_converted_weights_load_into_the_voc_r50_c4_model_with_no_backbone_parameter_missing(r50, caplog):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    _, weights = r50
    cfg = load_config("voc-r50-c4", ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN"])
    model = build_model(cfg)
    assert type(model.roi_heads).__name__ == "Res5ROIHeadsExtraNorm"
    assert isinstance(model.roi_heads.res5.norm, torch.nn.BatchNorm2d)  # the extra norm after res5
    with caplog.at_level(logging.WARNING):
        DetectionCheckpointer(model).load(str(weights))
    # fvcore lists what the checkpoint did not have: only the detection heads and the extra norm
    missing = caplog.text[caplog.text.find("not found in the checkpoint"):]
    assert "not found in the checkpoint" in caplog.text
    for part in ("backbone.", "roi_heads.res5.0", "roi_heads.res5.1", "roi_heads.res5.2"):
        assert part not in missing, missing
    assert "roi_heads.res5.norm" in missing and "proposal_generator.rpn_head" in missing
    # and every backbone tensor holds the pretrained value
    import pickle

    with open(weights, "rb") as f:
        converted = pickle.load(f)["model"]
    state = model.state_dict()
    for name, array in converted.items():
        target = f"roi_heads.{name}" if name.startswith("res5.") else f"backbone.{name}"
        assert torch.equal(state[target], torch.from_numpy(array)), target


def test_res4_features_equal_torchvision_layer3(r50):
    """The same image through the Detectron2 model (its own input normalisation) and torchvision.

    Eval mode, float32 on the CPU: the two compute the same convolutions in the same order, so the
    features agree to float32 rounding; the test allows 1e-4 of the features' largest magnitude.
    STRIDE_IN_1X1 True (MSRA's stride placement) or BGR input would make them differ completely.
    """
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    checkpoint, weights = r50
    cfg = load_config("voc-r50-c4", ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN"])
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(str(weights))
    resnet = build_backbone(read_backbone(checkpoint)).eval()

    torch.manual_seed(1)
    image = torch.randint(0, 256, (3, 96, 128)).float()  # RGB, 0-255, as Detectron2's mapper gives it
    with torch.no_grad():
        batched = model.preprocess_image([{"image": image}])  # (x - PIXEL_MEAN) / PIXEL_STD
        res4 = model.backbone(batched.tensor)["res4"]
        x = (image / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
        x = x[None]
        for layer in (resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1, resnet.layer2,
                      resnet.layer3):
            x = layer(x)
    assert res4.shape == x.shape == (1, 1024, 6, 8)
    assert (res4 - x).abs().max() <= 1e-4 * x.abs().max()


def test_syncbn_in_a_user_yaml_becomes_bn_on_one_process(tmp_path, r50, toy_root):
    _, weights = r50
    user = tmp_path / "mine.yaml"
    user.write_text(f'_BASE_: "{CONFIG_DIR / "voc-r50-fpn.yaml"}"\nMODEL:\n  RESNETS:\n    NORM: "SyncBN"\n'
                    '  FPN:\n    NORM: "SyncBN"\n')
    plan = plan_detection(str(user), str(weights), str(toy_root), str(tmp_path / "out"))
    assert "MODEL.RESNETS.NORM: SyncBN -> BN (one process: nothing to synchronise)" in plan.notes
    assert any(note.startswith("MODEL.FPN.NORM: SyncBN -> BN") for note in plan.notes)
    from detectron2.config import CfgNode
    from detectron2.modeling import build_model

    cfg = CfgNode.load_cfg(plan.run.config_yaml)
    assert cfg.MODEL.RESNETS.NORM == "BN" and cfg.MODEL.DEVICE == "cpu"
    backbone = build_model(cfg).backbone.train()
    backbone(torch.randn(2, 3, 64, 64))  # SyncBN would raise here without a process group


def test_scale_schedule_applies_the_linear_scaling_rule_and_says_so(tmp_path, r50, toy_root):
    _, weights = r50
    plan = plan_detection("voc-r50-c4", str(weights), str(toy_root), str(tmp_path / "out"), scale=True)
    from detectron2.config import CfgNode

    cfg = CfgNode.load_cfg(plan.run.config_yaml)
    # 1 GPU instead of 8: batch and lr / 8, iterations, steps and warmup x 8
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER, cfg.SOLVER.WARMUP_ITERS) == (2, 192000, 800)
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.0025) and tuple(cfg.SOLVER.STEPS) == (144000, 176000)
    assert cfg.SOLVER.REFERENCE_WORLD_SIZE == 1  # so that Detectron2's trainer does not scale again
    assert cfg.TEST.PRECISE_BN.NUM_ITER == 1600  # precise BN still sees 200 x 16 images
    assert "TEST.PRECISE_BN.NUM_ITER: 200 -> 1600" in plan.notes
    assert "linear scaling rule for 1 GPU(s) instead of 8:" in plan.notes
    assert "SOLVER.IMS_PER_BATCH: 16 -> 2" in plan.notes and "SOLVER.BASE_LR: 0.02 -> 0.0025" in plan.notes
    assert "SOLVER.STEPS: (18000, 22000) -> (144000, 176000)" in plan.notes
    unscaled = plan_detection("voc-r50-c4", str(weights), str(toy_root), str(tmp_path / "out"))
    assert any("--scale-schedule" in note for note in unscaled.notes)


def test_a_schedule_scaled_down_to_zero_iterations_is_refused(tmp_path, r50, toy_root, monkeypatch):
    _, weights = r50
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # planning only: nothing runs on them
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 16)
    with pytest.raises(InputError, match=r"^--scale-schedule for 16 GPUs: SOLVER.MAX_ITER 0: must be at least 1"):
        plan_detection("voc-r50-c4", str(weights), str(toy_root), str(tmp_path / "out"), num_gpus=16, scale=True,
                       opts=["SOLVER.MAX_ITER", "1", "SOLVER.STEPS", "(1,)", "SOLVER.WARMUP_ITERS", "0"])
    assert not (tmp_path / "out").exists()


def test_data_root_must_hold_every_dataset_the_config_reads(tmp_path, r50, r50_c4_detector):
    _, weights = r50
    make_toy_voc(tmp_path / "only2007", train_images=1, test_images=20, width=40, height=40)
    import shutil

    shutil.rmtree(tmp_path / "only2007" / "VOCdevkit" / "VOC2012")
    with pytest.raises(InputError, match="no VOCdevkit/VOC2012 folder, needed for voc_2012_trainval"):
        plan_detection("voc-r50-c4", str(weights), str(tmp_path / "only2007"), str(tmp_path / "out"))
    # evaluation reads only the test set
    plan = plan_detection("voc-r50-c4", str(r50_c4_detector), str(tmp_path / "only2007"), str(tmp_path / "out"),
                          eval_only=True)
    assert [d.name for d in plan.run.datasets] == ["voc_2007_test"]
    with pytest.raises(InputError, match="coco_2017_val needs annotations/instances_val2017.json, val2017"):
        (tmp_path / "coco" / "annotations").mkdir(parents=True)
        plan_detection("coco-r50-c4-1x", str(r50_c4_detector), str(tmp_path / "coco"), str(tmp_path / "out"),
                       eval_only=True)


def test_unknown_override_key_is_a_one_line_error(tmp_path, r50, toy_root):
    _, weights = r50
    result = CliRunner().invoke(simsiam, ["detect", "train", "--config", "voc-r50-c4", "--weights", str(weights),
                                          "--data-root", str(toy_root), "SOLVER.NO_SUCH_KEY", "1"])
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1] == \
        "Error: SOLVER.NO_SUCH_KEY 1: Non-existent key: SOLVER.NO_SUCH_KEY"


def test_an_integer_for_a_float_setting_is_taken_and_a_bad_pair_is_named_alone():
    # yacs refused SOLVER.BASE_LR 1 ("Type mismatch ... int"), and the error repeated every pair given
    cfg = load_config("voc-r50-c4", ["SOLVER.MAX_ITER", "10", "SOLVER.BASE_LR", "1"])
    assert cfg.SOLVER.BASE_LR == 1.0 and isinstance(cfg.SOLVER.BASE_LR, float) and cfg.SOLVER.MAX_ITER == 10
    with pytest.raises(InputError, match=r"^SOLVER.BASE_LR abc: Type mismatch"):
        load_config("voc-r50-c4", ["SOLVER.MAX_ITER", "10", "SOLVER.BASE_LR", "abc"])


@pytest.mark.parametrize("opts,message", [
    (["SOLVER.MAX_ITER", "-5"], "SOLVER.MAX_ITER -5: must be at least 1"),  # Detectron2: ValueError traceback
    (["SOLVER.CHECKPOINT_PERIOD", "0"], "SOLVER.CHECKPOINT_PERIOD 0: must be at least 1"),  # ZeroDivisionError
    (["MODEL.ROI_HEADS.NUM_CLASSES", "5"], "MODEL.ROI_HEADS.NUM_CLASSES 5: VOC has 20 classes"),  # IndexError
    (["SOLVER.BASE_LR", "-1"], "SOLVER.BASE_LR -1: must be a positive number"),
])
def test_absurd_settings_are_one_line_errors_before_anything_is_written(tmp_path, r50, toy_root, opts, message):
    _, weights = r50
    result = CliRunner().invoke(simsiam, ["detect", "train", "--config", "voc-r50-c4", "--weights", str(weights),
                                          "--data-root", str(toy_root), "--out", str(tmp_path / "out"), *opts])
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1] == f"Error: {message}", result.output
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_fit_the_configs_model_are_refused(tmp_path, toy_root):
    """Detectron2 itself would only warn tensor by tensor and run a mostly random network."""
    with torch.device("meta"):
        resnet = build_resnet("resnet18")
    torch.save({k: torch.zeros(v.shape) for k, v in resnet.state_dict().items()}, tmp_path / "r18.pth")
    r18 = str(write_detectron2_pickle(convert_checkpoint(tmp_path / "r18.pth"), tmp_path / "r18.pkl"))
    out = str(tmp_path / "out")
    with pytest.raises(InputError, match="in the weights, .* in the model and .*a resnet18 needs MODEL.RESNETS.DEPTH 18 "
                                         "MODEL.RESNETS.RES2_OUT_CHANNELS 64 and an FPN config"):
        plan_detection("voc-r50-c4", r18, str(toy_root), out)
    # the depth alone is not enough for the C4 head's res5, which is built of bottleneck blocks
    with pytest.raises(InputError, match="roi_heads.res5.0.conv1.weight is .* in the weights"):
        plan_detection("voc-r50-c4", r18, str(toy_root), out,
                       opts=["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"])
    with pytest.raises(InputError, match="cannot be built by Detectron2 .*RES2_OUT_CHANNELS = 64 for R18/R34"):
        plan_detection("voc-r50-fpn", r18, str(toy_root), out, opts=["MODEL.RESNETS.DEPTH", "18"])
    r18_fpn = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
    plan = plan_detection("voc-r50-fpn", r18, str(toy_root), out, opts=r18_fpn)
    assert "DEPTH: 18" in plan.run.config_yaml
    # a detector evaluated under another config than its own (R18-FPN's model under plain voc-r50-fpn)
    from detectron2.modeling import build_model

    cfg = load_config("voc-r50-fpn", [*r18_fpn, "MODEL.DEVICE", "cpu"])
    torch.save({"model": build_model(cfg).state_dict()}, tmp_path / "model_final.pth")
    detector = str(tmp_path / "model_final.pth")
    with pytest.raises(InputError, match="in the weights, .* in the model .*train_config.yaml"):
        plan_detection("voc-r50-fpn", detector, str(toy_root), out, eval_only=True)
    assert plan_detection("voc-r50-fpn", detector, str(toy_root), out, opts=r18_fpn, eval_only=True).run.eval_only
    # a backbone alone evaluates nothing: its heads would be random
    with pytest.raises(InputError, match="is not in the weights and .*train one from it first"):
        plan_detection("voc-r50-fpn", r18, str(toy_root), out, opts=r18_fpn, eval_only=True)
    assert not (tmp_path / "out").exists()


# Tiny images, 2 iterations, few proposals: a CPU run of the whole path in about a minute.
CPU_TOY = ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)", "SOLVER.WARMUP_ITERS", "1",
           "INPUT.MIN_SIZE_TRAIN", "(48,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "48",
           "INPUT.MAX_SIZE_TEST", "64", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
           "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16", "MODEL.RPN.PRE_NMS_TOPK_TEST", "100",
           "MODEL.RPN.POST_NMS_TOPK_TEST", "10", "TEST.PRECISE_BN.NUM_ITER", "1", "DATALOADER.NUM_WORKERS", "0"]


@pytest.mark.slow
def test_detect_train_then_eval_on_the_toy_voc_set_on_cpu(tmp_path, r50, toy_root):
    _, weights = r50
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(simsiam, ["detect", "train", "--config", "voc-r50-c4", "--weights", str(weights),
                                     "--data-root", str(toy_root), "--out", str(out), *CPU_TOY],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output[-3000:]
    assert "MODEL.RESNETS.NORM: naiveSyncBN -> BN" in result.output
    assert (out / "model_final.pth").is_file() and (out / "config.yaml").is_file()
    trained = json.loads((out / "eval_results.json").read_text())
    assert set(trained["voc_2007_test"]["bbox"]) == {"AP", "AP50", "AP75"}
    assert "voc_2007_test bbox: AP " in result.output

    again = runner.invoke(simsiam, ["detect", "train", "--config", "voc-r50-c4", "--weights", str(weights),
                                    "--data-root", str(toy_root), "--out", str(out), *CPU_TOY])
    assert again.exit_code == 2 and "already holds a training run" in again.output

    # a resume keeps the run's settings: the shipped defaults instead of its overrides are refused
    assert (out / "train_config.yaml").is_file()
    changed = runner.invoke(simsiam, ["detect", "train", "--config", "voc-r50-c4", "--data-root", str(toy_root),
                                      "--out", str(out), "--resume", *CPU_TOY[:-4]])
    assert changed.exit_code == 2, changed.output[-3000:]
    assert f"--resume: the run in {out} was started with other settings" in changed.output
    assert "(TEST.PRECISE_BN.NUM_ITER: 1 -> 200); give the" in changed.output  # the only change: workers may
    assert "train_config.yaml" in changed.output
    # the same settings, trained longer: accepted
    longer = [*CPU_TOY[:3], "4", *CPU_TOY[4:-1], "2"]
    plan = plan_detection("voc-r50-c4", None, str(toy_root), str(out), opts=longer, resume=True)
    assert plan.run.resume and "MAX_ITER: 4" in plan.run.config_yaml
    # a run of an earlier version (no train_config.yaml) resumes unchecked, and says so
    (out / "train_config.yaml").unlink()
    unchecked = plan_detection("voc-r50-c4", None, str(toy_root), str(out), opts=CPU_TOY[:-4], resume=True)
    assert any("holds no train_config.yaml, so the settings were not checked" in n for n in unchecked.notes)

    evaluated = runner.invoke(simsiam, ["detect", "eval", "--config", "voc-r50-c4", "--weights",
                                        str(out / "model_final.pth"), "--data-root", str(toy_root),
                                        "--out", str(tmp_path / "eval"), *CPU_TOY], catch_exceptions=False)
    assert evaluated.exit_code == 0, evaluated.output[-3000:]
    line = next(l for l in evaluated.output.splitlines() if l.startswith("voc_2007_test bbox:"))
    numbers = dict(zip(line.split()[2::2], map(float, line.split()[3::2])))
    assert set(numbers) == {"AP", "AP50", "AP75"} and all(0 <= v <= 100 for v in numbers.values())
    # the same weights give the same numbers as the evaluation at the end of training
    assert numbers["AP50"] == pytest.approx(trained["voc_2007_test"]["bbox"]["AP50"], abs=0.01)


@pytest.mark.slow
def test_a_diverged_run_is_one_line_and_its_traceback_goes_to_the_log_file(tmp_path, r50, toy_root):
    _, weights = r50
    out = tmp_path / "run"
    result = CliRunner().invoke(simsiam, ["detect", "train", "--config", "voc-r50-c4", "--weights", str(weights),
                                          "--data-root", str(toy_root), "--out", str(out), *CPU_TOY,
                                          "SOLVER.BASE_LR", "1e30"])
    assert result.exit_code == 2, result.output[-3000:]
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: training diverged at iteration ") and "lower SOLVER.BASE_LR (now 1e+30)" in last
    assert "Traceback" not in result.output
    assert "Traceback" in (out / "log.txt").read_text()  # Detectron2's own record of it, kept


def test_amp_on_a_cpu_and_an_evaluation_into_its_trainings_folder_are_avoided(tmp_path, r50, r50_c4_detector,
                                                                               toy_root, monkeypatch):
    _, weights = r50
    if not torch.cuda.is_available():  # Detectron2's AMPTrainer asserts, after the data is loaded
        with pytest.raises(InputError, match="SOLVER.AMP.ENABLED True: mixed-precision training needs a CUDA GPU"):
            plan_detection("voc-r50-c4", str(weights), str(toy_root), str(tmp_path / "out"),
                           opts=["SOLVER.AMP.ENABLED", "True"])
    # without --out, an evaluation writes its config.yaml and results beside, not over, the training's
    monkeypatch.chdir(tmp_path)
    assert plan_detection("voc-r50-c4", str(weights), str(toy_root)).output_dir == Path("output/voc-r50-c4")
    evaluation = plan_detection("voc-r50-c4", str(r50_c4_detector), str(toy_root), eval_only=True)
    assert evaluation.output_dir == Path("output/voc-r50-c4/eval")


@pytest.mark.parametrize("base", ["voc-r50-fpn", "voc-r50-fpn.yaml"])
def test_a_user_yaml_may_name_a_shipped_config_as_its_base(tmp_path, base):
    user = tmp_path / "mine.yaml"
    user.write_text(f'_BASE_: "{base}"\nSOLVER:\n  BASE_LR: 0.01\n')
    cfg = load_config(str(user))
    shipped = load_config("voc-r50-fpn")
    assert cfg.SOLVER.BASE_LR == 0.01 and shipped.SOLVER.BASE_LR == 0.02
    assert cfg.MODEL.ROI_HEADS.NAME == shipped.MODEL.ROI_HEADS.NAME and cfg.SOLVER.MAX_ITER == shipped.SOLVER.MAX_ITER
    # a file of that name beside the YAML is Detectron2's to read, as before
    (tmp_path / base).write_text('_BASE_: "' + str(CONFIG_DIR / "voc-r50-c4.yaml") + '"\n')
    assert load_config(str(user)).MODEL.ROI_HEADS.NAME == load_config("voc-r50-c4").MODEL.ROI_HEADS.NAME


def test_input_settings_other_than_the_weights_were_trained_with_are_said(tmp_path, r50, toy_root):
    _, weights = r50
    plan = plan_detection("voc-r50-c4", str(weights), str(toy_root), str(tmp_path / "out"))
    assert not any("were trained with" in note for note in plan.notes)  # the shipped configs set them
    plan = plan_detection("voc-r50-c4", str(weights), str(toy_root), str(tmp_path / "out"),
                          opts=["MODEL.RESNETS.STRIDE_IN_1X1", "True", "INPUT.FORMAT", "BGR"])
    said = [note for note in plan.notes if "were trained with" in note]
    assert [note.split(":")[0] for note in said] == ["MODEL.RESNETS.STRIDE_IN_1X1 True", "INPUT.FORMAT BGR"]
    assert "(a torchvision resnet50) were trained with False" in said[0]


def test_only_an_overwrite_clears_and_never_the_runs_own_inputs(tmp_path, r50, toy_root):
    _, weights = r50
    out = str(tmp_path / "out")
    assert not plan_detection("voc-r50-c4", str(weights), str(toy_root), out).clear
    plan = plan_detection("voc-r50-c4", str(weights), str(toy_root), out, overwrite=True)
    assert plan.clear and plan.inputs == (str((CONFIG_DIR / "voc-r50-c4.yaml").resolve()), str(weights.resolve()))
