"""``--resume`` of the training commands: the checkpoint to continue and the run config it saved,
and the command that continues a run stopped by Ctrl-C or SIGTERM."""

from __future__ import annotations

import shlex
from contextlib import contextmanager
from pathlib import Path

from .main import UserError


def saved_run(resume: Path, preset: str | None, command: str, required: str) -> tuple[Path, dict]:
    """The checkpoint that ``--resume`` names (a run folder or a checkpoint file) and its saved
    config. Refused: a checkpoint of another command (its config lacks ``required``) and a
    ``--preset`` other than the run's own, since a preset decides settings a resume cannot change."""
    from simsiam.checkpoint import find_resume_checkpoint, load_checkpoint

    checkpoint_path = find_resume_checkpoint(resume)
    saved = load_checkpoint(checkpoint_path, mmap=True).get("config")
    if not isinstance(saved, dict) or required not in saved:
        raise UserError(f"--resume {resume}: not a checkpoint of simsiam {command} (no run config to continue from)")
    if preset is not None and preset != saved.get("preset"):
        raise UserError(f"--preset {preset}: the run being resumed used --preset {saved.get('preset')}")
    return checkpoint_path, saved


@contextmanager
def resume_hint(command: str, out: str):
    """A Ctrl-C or SIGTERM in the block carries the command that continues the run, for the one
    line the CLI prints; only once the run folder holds a checkpoint to continue from."""
    from simsiam.run_dir import holds_run

    try:
        yield
    except KeyboardInterrupt as err:
        if holds_run(Path(out)):
            err.resume_command = f"simsiam {command} --resume {shlex.quote(out)}"
        raise
