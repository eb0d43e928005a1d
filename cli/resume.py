"""``--resume`` of the training commands: the checkpoint to continue and the run config it saved,
and the command that continues a run stopped by Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import shlex
import time
from contextlib import contextmanager
from pathlib import Path

from .main import UserError


def saved_run(resume: Path, preset: str | None, command: str, required: str) -> tuple[Path, dict]:
    """The checkpoint that ``--resume`` names (a run folder or a checkpoint file) and its saved
    config. Refused: a checkpoint of another command (its config lacks ``required``) and a
    ``--preset`` other than the run's own, since a preset decides settings a resume cannot change."""
    from simsiam.checkpoint import find_resume_checkpoint, load_checkpoint
    from simsiam.run_dir import settle_before_resume

    if resume.is_dir():
        settle_before_resume(resume)
    checkpoint_path = find_resume_checkpoint(resume)
    saved = load_checkpoint(checkpoint_path, mmap=True).get("config")
    if not isinstance(saved, dict) or required not in saved:
        raise UserError(f"--resume {resume}: not a checkpoint of simsiam {command} (no run config to continue from)")
    if preset is not None and preset != saved.get("preset"):
        raise UserError(f"--preset {preset}: the run being resumed used --preset {saved.get('preset')}")
    return checkpoint_path, saved


def epochs_option(config, saved: dict | None) -> list[str]:
    """``--epochs N`` when a resume grew the run's epochs: the checkpoint it resumed from still says
    the old number, so continuing from that one again needs it said."""
    return ["--epochs", str(config.epochs)] if saved is not None and saved.get("epochs") != config.epochs else []


@contextmanager
def resume_hint(command: str, out: str, resume_from: Path | None, options: list[str] = ()):
    """A Ctrl-C or SIGTERM in the block carries the command that continues the run (with
    ``options``), for the one line the CLI prints; only once ``out`` holds a checkpoint of this
    run: one saved since the block began, or any when resuming from a checkpoint in ``out``. An
    older run that ``--overwrite`` is replacing must not be offered."""
    from simsiam.run_dir import saved_since

    continuing = resume_from is not None and Path(resume_from).resolve().parent == Path(out).resolve()
    since = 0 if continuing else time.time() - 1  # the margin: file times may lag the clock a little
    try:
        yield
    except KeyboardInterrupt as err:
        if saved_since(Path(out), since):  # never raises: it runs while the interrupt is handled
            launcher = "simsiam" if int(os.environ.get("WORLD_SIZE", "1")) == 1 else "torchrun ... -m cli"
            err.resume_command = " ".join([launcher, command, "--resume", shlex.quote(out), *options])
        raise
