"""The ``simsiam`` click group, and the one place where library errors become exit codes."""

from __future__ import annotations

import click

from simsiam import __version__
from simsiam.errors import SimSiamError


class UserError(click.ClickException):
    """A one-line ``Error: ...`` and exit status 2, for bad input and failed runs alike."""

    exit_code = 2


class SimSiamGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SimSiamError as err:
            raise UserError(str(err)) from None


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


def main() -> None:
    simsiam(prog_name="simsiam")
