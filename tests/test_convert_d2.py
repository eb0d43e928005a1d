"""``simsiam convert-d2``: names and shapes exactly as a real Detectron2 build has them; every error.

The reference is ``fixtures/detectron2-resnet-parameters.json``: the parameter names and shapes of
Detectron2's R50-C4, R50-FPN, R101-C4 and R18-FPN backbones, read from ``build_model(cfg)`` of a
real Detectron2 (a copy of ``../shared/fixtures``). Needs no Detectron2.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from simsiam.backbones import build_resnet
from simsiam.checkpoint import to_official_layout
from simsiam.errors import InputError
from simsiam.model import SimSiam
from transfer import detectron2_weights
from transfer import detectron2_fit
from transfer.detectron2_fit import check_weights_fit, match_names, misfits
from transfer.detectron2_weights import WeightsFile, convert_checkpoint, detectron2_name
from cli_runner import assert_user_error, run

FIXTURE = Path(__file__).parent / "fixtures" / "detectron2-resnet-parameters.json"


def detectron2_reference(model: str) -> dict[str, tuple[int, ...]]:
    models = json.loads(FIXTURE.read_text())["models"]
    [key] = [k for k in models if k.startswith(model + " ")]
    return {name: tuple(shape) for name, shape in models[key].items()}


def random_state(module_on_meta: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A state dict of the module's names and shapes with random values (building the real model is slow)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in module_on_meta.state_dict().items():
        if tensor.dtype.is_floating_point:
            state[name] = torch.randn(tensor.shape, generator=generator)
        else:
            state[name] = torch.randint(0, 1000, tensor.shape, generator=generator, dtype=tensor.dtype)
    return state


@pytest.fixture(scope="module")
def official_r50(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A ResNet-50 SimSiam checkpoint in the official layout (``module.encoder.*``, ``module.predictor.*``)."""
    with torch.device("meta"):
        model = SimSiam(build_resnet("resnet50", num_classes=2048), 2048, 512)
    state = to_official_layout(random_state(model, seed=0))
    path = tmp_path_factory.mktemp("r50") / "checkpoint_0099.pth.tar"
    torch.save({"epoch": 100, "arch": "resnet50", "state_dict": state, "optimizer": {}}, path)
    return path, state


def assert_loads_exactly(converted: dict[str, np.ndarray], reference: dict[str, tuple[int, ...]]) -> None:
    """Paired as Detectron2 pairs names (``match_names``: each model parameter takes the checkpoint name
    that is its longest dot-separated suffix): the prefix-free names we write reach ``backbone.res4.*``
    (C4), ``backbone.bottom_up.res4.*`` (FPN) and, for C4, ``roi_heads.res5.*`` from our ``res5.*``."""
    matches = match_names(list(reference), list(converted), heuristics=True)
    assert set(matches) == set(reference), f"not matched: {sorted(set(reference) - set(matches))[:5]}"
    # one to one: every converted tensor lands in exactly one parameter, none is left over
    assert sorted(matches.values()) == sorted(converted)
    for model_name, checkpoint_name in matches.items():
        assert converted[checkpoint_name].shape == reference[model_name], model_name


def source_name(detectron2: str, backbone: dict[str, torch.Tensor]) -> str:
    [name] = [k for k in backbone if detectron2_name(k) == detectron2]
    return name


def test_official_r50_gives_exactly_the_names_and_shapes_of_detectron2_r50_c4_and_r50_fpn(official_r50):
    path, state = official_r50
    weights = convert_checkpoint(path)
    assert weights.arch == "resnet50"
    c4, fpn = detectron2_reference("R50-C4"), detectron2_reference("R50-FPN")
    assert sum(n.startswith("roi_heads.res5.") for n in c4) == 50  # res5 sits in the ROI head of C4
    assert_loads_exactly(weights.model, c4)
    assert_loads_exactly(weights.model, fpn)
    # the FPN names are the backbone's own, one to one, under backbone.bottom_up
    assert {f"backbone.bottom_up.{n}" for n in weights.model} == set(fpn)
    # every value is its source tensor, bit for bit; projector, predictor and counters are left out
    encoder = {k.removeprefix("module.encoder."): v for k, v in state.items()
               if k.startswith("module.encoder.") and not k.startswith("module.encoder.fc.")}
    assert len(weights.model) == len([k for k in encoder if not k.endswith("num_batches_tracked")]) == 265
    for name, array in weights.model.items():
        source = encoder[source_name(name, encoder)]
        assert isinstance(array, np.ndarray) and array.dtype == np.float32
        assert np.array_equal(array, source.numpy()), name
    assert not any("fc" in n or "predictor" in n or "num_batches_tracked" in n for n in weights.model)


