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


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """``simsiam ... | head -1``: the reader gone is not the user's error ("Error: Broken pipe", exit 2)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    write_metrics(tmp_path / "run")
    read, write = os.pipe()
    os.close(read)  # the reader has stopped: the first write fails with EPIPE
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "cli", "plot", str(tmp_path / "run")], stdout=write,
                          stderr=subprocess.PIPE, text=True, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    os.close(write)
    assert "Error" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1 and (tmp_path / "run" / "curves.png").is_file()


def test_a_broken_pipe_other_than_stdout_is_still_an_error(tmp_path, monkeypatch):
    import simsiam.training_curves

    def broken(*args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(simsiam.training_curves, "plot_training_curves", broken)
    write_metrics(tmp_path / "run")
    assert_user_error(run("plot", tmp_path / "run"), "Broken pipe")


def test_plot_of_a_diverged_run_with_infinite_values(tmp_path):
    # json writes float("inf") as Infinity, and reads it back: the collapse panel's limits were a ValueError
    write_metrics(tmp_path / "run")
    metrics = tmp_path / "run" / "metrics.jsonl"
    whole_lines = metrics.read_text().rsplit("\n", 1)[0]  # without the line a kill cut
    metrics.write_text(whole_lines + '\n{"kind": "step", "step": 13, "epoch": 4, "loss": Infinity, "lr": 0.01, '
                       '"collapse_std": Infinity}\n')
    result = run("plot", tmp_path / "run")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "run" / "curves.png") as image:
        assert image.size == (1000, 700)


def test_plot_without_knn_monitor_and_to_another_file(tmp_path):
    write_metrics(tmp_path / "run", knn=False)
    out = tmp_path / "c.png"
    assert run("plot", tmp_path / "run", "--out", out).exit_code == 0
    with Image.open(out) as image:
        assert image.size == (1000, 700)
    assert not list(tmp_path.glob(".c.png*"))


def test_the_knn_panel_is_in_percent_as_every_console_line(tmp_path, monkeypatch):
    """metrics.jsonl holds the kNN top-1 as a fraction (0.3), drawn unlabelled beside lincls's % panels."""
    from matplotlib.axes import Axes

    drawn, original = {}, Axes.plot

    def plot(ax, x, y, *args, **kwargs):  # the first curve of each label
        drawn.setdefault(kwargs.get("label"), list(y))
        return original(ax, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", plot)
    write_metrics(tmp_path / "run")
    assert run("plot", tmp_path / "run").exit_code == 0
    assert drawn["evaluation"] == pytest.approx([30.0, 40.0, 50.0])  # the kNN panel's points: 0.3, 0.4, 0.5


def test_a_linear_evaluation_folder_gets_its_own_panels_each_with_data(tmp_path):
    from simsiam.training_curves import LINEAR_EVAL_PANELS, _series, panels_for, read_metrics

    run_dir = tmp_path / "lincls"
    run_dir.mkdir()
    lines = [{"kind": "step", "step": s, "epoch": 1, "loss": 1.0 / s, "train_top1": 10.0 * s, "lr": 0.1}
             for s in (1, 2)]
    lines.append({"kind": "epoch", "step": 2, "epoch": 1, "loss": 0.7, "train_top1": 15.0, "lr": 0.1, "top1": 12.5,
                  "top5": 50.0, "topk": 5})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    steps, epochs = read_metrics(run_dir)
    assert panels_for(steps, epochs) == LINEAR_EVAL_PANELS
    assert all(_series(steps + epochs, key)[0] for key, _ in LINEAR_EVAL_PANELS)  # no "not recorded" panel
    assert run("plot", run_dir).exit_code == 0 and (run_dir / "curves.png").stat().st_size > 0


def test_plot_errors(tmp_path):
    assert_user_error(run("plot", tmp_path / "nope"), "no such run folder")
    (tmp_path / "file").write_text("x")
    assert_user_error(run("plot", tmp_path / "file"), "a file; give the run folder")
    (tmp_path / "empty").mkdir()
    assert_user_error(run("plot", tmp_path / "empty"), "no metrics.jsonl")
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert_user_error(run("plot", tmp_path / "empty"), "holds no metrics yet")
    assert not (tmp_path / "empty" / "curves.png").exists()
    (tmp_path / "empty" / "metrics.jsonl").write_text("\n")
    assert_user_error(run("plot", tmp_path / "empty"), "holds no metrics yet")
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"kind": "st')  # the first line, cut by a kill
    assert_user_error(run("plot", tmp_path / "empty"), "holds no metrics yet")
    # a file that is not ours says so, naming the line, rather than "no metrics yet"
    metrics = tmp_path / "empty" / "metrics.jsonl"
    metrics.write_bytes(bytes(range(256)) * 4)  # not even text
    assert_user_error(run("plot", tmp_path / "empty"), f"{metrics}: line 1 is not JSON; not a metrics.jsonl written")
    metrics.write_text('{"kind": "step", "step": 1, "loss": 0.5}\nloss,lr\n{"kind": "step", "step": 2}\n')
    assert_user_error(run("plot", tmp_path / "empty"), f"{metrics}: line 2 is not JSON")
    for line in ("[1, 2]", '{"loss": 0.5}', '{"step": "1"}'):
        metrics.write_text(line + "\n")
        assert_user_error(run("plot", tmp_path / "empty"), f"{metrics}: line 1 is not a metrics record")
    write_metrics(tmp_path / "run")
    (tmp_path / "folder.png").mkdir()
    assert_user_error(run("plot", tmp_path / "run", "--out", tmp_path / "folder.png"), "folder.png", "is a folder")
    assert_user_error(run("plot", tmp_path / "run", "--out", tmp_path / "curves.txt"), "must end in .png")
    assert not (tmp_path / "curves.txt").exists()
