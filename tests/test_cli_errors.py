"""The one place where errors become exit codes (cli/main.py): usage, OS and out-of-memory errors."""

import os
from pathlib import Path

import pytest

from cli_runner import assert_user_error, run


def test_a_file_where_a_folder_is_needed_is_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    assert_user_error(run("quickstart", "--out", afile), f"--out {afile}: is a file, not a folder")  # before any work
    assert afile.read_text() == "not a folder"


@pytest.mark.parametrize("command", [["extract", "ck.pth", "images", "--out"], ["convert-d2", "ck.pth", "--out"],
                                     ["index", "f.h5", "--out"], ["knn", "--train", "t.h5", "--val", "v.h5", "--predictions"],
                                     ["plot", "run", "--out"],
                                     ["search", "f.h5", "--query", "q.jpg", "--grid"]])
def test_an_output_file_ending_in_a_slash_is_refused_as_a_folder(tmp_path, command):
    """Path() drops the slash: "--out new/" wrote a file called new."""
    assert_user_error(run(*command, f"{tmp_path}/new/"), f"{tmp_path}/new/: is a folder; give a file name")
    assert not (tmp_path / "new").exists()


def test_usage_errors_are_one_line_naming_the_help():
    assert_user_error(run("nosuchcommand"), "No such command 'nosuchcommand'", "(see: simsiam --help)")
    assert_user_error(run("extract", "--no-such-option"), "--no-such-option", "(see: simsiam extract --help)")
    # a group's subcommand is named whole: detect's help does not list train's options
    assert_user_error(run("detect", "train", "--config", "voc-r50-c4", "--data-root", ".", "--max-iter", "3"),
                      "--max-iter", "(see: simsiam detect train --help)")
    assert_user_error(run("detect", "nosuchcommand"), "(see: simsiam detect --help)")


@pytest.mark.parametrize("error", [RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: 30 GB"),
                                   MemoryError()])
def test_running_out_of_memory_is_one_line(tmp_path, monkeypatch, error):
    import retrieval.evaluate

    def exhausted(*args, **kwargs):
        raise error

    monkeypatch.setattr(retrieval.evaluate, "evaluate_files", exhausted)
    assert_user_error(run("knn", "--train", tmp_path / "a.h5", "--val", tmp_path / "b.h5"),
                      "out of memory", "try a smaller --batch-size")


@pytest.mark.parametrize("module, function, args, hint", [
    ("retrieval.feature_model", "load_feature_model", ["extract", "ckpt", "images", "--out", "f.h5", "--resize", "4096"],
     "; try a smaller --batch-size, --image-size or --resize"),
    ("retrieval.search", "find_neighbours", ["search", "db.h5", "--query-h5", "q.h5"], "; try a smaller --batch-size"),
    ("retrieval.index", "build_index", ["index", "db.h5", "--out", "db.index"], "; try a smaller --max-memory"),
    ("simsiam.training_curves", "plot_training_curves", ["plot", "run"], ""),
])
def test_the_out_of_memory_hint_names_only_options_of_the_command_that_ran(tmp_path, monkeypatch, module, function,
                                                                           args, hint):
    import importlib

    def exhausted(*args, **kwargs):
        raise MemoryError()

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(importlib.import_module(module), function, exhausted)
    result = run(*args)
    assert_user_error(result, "out of memory (MemoryError)")
    assert result.output.strip().endswith(f"out of memory (MemoryError){hint}"), result.output


def test_other_runtime_errors_are_not_hidden(tmp_path, monkeypatch):
    import retrieval.evaluate

    def bug(*args, **kwargs):
        raise RuntimeError("a programming error")

    monkeypatch.setattr(retrieval.evaluate, "evaluate_files", bug)
    with pytest.raises(RuntimeError, match="a programming error"):
        run("knn", "--train", tmp_path / "a.h5", "--val", tmp_path / "b.h5")


