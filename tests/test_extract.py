"""``simsiam extract``: features equal those of the torchvision ResNet run directly, whatever the layout."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from retrieval.features import read_features
from simsiam.augment import eval_transform
from simsiam.data import decode_rgb
from simsiam.model import SimSiam
from simsiam.runtime import Runtime

from conftest import make_image_folder
from feature_files import assert_user_error, run, save_resnet18_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
FAST = ["--image-size", "16", "--resize", "0", "--workers", "0", "--device", "cpu", "--batch-size", "4"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_resnet18_checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "images", classes=2, per_class=4)


def reference_features(model: torch.nn.Module, root: Path, paths: list[str], image_size: int = 16,
                       resize: int | None = None) -> np.ndarray:
    """The network run directly, one image at a time, with the evaluation transform."""
    transform = eval_transform(image_size, resize)
    model.eval()
    with torch.no_grad():
        return torch.cat([model(transform(decode_rgb(root / p))[None]) for p in paths]).numpy()


def torchvision_backbone(checkpoints) -> torch.nn.Module:
    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(checkpoints["torchvision"], weights_only=True))
    model.fc = torch.nn.Identity()
    return model


def test_the_file_records_the_checkpoint_and_root_as_absolute_paths(tmp_path, checkpoints, images, monkeypatch):
    # typed relative, they would name nothing from another folder, and `knn` compares them
    monkeypatch.chdir(checkpoints["official"].parent)
    result = run("extract", checkpoints["official"].name, os.path.relpath(images), "--out", tmp_path / "f.h5", *FAST)
    assert result.exit_code == 0, result.output
    attrs = read_features(tmp_path / "f.h5").attrs
    assert attrs["checkpoint"] == str(checkpoints["official"].resolve()) and attrs["root"] == str(images.resolve())


def test_json_is_all_that_stdout_holds_and_says_what_was_written(tmp_path, checkpoints, images):
    import json

    out = tmp_path / "feats.h5"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "cli", "extract", str(checkpoints["torchvision"]), str(images),
                           "--out", str(out), "--json", *FAST], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)  # the whole of stdout: progress and warnings go to stderr
    assert report.pop("seconds") > 0
    assert report == {"out": str(out), "images": 8, "skipped": 0, "dim": 512, "dtype": "float16", "arch": "resnet18",
                      "layer": "backbone", "processes": 1}
    assert len(read_features(out)) == 8


@pytest.mark.parametrize("layout", ["official", "torchvision"])
def test_features_equal_the_torchvision_resnet_run_directly(tmp_path, checkpoints, images, layout):
    out = tmp_path / "feats.h5"
    result = run("extract", checkpoints[layout], images, "--out", out, "--dtype", "float32", *FAST)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "8 x 512" in result.output
    feats = read_features(out)
    # rows follow the images in sorted order, and row i is the features of image i
    assert feats.paths == sorted(feats.paths) and len(feats.paths) == 8
    assert feats.labels.tolist() == [0] * 4 + [1] * 4
    expected = reference_features(torchvision_backbone(checkpoints), images, feats.paths)
    np.testing.assert_allclose(feats.features, expected, rtol=1e-4, atol=1e-5)
    assert feats.attrs["layer"] == "backbone" and feats.attrs["arch"] == "resnet18"


def test_gpu_decode_path_gives_the_same_features(tmp_path, checkpoints, images):
    # --gpu-decode decodes, resizes and crops in batches on the device (here the CPU): same pixels
    plain, batched = tmp_path / "plain.h5", tmp_path / "batched.h5"
    args = [checkpoints["official"], images, "--dtype", "float32", "--image-size", "12", "--resize", "14",
            "--workers", "0", "--device", "cpu", "--batch-size", "3"]
    assert run("extract", *args, "--out", plain).exit_code == 0
    result = run("extract", *args, "--out", batched, "--gpu-decode")
    assert result.exit_code == 0, result.output
    a, b = read_features(plain), read_features(batched)
    assert a.paths == b.paths and a.labels.tolist() == b.labels.tolist()
    np.testing.assert_allclose(b.features, a.features, rtol=1e-5, atol=1e-6)


def test_projector_layer_is_the_simsiam_encoder_output(tmp_path, checkpoints, images):
    out = tmp_path / "z.h5"
    assert run("extract", checkpoints["official"], images, "--out", out, "--layer", "projector", "--dtype",
               "float32", *FAST).exit_code == 0
    feats = read_features(out)
    model = SimSiam(torchvision.models.resnet18(num_classes=64), dim=64, pred_dim=16, proj_layers=2)
    model.load_state_dict(torch.load(checkpoints["simsiam"], weights_only=True))
    expected = reference_features(model.encoder, images, feats.paths)
    assert feats.dim == 64
    np.testing.assert_allclose(feats.features, expected, rtol=1e-4, atol=1e-4)
    assert feats.attrs["layer"] == "projector"
    # the encoder saved alone (model.encoder.state_dict()): torchvision names, the projector at fc.*
    torch.save(model.encoder.state_dict(), tmp_path / "encoder.pth")
    assert run("extract", tmp_path / "encoder.pth", images, "--out", tmp_path / "encoder.h5", "--layer", "projector",
               "--dtype", "float32", *FAST).exit_code == 0
    np.testing.assert_allclose(read_features(tmp_path / "encoder.h5").features, expected, rtol=1e-4, atol=1e-4)


def test_projector_of_a_checkpoint_without_one_is_refused(tmp_path, checkpoints, images):
    result = run("extract", checkpoints["torchvision"], images, "--out", tmp_path / "z.h5", "--layer", "projector",
                 *FAST)
    assert_user_error(result, "has no SimSiam projector", "--layer backbone")
    assert not (tmp_path / "z.h5").exists()


@pytest.mark.parametrize("prefix, fc", [
    ("encoder_q", {"fc.weight": (128, 512), "fc.bias": (128,)}),  # MoCo v1
    ("encoder_q", {"fc.0.weight": (512, 512), "fc.0.bias": (512,), "fc.2.weight": (128, 512), "fc.2.bias": (128,)}),
    ("base_encoder", {"fc.0.weight": (4096, 512), "fc.1.weight": (4096,), "fc.1.bias": (4096,),  # MoCo v3
                      "fc.3.weight": (256, 4096), "fc.4.running_mean": (256,), "fc.4.running_var": (256,)}),
])
def test_projector_of_a_moco_checkpoint_is_refused_as_mocos(tmp_path, prefix, fc, images):
    """MoCo's heads are their own: v3's two layers were refused only as "Missing key(s) ... fc.3.bias"."""
    backbone = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    state = {**backbone, **{k: torch.zeros(shape) for k, shape in fc.items()}}
    moco = tmp_path / "moco.pth.tar"
    torch.save({"arch": "resnet18", "state_dict": {f"module.{prefix}.{k}": v for k, v in state.items()}}, moco)
    result = run("extract", moco, images, "--out", tmp_path / "z.h5", "--layer", "projector", *FAST)
    assert_user_error(result, "moco.pth.tar: holds MoCo's projector, not SimSiam's", "--layer backbone")
    assert not (tmp_path / "z.h5").exists()


def test_a_resize_smaller_than_the_crop_is_refused_not_padded_with_black(tmp_path, checkpoints, images):
    fast = FAST[4:]  # without --image-size and --resize
    result = run("extract", checkpoints["official"], images, "--out", tmp_path / "z.h5", *fast, "--image-size", "16",
                 "--resize", "12")
    assert_user_error(result, "--resize 12: smaller than --image-size 16, the centre crop would be padded with black")
    # the checkpoint's own resize (256, ImageNet's) with a larger crop asked for
    result = run("extract", checkpoints["official"], images, "--out", tmp_path / "z.h5", *fast, "--image-size", "288")
    assert_user_error(result, f"{checkpoints['official']}: its resize 256: smaller than --image-size 288",
                      "at least 288 (the ImageNet recipe's 256/224: 329)")
    assert not (tmp_path / "z.h5").exists()


def test_default_transform_resizes_to_256_and_crops_224_for_imagenet_checkpoints(tmp_path, checkpoints):
    big = tmp_path / "big"
    big.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (300, 260, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(big / "a.png")
    out = tmp_path / "big.h5"
    assert run("extract", checkpoints["torchvision"], big, "--out", out, "--dtype", "float32", "--workers", "0",
               "--device", "cpu").exit_code == 0
    feats = read_features(out)
    assert (feats.attrs["image_size"], feats.attrs["resize"]) == (224, 256)
    expected = reference_features(torchvision_backbone(checkpoints), big, ["a.png"], 224, 256)
    np.testing.assert_allclose(feats.features, expected, rtol=1e-4, atol=1e-5)
    assert feats.labels.tolist() == [-1] and feats.classes == []  # a flat folder: unlabeled


def test_random_init_baseline_is_seeded(tmp_path, images):
    args = ["extract", "--random-init", "--arch", "resnet18", images, *FAST]
    assert run(*args, "--out", tmp_path / "a.h5").exit_code == 0
    assert run(*args, "--out", tmp_path / "b.h5").exit_code == 0
    a, b = read_features(tmp_path / "a.h5"), read_features(tmp_path / "b.h5")
    np.testing.assert_array_equal(a.features, b.features)
    assert a.attrs["checkpoint"].startswith("random-init resnet18") and a.attrs["checkpoint_sha256"] == ""
    assert a.features.dtype == np.float16  # the default --dtype


def test_extract_ends_its_group_together_only_after_writing(tmp_path, images, monkeypatch):
    # under torchrun the processes wait for each other before ending their group, but not after an
    # error of one process: a peer that failed may be gone (simsiam.runtime.stop)
    import simsiam.runtime

    stopped = []
    monkeypatch.setattr(simsiam.runtime, "stop", lambda runtime, together=False: stopped.append(together))
    args = ["extract", "--random-init", "--arch", "resnet18", *FAST]
    assert run(*args, images, "--out", tmp_path / "a.h5").exit_code == 0
    assert_user_error(run(*args, tmp_path / "missing", "--out", tmp_path / "b.h5"),
                      f"DATA {tmp_path / 'missing'}: no such folder")
    assert stopped == [True, False]


def test_a_batch_size_beyond_the_images_is_one_batch_of_all(tmp_path, images):
    """A batch size beyond sys.maxsize was a ValueError traceback from the DataLoader's sampler."""
    args = ["extract", "--random-init", "--arch", "resnet18", images, *FAST]
    assert run(*args, "--out", tmp_path / "a.h5").exit_code == 0
    result = run(*args, "--batch-size", str(10**20), "--out", tmp_path / "b.h5")
    assert result.exit_code == 0, result.output
    a, b = read_features(tmp_path / "a.h5"), read_features(tmp_path / "b.h5")
    np.testing.assert_allclose(a.features, b.features, atol=1e-3)


