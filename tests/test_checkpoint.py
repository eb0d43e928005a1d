"""Checkpoint readers accept every supported layout; writes are atomic and loads are safe."""

import os
import pickle
import re
import warnings

import pytest
import torch

from simsiam.backbones import build_resnet, infer_resnet_arch
from simsiam.checkpoint import (build_backbone, check_checkpoint_file, find_resume_checkpoint, load_checkpoint,
                                read_backbone, save_atomic, to_official_layout)
from simsiam.errors import InputError
from simsiam.model import SimSiam


@pytest.fixture(scope="module")
def simsiam_r18():
    torch.manual_seed(0)
    return SimSiam(build_resnet("resnet18", num_classes=64, zero_init_residual=True), 64, 16)


def backbone_of(model: SimSiam) -> dict:
    return {k: v for k, v in model.encoder.state_dict().items() if not k.startswith("fc.")}


def assert_same_backbone(weights, model):
    expected = backbone_of(model)
    assert weights.backbone.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(weights.backbone[k], v), k


def test_reads_the_official_simsiam_layout(tmp_path, simsiam_r18):
    path = tmp_path / "checkpoint_0099.pth.tar"
    # main_simsiam.py: save_checkpoint({'epoch', 'arch', 'state_dict', 'optimizer'})
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": to_official_layout(simsiam_r18.state_dict()),
                "optimizer": {"state": {}, "param_groups": []}}, path)
    weights = read_backbone(path)
    assert (weights.arch, weights.cifar_stem, weights.layout) == ("resnet18", False, "simsiam")
    assert_same_backbone(weights, simsiam_r18)
    assert set(weights.projector) == {k[3:] for k in simsiam_r18.encoder.state_dict() if k.startswith("fc.")}
    assert weights.source["epoch"] == 100


def test_reads_checkpoints_without_the_module_prefix_and_bare_state_dicts(tmp_path, simsiam_r18):
    torch.save({"state_dict": simsiam_r18.state_dict()}, tmp_path / "a.pth")
    torch.save(simsiam_r18.state_dict(), tmp_path / "b.pth")
    for name in ("a.pth", "b.pth"):
        weights = read_backbone(tmp_path / name)
        assert weights.arch == "resnet18" and weights.layout == "simsiam"
        assert_same_backbone(weights, simsiam_r18)


def test_reads_a_plain_torchvision_state_dict_and_infers_its_arch(tmp_path):
    torch.manual_seed(1)
    resnet = build_resnet("resnet34")
    torch.save(resnet.state_dict(), tmp_path / "r34.pth")
    weights = read_backbone(tmp_path / "r34.pth")
    assert (weights.arch, weights.layout) == ("resnet34", "torchvision")
    assert "fc.weight" not in weights.backbone
    model = build_backbone(weights).eval()
    resnet.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = torch.flatten(resnet.avgpool(resnet.layer4(resnet.layer3(resnet.layer2(resnet.layer1(
            resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))))))), 1)
        assert torch.allclose(model(x), expected)


def test_reads_a_simsiam_encoders_state_dict_with_its_projector(tmp_path, simsiam_r18):
    """``model.encoder.state_dict()``: torchvision names, SimSiam's projector at ``fc.*`` (was read as a
    torchvision ResNet, and ``--layer projector`` said it had none)."""
    torch.save(simsiam_r18.encoder.state_dict(), tmp_path / "encoder.pth")
    weights = read_backbone(tmp_path / "encoder.pth")
    assert (weights.arch, weights.layout) == ("resnet18", "simsiam")
    assert_same_backbone(weights, simsiam_r18)
    assert weights.projector.keys() == {k[3:] for k in simsiam_r18.encoder.state_dict() if k.startswith("fc.")}


def test_reads_moco_encoder_q_checkpoints(tmp_path, simsiam_r18):
    state = {f"module.encoder_q.{k}": v for k, v in simsiam_r18.encoder.state_dict().items()}
    torch.save({"state_dict": state, "arch": "resnet18"}, tmp_path / "moco.pth.tar")
    weights = read_backbone(tmp_path / "moco.pth.tar")
    assert weights.layout == "moco"
    assert_same_backbone(weights, simsiam_r18)
    # MoCo v3: the base encoder (its fc is MoCo v3's projector), beside a momentum encoder and a predictor
    state = {f"module.base_encoder.{k}": v for k, v in simsiam_r18.encoder.state_dict().items()}
    state.update({f"module.momentum_encoder.{k}": torch.zeros_like(v) for k, v in simsiam_r18.encoder.state_dict().items()})
    torch.save({"state_dict": state, "arch": "resnet18"}, tmp_path / "mocov3.pth.tar")
    weights = read_backbone(tmp_path / "mocov3.pth.tar")
    assert weights.layout == "moco" and set(weights.projector) == {k.split(".fc.")[1] for k in state if ".base_encoder.fc." in k}
    assert_same_backbone(weights, simsiam_r18)


