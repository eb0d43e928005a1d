"""Files that appear complete or not at all: written under a temporary name, then renamed."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_options):
    """Yield a file in ``path``'s folder; it replaces ``path`` only when the block completes.

    The data is fsync'ed before the rename, so a crash or a SIGKILL at any moment leaves the old
    file or the new one, never half of one; the temporary file (``.NAME.XXXX.tmp``) is removed
    when the block raises.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "is a folder; give a file name", str(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make the file private to its writer
        with os.fdopen(fd, mode, **open_options) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def check_output(out: str | os.PathLike, option: str, overwrite: bool, inputs=()) -> Path:
    """Refuse, before any work, an output file that cannot or should not be written: a folder, a
    missing parent folder, one of the ``inputs``, or an existing file without ``overwrite``."""
    out = Path(out)
    if out.is_dir():
        raise InputError(f"{option} {out}: is a folder; give a file name")
    if not out.parent.is_dir():
        raise InputError(f"{option} {out}: the folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise InputError(f"{option} {out}: no permission to write in {out.parent}")
    if any(Path(p).exists() and out.exists() and out.samefile(p) for p in inputs):
        raise InputError(f"{option} {out}: is an input of this command; choose another name")
    if out.exists() and not overwrite:
        raise InputError(f"{option} {out}: exists; pass --overwrite to replace it")
    return out