def test_help_shows_each_presets_default_from_the_preset_tables():
    from simsiam.config import PRESETS
    from transfer.lincls_config import PRESETS as LINEAR_PRESETS

    pretrain = " ".join(run("pretrain", "--help").output.split())  # help lines are wrapped
    assert (f"Epochs. [default: imagenet {PRESETS['imagenet']['epochs']}, cifar {PRESETS['cifar']['epochs']}]"
            in pretrain)
    assert "Gaussian blur augmentation (p=0.5). [default: imagenet on, cifar off]" in pretrain
    assert f"[default: {PRESETS['cifar']['batch_size']}]" in pretrain  # both presets agree
    lincls = " ".join(run("lincls", "--help").output.split())
    assert f"Epochs. [default: imagenet {LINEAR_PRESETS['imagenet']['epochs']}, cifar 100]" in lincls
    assert "from --preset" not in pretrain + lincls


@pytest.mark.parametrize("rank,shown", [("0", True), ("1", False)])
def test_ctrl_c_and_sigterm_end_with_one_line_from_rank_0_and_the_shells_status(tmp_path, monkeypatch, rank, shown):
    import signal

    import retrieval.evaluate
    from cli.main import Terminated, _terminate

    monkeypatch.setenv("RANK", rank)
    for error, status, line in ((KeyboardInterrupt(), 130, "interrupted"), (Terminated(), 143, "terminated")):
        def stop(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(retrieval.evaluate, "evaluate_files", stop)
        result = run("knn", "--train", tmp_path / "a.h5", "--val", tmp_path / "b.h5")
        assert result.exit_code == status
        assert result.output.strip() == (line if shown else "")  # knn has nothing to resume: no hint
    import simsiam.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(simsiam.train, "pretrain", interrupted)
    result = run("pretrain", tmp_path, "--out", tmp_path / "run")
    assert result.exit_code == 130
    assert result.output.strip() == ("interrupted" if shown else "")  # no checkpoint yet: nothing to resume
    # an older run being replaced (--overwrite) has a checkpoint, but not of this run: no hint
    (tmp_path / "my run").mkdir()
    (tmp_path / "my run" / "last.pth.tar").write_bytes(b"")
    os.utime(tmp_path / "my run" / "last.pth.tar", (1e9, 1e9))
    result = run("pretrain", tmp_path, "--out", tmp_path / "my run", "--overwrite")
    assert result.exit_code == 130 and result.output.strip() == ("interrupted" if shown else "")

    def interrupted_after_a_checkpoint(config, **kwargs):
        (Path(config.out) / "last.pth.tar").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(simsiam.train, "pretrain", interrupted_after_a_checkpoint)
    result = run("pretrain", tmp_path, "--out", tmp_path / "my run", "--overwrite")
    assert result.exit_code == 130
    hint = f"interrupted (continue: simsiam pretrain --resume '{tmp_path / 'my run'}')"
    assert result.output.strip() == (hint if shown else "")
    # the handler raises once; a second SIGTERM finds the default action back
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with pytest.raises(Terminated):
            _terminate(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def _parameters(command, name="simsiam"):
    import click

    for param in command.params:
        yield f"{name} {param.opts[0] if isinstance(param, click.Option) else param.human_readable_name}", param
    if isinstance(command, click.Group):
        for sub_name, sub in command.commands.items():
            yield from _parameters(sub, f"{name} {sub_name}")


def test_every_path_a_command_takes_refuses_the_empty_string():
    """Path("") is the current folder: an empty value (a quoted, unset shell variable) must not
    extract, train into or overwrite it."""
    import click

    from cli.main import simsiam
    from cli.paths import NonEmptyPath

    paths = [(where, p) for where, p in _parameters(simsiam) if isinstance(p.type, click.Path)]
    assert len(paths) > 20  # every command's files and folders
    assert [where for where, p in paths if not isinstance(p.type, NonEmptyPath)] == []
    names = {where for where, _ in paths}
    assert {"simsiam extract [CHECKPOINT] DATA", "simsiam index --out", "simsiam pretrain --out"} <= names


@pytest.mark.parametrize("args,name", [
    (["extract", "--random-init", "--arch", "resnet18", "", "--out", "f.h5"], "'[CHECKPOINT] DATA'"),
    (["index", "f.h5", "--out", ""], "'--out'"),  # was a ValueError traceback
    (["pretrain", "images", "--out", ""], "'--out'"),  # was a run in the current folder
])
def test_an_empty_path_is_one_line_and_touches_nothing(tmp_path, monkeypatch, args, name):
    from conftest import make_image_folder

    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "images", classes=2, per_class=2, ext="jpg")
    before = sorted(tmp_path.rglob("*"))
    assert_user_error(run(*args), f"Invalid value for {name}: an empty path", f"simsiam {args[0]} --help")
    assert sorted(tmp_path.rglob("*")) == before


def test_under_torchrun_an_agreed_error_is_one_line_from_rank_0_and_another_is_named_by_its_rank(monkeypatch):
    """Every process of a torchrun job runs the CLI: an error they agreed on (simsiam.runtime.agree)
    is said once, by rank 0; an error of one process alone is said by it, named by its rank."""
    from cli.main import simsiam
    from simsiam.errors import InputError, agreed

    raised = []

    @simsiam.command("fail")
    def fail():
        raise raised[-1]

    try:
        monkeypatch.setenv("WORLD_SIZE", "2")
        for rank in ("0", "1"):
            monkeypatch.setenv("RANK", rank)
            raised.append(agreed(InputError("--out r: already holds a run")))
            result = run("fail")
            if rank == "0":
                assert_user_error(result, "Error: --out r: already holds a run")
            else:
                assert result.exit_code == 2 and result.output == ""
            raised.append(InputError("x.jpg: cannot decode image"))  # this process's alone
            assert_user_error(run("fail"), f"Error: rank {rank}: x.jpg: cannot decode image")
            # the command line is every process's: rank 0 alone says what is wrong with it
            result = run("extract", "--no-such-option")
            assert result.exit_code == 2 and (result.output.startswith("Error: No such option") == (rank == "0"))
        monkeypatch.setenv("WORLD_SIZE", "1")  # one process: never a rank
        raised.append(agreed(InputError("--out r: already holds a run")))
        assert_user_error(run("fail"), "Error: --out r: already holds a run")
    finally:
        simsiam.commands.pop("fail")


def test_a_sigterm_while_ending_on_an_error_does_not_replace_its_line():
    """torchrun sends SIGTERM to the others once one process of the job has ended: a process already on
    its way to its own Error line (cleaning up, printing) finishes it; otherwise SIGTERM interrupts."""
    import signal

    import click

    from cli.main import Terminated, _terminate
    from simsiam.errors import InputError

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        for ending in (InputError("x"), click.ClickException("x")):
            try:
                raise ending
            except Exception:
                assert _terminate(signal.SIGTERM, None) is None
        # a collective that lost its peer, under torchrun: rank 0 taking back the files of a run
        # refused on another rank (cut short, they were left half removed)
        signal.signal(signal.SIGTERM, _terminate)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("WORLD_SIZE", "2")
            try:
                raise RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:29500")
            except RuntimeError:
                assert _terminate(signal.SIGTERM, None) is None
        signal.signal(signal.SIGTERM, _terminate)
        try:
            raise KeyError("handled along the way, not an error the command ends on")
        except KeyError:
            with pytest.raises(Terminated):
                _terminate(signal.SIGTERM, None)
    finally:
        signal.signal(signal.SIGTERM, previous)


# Ctrl-C or SIGTERM landing while a DataLoader worker forks: the hook below stands for Python code
# run in the fork (an os.register_at_fork callback), where the handler's exception is swallowed.
_SIGNAL_IN_A_FORK_CALLBACK = """
import os, signal, sys
sent = []

def in_the_fork_callback():
    if not sent:
        sent.append(os.kill(os.getpid(), signal.{signal}))
        sum(range(100000))  # Python code: the signal's handler runs here

os.register_at_fork(before=in_the_fork_callback)
sys.argv[0] = "simsiam"
from cli.main import main
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("name,status,word", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_a_signal_swallowed_in_a_fork_callback_still_stops_the_command(tmp_path, name, status, word):
    """It printed "Exception ignored in ...", and the extraction went on to its end with exit 0."""
    import subprocess
    import sys

    from conftest import make_image_folder

    repo = Path(__file__).resolve().parents[1]
    # 64 batches of one image: the extraction goes on well past the 10 ms after which the signal is raised again
    data = make_image_folder(tmp_path / "data", classes=2, per_class=32, size=16, ext="jpg")
    out = tmp_path / "out" / "feats.h5"
    done = subprocess.run(
        [sys.executable, "-c", _SIGNAL_IN_A_FORK_CALLBACK.format(signal=name), "extract", "--random-init",
         "--arch", "resnet18", str(data), "--out", str(out), "--image-size", "16", "--resize", "0",
         "--workers", "1", "--batch-size", "1", "--device", "cpu"],
        cwd=repo, env={**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}, capture_output=True,
        text=True, timeout=120)
    assert done.returncode == status, done.stderr
    assert done.stderr.strip().splitlines()[-1] == word, done.stderr
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not out.parent.exists()


def test_only_the_main_processs_interrupts_are_raised_again_and_after_one_nothing_is_printed(monkeypatch):
    """A swallowed KeyboardInterrupt (SIGTERM's Terminated too) is raised again by the timer; any other
    exception Python could not raise is printed as before, until the command has ended on an
    interrupt: then the objects it cut short fail quietly as they go."""
    import signal
    import sys
    import types

    import cli.main

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    monkeypatch.setattr(cli.main, "_interrupted", False)
    monkeypatch.setattr(cli.main, "_ended", False)
    monkeypatch.setattr(cli.main, "_swallowed", [])
    previous = signal.getsignal(signal.SIGALRM)
    try:
        cli.main._catch_swallowed_interrupts()
        ignored = types.SimpleNamespace(exc_type=ValueError, exc_value=ValueError("x"))
        sys.unraisablehook(ignored)
        assert seen == [ignored] and cli.main._swallowed == []
        sys.unraisablehook(types.SimpleNamespace(exc_type=cli.main.Terminated, exc_value=cli.main.Terminated()))
        assert cli.main._swallowed == [cli.main.Terminated] and seen == [ignored]
        with pytest.raises(cli.main.Terminated):
            signal.getsignal(signal.SIGALRM)(signal.SIGALRM, None)  # what the timer calls
        assert cli.main._swallowed == []
        signal.getsignal(signal.SIGALRM)(signal.SIGALRM, None)  # nothing left to raise
        # as _terminate: a process already ending on its error (torchrun stopping the job) says that error
        from simsiam.errors import InputError

        cli.main._swallowed.append(cli.main.Terminated)
        try:
            raise InputError("--out r: already holds a run")
        except InputError:
            signal.getsignal(signal.SIGALRM)(signal.SIGALRM, None)
        assert cli.main._swallowed == []
        cli.main._swallowed.append(KeyboardInterrupt)
        signal.setitimer(signal.ITIMER_REAL, 100)
        cli.main._forget_swallowed_interrupts()  # the command ended: an interrupt now is not raised again
        assert cli.main._swallowed == [] and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        sys.unraisablehook(types.SimpleNamespace(exc_type=KeyboardInterrupt, exc_value=KeyboardInterrupt()))
        assert cli.main._swallowed == [] and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        sys.unraisablehook(ignored)  # ended without an interrupt: printed as before
        assert seen == [ignored, ignored]
        cli.main._forget_swallowed_interrupts(interrupted=True)
        sys.unraisablehook(ignored)
        assert seen == [ignored, ignored] and cli.main._swallowed == []
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