def test_library_callers_get_the_same_bounds(images):
    from retrieval.extract import embed
    from simsiam.data import ImageDataset, scan_images
    from simsiam.errors import InputError
    from simsiam.runtime import start

    dataset = ImageDataset(scan_images(images), eval_transform(16, None))
    with pytest.raises(InputError, match="--workers 99999999999: must be at most 128"):
        embed(torchvision.models.resnet18(), dataset, start("cpu", "fp32"), 4, workers=99999999999)


def test_a_size_too_large_from_the_checkpoint_names_the_checkpoint_not_an_option(images):
    """A size the user did not give comes from the checkpoint (e.g. a hand-made one): the message names it."""
    from retrieval.extract import extract_features
    from retrieval.feature_model import FeatureModel
    from simsiam.errors import InputError
    from simsiam.runtime import start

    model = FeatureModel(torchvision.models.resnet18(), "resnet18", "backbone", 1000, "hand-made.pth", "", 5000, 0)
    with pytest.raises(InputError, match="^hand-made.pth: its image-size 5000: must be at most 4096$"):
        extract_features(model, images, start("cpu", "fp32"))
    with pytest.raises(InputError, match="^--image-size 5000: must be at most 4096$"):
        extract_features(model, images, start("cpu", "fp32"), image_size=5000)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # numpy's overflow warning would print before the error
