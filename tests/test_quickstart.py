"""``simsiam quickstart`` writes the digits, pretrains, and reports kNN before and after.

The full default run (about 3 minutes on 2 CPU cores; `simsiam quickstart`, its numbers in
benchmarks/RESULTS.md) is too long for a test; here one epoch checks the whole path.
"""

import pickle
import re

import pytest
from click.testing import CliRunner

from cli.main import simsiam
from cli_runner import assert_user_error
from retrieval.features import read_features
from retrieval.knn import evaluate_knn
from simsiam.checkpoint import read_backbone


@pytest.mark.slow
def test_quickstart_runs_the_whole_path(tmp_path):
    out = tmp_path / "qs"
    out.mkdir()
    stale = out / ".resnet18-detectron2.pkl.k2x9q1zt.tmp"  # left by a quickstart killed while writing it
    stale.write_bytes(b"half a pickle")
    result = CliRunner().invoke(simsiam, ["quickstart", "--out", str(out), "--epochs", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert not stale.exists()  # refused its own folder before; now removed
    assert len(list((out / "digits" / "train").glob("*/*.png"))) == 1257
    assert len(list((out / "digits" / "test").glob("*/*.png"))) == 540
    assert "top-1 %" in result.output
    scores = dict(re.findall(r"(random initialisation|SimSiam pretrained).*?(\d{1,3}\.\d)\b", result.output))
    assert set(scores) == {"random initialisation", "SimSiam pretrained"}, result.output
    assert all(0.0 <= float(v) <= 100.0 for v in scores.values())
    # even one epoch moves the encoder far from where it starts (about 16 -> 66 % measured)
    assert float(scores["SimSiam pretrained"]) > float(scores["random initialisation"]) + 20
    weights = read_backbone(out / "run" / "last.pth.tar")
    assert weights.arch == "resnet18" and weights.source["epoch"] == 1

    # the later commands' outputs, written by the library calls they make
    train, test = read_features(out / "features" / "train.h5"), read_features(out / "features" / "test.h5")
    assert train.features.shape == (1257, 512) and test.features.shape == (540, 512)
    assert train.attrs["arch"] == "resnet18" and train.attrs["layer"] == "backbone"
    report = evaluate_knn(train, test, ks=(20,))
    assert f"{100 * report.results[0].top1:.1f}" == scores["SimSiam pretrained"]
    with open(out / "resnet18-detectron2.pkl", "rb") as f:
        detectron2 = pickle.load(f)
    assert detectron2["matching_heuristics"] and "stem.conv1.weight" in detectron2["model"]
    assert (out / "run" / "curves.png").stat().st_size > 0
    assert f"simsiam knn --train {out / 'features' / 'train.h5'}" in result.output


def test_a_folder_of_other_files_is_refused_before_any_work(tmp_path):
    """The quickstart replaces what it writes (its run with --overwrite): not in a folder of the user's."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert_user_error(CliRunner().invoke(simsiam, ["quickstart", "--out", str(tmp_path / "mine")]),
                      f"--out {tmp_path / 'mine'}: holds notes.txt, not written by the quickstart", "new or empty folder")
    (tmp_path / "afile").write_text("keep")
    assert_user_error(CliRunner().invoke(simsiam, ["quickstart", "--out", str(tmp_path / "afile")]),
                      "is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "mine"]
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    (tmp_path / "mine" / "notes.txt").unlink()
    (tmp_path / "mine" / ".notes.txt.k2x9q1zt.tmp").write_text("not the quickstart's")
    assert_user_error(CliRunner().invoke(simsiam, ["quickstart", "--out", str(tmp_path / "mine")]),
                      "holds .notes.txt.k2x9q1zt.tmp, not written by the quickstart")


def test_the_suggested_longer_run_is_longer_than_the_one_just_run(tmp_path, monkeypatch):
    # "--epochs 20" was suggested whatever --epochs the quickstart ran, and refused after 20 or more
    from simsiam import quickstart as library

    def quickstart(out, on_event, epochs=6):
        return library.QuickstartResult(0.1, 0.7, tmp_path / "run" / "last.pth.tar", tmp_path / "a.h5", tmp_path / "b.h5",
                                tmp_path / "r.pkl", tmp_path / "run" / "curves.png", 10, 5, epochs)

    monkeypatch.setattr(library, "run_quickstart", quickstart)
    for given, suggested in ((None, 20), ("30", 60)):
        result = CliRunner().invoke(simsiam, ["quickstart", "--out", str(tmp_path)] + (["--epochs", given] if given else []),
                                    catch_exceptions=False)
        assert f"simsiam pretrain --resume {tmp_path / 'run'} --epochs {suggested}   # train longer" in result.output


def test_the_suggested_commands_quote_paths_for_the_shell(tmp_path, monkeypatch):
    """Pasted as printed, a folder with a space split into two arguments."""
    import shlex

    from simsiam import quickstart as library

    out = tmp_path / "my runs"

    def quickstart(out_, on_event):
        return library.QuickstartResult(0.1, 0.7, out / "run" / "last.pth.tar", out / "features" / "train.h5",
                                        out / "features" / "test.h5", out / "r.pkl", out / "run" / "curves.png", 10, 5, 6)

    monkeypatch.setattr(library, "run_quickstart", quickstart)
    result = CliRunner().invoke(simsiam, ["quickstart", "--out", str(out)], catch_exceptions=False)
    suggested = [line.strip() for line in result.output.splitlines() if line.strip().startswith("simsiam ")]
    assert len(suggested) == 3
    knn = shlex.split(suggested[0])
    assert knn[:5] == ["simsiam", "knn", "--train", str(out / "features" / "train.h5"), "--val"]
    assert shlex.split(suggested[2].split("#")[0])[3] == str(out / "run")


def test_the_epochs_help_states_the_default_the_run_uses(tmp_path):
    from simsiam.quickstart import quickstart_config

    help_text = " ".join(CliRunner().invoke(simsiam, ["quickstart", "--help"]).output.split())
    assert f"Pretraining epochs. [default: {quickstart_config(tmp_path, tmp_path).epochs}]" in help_text
