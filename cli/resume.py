"""``--resume`` of the training commands: the checkpoint to continue and the run config it saved."""

from __future__ import annotations

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