@pytest.mark.parametrize("arch,cifar", [("resnet50", False), ("resnet18", True), ("wide_resnet50_2", False),
                                        ("resnext50_32x4d", False)])
def test_arch_inference(arch, cifar):
    with torch.device("meta"):
        state = build_resnet(arch, cifar_stem=cifar).state_dict()
    assert infer_resnet_arch(state) == (arch, cifar)


def test_unknown_layout_is_refused_naming_what_was_found(tmp_path):
    torch.save({"state_dict": {"backbone.stem.weight": torch.zeros(1)}}, tmp_path / "odd.pth")
    with pytest.raises(InputError, match=r"odd.pth: unknown checkpoint layout \(found keys like backbone.stem.weight\)"):
        read_backbone(tmp_path / "odd.pth")
    # keys as the file has them: the prefix stripped, the example was the layout the message asks for
    torch.save({"state_dict": {"module.module.encoder.conv1.weight": torch.zeros(1)}}, tmp_path / "twice.pth")
    with pytest.raises(InputError, match=r"found keys like module.module.encoder.conv1.weight\)"):
        read_backbone(tmp_path / "twice.pth")
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "empty.pth")
    with pytest.raises(InputError, match="top-level entries: epoch, note"):
        read_backbone(tmp_path / "empty.pth")


def test_arch_field_that_contradicts_the_weights_is_refused(tmp_path, simsiam_r18):
    torch.save({"arch": "resnet50", "state_dict": to_official_layout(simsiam_r18.state_dict())}, tmp_path / "x.pth")
    with pytest.raises(InputError, match="says arch resnet50 but its weights are those of a resnet18"):
        read_backbone(tmp_path / "x.pth")


def test_non_resnet_weights_are_refused(tmp_path):
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "layer1.0.conv1.weight": torch.zeros(8, 8, 3, 3)}, tmp_path / "n.pth")
    with pytest.raises(InputError, match="match no torchvision ResNet"):
        read_backbone(tmp_path / "n.pth")


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    torch.save({"state_dict": Payload()}, tmp_path / "evil2.pth")
    for name in ("evil.pth", "evil2.pth"):
        with pytest.raises(InputError, match="refusing to unpickle|not a PyTorch checkpoint"):
            load_checkpoint(tmp_path / name)