def test_broken_weights_are_refused_not_written_as_nan_or_infinite_features(tmp_path, checkpoints, images):
    state = torch.load(checkpoints["torchvision"], weights_only=True)
    nan = tmp_path / "nan.pth"
    torch.save({**state, "bn1.running_var": torch.full_like(state["bn1.running_var"], float("nan"))}, nan)
    assert_user_error(run("extract", nan, images, "--out", tmp_path / "f.h5", *FAST),
                      f"{nan}: the network gives NaN or infinite features", "class0/", only_line=False)
    huge = tmp_path / "huge.pth"
    torch.save({**state, "layer4.1.bn2.weight": state["layer4.1.bn2.weight"] * 1e7}, huge)
    assert_user_error(run("extract", huge, images, "--out", tmp_path / "f.h5", *FAST),
                      "--dtype float16: feature values up to", "use --dtype float32", only_line=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.pth", "nan.pth"]  # no feature file, no temporary
    # float32 holds them, and --normalize brings them into float16's range
    assert run("extract", huge, images, "--out", tmp_path / "f32.h5", "--dtype", "float32", *FAST).exit_code == 0
    assert run("extract", huge, images, "--out", tmp_path / "n.h5", "--normalize", *FAST).exit_code == 0
    assert np.isfinite(read_features(tmp_path / "n.h5").features).all()


def test_random_init_needs_an_arch_and_a_seed_torch_takes(tmp_path, images):
    assert_user_error(run("extract", "--random-init", images, "--out", tmp_path / "a.h5", *FAST), "--arch")
    assert_user_error(run("extract", "--random-init", "--arch", "resnet18", "--seed", str(2**64), images,
                          "--out", tmp_path / "a.h5", *FAST), f"--seed {2**64}: must be from 0 to")
    assert list(tmp_path.iterdir()) == []


def test_unknown_checkpoint_layout_writes_nothing(tmp_path, images):
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {"some.weight": torch.zeros(3)}}, bad)
    result = run("extract", bad, images, "--out", tmp_path / "feats.h5", *FAST)
    assert_user_error(result, "unknown checkpoint layout")
    assert list(tmp_path.iterdir()) == [bad]