def test_renaming_rules():
    assert detectron2_name("conv1.weight") == "stem.conv1.weight"
    assert detectron2_name("bn1.running_var") == "stem.conv1.norm.running_var"
    assert detectron2_name("layer1.0.bn3.bias") == "res2.0.conv3.norm.bias"
    assert detectron2_name("layer4.2.conv2.weight") == "res5.2.conv2.weight"
    assert detectron2_name("layer3.0.downsample.0.weight") == "res4.0.shortcut.weight"
    assert detectron2_name("layer3.0.downsample.1.running_mean") == "res4.0.shortcut.norm.running_mean"


def test_torchvision_r18_matches_detectron2_r18_fpn_and_says_to_use_fpn(tmp_path):
    with torch.device("meta"):
        resnet = build_resnet("resnet18")
    state = random_state(resnet, seed=1)  # a plain torchvision state dict, fc included
    torch.save(state, tmp_path / "r18.pth")
    weights = convert_checkpoint(tmp_path / "r18.pth")
    assert weights.arch == "resnet18"
    assert_loads_exactly(weights.model, detectron2_reference("R18-FPN"))
    for name, array in weights.model.items():
        assert np.array_equal(array, state[source_name(name, state)].numpy()), name
    assert weights.settings["MODEL.RESNETS.DEPTH"] == 18 and weights.settings["MODEL.RESNETS.RES2_OUT_CHANNELS"] == 64
    assert any("FPN" in note for note in weights.notes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_are_written_as_float32_as_detectron2s_own(tmp_path, dtype):
    # NumPy has no bfloat16 (the conversion was a TypeError traceback); Detectron2's model zoo
    # weights are float32, and so are its parameters
    with torch.device("meta"):
        resnet = build_resnet("resnet18")
    state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in random_state(resnet, seed=2).items()}
    torch.save(state, tmp_path / "half.pth")
    weights = convert_checkpoint(tmp_path / "half.pth")
    assert_loads_exactly(weights.model, detectron2_reference("R18-FPN"))
    for name, array in weights.model.items():
        assert array.dtype == np.float32, name
        assert np.array_equal(array, state[source_name(name, state)].float().numpy()), name


def converted_shapes(arch: str, folder: Path) -> dict[str, tuple]:
    with torch.device("meta"):
        resnet = build_resnet(arch)
    torch.save(random_state(resnet, seed=0), folder / f"{arch}.pth")
    return {name: array.shape for name, array in convert_checkpoint(folder / f"{arch}.pth").model.items()}


@pytest.mark.parametrize("arch, model, fits", [
    ("resnet50", "R50-C4", True), ("resnet50", "R50-FPN", True), ("resnet101", "R101-C4", True),
    ("resnet18", "R18-FPN", True),
    ("resnet18", "R50-FPN", False), ("resnet18", "R50-C4", False), ("resnet50", "R101-C4", False),
    ("resnet101", "R50-C4", False), ("resnext50_32x4d", "R50-C4", False), ("wide_resnet50_2", "R50-FPN", False),
    ("resnet50", "R18-FPN", False)])
def test_weights_fit_the_model_only_when_detectron2_loads_every_resnet_tensor(tmp_path, arch, model, fits):
    """What detect checks before a run (Detectron2 itself loads what matches and only warns)."""
    problems = misfits(detectron2_reference(model), converted_shapes(arch, tmp_path), heuristics=True,
                       whole_model=False)
    assert (problems == []) == fits, problems[:3]


def test_weights_converted_by_detectron2s_or_mocos_script_fit(tmp_path):
    """Their converters keep torchvision's fc as stem.fc.*, which Detectron2 leaves unused: not a misfit.
    Nor are BN statistics under a GN config, which has none."""
    weights = converted_shapes("resnet50", tmp_path)
    weights.update({"stem.fc.weight": (1000, 2048), "stem.fc.bias": (1000,)})
    model = detectron2_reference("R50-C4")
    assert misfits(model, weights, heuristics=True, whole_model=False) == []
    group_norm = {name: shape for name, shape in model.items() if not name.endswith(("running_mean", "running_var"))}
    assert misfits(group_norm, weights, heuristics=True, whole_model=False) == []


