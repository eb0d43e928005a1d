"""The ``simsiam`` click group, and the one place where library errors become exit codes."""

from __future__ import annotations

import click

from simsiam import __version__
from simsiam.errors import SimSiamError, lost_peer


class UserError(click.ClickException):
    """A one-line ``Error: ...`` and exit status 2, for bad input and failed runs alike."""

    exit_code = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's time limit, torchrun stopping its workers), raised like Ctrl-C:
    the temporary files of unfinished outputs are removed on the way out. A KeyboardInterrupt, so
    that DataLoader workers, which inherit the handler, end quietly as they do on Ctrl-C."""


def _terminate(signum, frame):
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    if _ending_on_error():
        return
    raise Terminated()


def _ending_on_error() -> bool:
    """Whether the process is already ending on its error, on its way to the Error line (cleaning up,
    or printing it): under torchrun, the SIGTERM that follows when another process of the job has
    ended first (for the same error, most often) would replace that line with "terminated", and
    cut its cleanup short (the run files of a run refused on another rank were left half removed)."""
    import sys

    ending = sys.exc_info()[1]
    return isinstance(ending, (SimSiamError, click.ClickException)) or (ending is not None and _peer_failed(ending))


class SimSiamGroup(click.Group):
    """Every user mistake ends as one ``Error:`` line and exit status 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as err:  # click would print "Aborted!" and exit 1
            import os

            _forget_swallowed_interrupts(interrupted=True)  # a second one on the way out changes nothing
            terminated = isinstance(err, Terminated)
            if os.environ.get("RANK", "0") == "0":  # torchrun: one line, from rank 0
                resume = getattr(err, "resume_command", None)  # set by pretrain and lincls once a checkpoint exists
                hint = f" (continue: {resume})" if resume else ""
                click.echo(f"{'terminated' if terminated else 'interrupted'}{hint}", err=True)
            ctx.exit(143 if terminated else 130)  # the shells' 128 + signal number
        except SimSiamError as err:
            if err.agreed and _rank() != "0":  # every process of the torchrun job failed so, and rank 0 says it
                ctx.exit(2)
            raise UserError(str(err) if err.agreed else _this_process(str(err))) from None
        except click.UsageError as err:  # click's own would print the usage and a hint: 4 lines
            if _rank() != "0":  # the command line is every process's: rank 0 says what is wrong with it
                ctx.exit(2)
            if isinstance(err, getattr(click.exceptions, "NoArgsIsHelpError", ())):  # click 8.2+: a group given
                raise  # no command shows its help
            raise UserError(f"{err.format_message()} (see: {_command_of(err.ctx, ctx)} --help)") from None
        except OSError as err:  # a path given: a missing folder, no permission, a folder for a file, a full disk
            if isinstance(err, BrokenPipeError) and _stdout_closed():
                raise  # piped into a reader that stopped (| head): not an error; click's main ends it quietly
            raise UserError(_this_process(_os_error(err))) from None
        except (MemoryError, RuntimeError) as err:
            if _peer_failed(err):  # its own Error line is the one that says why
                raise UserError(_this_process("stopped, another process of this torchrun job failed "
                                              "(its error is above)")) from None
            if not _out_of_memory(err):
                raise
            command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            raise UserError(_this_process(f"out of memory ({_first_line(err)}){_memory_hint(command)}")) from None


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on its write end), as
    opposed to another pipe of the command's (a worker's) that broke."""
    import select
    import sys

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
    except (OSError, ValueError, AttributeError):  # no real file (a test runner's), no poll
        return False
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _under_torchrun() -> bool:
    """Whether this process is one of several of a torchrun job."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _rank() -> str:
    """This process's rank under torchrun; "0" alone."""
    import os

    return os.environ.get("RANK", "0") if _under_torchrun() else "0"


def _this_process(message: str) -> str:
    """An error of this process alone (the processes did not agree on it): under torchrun, its rank
    first, as every process that fails prints its own line."""
    return f"rank {_rank()}: {message}" if _under_torchrun() else message


# Options that bound a command's memory use, in the order a hint names them.
MEMORY_OPTIONS = ("--batch-size", "--chunk-size", "--image-size", "--resize", "--max-memory")


