"""The type of every path the commands take."""

from __future__ import annotations

import os
from pathlib import Path

import click


class NonEmptyPath(click.Path):
    """A path, never the empty string: ``Path("")`` is the current folder, which an empty value
    (a quoted, unset shell variable: ``--out "$RUN"``) never means."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value:
            self.fail("an empty path", param, ctx)
        return super().convert(value, param, ctx)


class OutputFile(NonEmptyPath):
    """A file to write. A value ending in a slash names a folder, even a new one: ``Path`` drops
    the slash, and a file of that name would be written instead."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.endswith(os.sep):
            self.fail(f"{value}: is a folder; give a file name", param, ctx)
        return super().convert(value, param, ctx)


PATH = NonEmptyPath(path_type=Path)
OUTPUT_FILE = OutputFile(path_type=Path)