def test_a_misfit_is_named_with_what_the_weights_need(tmp_path, monkeypatch):
    r18 = WeightsFile("r18.pkl", converted_shapes("resnet18", tmp_path), True, "resnet18", False)
    monkeypatch.setattr(detectron2_fit, "model_shapes", lambda cfg: detectron2_reference("R50-C4"))
    with pytest.raises(InputError) as refused:
        check_weights_fit(None, r18, whole_model=False)
    message = str(refused.value)
    assert message.startswith("--weights r18.pkl: backbone.res2.0.conv1.weight is (64, 64, 3, 3) in the weights, "
                              "(64, 64, 1, 1) in the model and ")
    assert message.endswith("a resnet18 needs MODEL.RESNETS.DEPTH 18 MODEL.RESNETS.RES2_OUT_CHANNELS 64 and an FPN "
                            "config (the C4 head builds res5 from bottleneck blocks)")
    # a backbone alone does not evaluate: the heads would be random
    heads = {**detectron2_reference("R50-C4"), "roi_heads.box_predictor.cls_score.weight": (21, 2048)}
    monkeypatch.setattr(detectron2_fit, "model_shapes", lambda cfg: heads)
    r50 = WeightsFile("r50.pkl", converted_shapes("resnet50", tmp_path), True, None, False)
    check_weights_fit(None, r50, whole_model=False)
    with pytest.raises(InputError, match="cls_score.weight is not in the weights; .* train one from it first"):
        check_weights_fit(None, r50, whole_model=True)
    # a detector is paired by its exact names: one trained with another config is refused
    detector = WeightsFile("model_final.pth", {**heads, "roi_heads.box_predictor.cls_score.weight": (81, 2048)},
                           False, None, True)
    with pytest.raises(InputError, match=r"is \(81, 2048\) in the weights, \(21, 2048\) in the model; .*"
                                         "train_config.yaml"):
        check_weights_fit(None, detector, whole_model=True)


def test_moco_r101_matches_detectron2_r101_c4(tmp_path):
    with torch.device("meta"):
        resnet = build_resnet("resnet101", num_classes=128)
    backbone = random_state(resnet, seed=2)
    # MoCo's layout: module.encoder_q.* (and a key encoder that must not be converted)
    state = {f"module.encoder_q.{k}": v for k, v in backbone.items()}
    state["module.encoder_k.conv1.weight"] = torch.zeros(64, 3, 7, 7)
    state["module.queue"] = torch.zeros(128, 16)
    torch.save({"state_dict": state, "arch": "resnet101"}, tmp_path / "moco.pth.tar")
    weights = convert_checkpoint(tmp_path / "moco.pth.tar")
    assert weights.arch == "resnet101" and weights.settings["MODEL.RESNETS.DEPTH"] == 101
    assert_loads_exactly(weights.model, detectron2_reference("R101-C4"))
    for name, array in weights.model.items():
        assert np.array_equal(array, backbone[source_name(name, backbone)].numpy()), name


def test_cli_writes_the_detectron2_pickle_and_prints_count_and_settings(tmp_path, official_r50):
    path, _ = official_r50
    out = tmp_path / "r50.pkl"
    result = run("convert-d2", path, "--out", out)
    assert result.exit_code == 0, result.output
    assert "wrote 265 tensors of the resnet50 backbone" in result.output
    for line in ("MODEL.RESNETS.DEPTH 50", "MODEL.RESNETS.STRIDE_IN_1X1 False", "INPUT.FORMAT RGB",
                 "MODEL.PIXEL_MEAN [123.675,116.28,103.53]", "MODEL.PIXEL_STD [58.395,57.12,57.375]"):
        assert line in result.output
    with open(out, "rb") as f:
        data = pickle.load(f, encoding="latin1")  # as Detectron2's DetectionCheckpointer reads it
    assert set(data) == {"model", "__author__", "matching_heuristics"}
    assert data["matching_heuristics"] is True and data["__author__"].startswith("simsiam")
    assert len(data["model"]) == 265 and all(isinstance(v, np.ndarray) for v in data["model"].values())
    assert [p.name for p in tmp_path.iterdir()] == ["r50.pkl"]  # no temporary file left


def test_refuses_a_checkpoint_that_is_not_a_resnet(tmp_path):
    vgg = {"features.0.weight": torch.zeros(64, 3, 3, 3), "classifier.0.weight": torch.zeros(10, 64)}
    torch.save({"state_dict": vgg}, tmp_path / "vgg.pth")
    vit = {"module.encoder.cls_token": torch.zeros(1, 1, 8), "module.encoder.patch_embed.proj.weight": torch.zeros(8, 3, 4, 4),
           "module.predictor.0.weight": torch.zeros(8, 8)}
    torch.save({"state_dict": vit}, tmp_path / "vit.pth")
    for name, fragment in (("vgg.pth", "torchvision ResNet"), ("vit.pth", "not a ResNet")):
        out = tmp_path / f"{name}.pkl"
        assert_user_error(run("convert-d2", tmp_path / name, "--out", out), name, fragment)
        assert not out.exists()


