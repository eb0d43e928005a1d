"""The HDF5 feature file: schema, dtypes, attributes, row order, atomic writes, merged shards."""

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from retrieval.extract import extract_to_file
from retrieval.feature_model import FeatureModel
from retrieval.features import FeatureSet, FeatureWriter, merge_shards, read_features, write_features
from simsiam.errors import InputError
from simsiam.runtime import Runtime

from conftest import make_image_folder
from feature_files import assert_user_error, clustered, feature_file, run

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = Runtime(torch.device("cpu"), "fp32")


class MeanColour(torch.nn.Module):
    """A stand-in network whose features identify the image: its mean colour and its pixel values."""

    def forward(self, x):
        return torch.cat([x.mean(dim=(2, 3)), x.flatten(1)[:, :5]], dim=1)


def identity_model() -> FeatureModel:
    return FeatureModel(MeanColour(), "resnet18", "backbone", 8, "/ckpts/c.pth", "cd" * 32, 16, 0)


def test_round_trip_keeps_schema_dtype_attributes_and_rows(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(50, 7)).astype(np.float32)
    attrs = {"root": "/data/x", "classes": ["cat", "dog"], "arch": "resnet50", "layer": "projector",
             "checkpoint": "c.pth", "checkpoint_sha256": "00" * 32, "image_size": 224, "normalized": False}
    labels = rng.integers(-1, 2, 50)
    paths = [f"dir/é{i}.jpg" for i in range(50)]  # UTF-8
    for dtype, compression in (("float16", "gzip"), ("float32", "none"), ("float32", "lzf")):
        path = tmp_path / f"{dtype}-{compression}.h5"
        write_features(path, FeatureSet(features, labels, paths, attrs), dtype=dtype, compression=compression)
        with h5py.File(path) as f:
            assert f["features"].dtype == np.dtype(dtype) and f["features"].chunks is not None
            assert f["labels"].dtype == np.int64 and f["paths"].dtype.kind == "O"
            assert f["features"].compression == (None if compression == "none" else compression)
            assert json.loads(f.attrs["classes"]) == ["cat", "dog"]
            assert {"root", "classes", "arch", "layer", "checkpoint", "checkpoint_sha256", "image_size",
                    "normalized", "simsiam_version"} <= set(f.attrs)
        back = read_features(path)
        np.testing.assert_allclose(back.features, features, rtol=1e-3 if dtype == "float16" else 0)
        assert back.labels.tolist() == labels.tolist() and back.paths == paths
        assert back.classes == ["cat", "dog"] and back.attrs["layer"] == "projector"
        assert back.attrs["image_size"] == 224 and back.attrs["normalized"] is False


def test_extraction_rows_follow_the_images_and_record_the_transform(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=3)
    out = tmp_path / "feats.h5"
    summary = extract_to_file(identity_model(), data, out, CPU, dtype="float32", batch_size=2)
    feats = read_features(out)
    assert summary.images == 9 and feats.paths == sorted(feats.paths)
    assert feats.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert feats.classes == ["class0", "class1", "class2"]
    assert feats.attrs["root"] == str(data.resolve()) and feats.attrs["resize"] == 0
    assert feats.attrs["checkpoint_sha256"] == "cd" * 32 and feats.attrs["precision"] == "fp32"
    # row i holds image i: compare with each image embedded alone
    from simsiam.augment import eval_transform
    from simsiam.data import decode_rgb

    for row, path in enumerate(feats.paths):
        alone = MeanColour()(eval_transform(16, None)(decode_rgb(data / path))[None])[0]
        np.testing.assert_allclose(feats.features[row], alone.numpy(), rtol=1e-5, atol=1e-6)


def test_extraction_never_writes_over_an_image_it_reads(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=1, per_class=3)
    image = next((data / "class0").iterdir())
    before = image.read_bytes()
    with pytest.raises(InputError, match="is an input of this command"):
        extract_to_file(identity_model(), data, image, CPU, overwrite=True)
    assert image.read_bytes() == before


def test_normalize_stores_unit_rows(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=1, per_class=3)
    extract_to_file(identity_model(), data, tmp_path / "n.h5", CPU, dtype="float32", normalize=True)
    feats = read_features(tmp_path / "n.h5")
    np.testing.assert_allclose(np.linalg.norm(feats.features, axis=1), 1, rtol=1e-5)
    assert feats.attrs["normalized"] is True


