"""Typed errors the library raises; the CLI turns them into one-line messages and exit codes."""


class SimSiamError(Exception):
    """Base class of every error the library raises on purpose."""


class InputError(SimSiamError, ValueError):
    """Something the user gave us is wrong: a path, a file's content, an option's value.

    The message is one line that names the input and says what is wrong with it.
    """


class TrainingDiverged(SimSiamError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
