"""simsiam.atomic: outputs appear complete or not at all, and errors name the file the user chose."""

import errno
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest

from simsiam import atomic
from simsiam.atomic import atomic_write, check_output, new_temporary
from simsiam.errors import InputError


def test_check_output_accepts_missing_folders_and_refuses_a_file_in_the_way(tmp_path):
    assert check_output(tmp_path / "a" / "b" / "out.h5", "--out", False) == tmp_path / "a" / "b" / "out.h5"
    assert not (tmp_path / "a").exists()  # made by the writer, once there is something to write
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="--out .*afile/b/out.h5: .*afile is a file, not a folder"):
        check_output(tmp_path / "afile" / "b" / "out.h5", "--out", False)
    # "new/" names a folder, even one that does not exist yet: a file called "new" is not what was meant
    with pytest.raises(InputError, match="--out .*new/: is a folder; give a file name"):
        check_output(f"{tmp_path}/new/", "--out", False)
    assert not (tmp_path / "new").exists()


def test_an_output_that_is_a_link_or_a_device_is_refused_not_replaced(tmp_path):
    """The file is renamed over the output's name: that replaced a symbolic link (its target left stale)
    or a device itself (as root, extract --out /dev/null --overwrite made /dev/null a plain file)."""
    import os

    from cli_runner import assert_user_error, run
    from conftest import make_image_folder

    (tmp_path / "target.h5").write_bytes(b"old")
    os.symlink(tmp_path / "target.h5", tmp_path / "link.h5")
    os.symlink(tmp_path / "missing.h5", tmp_path / "dangling.h5")
    os.mkfifo(tmp_path / "pipe.h5")
    for name, message in (("link.h5", "is a symbolic link (to "), ("dangling.h5", "is a symbolic link (to "),
                          ("pipe.h5", "is not a regular file (a device, a pipe or a socket)")):
        for overwrite in (False, True):
            with pytest.raises(InputError, match=re.escape(f"--out {tmp_path / name}: {message}")):
                check_output(tmp_path / name, "--out", overwrite)
    with pytest.raises(InputError, match="--out /dev/null: is not a regular file"):
        check_output("/dev/null", "--out", True)
    images = make_image_folder(tmp_path / "images", classes=1, per_class=2, ext="jpg")
    assert_user_error(run("extract", "--random-init", "--arch", "resnet18", images, "--out", tmp_path / "link.h5",
                          "--overwrite", "--image-size", "16", "--resize", "0", "--workers", "0"),
                      f"--out {tmp_path / 'link.h5'}: is a symbolic link")
    assert os.path.islink(tmp_path / "link.h5") and (tmp_path / "target.h5").read_bytes() == b"old"
    assert os.path.islink(tmp_path / "dangling.h5") and not (tmp_path / "pipe.h5").is_file()


def test_atomic_write_makes_missing_folders_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a" / "b" / "out.txt"
    with atomic_write(path, "w") as f:
        f.write("done")
    assert path.read_text() == "done" and [p.name for p in path.parent.iterdir()] == ["out.txt"]
    with pytest.raises(ValueError), atomic_write(path, "w") as f:
        f.write("half")
        raise ValueError("interrupted")
    assert path.read_text() == "done" and [p.name for p in path.parent.iterdir()] == ["out.txt"]


def test_a_failed_write_removes_the_folders_made_for_it_and_only_those(tmp_path):
    with pytest.raises(ValueError), atomic_write(tmp_path / "new" / "sub" / "out.txt", "w") as f:
        f.write("half")
        raise ValueError("interrupted")
    assert list(tmp_path.iterdir()) == []  # "new/sub/" stayed, empty, beside where the file would be
    (tmp_path / "kept").mkdir()
    with pytest.raises(ValueError), atomic_write(tmp_path / "kept" / "new" / "out.txt", "w"):
        (tmp_path / "kept" / "other.txt").write_text("written meanwhile")
        raise ValueError("interrupted")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["other.txt"]  # made folder gone, the rest kept
    with pytest.raises(ValueError), atomic_write(tmp_path / "busy" / "out.txt", "w"):
        (tmp_path / "busy" / "another.txt").write_text("written meanwhile")
        raise ValueError("interrupted")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["another.txt"]  # not empty: kept


def test_a_finished_write_forgets_the_folders_it_made(tmp_path):
    # they hold its file now; the record of them would only grow with every output of a long process
    before = dict(atomic._FOLDERS_MADE_FOR)  # what other tests' unfinished writes left, if any
    with atomic_write(tmp_path / "new" / "sub" / "out.txt", "w") as f:
        f.write("done")
        assert len(atomic._FOLDERS_MADE_FOR) == len(before) + 1
    assert atomic._FOLDERS_MADE_FOR == before
    from retrieval.features import FeatureSet, write_features  # the feature file's writer renames its own way

    features = FeatureSet(np.zeros((2, 3), np.float32), np.array([0, 1]), ["a.jpg", "b.jpg"], {"classes": ["x", "y"]})
    write_features(tmp_path / "other" / "f.h5", features)
    assert (tmp_path / "other" / "f.h5").is_file() and atomic._FOLDERS_MADE_FOR == before


