"""``simsiam plot``: training curves from a run folder's metrics.jsonl."""

import json

import pytest
from PIL import Image

from feature_files import assert_user_error, run

pytestmark = pytest.mark.usefixtures("one_thread")


def write_metrics(run_dir, knn: bool = True):
    """Records as simsiam.train writes them: a line per logging step and per epoch, the last one cut by a kill."""
    run_dir.mkdir()
    lines = []
    for epoch in range(3):
        for step in range(1, 5):
            global_step = epoch * 4 + step
            lines.append({"kind": "step", "step": global_step, "epoch": epoch + 1, "loss": -0.5 - 0.1 * global_step,
                          "lr": 0.05 / (1 + epoch), "collapse_std": 0.9, "images_per_s": 100.0})
        record = {"kind": "epoch", "step": (epoch + 1) * 4, "epoch": epoch + 1, "loss": -0.6 - 0.3 * epoch,
                  "lr": 0.05 / (1 + epoch), "collapse_std": 0.9, "skipped_images": 0}
        if knn:
            record["knn_top1"] = 0.3 + 0.1 * epoch
        lines.append(record)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines) + '{"kind": "st')


def test_plot_writes_a_png_of_the_four_curves(tmp_path):
    write_metrics(tmp_path / "run")
    result = run("plot", tmp_path / "run")
    assert result.exit_code == 0, result.output
    png = tmp_path / "run" / "curves.png"
    assert f"wrote {png}" in result.output
    with Image.open(png) as image:
        image.load()
        assert image.format == "PNG" and image.size == (1000, 700)


def test_plot_without_knn_monitor_and_to_another_file(tmp_path):
    write_metrics(tmp_path / "run", knn=False)
    out = tmp_path / "c.png"
    assert run("plot", tmp_path / "run", "--out", out).exit_code == 0
    with Image.open(out) as image:
        assert image.size == (1000, 700)
    assert not list(tmp_path.glob(".c.png*"))


def test_plot_errors(tmp_path):
    assert_user_error(run("plot", tmp_path / "nope"), "no such run folder")
    (tmp_path / "empty").mkdir()
    assert_user_error(run("plot", tmp_path / "empty"), "no metrics.jsonl")
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert_user_error(run("plot", tmp_path / "empty"), "holds no metrics yet")
    assert not (tmp_path / "empty" / "curves.png").exists()
    (tmp_path / "empty" / "metrics.jsonl").write_bytes(bytes(range(256)) * 4)  # not even text
    assert_user_error(run("plot", tmp_path / "empty"), "holds no metrics yet")
    write_metrics(tmp_path / "run")
    (tmp_path / "folder.png").mkdir()
    assert_user_error(run("plot", tmp_path / "run", "--out", tmp_path / "folder.png"), "folder.png", "is a folder")
    assert_user_error(run("plot", tmp_path / "run", "--out", tmp_path / "curves.txt"), "must end in .png")
    assert not (tmp_path / "curves.txt").exists()
