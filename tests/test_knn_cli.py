"""``simsiam knn`` through click: table, JSON, several k, predictions CSV, the checkpoint form, every error."""

import csv
import json
import os
import sys

import h5py
import numpy as np
import pytest
import torch

from conftest import make_image_folder
from feature_files import assert_user_error, clustered, feature_file, run, save_resnet18_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("feats")
    train, train_labels = clustered(400, noise=1.2, seed=1)
    val, val_labels = clustered(100, noise=1.2, seed=2)
    return {"train": feature_file(folder / "train.h5", train, train_labels, dtype="float16"),
            "val": feature_file(folder / "val.h5", val, val_labels, dtype="float16"),
            "val_labels": val_labels}


def test_table_with_several_k(files):
    result = run("knn", "--train", files["train"], "--val", files["val"], "-k", "5", "-k", "20", "--backend", "torch")
    assert result.exit_code == 0, result.output
    assert "100 images classified against 400, 8 classes (torch-cpu" in result.output
    rows = [line for line in result.output.splitlines() if line.strip().startswith(("│  5", "│ 20"))]
    assert len(rows) == 2


def test_json_matches_the_library_and_backends_agree(files):
    from retrieval.evaluate import evaluate_files

    outputs = {}
    for backend in ("faiss", "torch"):
        result = run("knn", "--train", files["train"], "--val", files["val"], "-k", "1", "-k", "20",
                     "--temperature", "0.1", "--backend", backend, "--json")
        assert result.exit_code == 0, result.output
        outputs[backend] = json.loads(result.output)
    assert outputs["faiss"]["results"] == outputs["torch"]["results"]
    report, _ = evaluate_files(files["train"], files["val"], (1, 20), 0.1, "torch")
    assert [r["top1"] for r in outputs["torch"]["results"]] == pytest.approx([r.top1 for r in report.results])
    assert outputs["torch"]["train_size"] == 400 and outputs["torch"]["temperature"] == 0.1
    assert 0.3 < outputs["torch"]["results"][1]["top1"] < 1.0


def test_predictions_csv_has_a_row_per_image_and_k(files, tmp_path):
    out = tmp_path / "pred.csv"
    result = run("knn", "--train", files["train"], "--val", files["val"], "-k", "3", "-k", "7", "--predictions", out,
                 "--json")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 200 and rows[0].keys() == {"path", "label", "class", "k", "prediction", "predicted_class",
                                                   "top5", "correct"}
    k7 = [r for r in rows if r["k"] == "7"]
    top1 = json.loads(result.output)["results"][1]["top1"]
    assert np.mean([int(r["correct"]) for r in k7]) == pytest.approx(top1)
    assert [int(r["label"]) for r in k7] == files["val_labels"].tolist()
    assert all(r["predicted_class"] == f"class{r['prediction']}" for r in rows)