def test_an_error_making_the_temporary_names_the_output_not_the_temporary(tmp_path, monkeypatch):
    def refused(prefix, suffix, dir):
        raise PermissionError(errno.EACCES, "Permission denied", f"{dir}/{prefix}abc{suffix}")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(PermissionError) as caught:
        new_temporary(tmp_path / "feats.h5")
    assert caught.value.filename == str(tmp_path / "feats.h5") and caught.value.errno == errno.EACCES


def test_an_input_file_or_an_image_of_an_input_folder_is_never_an_output(tmp_path):
    checkpoint, images = tmp_path / "ckpt.pth", tmp_path / "images"
    (images / "cat").mkdir(parents=True)
    checkpoint.write_bytes(b"weights")
    (images / "cat" / "1.png").write_bytes(b"png")
    (images / "notes.csv").write_text("mine")
    for target in (checkpoint, images / "cat" / "1.png"):
        with pytest.raises(InputError, match="is an input of this command"):
            check_output(target, "--out", True, inputs=[checkpoint, images])
    # a file in an input folder that the command does not read may be replaced
    assert check_output(images / "notes.csv", "--out", True, inputs=[checkpoint, images]) == images / "notes.csv"
    assert check_output(images / "new.csv", "--out", True, inputs=[checkpoint, images]) == images / "new.csv"
    with pytest.raises(InputError, match="new.png: is inside .*images, a folder of images this command reads"):
        check_output(images / "cat" / "new.png", "--grid", True, inputs=[checkpoint, images])


def test_an_image_reached_through_a_symbolic_link_in_an_input_folder_is_an_input(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "a.png").write_bytes(b"png")
    (tmp_path / "queries").mkdir()
    (tmp_path / "queries" / "cls").symlink_to(tmp_path / "elsewhere")  # listed by scan_images as cls/a.png
    with pytest.raises(InputError, match="is an input of this command"):
        check_output(tmp_path / "queries" / "cls" / "a.png", "--grid", True, inputs=[tmp_path / "queries"])