def test_missing_and_garbage_files_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00not a checkpoint at all")
    with pytest.raises(InputError, match="junk.pth: not a"):
        load_checkpoint(tmp_path / "junk.pth")
    torch.save({"w": torch.ones(1000)}, tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    cases = {"notes.txt": (b"epoch 3, lr 0.05\n", "not a PyTorch checkpoint (neither torch.save's zip format nor its legacy pickle format"),
             "plain.pkl": (pickle.dumps({"epoch": 1}), "not a PyTorch checkpoint (neither"),
             "empty.pth": (b"", "is empty, not a checkpoint"),
             "feats.h5": (b"\x89HDF\r\n\x1a\n" + bytes(100), "an HDF5 file (a feature file of simsiam extract?), not a"),
             "cut.pth": (data[: len(data) // 2], "a damaged or truncated checkpoint")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputError, match=re.escape(f"{name}: {message}")):
            load_checkpoint(tmp_path / name)


def test_the_legacy_torch_save_format_still_loads(tmp_path):
    torch.save({"epoch": 7, "w": torch.arange(3.0)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    loaded = load_checkpoint(tmp_path / "old.pth")
    assert loaded["epoch"] == 7 and torch.equal(loaded["w"], torch.arange(3.0))
    # pickle protocol 4 frames its data, which the safe (weights_only) unpickler cannot read, in
    # either format (it was called a legacy-format file, also in torch.save's zip format)
    for name, zip_format in (("framed.pth", False), ("framed_zip.pth", True)):
        torch.save({"epoch": 7}, tmp_path / name, _use_new_zipfile_serialization=zip_format, pickle_protocol=4)
        with pytest.raises(InputError, match=re.escape(f"{name}: pickled with protocol 4 or later (torch.save's "
                                                       "pickle_protocol)") + ".*again with the default protocol$"):
            load_checkpoint(tmp_path / name)


def without_checksums(path) -> None:
    """Store 0 as every member's CRC-32, as torch.save does with torch.utils.serialization's
    ``compute_crc32`` off (torch >= 2.6): in each local header and central directory record."""
    import struct
    import zipfile

    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        infos, record = archive.infolist(), archive.start_dir
    for info in infos:
        data[info.header_offset + 14: info.header_offset + 18] = bytes(4)
        assert data[record: record + 4] == b"PK\x01\x02"
        data[record + 16: record + 20] = bytes(4)
        name, extra, comment = struct.unpack("<HHH", data[record + 28: record + 34])
        record += 46 + name + extra + comment
    path.write_bytes(bytes(data))


def test_a_zip_that_is_no_checkpoint_of_weights_or_is_damaged_is_refused(tmp_path):
    torch.save({"w": torch.arange(4096.0)}, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "stub.pth").write_bytes(data[:3])  # a copy cut short after "PK"
    with pytest.raises(InputError, match=re.escape("stub.pth: a damaged or truncated checkpoint")):
        load_checkpoint(tmp_path / "stub.pth")
    # bytes of the tensor's data changed on disk: torch.load does not check the zip's checksums
    start = data.index(torch.arange(4096.0).numpy().tobytes()[:64])
    (tmp_path / "flipped.pth").write_bytes(data[:start + 100] + bytes(8) + data[start + 108:])
    with pytest.raises(InputError, match=r"flipped.pth: a damaged checkpoint \(the data of \S+ does not match its "
                                         r"checksum\); copy it again"):
        load_checkpoint(tmp_path / "flipped.pth")
    assert not torch.equal(load_checkpoint(tmp_path / "flipped.pth", mmap=True)["w"], torch.arange(4096.0))  # a peek
    # torch.save with its checksums turned off (torch >= 2.6) stores 0 for every member: not damage
    torch.save({"w": torch.arange(4096.0)}, tmp_path / "unchecked.pth")
    without_checksums(tmp_path / "unchecked.pth")
    assert torch.equal(load_checkpoint(tmp_path / "unchecked.pth")["w"], torch.arange(4096.0))
    with warnings.catch_warnings():  # torch 2.10 and later deprecate TorchScript; users still have such files
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "scripted.pt")
    with pytest.raises(InputError, match=re.escape("scripted.pt: a TorchScript archive (torch.jit.save), not a "
                                                   "checkpoint of weights; torch.save the model's state_dict() instead")):
        load_checkpoint(tmp_path / "scripted.pt")


def test_save_is_atomic_when_the_write_fails(tmp_path):
    path = tmp_path / "ckpt.pth.tar"
    save_atomic({"epoch": 1}, path)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_atomic({"epoch": 2, "x": Unsaveable()}, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth.tar"]


def test_resume_picks_last_then_the_newest_numbered_checkpoint_never_temporaries(tmp_path):
    with pytest.raises(InputError, match="holds no checkpoint"):
        find_resume_checkpoint(tmp_path)
    for epoch in (1, 10, 2):
        save_atomic({"epoch": epoch}, tmp_path / f"checkpoint_{epoch:04d}.pth.tar")
    (tmp_path / ".last.pth.tar.abc.tmp").write_bytes(b"half-written")
    assert find_resume_checkpoint(tmp_path).name == "checkpoint_0010.pth.tar"
    save_atomic({"epoch": 11}, tmp_path / "last.pth.tar")
    assert find_resume_checkpoint(tmp_path).name == "last.pth.tar"
    with pytest.raises(InputError, match="no such checkpoint file or run folder"):
        find_resume_checkpoint(tmp_path / "missing")


def test_a_run_folder_given_for_a_checkpoint_file_is_refused_naming_its_newest_checkpoint(tmp_path):
    with pytest.raises(InputError, match=re.escape(f"{tmp_path}: is a folder, not a checkpoint file")) as refused:
        check_checkpoint_file(tmp_path)
    assert "newest" not in str(refused.value)  # nothing to point at in an empty folder
    for epoch in (2, 10):
        save_atomic({"epoch": epoch}, tmp_path / f"checkpoint_{epoch:04d}.pth.tar")
    with pytest.raises(InputError, match=re.escape(f"its newest checkpoint is {tmp_path / 'checkpoint_0010.pth.tar'}")):
        check_checkpoint_file(tmp_path)
    save_atomic({"epoch": 11}, tmp_path / "last.pth.tar")
    with pytest.raises(InputError, match=re.escape(f"its newest checkpoint is {tmp_path / 'last.pth.tar'}")):
        check_checkpoint_file(tmp_path)
    # a linear evaluation's folder: its checkpoints hold a linear head, not weights to extract or evaluate
    save_atomic({"epoch": 1, "config": {"checkpoint": "/runs/r50/checkpoint_0099.pth.tar", "train_dir": "/d/train"}},
                tmp_path / "last.pth.tar")
    with pytest.raises(InputError, match=re.escape(f"{tmp_path}: is a folder, not a checkpoint file; it holds a linear "
                                                   "evaluation of /runs/r50/checkpoint_0099.pth.tar")):
        check_checkpoint_file(tmp_path)