def test_refuses_the_cifar_stem(tmp_path):
    with torch.device("meta"):
        resnet = build_resnet("resnet18", cifar_stem=True)
    torch.save(random_state(resnet, seed=3), tmp_path / "cifar.pth")
    assert_user_error(run("convert-d2", tmp_path / "cifar.pth", "--out", tmp_path / "c.pkl"), "CIFAR 3x3 stem")
    assert not (tmp_path / "c.pkl").exists()


def test_errors_on_missing_or_unreadable_checkpoints_and_bad_out_paths(tmp_path, official_r50):
    path, _ = official_r50
    assert_user_error(run("convert-d2", tmp_path / "nope.pth", "--out", tmp_path / "a.pkl"), "nope.pth", "no such")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    assert_user_error(run("convert-d2", tmp_path / "junk.pth", "--out", tmp_path / "a.pkl"), "junk.pth")
    assert_user_error(run("convert-d2", path, "--out", tmp_path / "a.pth"), "must end in .pkl")
    assert_user_error(run("convert-d2", path, "--out", tmp_path / "junk.pth" / "a.pkl"), "junk.pth is a file, not a folder")
    for text in ("hi", "hello world"):  # text files torch.load cannot make sense of
        (tmp_path / "junk.pth").write_text(text)
        assert_user_error(run("convert-d2", tmp_path / "junk.pth", "--out", tmp_path / "a.pkl"), "junk.pth")
    (tmp_path / "junk.pth").write_bytes(np.random.default_rng(0).bytes(200))
    assert_user_error(run("convert-d2", tmp_path / "junk.pth", "--out", tmp_path / "a.pkl"), "junk.pth")
    (tmp_path / "dir.pkl").mkdir()
    assert_user_error(run("convert-d2", path, "--out", tmp_path / "dir.pkl"), "dir.pkl: is a folder")
    (tmp_path / "dir").mkdir()  # a folder is named as one, whatever its name ends in
    assert_user_error(run("convert-d2", path, "--out", tmp_path / "dir"), "dir: is a folder; give a file name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "dir.pkl", "junk.pth"]


def test_a_pickle_already_converted_is_named_as_such(tmp_path, official_r50):
    path, _ = official_r50
    assert run("convert-d2", path, "--out", tmp_path / "r50.pkl").exit_code == 0
    assert_user_error(run("convert-d2", tmp_path / "r50.pkl", "--out", tmp_path / "again.pkl"),
                      "r50.pkl: already Detectron2 weights", "detect train --weights as it is")
    assert not (tmp_path / "again.pkl").exists()


def test_an_existing_out_is_replaced_only_with_overwrite_and_never_the_input(tmp_path, official_r50):
    path, _ = official_r50
    out = tmp_path / "r50.pkl"
    out.write_bytes(b"someone's weights")
    assert_user_error(run("convert-d2", path, "--out", out), "r50.pkl: exists; pass --overwrite")
    assert out.read_bytes() == b"someone's weights"
    assert run("convert-d2", path, "--out", out, "--overwrite").exit_code == 0
    assert pickle.loads(out.read_bytes())["matching_heuristics"] is True
    assert_user_error(run("convert-d2", out, "--out", out, "--overwrite"), "is an input of this command")
    # broken weights are refused, not converted into a pickle of NaNs
    state = torch.load(path, weights_only=True)
    name = next(k for k in state["state_dict"] if k.endswith("layer2.0.conv1.weight"))
    state["state_dict"][name] = torch.full_like(state["state_dict"][name], float("nan"))
    torch.save(state, tmp_path / "nan.pth.tar")
    assert_user_error(run("convert-d2", tmp_path / "nan.pth.tar", "--out", tmp_path / "nan.pkl"),
                      "nan.pth.tar: 1 tensor(s) hold NaN or infinite values (res3.0.conv1.weight, ...)")
    assert not (tmp_path / "nan.pkl").exists()
    # the library's writer asks for overwrite too
    from simsiam.errors import InputError

    with pytest.raises(InputError, match="r50.pkl: exists; pass --overwrite"):
        detectron2_weights.write_detectron2_pickle(convert_checkpoint(path), out)


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, official_r50, monkeypatch):
    path, _ = official_r50
    out = tmp_path / "r50.pkl"
    out.write_bytes(b"previous")

    def dump_then_fail(obj, f, protocol=None):
        f.write(b"half a pickle")
        raise KeyboardInterrupt

    monkeypatch.setattr(detectron2_weights.pickle, "dump", dump_then_fail)
    with pytest.raises(KeyboardInterrupt):
        detectron2_weights.write_detectron2_pickle(convert_checkpoint(path), out, overwrite=True)
    assert out.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["r50.pkl"]