def _memory_hint(command: click.Command | None) -> str:
    """"; try a smaller --batch-size or --image-size", naming only options the command that ran has
    (a group: its subcommands'), or nothing where it has none."""
    commands = list(command.commands.values()) if isinstance(command, click.Group) else [command] if command else []
    names = {name for c in commands for param in c.params for name in param.opts}
    have = [option for option in MEMORY_OPTIONS if option in names]
    if not have:
        return ""
    return "; try a smaller " + (f"{', '.join(have[:-1])} or {have[-1]}" if len(have) > 1 else have[0])


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _command_of(failed: click.Context | None, root: click.Context) -> str:
    """``simsiam detect train``: the (sub)command whose line was wrong, as the user types it."""
    names = []
    while failed is not None and failed.parent is not None:
        names.append(failed.info_name)
        failed = failed.parent
    if not names and root.invoked_subcommand:
        names = [root.invoked_subcommand]
    return " ".join(["simsiam", *reversed(names)])


def _os_error(err: OSError) -> str:
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{err.strerror or _first_line(err)}"


def _peer_failed(err: BaseException) -> bool:
    """Under torchrun, a collective that lost a peer (:func:`simsiam.errors.lost_peer`)."""
    return _under_torchrun() and lost_peer(err)


def _out_of_memory(err: BaseException) -> bool:
    # torch.OutOfMemoryError (CUDA), the CPU allocator's RuntimeError; checked by name so that
    # this module does not import torch
    text = str(err)
    return (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in text or "out of memory" in text.lower())


@click.group(cls=SimSiamGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="simsiam")
def simsiam():
    """SimSiam pretraining, embeddings, kNN, search and detection transfer."""


# Each module holds one command (or command group) named ``command``.
COMMAND_MODULES = (
    "convert_d2",
    "detect",
    "extract",
    "index",
    "knn",
    "lincls",
    "plot",
    "pretrain",
    "quickstart",
    "search",
)


def _register() -> None:
    import importlib

    for name in COMMAND_MODULES:
        simsiam.add_command(importlib.import_module(f"cli.{name}").command)


_register()


# The class of a Ctrl-C or SIGTERM that Python swallowed (see _catch_swallowed_interrupts), until
# it is raised again; whether the command has ended, and whether on an interrupt.
_swallowed: list[type[KeyboardInterrupt]] = []
_ended = _interrupted = False


def _catch_swallowed_interrupts() -> None:
    """Ctrl-C and SIGTERM raise in the main thread wherever it is. Where that is a callback Python
    calls from C (an ``os.register_at_fork`` hook as DataLoader workers start, a ``__del__``), the
    exception cannot propagate: Python prints "Exception ignored in ..." and the run went on to its
    end. Such an interrupt is raised again a moment later, from wherever the main thread is then
    (again, if that is such a callback too), by SIGALRM.

    Once the command has ended, an interrupt is not raised again (its outputs are settled; raised
    as the interpreter exits it would only print a traceback); once it has ended on an interrupt,
    what Python cannot raise is not printed either: the objects the interrupt cut short fail as they
    go (torch's DataLoader iterator stopped while it started its workers raises AttributeError in
    its ``__del__``), after the one line that said why."""
    import os
    import signal
    import sys

    global _ended, _interrupted
    main_process, default_hook = os.getpid(), sys.unraisablehook
    _ended = _interrupted = False

    def hook(unraisable) -> None:
        if os.getpid() != main_process:
            default_hook(unraisable)
        elif isinstance(unraisable.exc_value, KeyboardInterrupt):
            if not _ended:
                _swallowed[:] = [unraisable.exc_type]
                signal.setitimer(signal.ITIMER_REAL, 0.01)  # not here: this is the callback
        elif not _interrupted:
            default_hook(unraisable)

    def raise_again(signum, frame) -> None:
        if _swallowed and os.getpid() == main_process:  # a forked worker inherits the handler, not the timer
            interrupt = _swallowed.pop()
            if not _ending_on_error():  # as _terminate: the run's own error is the one to say
                raise interrupt()

    signal.signal(signal.SIGALRM, raise_again)
    sys.unraisablehook = hook


def _forget_swallowed_interrupts(interrupted: bool = False) -> None:
    """The command has ended (``interrupted``: on an interrupt): none is to be raised again."""
    import signal

    global _ended, _interrupted
    _ended, _interrupted = True, _interrupted or interrupted
    if _swallowed:
        _swallowed.clear()
        signal.setitimer(signal.ITIMER_REAL, 0)


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    _catch_swallowed_interrupts()
    try:
        simsiam(prog_name="simsiam")
    finally:
        # the command is over, its outputs settled: a SIGTERM now (torchrun stopping the other ranks
        # of a failed job) would only interrupt the interpreter's exit with a traceback
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _forget_swallowed_interrupts()
