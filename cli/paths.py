"""The type of every path the commands take."""

from __future__ import annotations

from pathlib import Path

import click


class NonEmptyPath(click.Path):
    """A path, never the empty string: ``Path("")`` is the current folder, which an empty value
    (a quoted, unset shell variable: ``--out "$RUN"``) never means."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value:
            self.fail("an empty path", param, ctx)
        return super().convert(value, param, ctx)


PATH = NonEmptyPath(path_type=Path)
