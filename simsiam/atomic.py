"""Files that appear complete or not at all: written under a temporary name, then renamed."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", replace: bool = True, **open_options):
    """Yield a file in ``path``'s folder; it replaces ``path`` only when the block completes
    (``replace`` False: it is refused if a file appeared there meanwhile, see :func:`settle_temporary`).

    The data is fsync'ed before the rename, so a crash or a SIGKILL at any moment leaves the old
    file or the new one, never half of one; the temporary file (``.NAME.XXXX.tmp``) is removed
    when the block raises.
    """
    path = Path(path)
    tmp = new_temporary(path)
    try:
        with open(tmp, mode, **open_options) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        settle_temporary(tmp, path, replace)
    except OSError as err:
        discard_temporary(tmp)
        if err.filename is None or err.filename == str(tmp):  # a full disk, say: name the file the user chose
            raise OSError(err.errno, err.strerror or str(err), str(path)) from None
        raise
    except BaseException:
        discard_temporary(tmp)
        raise


# What an input or output path that exists but is no file is (said where a file is expected).
NOT_A_REGULAR_FILE = "is not a regular file (a device, a pipe or a socket)"

# The folders new_temporary made for a temporary file, which discard_temporary removes with it.
_FOLDERS_MADE_FOR: dict[Path, list[Path]] = {}


def new_temporary(path: str | os.PathLike) -> Path:
    """Create an empty, hidden ``.NAME.XXXX.tmp`` beside ``path`` (never mistaken for a finished
    file), making ``path``'s missing folders. An error names ``path``: the user never chose the
    temporary name."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "is a folder; give a file name", str(path))
    missing = [folder for folder in path.parents if not folder.exists()]  # deepest first
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{_within_name_max(path.name)}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make the file private to its writer
        os.close(fd)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from None
    if missing:
        _FOLDERS_MADE_FOR[Path(tmp)] = missing
    return Path(tmp)


NAME_MAX = 255  # bytes of a file name on Linux's file systems


def _within_name_max(name: str) -> str:
    """``name`` cut to leave room in a file name for the temporary's dots and its random part
    (``.NAME.XXXXXXXX.tmp``): a name the system takes must not fail for its temporary's sake."""
    room = NAME_MAX - len("..XXXXXXXX.tmp")
    encoded = os.fsencode(name)
    return name if len(encoded) <= room else os.fsdecode(encoded[:room])


def discard_temporary(tmp: Path) -> None:
    """Remove a temporary file of :func:`new_temporary`, and the folders made for it that are still
    empty: a failed command leaves no trace of the output it did not write. Where it cannot be
    removed (a folder made read-only meanwhile) it stays: the error being raised is the one to
    report, not this one about a hidden name the user never chose."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass
    for folder in _FOLDERS_MADE_FOR.pop(tmp, []):
        try:
            folder.rmdir()
        except OSError:  # not empty (another file was written there since), or gone
            break


def settle_temporary(tmp: Path, path: str | os.PathLike, replace: bool = True) -> None:
    """Rename a complete temporary file of :func:`new_temporary` into place at ``path``; the
    folders made for it now hold a file, and are no longer the temporary's to remove.

    ``replace`` False (no ``--overwrite``): a file that appeared at ``path`` since the command
    checked it (another command writing the same output) is not replaced: a hard link, which an
    existing name refuses, then the temporary's name removed. Two such commands both said "wrote",
    and the first one's file was gone."""
    written_meanwhile = InputError(f"{path}: exists (written meanwhile by another command); pass --overwrite to "
                                   "replace it")
    if replace:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise written_meanwhile from None
        except OSError:  # a file system without hard links: the check and the rename, a moment apart
            if os.path.lexists(path):
                raise written_meanwhile from None
            os.replace(tmp, path)
        else:
            os.unlink(tmp)
    _FOLDERS_MADE_FOR.pop(tmp, None)


_TEMPORARY_NAME = re.compile(r"^\.(.+)\.[^.]+\.tmp$")  # .NAME.XXXX.tmp, as new_temporary and link_atomic name them


def temporary_for(name: str) -> str | None:
    """The file name a temporary of this module stands for (``.x.h5.ab12cd.tmp``: ``x.h5``), None
    for a name that is not one: a leftover of a process killed while writing can be told from others."""
    match = _TEMPORARY_NAME.match(name)
    return match.group(1) if match else None


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
    folder that cannot be made or written in, one of the ``inputs``, or an existing file without
    ``overwrite``. An input folder counts with the images under it, new ones included.
    Missing folders are made by the writer, once there is something to write."""
    name = os.fsencode(Path(out).name)
    if len(name) > NAME_MAX:  # before any work (index's OUT.json is 5 bytes longer than OUT); stat() would raise
        raise InputError(f"{option} {out}: a file name of {len(name)} bytes; a file name has at most {NAME_MAX}")
    if str(out).endswith(os.sep) or Path(out).is_dir():  # "new/" names a folder, which Path() forgets
        raise InputError(f"{option} {out}: is a folder; give a file name")
    out = Path(out)
    existing = next(folder for folder in out.parents if folder.exists() or folder == folder.parent)
    if not existing.is_dir():
        raise InputError(f"{option} {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise InputError(f"{option} {out}: no permission to write in {existing}")
    # the file is written beside it and renamed over it: that replaces a link or a device itself (as
    # root, --out /dev/null --overwrite made /dev/null a plain file), instead of writing through it
    if out.is_symlink():  # a dangling one too, which exists() does not see
        raise InputError(f"{option} {out}: is a symbolic link (to {os.readlink(out)}); the file would replace the "
                         "link, not be written where it points: give the path of a file")
    if out.exists() and not out.is_file():
        raise InputError(f"{option} {out}: {NOT_A_REGULAR_FILE}; give the path of a file")
    if out.exists() and any(_is_or_holds(Path(p), out) for p in inputs):
        raise InputError(f"{option} {out}: is an input of this command; choose another name")
    # a new image (search's --grid PNG) in a folder of images read: one more image there for every later scan
    folder = next((p for p in inputs if not out.exists() and Path(p).is_dir() and _is_or_holds(Path(p), out)), None)
    if folder is not None:
        raise InputError(f"{option} {out}: is inside {folder}, a folder of images this command reads, where it would "
                         "become one of its images; write it elsewhere")
    if out.exists() and not overwrite:
        raise InputError(f"{option} {out}: exists; pass --overwrite to replace it")
    return out


def _is_or_holds(given: Path, existing: Path) -> bool:
    """Whether ``existing`` is the file ``given``, or an image the folder ``given`` holds."""
    if not given.exists():
        return False
    if given.is_dir():
        from .image_folders import is_image_name

        # both spellings: the folder's listing follows symbolic links below it, resolve() does not keep them
        inside = (existing.resolve().is_relative_to(given.resolve())
                  or Path(os.path.abspath(existing)).is_relative_to(os.path.abspath(given)))
        return is_image_name(existing.name) and inside
    return existing.samefile(given)