def test_an_interrupted_extraction_leaves_no_finished_looking_file(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=4)
    out = tmp_path / "feats.h5"
    out.write_bytes(b"the previous file")
    seen = []

    def kill_after_two_batches(event):
        if event["event"] == "batch":
            # while writing, only a hidden temporary file exists beside the old one
            seen.append(sorted(p.name for p in tmp_path.iterdir() if p.name != "data"))
            if len(seen) == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_to_file(identity_model(), data, out, CPU, batch_size=2, overwrite=True,
                        on_event=kill_after_two_batches)
    assert len(seen[0]) == 2 and seen[0][0].startswith(".feats.h5.") and seen[0][0].endswith(".tmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "feats.h5"]
    assert out.read_bytes() == b"the previous file"


def test_writer_removes_its_temporary_file_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with FeatureWriter(tmp_path / "f.h5", 3, {"arch": "a", "layer": "backbone"}) as writer:
            writer.append(np.ones((2, 3)), [0, 1], ["a", "b"])
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="--compression zstd"):
        FeatureWriter(tmp_path / "f.h5", 3, {"arch": "a", "layer": "backbone"}, compression="zstd")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("features, labels, paths", [
    (np.ones((4, 3)), [1], ["a.jpg"]),  # h5py stretched the one label and path over the four rows
    (np.ones((4, 3)), [0, 1, 0, 1], ["a", "b"]),
])
def test_rows_with_other_counts_of_labels_or_paths_are_refused_and_leave_no_file(tmp_path, features, labels, paths):
    attrs = {"arch": "a", "layer": "backbone", "classes": ["a", "b"]}
    with pytest.raises(InputError, match="expected \\[rows, 3\\] features and one label and path a row"):
        write_features(tmp_path / "f.h5", FeatureSet(features, np.array(labels), paths, attrs))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match=r"features of shape \(2, 5\) with 2 labels and 2 paths; expected \[rows, 3\]"):
        with FeatureWriter(tmp_path / "f.h5", 3, attrs) as writer:
            writer.append(np.ones((2, 5)), [0, 1], ["a", "b"])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match=r"<memory>: features of shape \(3,\); expected a \[rows, dim\] matrix"):
        write_features(tmp_path / "f.h5", FeatureSet(np.ones(3), np.array([0, 1, 2]), ["a", "b", "c"], attrs))
    assert list(tmp_path.iterdir()) == []


def test_merged_shards_are_one_plain_file_in_rank_order(tmp_path, monkeypatch):
    import retrieval.features

    monkeypatch.setattr(retrieval.features, "MERGE_ROWS", 2)  # blocks that split the shards
    attrs = {"root": "/r", "classes": ["a"], "arch": "resnet18", "layer": "backbone", "checkpoint": "c",
             "checkpoint_sha256": "", "image_size": 16, "normalized": False}
    shards_dir = tmp_path / "run" / "feats.h5.shards"
    shards_dir.mkdir(parents=True)
    parts = [np.full((n, 4), i, np.float32) for i, n in enumerate((3, 0, 2))]  # an empty shard too
    shards = []
    for i, part in enumerate(parts):
        shards.append(write_features(shards_dir / f"rank{i:05d}-of-00003.h5",
                                     FeatureSet(part, np.zeros(len(part), np.int64),
                                                [f"{i}-é{j}" for j in range(len(part))], attrs),
                                     dtype="float16", compression="gzip"))
    merge_shards(tmp_path / "run" / "feats.h5", shards, {**attrs, "skipped_images": 1})
    shutil.rmtree(shards_dir)  # the merged file needs nothing beside it
    with h5py.File(tmp_path / "run" / "feats.h5") as f:
        assert not any(f[name].is_virtual for name in ("features", "labels", "paths"))
        assert f["features"].dtype == np.float16 and f["features"].compression == "gzip"  # as the shards
    feats = read_features(tmp_path / "run" / "feats.h5")
    assert feats.paths == ["0-é0", "0-é1", "0-é2", "2-é0", "2-é1"]
    np.testing.assert_array_equal(feats.features[:, 0], [0, 0, 0, 2, 2])
    assert feats.attrs["skipped_images"] == 1 and feats.attrs["layer"] == "backbone"


def test_a_virtual_file_of_an_earlier_version_without_its_shard_is_refused_not_read_as_zeros(tmp_path):
    attrs = {"root": "/r", "classes": ["a"], "arch": "resnet18", "layer": "backbone", "checkpoint": "c",
             "checkpoint_sha256": "", "image_size": 16, "normalized": False}
    shard = write_features(tmp_path / "feats.h5.shards" / "rank00000-of-00001.h5",
                           FeatureSet(np.ones((3, 4), np.float32), np.zeros(3, np.int64), ["x", "y", "z"], attrs),
                           dtype="float32")
    with h5py.File(tmp_path / "feats.h5", "w") as f:  # as earlier versions wrote a torchrun extraction
        for name, shape, dtype in (("features", (3, 4), np.float32), ("labels", (3,), np.int64),
                                   ("paths", (3,), h5py.string_dtype())):
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
            layout[:] = h5py.VirtualSource("feats.h5.shards/rank00000-of-00001.h5", name, shape=shape)
            f.create_virtual_dataset(name, layout)
        for name, value in attrs.items():
            f.attrs[name] = json.dumps(value) if name == "classes" else value
    assert read_features(tmp_path / "feats.h5").features.sum() == 12  # with its shard: readable
    shard.unlink()
    with pytest.raises(InputError, match="its shard feats.h5.shards/rank00000-of-00001.h5 is missing"):
        read_features(tmp_path / "feats.h5")