def test_checkpoint_form_extracts_in_memory_and_saves_features_on_request(tmp_path):
    checkpoint = save_resnet18_checkpoints(tmp_path / "ckpt")["torchvision"]
    train = make_image_folder(tmp_path / "train", classes=2, per_class=3)
    val = make_image_folder(tmp_path / "val", classes=2, per_class=2, seed=1)
    args = ["knn", checkpoint, "--train-dir", train, "--val-dir", val, "-k", "3", "--image-size", "16",
            "--resize", "0", "--workers", "0", "--device", "cpu", "--json"]
    saved = tmp_path / "saved" / "new"  # made, as every output folder
    result = run(*args, "--save-features", f"{saved}/")  # a folder, as a shell's completion writes it
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["train_size"] == 6 and report["val_size"] == 4 and report["results"][0]["k"] == 3
    assert sorted(p.name for p in saved.iterdir()) == ["train.h5", "val.h5"]
    again = run("knn", "--train", saved / "train.h5", "--val", saved / "val.h5", "-k", "3", "--json")
    assert json.loads(again.output)["results"] == report["results"]
    before = set(tmp_path.rglob("*"))
    assert run(*args).exit_code == 0
    assert set(tmp_path.rglob("*")) == before  # nothing written without --save-features
    written = (saved / "train.h5").stat().st_mtime_ns
    assert_user_error(run(*args, "--save-features", saved), "train.h5: exists; pass --overwrite")
    assert (saved / "train.h5").stat().st_mtime_ns == written
    assert run(*args, "--save-features", saved, "--overwrite").exit_code == 0
    assert (saved / "train.h5").stat().st_mtime_ns != written
    # a failure while writing the pair (a full disk at val.h5) replaces neither file of the pair
    import retrieval.features

    pair = {name: (saved / name).read_bytes() for name in ("train.h5", "val.h5")}
    append = retrieval.features.FeatureWriter.append

    def full_disk_at_val(writer, *a):
        if writer.path.name == "val.h5":
            raise OSError(28, "No space left on device", str(writer.path))
        append(writer, *a)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(retrieval.features.FeatureWriter, "append", full_disk_at_val)
        assert_user_error(run(*args, "--save-features", saved, "--overwrite", "--image-size", "24"),
                          "No space left on device", only_line=False)
    assert {name: (saved / name).read_bytes() for name in pair} == pair
    assert sorted(p.name for p in saved.iterdir()) == ["train.h5", "val.h5"]  # no temporary file either
    # room for train.h5 but not for the pair: refused before either is written, naming the option
    import collections

    usage = collections.namedtuple("usage", "total used free")
    one_file = 6 * (512 * 4 + retrieval.features.BYTES_PER_ROW) + (1 << 20) + 1000  # 6 training images, headroom
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(retrieval.features.shutil, "disk_usage", lambda path: usage(1 << 40, 0, one_file))
        assert_user_error(run(*args, "--save-features", saved, "--overwrite"),
                          f"--save-features {saved}: needs about", only_line=False)
    assert {name: (saved / name).read_bytes() for name in pair} == pair
    # a class of the validation folder that training lacks: refused before any image is embedded
    other = make_image_folder(tmp_path / "other", classes=3, per_class=1, seed=2)
    import retrieval.extract  # where evaluate_checkpoint imports it from, when it runs

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(retrieval.extract, "extract_features", lambda *a, **k: pytest.fail("extracted first"))
        assert_user_error(run(*args[:5], other, *args[6:]),
                          f"--val-dir {other}: classes class2 are not among the 2 classes of --train-dir {train}")
    # --predictions never replaces an input, the CHECKPOINT or an image included
    for target in (checkpoint, next(train.rglob("*.png"))):
        size = target.stat().st_size
        assert_user_error(run(*args, "--predictions", target), "is an input of this command")
        assert target.stat().st_size == size


# ---- errors: exit 2, one line, nothing written --------------------------------------------------------------------


def knn_error(tmp_path, train, val, *extra):
    out = tmp_path / "pred.csv"
    result = run("knn", "--train", train, "--val", val, "--predictions", out, *extra)
    assert not out.exists() and not list(tmp_path.glob(".pred.csv*"))
    return result


def test_missing_and_non_hdf5_files(files, tmp_path):
    assert_user_error(knn_error(tmp_path, tmp_path / "nope.h5", files["val"]), "nope.h5: no such feature file")
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    assert_user_error(knn_error(tmp_path, files["train"], text), "notes.h5: not an HDF5 file")
    checkpoint = tmp_path / "ckpt.pth.tar"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, checkpoint)
    assert_user_error(knn_error(tmp_path, checkpoint, files["val"]),
                      f"--train {checkpoint}: a checkpoint, not a feature file", f"simsiam knn {checkpoint} --train-dir")
    arrays = tmp_path / "feats.npz"  # a zip archive too, but not torch.save's
    np.savez(arrays, features=np.zeros((2, 2)))
    assert_user_error(knn_error(tmp_path, arrays, files["val"]), "feats.npz: not an HDF5 file")
    # the CHECKPOINT form: a missing checkpoint is said first, before the folders or -k are looked at
    assert_user_error(run("knn", tmp_path / "nope.pth", "--train-dir", tmp_path / "none", "--val-dir",
                          tmp_path / "none", "-k", "99"), "nope.pth: no such checkpoint file")
    # the other commands that read feature files say how to make one
    assert_user_error(run("index", checkpoint, "--out", tmp_path / "x.index"),
                      "ckpt.pth.tar: a checkpoint, not a feature file; simsiam extract CHECKPOINT DATA --out FILE")