def test_a_disk_too_small_for_the_file_is_refused_before_writing(tmp_path, checkpoints, images, monkeypatch):
    """HDF5 finding the disk full mid-write fails its close too, and can crash the process at exit."""
    import collections

    import retrieval.features as features

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(features.shutil, "disk_usage", lambda path: usage(10 << 20, 10 << 20, 100 << 10))
    out = tmp_path / "feats.h5"
    assert_user_error(run("extract", checkpoints["torchvision"], images, "--out", out, *FAST),
                      f"--out {out}: needs about", "MiB, but its disk has 0.1 MiB free")
    assert not list(tmp_path.glob("*feats*")) and not list(tmp_path.glob(".*"))
    # into folders still to be made: the disk they will be on is asked, not the working folder's
    asked = []
    monkeypatch.setattr(features.shutil, "disk_usage", lambda path: asked.append(path) or usage(1, 1, 1 << 40))
    assert run("extract", checkpoints["torchvision"], images, "--out", tmp_path / "a" / "b" / "f.h5", *FAST).exit_code == 0
    assert asked == [tmp_path]


def test_a_compressed_file_checks_the_room_of_each_block_before_hdf5_writes_it(tmp_path, checkpoints, images,
                                                                                monkeypatch):
    """A compressed file's size is not known ahead: HDF5 met the full disk itself, a traceback and a
    segmentation fault at exit (measured on a 2 MiB tmpfs). Each block is checked, at its raw size."""
    import collections

    import retrieval.features as features

    usage = collections.namedtuple("usage", "total used free")
    free = {"bytes": 1 << 40}
    monkeypatch.setattr(features.shutil, "disk_usage", lambda path: usage(1 << 40, 0, free["bytes"]))
    flushed = []
    real_append = features.FeatureWriter.append

    def append_then_fill_the_disk(writer, *args):
        real_append(writer, *args)
        flushed.append(writer.file.id.get_filesize())
        free["bytes"] = 100 << 10  # the disk is full after the first block

    monkeypatch.setattr(features.FeatureWriter, "append", append_then_fill_the_disk)
    out = tmp_path / "feats.h5"
    result = run("extract", checkpoints["torchvision"], images, "--out", out, *FAST, "--batch-size", "4",
                 "--compression", "gzip")
    assert_user_error(result, f"--out {out}: needs about", "MiB, but its disk has 0.1 MiB free", only_line=False)
    assert not list(tmp_path.glob("*feats*")) and not list(tmp_path.glob(".*"))
    assert len(flushed) == 1


def test_a_failing_close_still_removes_the_temporary_file(tmp_path, monkeypatch):
    from retrieval.features import FeatureWriter

    writer = FeatureWriter(tmp_path / "f.h5", 4, {"root": str(tmp_path)}, "float32", expected_rows=2)
    writer.append(np.ones((2, 4), np.float32), [0, 1], ["a.jpg", "b.jpg"])
    monkeypatch.setattr(writer.file, "close", lambda: (_ for _ in ()).throw(RuntimeError("file write failed")))
    writer.abort()
    assert not writer.tmp.exists() and not (tmp_path / "f.h5").exists()
    monkeypatch.undo()
    writer.file.close()