def _replace(f: h5py.File, name: str, **dataset) -> None:
    del f[name]
    f.create_dataset(name, **dataset)


# hand-made or foreign files: each breaks one thing the reader relies on
FOREIGN_FILES = {
    "features a group": (lambda f: (f.__delitem__("features"), f.create_group("features")),
                         "'features' is not a dataset"),
    "paths of integers": (lambda f: _replace(f, "paths", data=np.arange(len(f["labels"]))),
                          "'paths' is not a dataset of strings"),
    "paths not UTF-8": (lambda f: _replace(f, "paths", data=np.array([b"\xff\xfe"] * len(f["labels"]))),
                        "'paths' row 0 is not UTF-8 text"),
    "classes of numbers": (lambda f: f.attrs.__setitem__("classes", json.dumps([1, 2, 3, 4])),
                           "its 'classes' attribute is not a JSON list of class names"),
    "classes an object": (lambda f: f.attrs.__setitem__("classes", json.dumps({"a": 1})),
                          "its 'classes' attribute is not a JSON list of class names"),
    "root a number": (lambda f: f.attrs.__setitem__("root", 3), "its 'root' attribute is not a string"),
}


@pytest.mark.parametrize("case", FOREIGN_FILES)
def test_a_foreign_feature_file_is_refused_in_one_line_by_every_command(tmp_path, case):
    edit, message = FOREIGN_FILES[case]
    good = feature_file(tmp_path / "good.h5", *clustered(40, classes=4, dim=8))
    bad = tmp_path / "bad.h5"
    shutil.copy(good, bad)
    with h5py.File(bad, "r+") as f:
        edit(f)
    for command in (["knn", "--train", good, "--val", bad], ["knn", "--train", bad, "--val", good],
                    ["index", bad, "--out", tmp_path / "bad.index"], ["search", bad, "--query-h5", good]):
        assert_user_error(run(*command), f"bad.h5: {message}; not a feature file written by simsiam extract")
    assert not list(tmp_path.glob("*.index*"))


def test_a_feature_file_with_damaged_structures_is_refused_in_one_line(tmp_path):
    # HDF5's errors reach h5py as KeyError, RuntimeError, ValueError or TypeError, not only OSError:
    # each was a traceback. Every byte of the file's first 2 KiB (its superblock, object headers,
    # B-trees and heaps) flipped in turn: each file reads, or is refused as an InputError
    good = feature_file(tmp_path / "good.h5", *clustered(40, classes=4, dim=8))
    data = good.read_bytes()
    bad = tmp_path / "bad.h5"
    unreadable = []  # the positions refused as damaged
    for position in range(2048):
        damaged = bytearray(data)
        damaged[position] ^= 0xFF
        bad.write_bytes(damaged)
        try:
            read_features(bad)
        except InputError as err:
            if str(err).startswith(f"{bad}: unreadable HDF5 file ("):
                unreadable.append(position)
    assert unreadable
    # and through a command, as one line
    damaged = bytearray(data)
    damaged[unreadable[len(unreadable) // 2]] ^= 0xFF
    bad.write_bytes(damaged)
    assert_user_error(run("knn", "--train", good, "--val", bad, "-k", "3"), f"{bad}: unreadable HDF5 file")


def test_features_a_file_claims_but_does_not_store_are_refused_not_allocated(tmp_path):
    # a damaged shape (h5py 3.8 went on to allocate 638 GiB for it), or a writer that stopped early:
    # chunks never written, which HDF5 would read as zeros
    good = feature_file(tmp_path / "good.h5", *clustered(40, classes=4, dim=8))
    bad = tmp_path / "bad.h5"
    for chunks, written in (((4, 8), 10), (None, 0)):  # contiguous: allocated at the first write, whole
        shutil.copy(good, bad)
        with h5py.File(bad, "r+") as f:
            del f["features"]
            f.create_dataset("features", shape=(40, 8), dtype="float32", chunks=chunks)
            if written:
                f["features"][:written] = 1.0
        with pytest.raises(InputError, match="bad.h5: damaged: its 'features' claim 40 x 8 values, more than the file "
                                             "stores"):
            read_features(bad)