def test_hdf5_without_the_schema(files, tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["data"] = np.zeros((3, 4))
    assert_user_error(knn_error(tmp_path, other, files["val"]),
                      "other.h5: not a simsiam feature file: no dataset 'features', 'labels', 'paths'")
    # labels that do not index the file's classes
    bad = feature_file(tmp_path / "bad.h5", *clustered(20, seed=4))
    with h5py.File(bad, "r+") as f:
        f["labels"][0] = 99
    assert_user_error(knn_error(tmp_path, files["train"], bad), "bad.h5: labels from", "to 99 do not index its")
    with h5py.File(bad, "r+") as f:
        del f["labels"]
        f["labels"] = np.zeros(20, np.float32)
    assert_user_error(knn_error(tmp_path, files["train"], bad), "bad.h5: labels are float32, expected integers")


def test_different_dimensions_or_layers_are_refused(files, tmp_path):
    wide = feature_file(tmp_path / "wide.h5", *clustered(20, dim=64))
    assert_user_error(knn_error(tmp_path, files["train"], wide), "--val", "64-d features", "has 32-d")
    projector = feature_file(tmp_path / "z.h5", *clustered(20), layer="projector")
    assert_user_error(knn_error(tmp_path, files["train"], projector), "layer 'projector'", "layer 'backbone'")


def test_different_checkpoints_only_warn(files, tmp_path):
    other = feature_file(tmp_path / "other.h5", *clustered(30, seed=3), checkpoint="b.pth", sha="ef" * 32)
    result = run("knn", "--train", files["train"], "--val", other, "-k", "5")
    assert result.exit_code == 0, result.output
    assert "warning: --train and --val come from different checkpoints" in result.output
    with h5py.File(other, "r+") as f:
        f.attrs["resize"] = 36
    result = run("knn", "--train", files["train"], "--val", other, "-k", "5")
    assert result.exit_code == 0, result.output
    assert "warning: --train and --val were extracted with different resize (0 vs 36)" in result.output


def test_val_with_some_of_the_classes_is_matched_by_class_name(files, tmp_path):
    import h5py as h5

    with h5.File(files["val"]) as f:
        features, labels = f["features"][:], f["labels"][:]
    rows = np.isin(labels, [2, 5, 7])
    renumbered = np.searchsorted([2, 5, 7], labels[rows])  # 0, 1, 2 for class2, class5, class7
    subset = feature_file(tmp_path / "subset.h5", features[rows], renumbered, dtype="float16",
                          classes=["class2", "class5", "class7"])
    full_csv, subset_csv = tmp_path / "full.csv", tmp_path / "subset.csv"
    assert run("knn", "--train", files["train"], "--val", files["val"], "-k", "5", "--predictions", full_csv).exit_code == 0
    result = run("knn", "--train", files["train"], "--val", subset, "-k", "5", "--predictions", subset_csv, "--json")
    assert result.exit_code == 0, result.output
    expected = [r for r in csv.DictReader(full_csv.open()) if r["class"] in ("class2", "class5", "class7")]
    got = list(csv.DictReader(subset_csv.open()))
    assert [(r["label"], r["class"], r["prediction"], r["correct"]) for r in got] == \
        [(r["label"], r["class"], r["prediction"], r["correct"]) for r in expected]
    assert "--val has 3 of the 8 classes of --train; labels matched by class name" in result.output
    report = json.loads(result.output.splitlines()[-1])
    assert report["results"][0]["top1"] == pytest.approx(np.mean([int(r["correct"]) for r in expected]))
    # all the classes, in another order: said as such (it said "has 8 of the 8 classes")
    order = [7, 6, 5, 4, 3, 2, 1, 0]
    reordered = feature_file(tmp_path / "reordered.h5", features, np.asarray(order)[labels], dtype="float16",
                             classes=[f"class{c}" for c in order])
    result = run("knn", "--train", files["train"], "--val", reordered, "-k", "5", "--json")
    assert "--val has the classes of --train in another order; labels matched by class name" in result.output
    assert json.loads(result.output.splitlines()[-1])["results"] == json.loads(
        run("knn", "--train", files["train"], "--val", files["val"], "-k", "5", "--json").output)["results"]
    # a class the training set does not have could never be predicted: refused
    alien = feature_file(tmp_path / "alien.h5", features[:5], np.zeros(5, int), classes=["zebra"])
    assert_user_error(knn_error(tmp_path, files["train"], alien), "--val", "zebra", "not among the 8 classes of --train")


def test_predictions_never_replace_an_input(files, tmp_path):
    import shutil

    val = tmp_path / "val.h5"
    shutil.copyfile(files["val"], val)
    before = val.read_bytes()
    assert_user_error(run("knn", "--train", files["train"], "--val", val, "--predictions", val),
                      "--predictions", "is an input of this command")
    assert val.read_bytes() == before
    # nor any other file but a .csv: it replaces what is there (a feature file given for --train.h5, say)
    other = tmp_path / "other.h5"
    shutil.copyfile(files["val"], other)
    assert_user_error(run("knn", "--train", files["train"], "--val", files["val"], "--predictions", other),
                      f"--predictions {other}: must end in .csv")
    assert other.read_bytes() == before
    # the library's writer refuses it too
    from retrieval.features import read_features
    from retrieval.knn import evaluate_knn, write_predictions
    from simsiam.errors import InputError

    val_set = read_features(val)
    with pytest.raises(InputError, match="is an input of this command"):
        write_predictions(val, val_set, evaluate_knn(read_features(files["train"]), val_set, ks=(5,)))
    assert val.read_bytes() == before


def test_one_class_is_warned_about_as_an_accuracy_that_means_nothing(tmp_path):
    features, _ = clustered(30, classes=3)
    train = feature_file(tmp_path / "train.h5", features[:20], np.zeros(20, int))
    val = feature_file(tmp_path / "val.h5", features[20:], np.zeros(10, int), root="/other")
    result = run("knn", "--train", train, "--val", val, "-k", "3", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.splitlines()[-1])
    assert report["results"][0]["top1"] == 1.0
    assert report["warnings"] == ["--train has one class: every image is classified as it, so the accuracy is "
                                  "100 % whatever the features"]


def test_the_same_images_as_train_and_val_warn(files):
    result = run("knn", "--train", files["train"], "--val", files["train"], "--json")
    assert result.exit_code == 0, result.output
    assert any("--train and --val hold the same images" in w
               for w in json.loads(result.output.splitlines()[-1])["warnings"])
    assert "hold the same images" not in run("knn", "--train", files["train"], "--val", files["val"]).output


def test_the_same_folder_as_train_dir_and_val_dir_warns_naming_those_options_and_is_embedded_once(tmp_path,
                                                                                                  monkeypatch):
    import simsiam.data

    checkpoint = save_resnet18_checkpoints(tmp_path / "ckpt")["torchvision"]
    images = make_image_folder(tmp_path / "images", classes=2, per_class=3)
    decoded = []
    decode_rgb = simsiam.data.decode_rgb
    monkeypatch.setattr(simsiam.data, "decode_rgb", lambda path: decoded.append(path) or decode_rgb(path))
    fast = ["-k", "3", "--image-size", "16", "--resize", "0", "--workers", "0", "--device", "cpu", "--json"]
    result = run("knn", checkpoint, "--train-dir", images, "--val-dir", f"{tmp_path}/./images/", *fast)
    assert result.exit_code == 0, result.output
    assert len(decoded) == 6  # each image once: the features of --train-dir serve as --val-dir's
    assert json.loads(result.output.strip().splitlines()[-1])["val_size"] == 6
    assert json.loads(result.output.strip().splitlines()[-1])["warnings"] == [
        "--train-dir and --val-dir hold the same images: each is its own nearest neighbour, so the accuracy is "
        "inflated; evaluate on held-out images"]
    assert "warning: --train-dir and --val-dir hold the same images" in result.output


def test_images_beside_class_folders_are_warned_about_under_the_option_that_gave_them(tmp_path):
    checkpoint = save_resnet18_checkpoints(tmp_path / "ckpt")["torchvision"]
    train = make_image_folder(tmp_path / "train", classes=2, per_class=3)
    val = make_image_folder(tmp_path / "val", classes=2, per_class=2)
    make_image_folder(val, classes=1, per_class=2, labelled=False)  # loose images beside the classes
    fast = ["-k", "3", "--image-size", "16", "--resize", "0", "--workers", "0", "--device", "cpu"]
    result = run("knn", checkpoint, "--train-dir", train, "--val-dir", val, *fast)
    assert result.exit_code == 0, result.output
    assert f"warning: --val-dir {val}: 2 image(s) lying directly in it are left out" in result.output  # was "DATA"


def test_errors_about_a_path_name_the_option_that_gave_it(files, tmp_path):
    checkpoint = save_resnet18_checkpoints(tmp_path / "ckpt")["torchvision"]
    images = make_image_folder(tmp_path / "images", classes=2, per_class=2)
    empty, broken = tmp_path / "empty", tmp_path / "broken" / "class0"
    empty.mkdir()
    broken.mkdir(parents=True)
    for i in range(3):
        (broken / f"{i}.jpg").write_bytes(b"not a jpeg")
    assert_user_error(knn_error(tmp_path, tmp_path / "none.h5", files["val"]), f"--train {tmp_path / 'none.h5'}: no such")
    assert_user_error(knn_error(tmp_path, files["train"], tmp_path), f"--val {tmp_path}: not a file")
    fast = ["-k", "2", "--image-size", "16", "--resize", "0", "--workers", "0", "--device", "cpu"]
    for train, val, expected in ((tmp_path / "none", images, f"--train-dir {tmp_path / 'none'}: no such folder"),
                                 (images, empty, f"--val-dir {empty}: no images found"),
                                 (broken.parent, broken.parent,
                                  f"--train-dir {broken.parent}: none of its 3 images could be decoded")):
        result = run("knn", checkpoint, "--train-dir", train, "--val-dir", val, *fast)
        assert_user_error(result, expected, only_line=False)


def test_a_feature_file_as_checkpoint_points_to_the_feature_file_form_before_scanning(files, tmp_path, monkeypatch):
    import retrieval.evaluate

    images = make_image_folder(tmp_path / "images", classes=2, per_class=2)
    monkeypatch.setattr(retrieval.evaluate, "scan_images", lambda *a, **k: pytest.fail("scanned"))
    result = run("knn", files["train"], "--train-dir", images, "--val-dir", images, "-k", "2", "--device", "cpu")
    assert_user_error(result, f"CHECKPOINT {files['train']}: a feature file, not a checkpoint; to evaluate feature "
                      "files: simsiam knn --train TRAIN.h5 --val VAL.h5")


@pytest.mark.parametrize("odd, named", [(b"class0/\xff.png", "class0/\\xff.png: the file name"),
                                        (b"class0/caf\xe9/a.png", "class0/caf\\xe9: the folder name")])
def test_a_val_dir_image_path_that_is_not_utf8_is_refused_before_embedding_train_dir(tmp_path, monkeypatch, odd,
                                                                                     named):
    import retrieval.extract  # where evaluate_checkpoint imports it from, when it runs

    checkpoint = save_resnet18_checkpoints(tmp_path / "ckpt")["torchvision"]
    train = make_image_folder(tmp_path / "train", classes=2, per_class=2)
    val = make_image_folder(tmp_path / "val", classes=2, per_class=2, seed=1)
    target = os.fsencode(val) + b"/" + odd
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(val / "class0" / "c0_000.png", target)
    monkeypatch.setattr(retrieval.extract, "extract_features", lambda *a, **k: pytest.fail("embedded"))
    result = run("knn", checkpoint, "--train-dir", train, "--val-dir", val, "-k", "2", "--device", "cpu")
    assert_user_error(result, f"{val}/{named} is not valid UTF-8", "rename it")


def test_val_without_labels(files, tmp_path):
    unlabeled = feature_file(tmp_path / "u.h5", clustered(10)[0])
    assert_user_error(knn_error(tmp_path, files["train"], unlabeled), "--val", "10 image(s) without a label")


def test_k_larger_than_the_training_set(files, tmp_path):
    assert_user_error(knn_error(tmp_path, files["train"], files["val"], "-k", "10", "-k", "401"),
                      f"-k 401: larger than the 400 training images of --train {files['train']}")


def test_k_larger_than_the_decodable_images_of_train_dir_names_it_and_the_unreadable(tmp_path):
    checkpoint = save_resnet18_checkpoints(tmp_path / "ckpt")["torchvision"]
    images = make_image_folder(tmp_path / "images", classes=1, per_class=3)
    (images / "class0" / "broken.png").write_bytes(b"not a png")
    result = run("knn", checkpoint, "--train-dir", images, "--val-dir", images, "-k", "4", "--image-size", "16",
                 "--resize", "0", "--workers", "0", "--device", "cpu")
    assert_user_error(result, f"-k 4: larger than the 3 training images of --train-dir {images} (1 more could not "
                      "be decoded)", only_line=False)


def test_unreadable_images_of_the_folders_are_in_the_json_report(tmp_path):
    checkpoint = save_resnet18_checkpoints(tmp_path / "ckpt")["torchvision"]
    train = make_image_folder(tmp_path / "train", classes=2, per_class=3)
    val = make_image_folder(tmp_path / "val", classes=2, per_class=2, seed=1)
    (val / "class1" / "broken.png").write_bytes(b"not a png")
    result = run("knn", checkpoint, "--train-dir", train, "--val-dir", val, "-k", "3", "--image-size", "16",
                 "--resize", "0", "--workers", "0", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["val_size"] == 4
    assert report["warnings"] == [f"--val-dir {val}: 1 of its 5 images could not be decoded and are left out"]


@pytest.mark.parametrize("temperature", ["0", "-1", "nan", "inf"])
def test_a_temperature_that_is_not_positive_is_refused_before_reading_or_embedding(tmp_path, monkeypatch, temperature):
    import retrieval.evaluate

    monkeypatch.setattr(retrieval.evaluate, "read_features", lambda *a, **k: pytest.fail("read"))
    monkeypatch.setattr(retrieval.extract, "extract_features", lambda *a, **k: pytest.fail("embedded"))
    checkpoint = save_resnet18_checkpoints(tmp_path / "ckpt")["torchvision"]
    images = make_image_folder(tmp_path / "images", classes=2, per_class=2)
    expected = f"--temperature {float(temperature)}: must be a positive finite number"
    assert_user_error(knn_error(tmp_path, images, images, "--temperature", temperature), expected)
    assert_user_error(run("knn", checkpoint, "--train-dir", images, "--val-dir", images, "-k", "2", "--device", "cpu",
                          "--temperature", temperature), expected)


@pytest.mark.parametrize("bad", ["nan", "zero"])
def test_nan_or_all_zero_features(files, tmp_path, bad):
    features, labels = clustered(20)
    features[7] = np.nan if bad == "nan" else 0
    broken = feature_file(tmp_path / "broken.h5", features, labels)
    expected = "NaN or infinite features (row 7" if bad == "nan" else "all-zero feature vector (row 7"
    assert_user_error(knn_error(tmp_path, broken, files["val"]), "--train", expected)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_huge_and_tiny_features_give_the_accuracy_of_the_same_features_scaled(tmp_path, backend):
    """Cosine similarity does not depend on the scale; float32 squares overflow beyond 1.8e19 and
    vanish below 1e-19, which gave a wrong top-1 (with numpy overflow warnings) before."""
    pytest.importorskip(backend)
    train, train_labels = clustered(400, noise=1.2, seed=1)
    val, val_labels = clustered(100, noise=1.2, seed=2)
    top1 = {}
    for scale in (1.0, 1e20, 1e-25):
        files = [feature_file(tmp_path / f"{name}{scale}.h5", x * np.float32(scale), y)
                 for name, x, y in (("train", train, train_labels), ("val", val, val_labels))]
        result = run("knn", "--train", files[0], "--val", files[1], "--backend", backend, "--json")
        assert result.exit_code == 0, result.output
        top1[scale] = json.loads(result.output)["results"][0]["top1"]
    assert top1[1e20] == top1[1e-25] == top1[1.0] > 0.5


def test_nan_features_given_as_arrays_are_refused():
    """The pretraining monitor calls the kNN on arrays: NaN similarities would rank neighbours arbitrarily."""
    from retrieval.knn import weighted_knn
    from simsiam.errors import InputError

    features, labels = clustered(20)
    broken = features.copy()
    broken[7, 3] = np.inf
    with pytest.raises(InputError, match=r"val features: NaN or infinite values \(row 7\)"):
        weighted_knn(features, labels, broken, labels, ks=(5,), backend="torch")


def test_the_arrays_finiteness_is_checked_a_block_of_rows_at_a_time(monkeypatch):
    """isfinite of the whole matrix took 2.5 times the features' memory (13 GB for ImageNet's)."""
    import retrieval.knn as knn
    from simsiam.errors import InputError

    features, labels = clustered(20)
    monkeypatch.setattr(knn, "FINITE_CHECK_VALUES", 3 * features.shape[1])
    checked = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda x: checked.append(x.shape[0]) or isfinite(x))
    knn.weighted_knn(features, labels, features[:5], labels[:5], ks=(5,), backend="torch")
    assert sum(checked) == 25 and max(checked) == 3  # every row, three at a time
    broken = features.copy()
    broken[13, 0] = np.nan
    with pytest.raises(InputError, match=r"train features: NaN or infinite values \(row 13\)"):
        knn.weighted_knn(broken, labels, features, labels, ks=(5,), backend="torch")


def test_feature_files_are_read_for_nan_once(files, tmp_path, monkeypatch):
    """check_usable refuses a file's NaN; the arrays' check read every value again (27 s on a CPU for
    ImageNet's float16 features)."""
    import retrieval.knn as knn

    monkeypatch.setattr(knn, "first_non_finite", lambda features: pytest.fail("the features read for NaN again"))
    result = run("knn", "--train", files["train"], "--val", files["val"], "--backend", "torch", "--json")
    assert result.exit_code == 0, result.output
    features, labels = clustered(20)
    features[7] = np.nan  # still refused, by check_usable
    broken = feature_file(tmp_path / "broken.h5", features, labels)
    assert_user_error(knn_error(tmp_path, broken, files["val"]), "--train", "NaN or infinite features (row 7")


def test_faiss_backend_without_faiss_names_the_install_extra(files, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    assert_user_error(knn_error(tmp_path, files["train"], files["val"], "--backend", "faiss"),
                      "--backend faiss: faiss is not installed", "simsiam[cpu]", "or use --backend torch")
    # an index is faiss's alone: no --backend to point to (index has none; searching an index file
    # with --backend torch met the same error)
    result = run("index", files["train"], "--out", tmp_path / "x.index")
    assert_user_error(result, "simsiam index: faiss is not installed", "simsiam[cpu]")
    assert "--backend" not in result.output
    (tmp_path / "x.index").write_bytes(b"")
    (tmp_path / "x.index.json").write_text("{}")
    result = run("search", tmp_path / "x.index", "--query-h5", files["val"], "--backend", "torch")
    assert_user_error(result, f"{tmp_path / 'x.index'}: faiss is not installed",
                      "or search the feature file it was built from (.h5) with --backend torch")
    # auto falls back to torch
    result = run("knn", "--train", files["train"], "--val", files["val"], "--json")
    assert json.loads(result.output)["backend"] == "torch-cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without a GPU")
@pytest.mark.parametrize("backend", ["torch", "faiss", "auto"])
def test_cuda_without_a_gpu_names_the_install_extra(files, tmp_path, backend):
    result = knn_error(tmp_path, files["train"], files["val"], "--device", "cuda", "--backend", backend)
    assert_user_error(result, "--device cuda", "[gpu]")


def test_usage_errors(files):
    result = run("knn", "--train", files["train"])
    assert result.exit_code == 2 and "give --train FILE --val FILE" in result.output
    assert "Usage:" not in result.output and len(result.output.strip().splitlines()) == 1
    # what embeds images is refused with feature files, not silently ignored (--layer projector evaluating backbone)
    for option, value in (("--layer", "projector"), ("--image-size", "64"), ("--save-features", files["train"].parent),
                          ("--train-dir", files["train"].parent), ("--batch-size", "8"), ("--overwrite", None)):
        assert_user_error(run("knn", "--train", files["train"], "--val", files["val"], option,
                              *([value] if value else [])),
                          f"{option}: only with CHECKPOINT (simsiam knn CHECKPOINT --train-dir DIR --val-dir DIR); "
                          "the --train/--val feature files are embedded already")
    assert_user_error(run("knn", "--train-dir", files["train"].parent, "--val-dir", files["train"].parent),
                      "--train-dir: only with CHECKPOINT (simsiam knn CHECKPOINT --train-dir DIR --val-dir DIR) (see")
    for option, value in (("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "0")):
        assert_user_error(run("knn", "--train", files["train"], "--val", files["val"], option, value),
                          f"--temperature {float(value)}: must be a positive finite number")
    assert_user_error(run("knn", "--train", files["train"], "--val", files["val"], "--chunk-size", "-5"),
                      "--chunk-size", "-5 is not in the range x>=1", "(see: simsiam knn --help)")
    # the torch backend's option: silently ignored by faiss (auto's choice on CPU) before
    assert_user_error(run("knn", "--train", files["train"], "--val", files["val"], "--chunk-size", "5", "--backend",
                          "faiss"), "--chunk-size: sets the torch backend's chunks; --backend faiss has none")
    result = run("knn", "--train", files["train"], "--val", files["val"], "--chunk-size", "5", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["backend"].startswith("torch"), result.output


def test_a_dataset_top_folder_with_split_folders_is_warned_about_in_extract_and_knn(tmp_path):
    """DATA holding train/ and test/ (the split folders taken for classes): extract and knn say so."""
    data = make_image_folder(tmp_path / "cifar", classes=2, per_class=3)
    (data / "class0").rename(data / "train")
    (data / "class1").rename(data / "test")
    args = ["--random-init", "--arch", "resnet18", "--image-size", "16", "--resize", "0", "--workers", "0"]
    result = run("extract", *args, data, "--out", tmp_path / "f.h5")
    assert result.exit_code == 0, result.output
    assert (f"warning: DATA {data}: its class folders (test, train) are dataset splits, so the labels are the "
            f"splits, not classes; did you mean a split's folder ({data / 'train'})?") in result.output
    result = run("knn", "--train", tmp_path / "f.h5", "--val", tmp_path / "f.h5", "-k", "2")
    assert result.exit_code == 0, result.output
    assert f"--train {tmp_path / 'f.h5'}: the class folders of {data} (test, train) are dataset splits" in result.output
    other = make_image_folder(tmp_path / "other", classes=2, per_class=3)
    result = run("extract", *args, other, "--out", tmp_path / "g.h5")
    assert result.exit_code == 0 and "warning" not in result.output, result.output


def test_a_class_name_in_another_unicode_form_is_named_as_such(tmp_path):
    """café as one code point in --train-dir and as e + combining accent in --val-dir (a macOS copy):
    they print alike, so "not among the classes" alone left the user staring at the same word."""
    import unicodedata

    checkpoint = save_resnet18_checkpoints(tmp_path / "ckpt")["torchvision"]
    train = make_image_folder(tmp_path / "train", classes=2, per_class=2)
    val = make_image_folder(tmp_path / "val", classes=2, per_class=2)
    (train / "class1").rename(train / unicodedata.normalize("NFC", "café"))
    (val / "class1").rename(val / unicodedata.normalize("NFD", "café"))
    fast = ["-k", "2", "--image-size", "16", "--resize", "0", "--workers", "0", "--device", "cpu"]
    result = run("knn", checkpoint, "--train-dir", train, "--val-dir", val, *fast)
    assert_user_error(result, "are not among the 2 classes of --train-dir", "written in another Unicode form")


def test_commands_on_feature_files_do_not_load_torchvision(files, tmp_path):
    """knn, index and search of feature files embed nothing: importing torchvision (2 s, and its
    compiler's sympy) was most of a small knn's time."""
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    pytest.importorskip("faiss")
    commands = [["knn", "--train", files["train"], "--val", files["val"], "--json"],
                ["index", files["train"], "--out", tmp_path / "train.index", "--json"],
                ["search", tmp_path / "train.index", "--query-h5", files["val"], "-k", "3", "--eval", "--json"],
                ["search", files["train"], "--query-h5", files["val"], "-k", "3", "--json"]]
    script = ("import sys\nfrom cli.main import simsiam\n"
              "simsiam(sys.argv[1:], standalone_mode=False)\n"
              "assert 'torchvision' not in sys.modules, 'torchvision imported'\n")
    for command in commands:
        done = subprocess.run([sys.executable, "-c", script, *map(str, command)], cwd=repo, capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(repo)}, timeout=300)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        assert json.loads(done.stdout.splitlines()[-1])
