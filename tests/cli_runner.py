"""Running ``simsiam`` commands in-process, and what a user error must look like."""

from click.testing import CliRunner

from cli.main import simsiam


def run(*args):
    return CliRunner().invoke(simsiam, [str(a) for a in args], catch_exceptions=False)


def assert_user_error(result, *fragments, only_line: bool = True):
    """Exit status 2, one ``Error:`` line naming the problem, no traceback.

    ``only_line``: that line is the whole output (errors found before any work starts); else it is
    the last line, after the progress output of a run that failed on the way.
    """
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.output
    if only_line:
        assert len(result.output.splitlines()) == 1, repr(result.output)  # not even an empty line before it
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.output


def assert_resume_refuses_edited(command: str, checkpoint, folder, edits) -> None:
    """``simsiam COMMAND --resume`` of ``checkpoint`` edited by each ``(edit, message)`` of
    ``edits`` (a function changing the loaded dict in place) is refused in one line naming the
    file and saying ``message``, and makes no run folder."""
    import torch

    edited, out = folder / "edited.pth.tar", folder / "resumed"
    for edit, message in edits:
        saved = torch.load(checkpoint, weights_only=True)
        edit(saved)
        torch.save(saved, edited)
        assert_user_error(run(command, "--resume", edited, "--out", out, "--epochs", "2"), f"--resume {edited}: ",
                          message)
        assert not out.exists()