def test_a_full_disk_is_reported_under_the_name_the_user_chose(tmp_path, monkeypatch):
    import torch

    import simsiam.atomic
    from simsiam.checkpoint import save_atomic

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(simsiam.atomic.os, "fsync", full)
    with pytest.raises(OSError) as raised:
        with atomic_write(tmp_path / "out.bin") as f:
            f.write(b"data")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "out.bin")
    monkeypatch.undo()
    # torch's zip writer says a failed write as a RuntimeError: an OSError naming the checkpoint
    monkeypatch.setattr(torch, "save", lambda obj, f: (_ for _ in ()).throw(RuntimeError("unexpected pos 704 vs 598")))
    with pytest.raises(OSError, match="cannot write the checkpoint .*unexpected pos.*is its disk full") as raised:
        save_atomic({}, tmp_path / "c.pth")
    assert raised.value.filename == str(tmp_path / "c.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary file left


def test_the_error_raised_is_reported_even_when_the_temporary_cannot_be_removed(tmp_path, monkeypatch):
    """A folder made read-only meanwhile: the temporary's own PermissionError replaced the error,
    naming a hidden file the user never chose."""
    unlink = Path.unlink

    def refused(self, missing_ok=False):
        if self.name.endswith(".tmp"):
            raise PermissionError(13, "Permission denied", str(self))
        return unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    with pytest.raises(OSError) as raised:
        with atomic_write(tmp_path / "out.bin", "wb"):
            raise OSError(28, "No space left on device")
    assert raised.value.errno == 28 and raised.value.filename == str(tmp_path / "out.bin")


def test_a_run_folders_lock_that_cannot_be_removed_leaves_the_runs_error_to_report(tmp_path, monkeypatch):
    from simsiam.errors import InputError
    from simsiam.run_dir import LOCK_FILE, locked_run_dir

    unlink = Path.unlink

    def refused(self, missing_ok=False):
        if self.name == LOCK_FILE:
            raise PermissionError(13, "Permission denied", str(self))
        return unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    with pytest.raises(InputError, match="the run's own error"):
        with locked_run_dir(tmp_path / "run"):
            raise InputError("the run's own error")


def test_a_refused_runs_files_that_cannot_be_taken_back_leave_its_error_to_report(tmp_path, monkeypatch):
    from simsiam.errors import InputError
    from simsiam.run_dir import CONFIG_FILE, LOCK_FILE, locked_run_dir

    unlink = Path.unlink

    def refused(self, missing_ok=False):
        if self.name in (CONFIG_FILE, LOCK_FILE):
            raise PermissionError(13, "Permission denied", str(self))
        return unlink(self, missing_ok=missing_ok)

    with pytest.raises(InputError, match="the run's own error"):
        with locked_run_dir(tmp_path / "run") as folder:
            folder.prepare(None)
            (tmp_path / "run" / CONFIG_FILE).write_text("{}")
            monkeypatch.setattr(Path, "unlink", refused)
            raise InputError("the run's own error")
    monkeypatch.undo()
    with locked_run_dir(tmp_path / "run"):  # the lock was released all the same
        pass


def test_a_temporary_names_the_file_it_stands_for(tmp_path):
    from simsiam.atomic import temporary_for

    tmp = new_temporary(tmp_path / "feats.v2.h5")
    assert temporary_for(tmp.name) == "feats.v2.h5"
    assert temporary_for("feats.h5") is None and temporary_for(".feats.h5") is None


def test_a_file_name_the_system_takes_is_written_and_a_longer_one_refused_before_any_work(tmp_path):
    """A name of 242 to 255 bytes failed with "File name too long": its temporary's (14 bytes more);
    index's OUT.json failed so after the build."""
    import json

    from cli_runner import assert_user_error, run
    from feature_files import clustered, feature_file

    name = tmp_path / ("a" * 240 + "é.bin")  # 247 bytes, a character of two cut in the temporary's name
    with atomic_write(name) as f:
        f.write(b"x")
    assert name.read_bytes() == b"x" and [p.name for p in tmp_path.iterdir()] == [name.name]
    features, labels = clustered(40, classes=2, dim=8, seed=0)
    path = feature_file(tmp_path / "f.h5", features, labels)
    index = tmp_path / ("i" * 246 + ".index")  # 252 bytes: the index fits, its .json (257) does not
    assert_user_error(run("index", path, "--out", index), f"--out {index}.json: a file name of 257 bytes; a file "
                      "name has at most 255")
    assert not list(tmp_path.glob("i*"))
    index = tmp_path / ("i" * 244 + ".index")
    assert run("index", path, "--out", index, "--json").exit_code == 0
    assert json.loads(Path(f"{index}.json").read_text())["rows"] == 40


def test_without_overwrite_a_file_written_meanwhile_is_not_replaced(tmp_path, monkeypatch):
    """Two commands writing one new output without --overwrite both said "wrote", and the first one's
    file was gone: the check is made at the start, the rename replaced what came since."""
    import os

    from cli_runner import assert_user_error, run
    from conftest import make_image_folder

    from simsiam.atomic import settle_temporary

    for links in (True, False):  # a file system without hard links too
        if not links:
            monkeypatch.setattr(os, "link", lambda *args: (_ for _ in ()).throw(PermissionError(1, "no links")))
        out = tmp_path / f"out{links}.bin"
        tmp = new_temporary(out)
        tmp.write_bytes(b"mine")
        out.write_bytes(b"theirs")  # written since this command checked
        with pytest.raises(InputError, match=f"{out}: exists \\(written meanwhile by another command\\); pass "
                                             "--overwrite"):
            settle_temporary(tmp, out, replace=False)
        assert out.read_bytes() == b"theirs" and tmp.exists()
        tmp.unlink()
        fresh = tmp_path / f"fresh{links}.bin"
        tmp = new_temporary(fresh)
        tmp.write_bytes(b"mine")
        settle_temporary(tmp, fresh, replace=False)
        assert fresh.read_bytes() == b"mine" and not tmp.exists()
    monkeypatch.undo()
    # through a command: extract's file appears at --out while it embeds
    import retrieval.features as features

    images = make_image_folder(tmp_path / "images", classes=1, per_class=2, ext="jpg")
    out = tmp_path / "feats.h5"
    commit = features.FeatureWriter.commit

    def another_command_writes_first(writer):
        out.write_bytes(b"another extraction's")
        return commit(writer)

    monkeypatch.setattr(features.FeatureWriter, "commit", another_command_writes_first)
    assert_user_error(run("extract", "--random-init", "--arch", "resnet18", images, "--out", out, "--image-size", "16",
                          "--resize", "0", "--workers", "0"), f"{out}: exists (written meanwhile", only_line=False)
    assert out.read_bytes() == b"another extraction's" and not list(tmp_path.glob(".feats*"))


def test_an_input_that_is_a_pipe_or_a_device_is_named_so_not_missing(tmp_path):
    """A FIFO given as a checkpoint, an index or --resume was called "no such ... file"."""
    import os

    from cli_runner import assert_user_error, run

    os.mkfifo(tmp_path / "pipe.pth.tar")
    os.mkfifo(tmp_path / "pipe.index")
    os.mkfifo(tmp_path / "pipe.h5")
    not_regular = "is not a regular file (a device, a pipe or a socket)"
    assert_user_error(run("convert-d2", tmp_path / "pipe.pth.tar", "--out", tmp_path / "o.pkl"),
                      f"{tmp_path / 'pipe.pth.tar'}: {not_regular}")
    assert_user_error(run("pretrain", "--resume", tmp_path / "pipe.pth.tar"), f"--resume {tmp_path / 'pipe.pth.tar'}: "
                      f"{not_regular}")
    assert_user_error(run("knn", "--train", tmp_path / "pipe.h5", "--val", tmp_path / "pipe.h5"),
                      f"{tmp_path / 'pipe.h5'}: {not_regular}")
    from retrieval.index import load_index

    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'pipe.index'}: {not_regular}")):
        load_index(tmp_path / "pipe.index")
    assert_user_error(run("convert-d2", tmp_path / "none.pth.tar", "--out", tmp_path / "o.pkl"), "no such checkpoint file")
