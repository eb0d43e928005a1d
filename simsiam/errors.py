"""Typed errors the library raises; the CLI turns them into one-line messages and exit codes."""

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class SimSiamError(Exception):
    """Base class of every error the library raises on purpose."""

    # Under torchrun: True when every process raises this error, having agreed on it
    # (:func:`simsiam.runtime.agree`); the CLI then reports it once, from rank 0.
    agreed = False


def agreed(error: SimSiamError) -> SimSiamError:
    """``error``, marked as raised by every process of a torchrun job alike (a check of values they
    all reduced together, or :func:`simsiam.runtime.agree`): the CLI reports it once, from rank 0."""
    error.agreed = True
    return error


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective's failure on losing a peer of its torchrun job: another rank
    ended (an input error of its own, a crash). Checked by name and text, so that the CLI need not
    import torch."""
    text = str(err)
    return (type(err).__name__ in ("DistBackendError", "DistNetworkError")
            or "closed by peer" in text or "reset by peer" in text)


class InputError(SimSiamError, ValueError):
    """Something the user gave us is wrong: a path, a file's content, an option's value.

    The message is one line that names the input and says what is wrong with it.
    """


class TrainingDiverged(SimSiamError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@contextmanager
def given_as(option: str, value) -> Iterator[None]:
    """Within the block, an InputError about ``value`` (its message starts with the bare path) names
    the option the user gave it with, and the path as typed: ``--checkpoint ./x.pth: no such checkpoint file``.

    The readers (of checkpoints, feature files, folders) name the path they read; only the caller
    knows which option it came from.
    """
    try:
        yield
    except InputError as err:
        message = str(err)
        for spelling in {str(value), str(Path(value))}:  # as typed, and as pathlib spells it ("./x" is "x")
            if message.startswith(f"{spelling}:"):
                # the same error, type and traceback kept; the path as the user typed it
                err.args = (f"{option} {value}{message[len(spelling):]}",)
                break
        raise
