"""Files that appear complete or not at all: written under a temporary name, then renamed."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Yield a file in ``path``'s folder; it replaces ``path`` only when the block completes.

    The data is fsync'ed before the rename, so a crash or a SIGKILL at any moment leaves the old
    file or the new one, never half of one; the temporary file (``.NAME.XXXX.tmp``) is removed
    when the block raises.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def link_atomic(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make ``path`` another name of ``source`` (a hard link, a copy where links are refused)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, path)
