"""``simsiam detect``: what works without Detectron2 (CI has none): input checks, configs, the toy set.

Every input error is reported before Detectron2 is needed, so these run everywhere; the tests
that need Detectron2 are in test_detectron2.py.
"""

from __future__ import annotations

import ast
import collections
import pickle
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from simsiam.errors import InputError
from transfer.detectron2_config import (CONFIG_DIR, check_classes, check_settings, config_names, set_key,
                                       use_plain_batchnorm)
from transfer.toy_voc import VOC_CLASSES, make_toy_voc
from cli_runner import assert_user_error, run

SHIPPED = ["coco-r50-c4-1x", "coco-r50-c4-2x", "coco-r50-fpn-1x", "voc-r50-c4", "voc-r50-fpn"]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    make_toy_voc(root, train_images=4, test_images=20, width=64, height=48)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A file in the Detectron2 pickle format (contents need not be a whole ResNet for the checks)."""
    path = tmp_path_factory.mktemp("w") / "r50.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}, "__author__": "test",
                     "matching_heuristics": True}, f)
    return path


def test_the_shipped_configs_are_listed_and_their_bases_exist():
    assert config_names() == SHIPPED
    for name in SHIPPED:
        path = CONFIG_DIR / f"{name}.yaml"
        while True:
            data = yaml.safe_load(path.read_text())
            if "_BASE_" not in data:
                break
            path = path.parent / data["_BASE_"]
            assert path.is_file(), path
        assert path.name.startswith("_base-")  # every chain ends in a base with the backbone settings


def shipped_settings(path):
    """A shipped config as flat ``KEY: value`` pairs, its ``_BASE_`` chain merged the way yacs merges
    it (the child wins), without Detectron2; tuples written as strings are read as yacs reads them."""
    data = yaml.safe_load(path.read_text())
    settings = shipped_settings(path.parent / data.pop("_BASE_")) if "_BASE_" in data else {}

    def flatten(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                flatten(value, f"{prefix}{key}.")
            else:
                is_tuple = isinstance(value, str) and value.startswith("(")
                settings[prefix + key] = ast.literal_eval(value) if is_tuple else value

    flatten(data)
    return settings


# The protocol of MoCo's detection configs (DESIGN.md), for every shipped config; the same values
# are checked on Detectron2's merged config in test_detectron2.py where Detectron2 is installed.
BACKBONE_PROTOCOL = {"MODEL.BACKBONE.FREEZE_AT": 0, "MODEL.RESNETS.DEPTH": 50, "MODEL.RESNETS.STRIDE_IN_1X1": False,
                     "MODEL.RESNETS.NORM": "naiveSyncBN", "INPUT.FORMAT": "RGB",
                     "MODEL.PIXEL_MEAN": [123.675, 116.280, 103.530], "MODEL.PIXEL_STD": [58.395, 57.120, 57.375],
                     "TEST.PRECISE_BN.ENABLED": True, "SOLVER.IMS_PER_BATCH": 16, "SOLVER.BASE_LR": 0.02,
                     "INPUT.MIN_SIZE_TEST": 800}
SCHEDULES = {"voc-r50-c4": (24000, (18000, 22000)), "voc-r50-fpn": (24000, (18000, 22000)),
             "coco-r50-c4-1x": (90000, (60000, 80000)), "coco-r50-fpn-1x": (90000, (60000, 80000)),
             "coco-r50-c4-2x": (180000, (120000, 160000))}


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_configs_hold_the_protocol(name):
    settings = shipped_settings(CONFIG_DIR / f"{name}.yaml")
    for key, value in BACKBONE_PROTOCOL.items():
        assert settings[key] == value, key
    assert (settings["SOLVER.MAX_ITER"], settings["SOLVER.STEPS"]) == SCHEDULES[name]
    if name.startswith("voc"):
        assert settings["INPUT.MIN_SIZE_TRAIN"] == tuple(range(480, 801, 32))
        assert settings["DATASETS.TRAIN"] == ("voc_2007_trainval", "voc_2012_trainval")
        assert settings["DATASETS.TEST"] == ("voc_2007_test",) and settings["SOLVER.WARMUP_ITERS"] == 100
        assert settings["MODEL.ROI_HEADS.NUM_CLASSES"] == 20 and settings["MODEL.MASK_ON"] is False
    else:
        assert settings["INPUT.MIN_SIZE_TRAIN"] == tuple(range(640, 801, 32))
        assert settings["DATASETS.TRAIN"] == ("coco_2017_train",) and settings["DATASETS.TEST"] == ("coco_2017_val",)
        assert settings["MODEL.MASK_ON"] is True
    if "-c4" in name:
        assert settings["MODEL.ROI_HEADS.NAME"] == "Res5ROIHeadsExtraNorm"
        assert (settings["MODEL.RPN.PRE_NMS_TOPK_TEST"], settings["MODEL.RPN.POST_NMS_TOPK_TEST"]) == (6000, 1000)


def test_synchronised_norms_become_plain_bn_in_one_process_and_say_so():
    # a user's config, as the nested mapping yacs' CfgNode is (a dict subclass)
    cfg = {"MODEL": {"RESNETS": {"NORM": "SyncBN"}, "FPN": {"NORM": "naiveSyncBN"},
                     "ROI_BOX_HEAD": {"NORM": ""}, "ROI_MASK_HEAD": {"NORM": "GN"}}}
    changes = use_plain_batchnorm(cfg)
    assert changes == ["MODEL.RESNETS.NORM: SyncBN -> BN (one process: nothing to synchronise)",
                       "MODEL.FPN.NORM: naiveSyncBN -> BN (one process: nothing to synchronise)"]
    assert cfg["MODEL"] == {"RESNETS": {"NORM": "BN"}, "FPN": {"NORM": "BN"}, "ROI_BOX_HEAD": {"NORM": ""},
                            "ROI_MASK_HEAD": {"NORM": "GN"}}
    assert use_plain_batchnorm({"MODEL": {"RESNETS": {"NORM": "BN"}}}) == []  # keys it lacks are fine


def test_unknown_config_lists_the_valid_ones(tmp_path, weights, toy_root):
    result = run("detect", "train", "--config", "voc-r50-c5", "--weights", weights, "--data-root", toy_root)
    assert_user_error(result, "voc-r50-c5", "unknown config", ", ".join(SHIPPED))
    result = run("detect", "eval", "--config", tmp_path / "mine.yaml", "--weights", weights, "--data-root", toy_root)
    assert_user_error(result, "mine.yaml", "no such YAML file")


def test_weights_missing_or_not_a_detectron2_pickle(tmp_path, toy_root):
    base = ["detect", "train", "--config", "voc-r50-c4", "--data-root", toy_root, "--out", tmp_path / "out"]
    assert_user_error(run(*base, "--weights", tmp_path / "none.pkl"), "none.pkl", "no such file")
    (tmp_path / "text.pkl").write_text("hello")
    assert_user_error(run(*base, "--weights", tmp_path / "text.pkl"), "text.pkl", "not a Detectron2 pickle")
    with open(tmp_path / "counter.pkl", "wb") as f:  # a pickle that would build an arbitrary object
        pickle.dump({"model": collections.Counter("abc")}, f)
    assert_user_error(run(*base, "--weights", tmp_path / "counter.pkl"), "not a Detectron2 pickle",
                      "collections.Counter")
    with open(tmp_path / "strings.pkl", "wb") as f:
        pickle.dump({"model": {"a": "b"}}, f)
    assert_user_error(run(*base, "--weights", tmp_path / "strings.pkl"), "not a Detectron2 pickle")
    torch.save({"state_dict": {"module.encoder.conv1.weight": torch.zeros(1)}}, tmp_path / "simsiam.pth.tar")
    assert_user_error(run(*base, "--weights", tmp_path / "simsiam.pth.tar"), "convert it first")
    # torch.save's legacy format is a PyTorch checkpoint too (Detectron2 would load it): not "neither"
    torch.save({"state_dict": {"module.encoder.conv1.weight": torch.zeros(1)}}, tmp_path / "legacy.pth.tar",
               _use_new_zipfile_serialization=False)
    assert_user_error(run(*base, "--weights", tmp_path / "legacy.pth.tar"), "legacy.pth.tar: a SimSiam/MoCo/torchvision "
                      "checkpoint, not Detectron2 weights; convert it first")
    with open(tmp_path / "converted.pth", "wb") as f:  # Detectron2 reads a pickle only under a .pkl name
        pickle.dump({"model": {"stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}, "__author__": "x"}, f)
    assert_user_error(run(*base, "--weights", tmp_path / "converted.pth"), "converted.pth: a Detectron2 pickle not "
                      "named *.pkl", "rename it")
    assert_user_error(run("convert-d2", tmp_path / "converted.pth", "--out", tmp_path / "again.pkl"),
                      "converted.pth: already Detectron2 weights", "rename it to end in .pkl")
    (tmp_path / "odd.pth").write_bytes(b"\x80\x04\x8e" + b"\xff" * 7 + b"\x7f")  # a pickle asking for 2^63 bytes
    assert_user_error(run(*base, "--weights", tmp_path / "odd.pth"), "odd.pth: neither a Detectron2 .pkl nor a "
                      "PyTorch checkpoint")
    assert_user_error(run("convert-d2", tmp_path / "odd.pth", "--out", tmp_path / "again.pkl"), "odd.pth: not a")
    (tmp_path / "model.pth").write_bytes(b"\0" * 64)
    assert_user_error(run(*base, "--weights", tmp_path / "model.pth"), "model.pth", "neither")
    missing = run("detect", "eval", "--config", "voc-r50-c4", "--data-root", toy_root)
    assert missing.exit_code == 2 and "Missing option '--weights'" in missing.output  # click's usage error
    stopped = tmp_path / "stopped"  # a run stopped before its end: checkpoints, no model_final.pth
    stopped.mkdir()
    for name in ("model_0000999.pth", "model_0001999.pth"):
        (stopped / name).write_bytes(b"")
    evaluate = ["detect", "eval", "--config", "voc-r50-c4", "--data-root", toy_root, "--out", tmp_path / "out"]
    assert_user_error(run(*evaluate, "--weights", stopped / "model_final.pth"), "model_final.pth: no such file (the run "
                      "there did not finish; its newest checkpoint is model_0001999.pth)")
    assert_user_error(run(*evaluate, "--weights", stopped), "stopped: is a folder; give a file in it")
    assert not (tmp_path / "out").exists()


def test_data_root_without_voc_or_coco_folders(tmp_path, weights):
    base = ["detect", "train", "--config", "voc-r50-c4", "--weights", weights, "--out", tmp_path / "out"]
    assert_user_error(run(*base, "--data-root", tmp_path / "nowhere"), "nowhere", "no such folder")
    (tmp_path / "empty").mkdir()
    assert_user_error(run(*base, "--data-root", tmp_path / "empty"), "empty", "neither VOC", "VOCdevkit/VOC2007",
                      "train2017/")
    assert not (tmp_path / "out").exists()


def test_the_library_takes_paths_as_paths(tmp_path, weights):
    """plan_detection(Path(...)) raised AttributeError, check_detectron2_weights(Path) a TypeError."""
    from simsiam.errors import InputError
    from transfer.detection import plan_detection
    from transfer.detectron2_weights import check_detectron2_weights

    assert check_detectron2_weights(weights) == check_detectron2_weights(str(weights))
    (tmp_path / "empty").mkdir()
    for config in (Path("voc-r50-c4"), "voc-r50-c4"):
        with pytest.raises(InputError, match="empty: holds neither VOC"):
            plan_detection(config, weights, tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_without_detectron2_a_clear_message_with_the_install_command(tmp_path, weights, toy_root, monkeypatch):
    monkeypatch.setitem(sys.modules, "detectron2", None)  # "import detectron2" now fails, installed or not
    result = run("detect", "train", "--config", "voc-r50-c4", "--weights", weights, "--data-root", toy_root,
                 "--out", tmp_path / "out")
    assert_user_error(result, "Detectron2 is not installed", "pip install --no-build-isolation",
                      "git+https://github.com/facebookresearch/detectron2.git", "setuptools<81")
    assert not (tmp_path / "out").exists()


def test_negative_override_values_reach_the_config_and_misspelt_options_stay_errors(tmp_path, weights, toy_root,
                                                                                       monkeypatch):
    monkeypatch.setitem(sys.modules, "detectron2", None)  # the overrides pass click; Detectron2's absence is next
    base = ["detect", "train", "--config", "voc-r50-c4", "--weights", weights, "--data-root", toy_root]
    # click took "-5" for an option: "No such option '-5'"
    assert_user_error(run(*base, "SOLVER.MAX_ITER", "-5"), "Detectron2 is not installed")
    # click's own words, which its versions quote differently ("No such option: -x", "... '-x'.")
    assert_user_error(run(*base, "--weigths", weights), "No such option", "--weigths", "Did you mean", "--weights")
    assert_user_error(run(*base, "SOLVER.MAX_ITER", "3", "--bogus"), "No such option", "--bogus")
    assert_user_error(run("detect", "eval", *base[2:], "-x", "1"), "No such option", "-x")


class Node(dict):
    """A stand-in for Detectron2's CfgNode (a dict whose keys read as attributes), for the checks
    that need no Detectron2."""

    def __getattr__(self, name):
        return self[name]


def toy_settings(**changes):
    cfg = Node(SOLVER=Node(MAX_ITER=20, IMS_PER_BATCH=2, STEPS=(15,), WARMUP_ITERS=5, CHECKPOINT_PERIOD=5000,
                           BASE_LR=0.02, GAMMA=0.1),
               TEST=Node(EVAL_PERIOD=0, PRECISE_BN=Node(ENABLED=True, NUM_ITER=5)),
               INPUT=Node(MIN_SIZE_TRAIN=(120,), MAX_SIZE_TRAIN=200, MIN_SIZE_TEST=120, MAX_SIZE_TEST=200),
               MODEL=Node(DEVICE="cuda", RPN=Node(BATCH_SIZE_PER_IMAGE=256),
                          ROI_HEADS=Node(BATCH_SIZE_PER_IMAGE=32, NUM_CLASSES=20)),
               DATALOADER=Node(NUM_WORKERS=0))
    for key, value in changes.items():
        set_key(cfg, key.replace("__", "."), value)
    return cfg


@pytest.mark.parametrize("key,value,message", [
    # each failed mid-run with a traceback (ValueError, AssertionError, ZeroDivisionError, IndexError)
    ("SOLVER.MAX_ITER", -5, "SOLVER.MAX_ITER -5: must be at least 1"),
    ("SOLVER.IMS_PER_BATCH", 0, "SOLVER.IMS_PER_BATCH 0: must be at least 1"),
    ("SOLVER.STEPS", (10, -1), "SOLVER.STEPS (10, -1): must be at least 1"),
    ("SOLVER.CHECKPOINT_PERIOD", 0, "SOLVER.CHECKPOINT_PERIOD 0: must be at least 1"),
    ("SOLVER.CHECKPOINT_PERIOD", -1, "must be at least 1"),  # saved every iteration
    ("SOLVER.WARMUP_ITERS", -3, "SOLVER.WARMUP_ITERS -3: must be at least 0"),
    ("SOLVER.BASE_LR", 0.0, "SOLVER.BASE_LR 0: must be a positive number"),
    ("SOLVER.BASE_LR", float("nan"), "SOLVER.BASE_LR nan: must be a positive number"),
    ("SOLVER.GAMMA", -1.0, "SOLVER.GAMMA -1: must be a positive number"),
    ("TEST.EVAL_PERIOD", -1, "TEST.EVAL_PERIOD -1: must be at least 0"),
    ("INPUT.MIN_SIZE_TRAIN", (0, -3), "INPUT.MIN_SIZE_TRAIN (0, -3): must be at least 0"),
    ("INPUT.MAX_SIZE_TRAIN", 0, "INPUT.MAX_SIZE_TRAIN 0: must be at least 1"),
    ("INPUT.MAX_SIZE_TEST", -1, "INPUT.MAX_SIZE_TEST -1: must be at least 1"),
    ("DATALOADER.NUM_WORKERS", -1, "DATALOADER.NUM_WORKERS -1: must be at least 0"),
    ("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 0, "must be at least 1"),
    ("TEST.PRECISE_BN.NUM_ITER", 0, "TEST.PRECISE_BN.NUM_ITER 0: must be at least 1; TEST.PRECISE_BN.ENABLED False"),
    ("MODEL.DEVICE", "tpu", "MODEL.DEVICE tpu: must be cpu, cuda or cuda:N"),
])
def test_settings_detectron2_would_fail_on_mid_run_are_refused_naming_the_key(key, value, message):
    check_settings(toy_settings())  # the toy settings themselves pass
    with pytest.raises(InputError) as err:
        check_settings(toy_settings(**{key.replace(".", "__"): value}))
    assert str(err.value).startswith(f"{key} ") and message in str(err.value)


def test_settings_that_mean_something_at_zero_pass_and_evaluation_checks_its_own():
    # 0: no resize (INPUT.MIN_SIZE_*), evaluation at the end only, no warmup
    check_settings(toy_settings(INPUT__MIN_SIZE_TRAIN=(0,), INPUT__MIN_SIZE_TEST=0, TEST__EVAL_PERIOD=0,
                                SOLVER__WARMUP_ITERS=0, MODEL__DEVICE="cuda:1"))
    check_settings(toy_settings(TEST__PRECISE_BN__ENABLED=False, TEST__PRECISE_BN__NUM_ITER=0))
    check_settings(toy_settings(SOLVER__MAX_ITER=0, SOLVER__BASE_LR=0.0), eval_only=True)  # not used to evaluate
    with pytest.raises(InputError, match="INPUT.MAX_SIZE_TEST 0"):
        check_settings(toy_settings(INPUT__MAX_SIZE_TEST=0), eval_only=True)


def test_the_box_head_must_predict_the_datasets_classes():
    check_classes(toy_settings(), ["voc", "voc"])
    with pytest.raises(InputError, match=r"^MODEL.ROI_HEADS.NUM_CLASSES 5: VOC has 20 classes$"):
        check_classes(toy_settings(MODEL__ROI_HEADS__NUM_CLASSES=5), ["voc"])
    with pytest.raises(InputError, match="COCO has 80 classes"):
        check_classes(toy_settings(), ["coco"])


def test_help_works_without_detectron2(monkeypatch):
    monkeypatch.setitem(sys.modules, "detectron2", None)
    for command in ("train", "eval", "make-toy-voc"):
        result = run("detect", command, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output
    # no command: the group's help, as plain `simsiam` shows its own (click 8.2+ exits 2, 8.1 exits 0);
    # it was the whole help as one "Error:" line with a "(see: ...)" hint glued to its last line
    result = run("detect")
    assert result.exit_code in (0, 2) and result.output.startswith("Usage: simsiam detect")
    assert "Error:" not in result.output and "(see:" not in result.output


def test_make_toy_voc_writes_a_voc_dataset(tmp_path):
    result = run("detect", "make-toy-voc", tmp_path / "toy", "--train-images", "6", "--test-images", "20",
                 "--size", "80", "60")
    assert result.exit_code == 0, result.output
    assert "simsiam detect train --config voc-r50-c4" in result.output
    counts = {("VOC2007", "trainval"): 6, ("VOC2007", "test"): 20, ("VOC2012", "trainval"): 3}
    for (year, split), count in counts.items():
        folder = tmp_path / "toy" / "VOCdevkit" / year
        ids = (folder / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        assert len(ids) == count
        names = set()
        for file_id in ids:
            assert (folder / "JPEGImages" / f"{file_id}.jpg").is_file()
            tree = ET.parse(folder / "Annotations" / f"{file_id}.xml")
            width, height = int(tree.find("size/width").text), int(tree.find("size/height").text)
            assert (width, height) == (80, 60)
            objects = tree.findall("object")
            assert 1 <= len(objects) <= 3
            for obj in objects:
                names.add(obj.find("name").text)
                assert obj.find("difficult").text == "0"
                x0, y0, x1, y1 = (int(obj.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax"))
                assert 1 <= x0 < x1 <= width and 1 <= y0 < y1 <= height  # VOC: 1-based, inclusive
        assert names <= set(VOC_CLASSES)
        if split == "test":
            assert names == set(VOC_CLASSES)  # each class has ground truth, so every per-class AP is defined
    assert [p.name for p in (tmp_path / "toy").iterdir()] == ["VOCdevkit"]  # no staging folder left


def test_make_toy_voc_errors(tmp_path):
    make_toy_voc(tmp_path, train_images=1, test_images=20, width=40, height=40)
    assert_user_error(run("detect", "make-toy-voc", tmp_path), "already holds a VOCdevkit folder; remove "
                      f"{tmp_path / 'VOCdevkit'} or give another ROOT")
    # a file in the way: named, with what to do (mkdir said just "File exists" / "Not a directory")
    (tmp_path / "afile").touch()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "VOCdevkit").touch()
    assert_user_error(run("detect", "make-toy-voc", tmp_path / "afile"),
                      f"{tmp_path / 'afile'}: a file, not a folder; give ROOT a folder to write VOCdevkit in")
    assert_user_error(run("detect", "make-toy-voc", tmp_path / "afile" / "sub"),
                      f"{tmp_path / 'afile'} is a file, not a folder; give ROOT a folder")
    assert_user_error(run("detect", "make-toy-voc", tmp_path / "d"),
                      f"already holds a VOCdevkit file; remove {tmp_path / 'd' / 'VOCdevkit'} or give another ROOT")
    assert_user_error(run("detect", "make-toy-voc", tmp_path / "b", "--test-images", "5"), "--test-images 5")
    assert_user_error(run("detect", "make-toy-voc", tmp_path / "c", "--size", "8", "8"), "must be from 32 to 4096")
    # numpy's generator takes no negative seed: was a traceback (exit 1), and an empty folder left
    assert_user_error(run("detect", "make-toy-voc", tmp_path / "s", "--seed", "-1"), "--seed -1: must be from 0 to")
    assert not (tmp_path / "s").exists()
    # was a run until stopped, writing images
    assert_user_error(run("detect", "make-toy-voc", tmp_path / "c", "--train-images", str(10**8)),
                      f"--train-images {10**8} / --test-images 20: at most 20,000 each")
    assert_user_error(run("detect", "make-toy-voc", tmp_path / "c", "--test-images", "20001"), "at most 20,000 each")
    huge = str(10**20)  # was PIL's 'Maximum allowed dimension exceeded' traceback, after making ROOT
    assert_user_error(run("detect", "make-toy-voc", tmp_path / "c", "--size", huge, huge),
                      f"--size {huge}x{huge}: width and height must be from 32 to 4096")
    assert not (tmp_path / "c").exists()


def test_a_resume_may_change_the_length_saving_and_device_of_a_run_and_nothing_else():
    from transfer.detection import changed_settings

    saved = {"MODEL": {"WEIGHTS": "r50.pkl", "DEVICE": "cuda", "RESNETS": {"NORM": "SyncBN", "DEPTH": 50}},
             "SOLVER": {"IMS_PER_BATCH": 16, "MAX_ITER": 24000, "STEPS": [18000, 22000]}, "OUTPUT_DIR": "runs/voc"}
    resumed = {"MODEL": {"WEIGHTS": "", "DEVICE": "cpu", "RESNETS": {"NORM": "SyncBN", "DEPTH": 50}},
               "SOLVER": {"IMS_PER_BATCH": 16, "MAX_ITER": 30000, "STEPS": [18000, 22000]}, "OUTPUT_DIR": "runs/voc"}
    assert changed_settings(saved, resumed) == []
    resumed["MODEL"]["RESNETS"]["NORM"] = "BN"  # one GPU instead of eight
    resumed["SOLVER"]["IMS_PER_BATCH"] = 2
    resumed["SOLVER"]["STEPS"] = [144000, 176000]
    resumed["TEST"] = {"AUG": {"ENABLED": True}}  # a key the saved run did not have
    assert changed_settings(saved, resumed) == ["MODEL.RESNETS.NORM: SyncBN -> BN", "SOLVER.IMS_PER_BATCH: 16 -> 2",
                                                "SOLVER.STEPS: [18000, 22000] -> [144000, 176000]",
                                                "TEST: None -> {'AUG': {'ENABLED': True}}"]


def test_a_resume_with_other_settings_is_refused_naming_the_first_changes(tmp_path):
    import types

    import yaml

    from simsiam.errors import InputError
    from transfer.detection import TRAIN_CONFIG_FILE, _check_resume

    saved = {"MODEL": {"WEIGHTS": "r50.pkl", "RESNETS": {"NORM": "SyncBN"}}, "SEED": 1,
             "SOLVER": {"IMS_PER_BATCH": 16, "BASE_LR": 0.02, "MAX_ITER": 24000}}
    (tmp_path / TRAIN_CONFIG_FILE).write_text(yaml.safe_dump(saved))
    longer = {**saved, "SOLVER": {**saved["SOLVER"], "MAX_ITER": 30000}}
    _check_resume(tmp_path, types.SimpleNamespace(dump=lambda: yaml.safe_dump(longer)))  # accepted
    other = {"MODEL": {"WEIGHTS": "", "RESNETS": {"NORM": "BN"}}, "SEED": 2,
             "SOLVER": {"IMS_PER_BATCH": 2, "BASE_LR": 0.0025, "MAX_ITER": 24000}}
    with pytest.raises(InputError) as refused:
        _check_resume(tmp_path, types.SimpleNamespace(dump=lambda: yaml.safe_dump(other)))
    assert str(refused.value) == (
        f"--resume: the run in {tmp_path} was started with other settings (MODEL.RESNETS.NORM: SyncBN -> BN; "
        "SEED: 1 -> 2; SOLVER.BASE_LR: 0.02 -> 0.0025 and 1 more); give the --config, --num-gpus, --num-machines, "
        f"--scale-schedule and KEY VALUE pairs it was started with (they are in {tmp_path / TRAIN_CONFIG_FILE})")


@pytest.mark.parametrize("clear", [False, True])
def test_overwrite_clears_the_earlier_runs_files_and_only_those(tmp_path, monkeypatch, clear):
    """--overwrite: Detectron2 appends to metrics.json, and a later --resume would follow last_checkpoint
    to the old run's model. Nothing goes without it, nor the run's own --config and --weights."""
    import types

    from transfer.detection import DetectionPlan, DetectionRun, run_detection

    out = tmp_path / "run"
    (out / "inference").mkdir(parents=True)
    old = ["last_checkpoint", "model_0000019.pth", "metrics.json", "log.txt", "events.out.tfevents.1.host",
           "inference/coco_instances_results.json", "eval_results.json", "train_config.yaml"]
    inputs = ["config.yaml", "model_final.pth"]  # the user's YAML and the detector to fine-tune, under run names
    for name in old + inputs + ["notes.txt", "my_model.pth"]:  # and two files of the user's
        (out / name).write_text("old")
    launched = []
    monkeypatch.setitem(sys.modules, "detectron2.engine", types.SimpleNamespace(launch=lambda *a, **k: launched.append(a)))
    monkeypatch.setitem(sys.modules, "transfer.detectron2_trainer", types.SimpleNamespace(detection_worker=None))
    plan = DetectionPlan(DetectionRun(str(out / "config.yaml"), "SEED: 1\n", [], eval_only=False, resume=False), out,
                         1, 1, 1, clear=clear, inputs=tuple(str((out / name).resolve()) for name in inputs))
    assert run_detection(plan) is None and launched
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    if clear:
        assert left == ["config.yaml", "model_final.pth", "my_model.pth", "notes.txt", "train_config.yaml"]
    else:
        assert set(left) == set(old + inputs) - {"eval_results.json"} | {"notes.txt", "my_model.pth"}
    assert (out / "train_config.yaml").read_text() == "SEED: 1\n" and (out / "config.yaml").read_text() == "old"


def test_a_voc_split_that_is_empty_or_names_missing_files_is_refused_naming_them(tmp_path):
    from transfer.detection_datasets import locate_dataset

    make_toy_voc(tmp_path, train_images=4, test_images=20, width=40, height=32)
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    assert locate_dataset(tmp_path, "voc_2007_test").split == "test"
    first = (voc / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
    (voc / "JPEGImages" / f"{first}.jpg").unlink()  # Detectron2: a FileNotFoundError in a loader worker, unnamed
    with pytest.raises(InputError, match=f"voc_2007_test lists {first} .*, but VOCdevkit/VOC2007/JPEGImages/"
                                         f"{first}.jpg is missing$"):
        locate_dataset(tmp_path, "voc_2007_test")
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("\n")  # Detectron2: an AssertionError
    with pytest.raises(InputError, match="ImageSets/Main/trainval.txt lists no images, so voc_2007_trainval is empty"):
        locate_dataset(tmp_path, "voc_2007_trainval")
    (voc / "ImageSets" / "Main" / "trainval.txt").write_bytes(b"\xff\xfe000001\n")  # not text
    with pytest.raises(InputError, match="cannot read VOCdevkit/VOC2007/ImageSets/Main/trainval.txt"):
        locate_dataset(tmp_path, "voc_2007_trainval")


def test_weights_and_output_given_as_overrides_are_refused_not_replaced(tmp_path, weights, toy_root):
    base = ["detect", "train", "--config", "voc-r50-c4", "--weights", weights, "--data-root", toy_root,
            "--out", tmp_path / "out"]
    assert_user_error(run(*base, "MODEL.WEIGHTS", "other.pkl"), "MODEL.WEIGHTS: give it as --weights")
    assert_user_error(run(*base, "OUTPUT_DIR", "/tmp/x"), "OUTPUT_DIR: give it as --out")
    assert not (tmp_path / "out").exists()


def test_a_resume_whose_last_checkpoint_is_gone_or_cut_short_is_refused(tmp_path):
    from transfer.detection import _check_last_checkpoint

    (tmp_path / "last_checkpoint").write_text("model_0000003.pth")
    with pytest.raises(InputError, match="last_checkpoint names model_0000003.pth, which is not there"):
        _check_last_checkpoint(tmp_path)
    torch.save({"model": {"w": torch.zeros(100)}}, tmp_path / "model_0000003.pth")
    _check_last_checkpoint(tmp_path)
    data = (tmp_path / "model_0000003.pth").read_bytes()
    (tmp_path / "model_0000003.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="model_0000003.pth \\(named by last_checkpoint\\) is cut short"):
        _check_last_checkpoint(tmp_path)


@pytest.mark.parametrize("subcommand", ["train", "eval"])
def test_the_output_folder_is_out_as_in_every_command_and_output_still_works(tmp_path, weights, toy_root,
                                                                              monkeypatch, subcommand):
    """detect said --output where every other command says --out; what a script wrote before still runs."""
    import transfer.detection

    def plan_detection(config, weights, data_root, output, *args, **kwargs):
        raise InputError(f"planned into {output}")

    monkeypatch.setattr(transfer.detection, "plan_detection", plan_detection)
    base = ["detect", subcommand, "--config", "voc-r50-c4", "--weights", weights, "--data-root", toy_root]
    for spelling in ("--out", "--output"):
        assert_user_error(run(*base, spelling, tmp_path / spelling), f"planned into {tmp_path / spelling}")
    assert "--out, --output PATH" in run("detect", subcommand, "--help").output