def test_bad_option_values_are_refused_before_any_work(tmp_path, checkpoints, images):
    out = tmp_path / "feats.h5"
    for option, value, message in (("--image-size", "0", "--image-size"), ("--batch-size", "0", "--batch-size"),
                                   ("--workers", "-1", "--workers"), ("--resize", "-3", "--resize"),
                                   ("--workers", "99999999999", "--workers"),  # was forking until the OOM killer
                                   ("--resize", str(10**20), "--resize")):  # was an overflow traceback in torch
        assert_user_error(run("extract", checkpoints["torchvision"], images, "--out", out, *FAST, option, value),
                          message, "(see: simsiam extract --help)")
    assert_user_error(run("extract", checkpoints["torchvision"], images, "--out", out, *FAST, "--cifar-stem"),
                      "--cifar-stem: only with --random-init")
    assert_user_error(run("extract", checkpoints["torchvision"], images, "--out", out, *FAST, "--seed", "3"),
                      "--seed: only with --random-init")
    assert_user_error(run("extract", tmp_path, images, "--out", out, *FAST), "is a folder, not a checkpoint file")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path, checkpoints, images):
    out = tmp_path / "feats.h5"
    out.write_text("keep me")
    assert_user_error(run("extract", checkpoints["torchvision"], images, "--out", out, *FAST), "--overwrite")
    assert out.read_text() == "keep me"
    size = checkpoints["torchvision"].stat().st_size
    assert_user_error(run("extract", checkpoints["torchvision"], images, "--out", checkpoints["torchvision"],
                          "--overwrite", *FAST), "is an input of this command")
    assert checkpoints["torchvision"].stat().st_size == size


def test_missing_output_folders_are_made_a_file_in_the_way_is_refused(tmp_path, checkpoints, images):
    out = tmp_path / "new" / "sub" / "feats.h5"
    result = run("extract", checkpoints["torchvision"], images, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert len(read_features(out)) > 0 and [p.name for p in out.parent.iterdir()] == ["feats.h5"]
    (tmp_path / "afile").write_text("keep me")
    assert_user_error(run("extract", checkpoints["torchvision"], images, "--out", tmp_path / "afile" / "f.h5", *FAST),
                      "afile is a file, not a folder")


def test_unreadable_images_are_skipped_and_counted_or_fatal_with_strict(tmp_path, checkpoints):
    data = make_image_folder(tmp_path / "data", classes=1, per_class=3)
    (data / "class0" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "feats.h5"
    result = run("extract", checkpoints["torchvision"], data, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert "1 unreadable skipped" in result.output and "broken.png" in result.output
    feats = read_features(out)
    assert len(feats) == 3 and feats.attrs["skipped_images"] == 1 and "class0/broken.png" not in feats.paths
    strict = run("extract", checkpoints["torchvision"], data, "--out", tmp_path / "strict.h5", "--strict", *FAST)
    assert_user_error(strict, "broken.png", only_line=False)
    assert not (tmp_path / "strict.h5").exists()
    # the folders made for the file go with it
    strict = run("extract", checkpoints["torchvision"], data, "--out", tmp_path / "new" / "strict.h5", "--strict", *FAST)
    assert_user_error(strict, "broken.png", only_line=False)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("name, reason", [("broken.bmp", "cannot identify image file"),  # PIL decodes BMP, TIFF
                                          ("broken.tif", "cannot identify image file"),
                                          ("gone.jpg", "No such file or directory"),  # a dangling link
                                          ("gone.bmp", "No such file or directory")])
def test_an_unreadable_image_is_named_once_with_the_reason_alone(tmp_path, checkpoints, name, reason):
    """PIL's messages and the OS's end with the path, which the message gives first already."""
    data = make_image_folder(tmp_path / "data", classes=1, per_class=2)
    bad = data / "class0" / name
    if name.startswith("gone"):
        bad.symlink_to(tmp_path / "nowhere" / name)
    else:
        bad.write_bytes(b"not an image at all")
    skipped = run("extract", checkpoints["torchvision"], data, "--out", tmp_path / "feats.h5", *FAST)
    assert skipped.exit_code == 0, skipped.output
    assert f"warning: skipped unreadable image {bad} ({reason})" in skipped.output
    strict = run("extract", checkpoints["torchvision"], data, "--out", tmp_path / "strict.h5", "--strict", *FAST)
    assert_user_error(strict, f"Error: {bad}: cannot decode image ({reason}); drop --strict", only_line=False)
    assert strict.output.count(name) == 1


def test_an_image_name_that_is_not_utf8_is_refused_by_name_before_any_work(tmp_path, checkpoints):
    """A feature file stores paths as UTF-8: no image is lost to an 'unreadable' skip, no HDF5 error at the end."""
    data = make_image_folder(tmp_path / "data", classes=1, per_class=2)
    odd = os.fsencode(data / "class0") + b"/\xff.png"
    Path(os.fsdecode(odd)).write_bytes((data / "class0" / "c0_000.png").read_bytes())
    out = tmp_path / "feats.h5"
    result = run("extract", checkpoints["torchvision"], data, "--out", out, *FAST)
    assert_user_error(result, "class0/\\xff.png: the file name is not valid UTF-8", "rename it")
    assert not out.exists() and os.listdir(tmp_path) == ["data"]


def test_a_class_folder_name_that_is_not_utf8_is_refused_by_name_before_any_work(tmp_path, checkpoints, monkeypatch):
    import retrieval.extract

    data = make_image_folder(tmp_path / "data", classes=1, per_class=2)
    os.rename(data / "class0", os.fsdecode(os.fsencode(data) + b"/caf\xe9"))
    monkeypatch.setattr(retrieval.extract, "embed_batches", lambda *a, **k: pytest.fail("embedded"))
    out = tmp_path / "feats.h5"
    result = run("extract", checkpoints["torchvision"], data, "--out", out, *FAST)
    assert_user_error(result, f"{data}/caf\\xe9: the folder name is not valid UTF-8 (and 1 more image path(s) in "
                      f"{data})", "rename it")
    assert not out.exists() and os.listdir(tmp_path) == ["data"]


@pytest.mark.slow
def test_torchrun_ranks_write_shards_merged_into_one_file_in_dataset_order(tmp_path, checkpoints, images):
    single = tmp_path / "single.h5"
    assert run("extract", checkpoints["torchvision"], images, "--out", single, "--dtype", "float32",
               *FAST).exit_code == 0
    out = tmp_path / "new" / "ddp.h5"  # its folder made by the ranks
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cli",
               "extract", str(checkpoints["torchvision"]), str(images), "--out", str(out), "--dtype", "float32",
               *FAST]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("wrote") == 1 and "by 2 processes" in done.stdout  # rank 0 reports
    # one plain file, the shards merged and gone: it needs nothing beside it
    assert sorted(p.name for p in out.parent.iterdir()) == ["ddp.h5"]
    with h5py.File(out) as f:
        assert not any(f[name].is_virtual for name in ("features", "labels", "paths"))
    a, b = read_features(single), read_features(out)
    assert b.paths == a.paths and b.labels.tolist() == a.labels.tolist()
    np.testing.assert_allclose(b.features, a.features, rtol=1e-5, atol=1e-6)
    assert b.attrs["skipped_images"] == 0 and b.attrs["layer"] == "backbone"
    # the shards an interrupted multi-process run left go when the file is written again
    (tmp_path / "new" / "ddp.h5.shards").mkdir()
    (tmp_path / "new" / "ddp.h5.shards" / "rank00001-of-00002.h5").write_bytes(b"stale")
    assert run("extract", checkpoints["torchvision"], images, "--out", out, "--overwrite", *FAST).exit_code == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["ddp.h5"]


class LostPeerRuntime(Runtime):
    """Rank 0 of 2 whose peer has failed: its first collective raises what gloo raises then."""

    def barrier(self) -> None:
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:190")


@pytest.fixture
def checks_pass_on_every_rank(monkeypatch):
    """The agreement on the checks (simsiam.runtime.agree) without a process group: no other rank failed."""
    monkeypatch.setattr("simsiam.runtime.dist.all_gather_object", lambda output, value: output.__setitem__(
        slice(None), [value] + [None] * (len(output) - 1)))


def test_a_rank_whose_peer_failed_leaves_no_shard(tmp_path, images, checks_pass_on_every_rank):
    """Its shard was written; the merge never comes: the shard and the shards' folder go."""
    from retrieval.extract import extract_to_file
    from retrieval.feature_model import load_feature_model

    model = load_feature_model(None, "backbone", random_init=True, arch="resnet18")
    with pytest.raises(RuntimeError, match="closed by peer"):
        extract_to_file(model, images, tmp_path / "feats.h5", LostPeerRuntime(torch.device("cpu"), "fp32", 0, 2),
                        image_size=16, resize=0)
    assert os.listdir(tmp_path) == []


def test_a_rank_stopped_while_writing_its_shard_leaves_no_shards_folder(tmp_path, images, checks_pass_on_every_rank):
    """torchrun's SIGTERM (another rank failed) mid-shard: the shard's temporary file goes, and the
    shards' folder with it (it stayed, empty, beside where the file would be)."""
    from retrieval.extract import extract_to_file
    from retrieval.feature_model import load_feature_model

    def stop_at_first_batch(event):
        if event["event"] == "batch":
            raise KeyboardInterrupt  # what the CLI's SIGTERM handler raises (cli.main.Terminated)

    model = load_feature_model(None, "backbone", random_init=True, arch="resnet18")
    with pytest.raises(KeyboardInterrupt):
        extract_to_file(model, images, tmp_path / "feats.h5", Runtime(torch.device("cpu"), "fp32", 0, 2),
                        image_size=16, resize=0, batch_size=2, on_event=stop_at_first_batch)
    assert os.listdir(tmp_path) == []


def test_a_check_failed_on_another_rank_stops_this_one_before_any_work(tmp_path, images, monkeypatch):
    """Under torchrun every rank checks its inputs, then they agree: rank 1 lacking DATA (another
    node's disk) stops rank 0 too, with rank 1's error, before it embeds anything."""
    from retrieval.extract import extract_to_file
    from retrieval.feature_model import load_feature_model
    from simsiam.errors import InputError

    monkeypatch.setattr("simsiam.runtime.dist.all_gather_object", lambda output, value: output.__setitem__(
        slice(None), [value, "DATA /data: no such folder"]))
    model = load_feature_model(None, "backbone", random_init=True, arch="resnet18")
    with pytest.raises(InputError, match="^rank 1: DATA /data: no such folder$") as raised:
        extract_to_file(model, images, tmp_path / "feats.h5", Runtime(torch.device("cpu"), "fp32", 0, 2),
                        image_size=16, resize=0)
    assert raised.value.agreed  # rank 0 prints it, once
    assert os.listdir(tmp_path) == []


def test_a_lost_peer_under_torchrun_is_one_line_not_a_traceback(monkeypatch):
    """gloo's RuntimeError on the rank that outlived a failed one: one line pointing at the other's error."""
    from cli.main import simsiam

    @simsiam.command("lose-peer")
    def lose_peer():
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:190")

    try:
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
        assert_user_error(run("lose-peer"), "rank 0: stopped, another process of this torchrun job failed")
        monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no peer to blame, torch's error as it is
        with pytest.raises(RuntimeError, match="closed by peer"):
            run("lose-peer")
    finally:
        simsiam.commands.pop("lose-peer")


@pytest.mark.slow
def test_torchrun_a_rank_that_fails_alone_ends_the_job_with_its_error_and_no_shards(tmp_path, checkpoints):
    """--strict and one unreadable image, in rank 1's half: rank 1 says why, rank 0 says it stopped
    for it (no traceback), and nothing is left where the file would be."""
    data = make_image_folder(tmp_path / "data", classes=2, per_class=4)
    (data / "class1" / "zzz.jpg").write_bytes(b"not an image")  # the last image: rank 1's
    out = tmp_path / "out" / "feats.h5"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cli",
               "extract", str(checkpoints["torchvision"]), str(data), "--out", str(out), "--strict", *FAST]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error: ")]
    assert done.returncode != 0 and len(errors) == 2, done.stdout + done.stderr
    assert any(line.startswith("Error: rank 1: ") and "zzz.jpg: cannot decode" in line for line in errors)
    assert any("rank 0: stopped, another process" in line for line in errors)
    assert "[rank0]: Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    assert not out.parent.exists() or os.listdir(out.parent) == []


@pytest.mark.cuda(reason="the CPU tests above check the same features in fp32")
def test_cuda_extraction_runs_in_bf16_and_stays_close_to_fp32(tmp_path, checkpoints, images):
    cpu, gpu = tmp_path / "cpu.h5", tmp_path / "gpu.h5"
    common = [checkpoints["torchvision"], images, "--dtype", "float32", "--image-size", "16", "--resize", "0",
              "--workers", "0"]
    assert run("extract", *common, "--out", cpu, "--device", "cpu").exit_code == 0
    assert run("extract", *common, "--out", gpu, "--device", "cuda", "--precision", "bf16").exit_code == 0  # auto: fp32 before Ampere
    a, b = read_features(cpu), read_features(gpu)
    assert b.attrs["precision"] == "bf16" and a.attrs["precision"] == "fp32"
    cosine = (a.features * b.features).sum(1) / np.linalg.norm(a.features, axis=1) / np.linalg.norm(b.features, axis=1)
    assert cosine.min() > 0.99, cosine


@pytest.mark.slow
@pytest.mark.parametrize("sent,status,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_a_signal_mid_write_leaves_no_temporary_file(tmp_path, checkpoints, sent, status, word):
    """``kill`` (SIGTERM) or Ctrl-C while the feature file is being written: a one-line message, the
    shells' exit status, and neither the output nor its temporary file (a worker process running)."""
    data = make_image_folder(tmp_path / "data", classes=2, per_class=150, size=64)
    out = tmp_path / "out" / "feats.h5"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "cli", "extract", str(checkpoints["torchvision"]), str(data),
                                "--out", str(out), "--image-size", "64", "--resize", "0", "--batch-size", "1",
                                "--workers", "1", "--device", "cpu"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out.parent.is_dir() and list(out.parent.glob(".feats.h5.*.tmp"))):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    time.sleep(0.5)  # the extraction under way (300 images take seconds here)
    assert process.poll() is None, "finished before the signal: give the test more images"
    process.send_signal(sent)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == status, stderr
    assert stderr.strip().splitlines()[-1] == word and "Traceback" not in stderr, stderr
    assert not out.parent.exists()  # made for the file, and gone with its temporary file


def test_a_random_init_baseline_leaves_the_callers_random_generator_alone():
    from retrieval.feature_model import load_feature_model

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_feature_model(random_init=True, arch="resnet18", seed=7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("layer", ["backbone", "projector"])
def test_loading_a_checkpoint_leaves_the_callers_random_generator_alone(checkpoints, layer):
    # the ResNet is initialised at random before its weights replace that: not from the caller's generator
    from retrieval.feature_model import load_feature_model

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_feature_model(checkpoints["official"], layer=layer)
    assert torch.equal(torch.rand(3), expected)


def test_a_random_init_backbone_is_the_one_pretraining_starts_from_whatever_its_projector_widths():
    """The convolutions were drawn after torchvision's fc of --dim outputs: a run of another --dim
    started from another backbone than the baseline's."""
    from retrieval.feature_model import load_feature_model
    from simsiam.config import preset_config
    from simsiam.train import build_model

    baseline = load_feature_model(random_init=True, arch="resnet18", cifar_stem=True, seed=3).module.state_dict()
    for widths in ({"dim": 64}, {"dim": 64, "pred_dim": 16, "proj_hidden_dim": 128, "proj_layers": 3}):
        torch.manual_seed(3)
        encoder = build_model(preset_config("cifar", arch="resnet18", **widths)).encoder.state_dict()
        backbone = {k: v for k, v in encoder.items() if not k.startswith("fc.")}
        assert backbone.keys() == baseline.keys()
        assert all(torch.equal(backbone[k], baseline[k]) for k in baseline), widths


@pytest.mark.parametrize("preset, cifar_stem", [("imagenet", False), ("cifar", True)])
def test_a_random_init_projector_is_the_one_pretraining_starts_from_seeded(preset, cifar_stem):
    # the projector too: drawn from the seed, not the caller's generator, with the preset's widths
    from retrieval.feature_model import load_feature_model
    from simsiam.config import preset_config
    from simsiam.train import build_model

    torch.manual_seed(5)
    pretraining_starts = build_model(preset_config(preset, arch="resnet18")).encoder.state_dict()
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)
        model = load_feature_model(layer="projector", random_init=True, arch="resnet18", cifar_stem=cifar_stem, seed=5)
        state = model.module.state_dict()
        assert state.keys() == pretraining_starts.keys()
        assert all(torch.equal(state[k], pretraining_starts[k]) for k in state)


def test_the_model_takes_the_memory_layout_of_the_images_it_is_given(tmp_path, images):
    """On CUDA with bf16 the images come channels_last; the model is laid out alike (it was not,
    and every convolution converted its input), with the same features."""
    from retrieval.extract import extract_to_file
    from retrieval.feature_model import load_feature_model

    class ChannelsLast(Runtime):
        channels_last = True

    runs = {}
    for name, runtime in (("plain", Runtime(torch.device("cpu"), "fp32")),
                          ("channels_last", ChannelsLast(torch.device("cpu"), "fp32"))):
        model = load_feature_model(None, "backbone", True, "resnet18", False, 0)
        extract_to_file(model, images, tmp_path / f"{name}.h5", runtime, image_size=16, resize=0, dtype="float32",
                        batch_size=4)
        runs[name] = (model, read_features(tmp_path / f"{name}.h5").features)
    weight = next(p for p in runs["channels_last"][0].module.parameters() if p.dim() == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(runs["channels_last"][1], runs["plain"][1], rtol=1e-4, atol=1e-5)


def test_the_unreadable_count_of_the_progress_says_whose_share_it_is():
    # under torchrun the bar shows rank 0's share: its count of unreadable images was said "in all"
    # beside the final line's total of every rank
    import io

    from rich.console import Console

    from cli.embedding import EmbeddingProgress

    for world_size, expected in ((1, "in all"), (2, "in all of rank 0's share")):
        text = io.StringIO()
        with EmbeddingProgress("extract", Console(file=text, width=200)) as progress:
            progress({"event": "start", "rank": 0, "world_size": world_size, "images": 4, "total_images": 8,
                      "device": "cpu", "precision": "fp32"})
            for name in ("a.jpg", "b.jpg"):
                progress({"event": "unreadable", "path": name, "reason": "not an image"})
        assert text.getvalue().splitlines()[-1] == f"warning: skipped 2 unreadable image(s) {expected}"
