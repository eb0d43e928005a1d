"""The run folder of ``pretrain`` and ``lincls``: what marks it as holding a run, the checks
before a run starts in it, the lock of the run writing it, and its ``metrics.jsonl``."""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from .atomic import atomic_write, temporary_for
from .checkpoint import LAST, load_checkpoint
from .errors import InputError, SimSiamError, agreed, lost_peer
from .runtime import Runtime, agreement, start, stop

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
# Files that mark a folder as holding a run, and that --overwrite removes.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, LAST)
NUMBERED_CHECKPOINTS = "checkpoint_*.pth.tar"  # epoch_checkpoint_name's

LOCK_FILE = ".lock"


# Where a fresh run keeps the files of the run it replaces (--overwrite) until its first checkpoint.
REPLACED_RUN = ".replaced-run"
# inside .replaced-run/ while files move between it and the run folder: every run file there is
# the replaced run's, and belongs back (the new run has written nothing yet, or took its files back)
IN_TRANSIT = ".in-transit"


class RunFolder:
    """The run folder while a run holds its lock (what :func:`locked_run_dir` yields)."""

    def __init__(self, path: Path):
        self.path = path
        self.started_fresh = False  # whether this run replaced the folder's run files with its own
        self.replaced: Path | None = None  # the replaced run's files, until this run saves a checkpoint

    def prepare(self, resume_from: str | os.PathLike | None, also: tuple[str, ...] = ()) -> None:
        """Make the run folder. A fresh run moves the files of the run it replaces (and ``also``,
        names of its own outputs) aside into ``.replaced-run/``: they go for good with its first
        checkpoint (:meth:`saved`), and come back if it ends before one (:meth:`end`), so that an
        ``--overwrite`` run refused at its first batch does not cost the run it was to replace."""
        out = self.path
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp"):  # left by a run killed while writing
            # only the run's own: another command writing in the folder (extract, plot) holds its own
            if _is_run_output(temporary_for(stale.name), also):
                stale.unlink(missing_ok=True)
        if _resuming_in(out, resume_from):
            return
        self.started_fresh = True
        replaced = [p for p in (*_replaced_files(out), *(out / name for name in also)) if p.exists()]
        if replaced:
            self.replaced = out / REPLACED_RUN
            self.replaced.mkdir()
            # stopped half-way (Ctrl-C, kill -9), the old run's checkpoints not yet moved would pass
            # for the new run's first one, and the moved files would go for good
            (self.replaced / IN_TRANSIT).touch()
            for path in replaced:
                os.replace(path, self.replaced / path.name)
            (self.replaced / IN_TRANSIT).unlink()

    def saved(self) -> None:
        """This run saved a checkpoint: the run it replaced is gone for good."""
        if self.replaced is not None:
            shutil.rmtree(self.replaced, ignore_errors=True)
            self.replaced = None

    def end(self, refused: bool) -> None:
        """A fresh run that ends before its first checkpoint takes back its config.json and
        metrics.jsonl when it was ``refused`` for bad input (they would only make the folder look
        like it holds a run) or when the run it replaced comes back; otherwise (diverged,
        interrupted) they stay as its log. A resumed run's files are the earlier run's."""
        if self.replaced is not None and (self.replaced / IN_TRANSIT).exists():  # stopped while moving them aside
            _give_back_replaced(self.path)
            self.replaced = None
            return
        if not self.started_fresh or checkpoint_files(self.path):
            self.saved()
            return
        if self.replaced is not None:
            _give_back_replaced(self.path)
            self.replaced = None
        elif refused:
            _remove_run_files(self.path)


def _remove_run_files(out: Path) -> None:
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def _give_back_replaced(out: Path) -> None:
    """Put the files of ``out/.replaced-run/`` back in ``out``, in place of the run files there
    (those of a run that saved no checkpoint), and remove the folder. Marked in transit first: a
    second Ctrl-C or a kill half-way leaves the rest for the next start to bring back, where the old
    checkpoints already back would pass for the new run's, and the rest would go for good."""
    folder = out / REPLACED_RUN
    if not any(folder.iterdir()):  # stopped just after making it, or just before removing it: nothing aside
        folder.rmdir()
        return
    if not (folder / IN_TRANSIT).exists():  # (when it is, what is in out is the old run's, moved or not yet)
        _remove_run_files(out)
        (folder / IN_TRANSIT).touch()
    for path in folder.iterdir():
        if path.name != IN_TRANSIT:
            os.replace(path, out / path.name)
    (folder / IN_TRANSIT).unlink()
    folder.rmdir()


def _settle_replaced(out: Path) -> None:
    """A ``.replaced-run/`` left by a run killed (``kill -9``) before its first checkpoint, or while
    its files moved, holds the run it was replacing: put back; after one, it is gone for good."""
    folder = out / REPLACED_RUN
    if not folder.is_dir():
        return
    if (folder / IN_TRANSIT).exists() or not checkpoint_files(out):
        _give_back_replaced(out)
    else:
        shutil.rmtree(folder, ignore_errors=True)


def settle_before_resume(folder: Path, wait_s: float = 10.0) -> None:
    """What a start into ``folder`` does first, done before ``--resume`` looks for its checkpoint:
    put back the run that an ``--overwrite`` run killed (``kill -9``) before its first checkpoint
    was replacing, else ``--resume`` finds no checkpoint. Under the folder's lock. Under torchrun
    every process gets here: the first takes the lock and settles, the others wait for it (at
    most ``wait_s``, the time a live run holding the lock is given before the refusal)."""
    deadline = time.monotonic() + wait_s
    while (folder / REPLACED_RUN).is_dir():
        try:
            lock = _lock(folder)
        except FolderBusy:
            if time.monotonic() > deadline:
                raise InputError(f"--resume {folder}: another simsiam run is writing in this folder; wait for it "
                                 "to end") from None
            time.sleep(0.1)
            continue
        try:
            _settle_replaced(folder)  # once: what it cannot remove, the start's own settling meets again
        finally:
            _unlock(folder, lock)
        return


def run_in_folder(config, overwrite: bool, body: Callable[[Runtime, "RunFolder"], dict]) -> dict:
    """What ``pretrain`` and ``lincls`` share around their training: start the runtime; check the
    settings and that ``--out`` is apart from the inputs (agreed under torchrun, one Error line
    for all); hold the folder's lock while ``body(runtime, run_folder)`` runs; stop the runtime
    however it ends."""
    runtime = start(config.device, config.precision)
    together = False  # every process ends here: finished, or on an error they agreed on
    try:
        with agreement(runtime):
            config.validate()
            check_out_apart_from_inputs(config, overwrite)
        # the run seeds torch's generators (and a resumed one sets their state): the caller's CPU
        # generator and the run's GPU's are given back as they were, so that a script's own seeding
        # still counts after the call (not those of other GPUs: forking them would make a context on each)
        cuda = [runtime.device.index or 0] if runtime.device.type == "cuda" else []
        with locked_run_dir(Path(config.out), runtime) as run_folder, torch.random.fork_rng(devices=cuda):
            result = body(runtime, run_folder)
        together = True
        return result
    except SimSiamError as err:
        together = err.agreed
        raise
    finally:
        stop(runtime, together)


@contextmanager
def locked_run_dir(out: Path, runtime=None):
    """Hold ``out``'s lock for the block (making ``out``): a second run started into the same
    folder is refused at once, instead of interleaving its files with those of the first.
    Yields a :class:`RunFolder`, through which the run prepares the folder.

    An ``flock`` taken by the main process: the kernel releases it however the process ends (a
    ``kill -9`` leaves the empty lock file, harmless: the next run takes it). Under ``torchrun``
    (``runtime`` distributed) every rank learns the outcome, so none goes on alone. The lock file
    goes when the block ends, and so do the folders made here when the block left them empty;
    a fresh run that saved no checkpoint first takes back its files on an :class:`InputError`, and
    puts back those of the run it replaced (:meth:`RunFolder.end`), so bad input leaves the folder
    as it was.
    """
    refusal, lock, made = None, None, []
    if runtime is None or runtime.is_main:
        try:
            made = [folder for folder in (out, *out.parents) if not folder.exists()]
            lock = _lock(out)
            _settle_replaced(out)
        except InputError as err:
            refusal = str(err)
    if runtime is not None and runtime.distributed:
        shared = [refusal]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal is not None:
        raise agreed(InputError(refusal))  # rank 0's, shared: every process raises it alike
    folder = RunFolder(out)
    refused = failing = False
    try:
        yield folder
    except InputError:
        refused = failing = True
        raise
    except Exception as err:
        # under torchrun, rank 0's collective lost a peer that was refused (its own line says why)
        refused = runtime is not None and runtime.distributed and lost_peer(err)
        failing = True
        raise
    except BaseException:  # Ctrl-C, SystemExit
        failing = True
        raise
    finally:
        try:
            folder.end(refused)  # acts where the folder was prepared: rank 0's process
        except OSError:
            if not failing:  # else the run's own error is the one to report (a folder made read-only)
                raise
        finally:
            if lock is not None:
                _unlock(out, lock)
                for made_folder in made:  # innermost first: a run that failed before writing leaves no folder
                    try:
                        made_folder.rmdir()
                    except OSError:  # not empty (or gone): the run's own error is the one to report
                        break


def _unlock(out: Path, lock) -> None:
    try:
        (out / LOCK_FILE).unlink(missing_ok=True)  # while still held; see _lock
    except OSError:  # a folder made read-only meanwhile: the next run takes the lock file; the run's own error is the one to report
        pass
    lock.close()


class FolderBusy(InputError):
    """Another run holds the folder's lock."""


def _lock(out: Path):
    """The open, locked ``out/.lock``. Its holder deletes it before releasing it, so a lock taken
    on a file no longer at that name (opened just before the deletion) is dropped and retaken."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    while True:
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = open(out / LOCK_FILE, "a")
        except OSError as err:
            raise InputError(f"--out {out}: cannot write in this folder ({err.strerror})") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise FolderBusy(f"--out {out}: another simsiam run is writing in this folder; wait for it to end "
                             "or choose another --out") from None
        try:
            current = os.stat(out / LOCK_FILE).st_ino == os.fstat(lock.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return lock
        lock.close()


def resume_checkpoint(config, resume_from: str | os.PathLike | None) -> dict | None:
    """The checkpoint ``resume_from`` names (None without one), refused when ``config`` changes a
    setting its run may not (``RunSettings.check_resumes``). Read before any slow work."""
    if resume_from is None:
        return None
    checkpoint = load_checkpoint(resume_from)
    if isinstance(checkpoint.get("config"), dict):
        config.check_resumes(checkpoint["config"], str(resume_from))
    return checkpoint


def check_resumable(checkpoint: dict, where, also: tuple[str, ...] = ()) -> None:
    """Refuse a checkpoint without what a resume loads (one edited to drop its optimizer state to
    save space, one another tool wrote): ``epoch``, ``state_dict`` and ``optimizer``, and ``also``."""
    missing = [name for name in ("epoch", "state_dict", "optimizer", *also) if name not in checkpoint]
    if missing:
        raise InputError(f"--resume {where}: holds no {' or '.join(map(repr, missing))}, which resuming a run "
                         "loads; give a checkpoint the run saved whole")
    epoch = checkpoint["epoch"]
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise InputError(f"--resume {where}: its 'epoch' is {epoch!r}, not a count of epochs")


def check_resumed_state(checkpoint: dict, where, rename: Callable[[dict], dict], model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer) -> None:
    """Refuse a resumable checkpoint (:func:`check_resumable`) whose state dict, renamed by
    ``rename``, lacks or misshapes a tensor of ``model``, or whose optimizer state is not for
    ``optimizer``'s parameter groups: loading it would be a traceback. ``model`` and ``optimizer``
    may be built on the meta device: only shapes are compared."""
    state = checkpoint["state_dict"]
    saved = ({name: tuple(tensor.shape) for name, tensor in rename(state).items() if isinstance(tensor, torch.Tensor)}
             if isinstance(state, dict) else {})
    wanted = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if saved != wanted:
        lacking, unexpected = sorted(wanted.keys() - saved.keys()), sorted(saved.keys() - wanted.keys())
        resized = sorted(name for name in wanted.keys() & saved.keys() if wanted[name] != saved[name])
        detail = (f"no {lacking[0]}" if lacking else f"an unexpected {unexpected[0]}" if unexpected else
                  f"{resized[0]} of shape {list(saved[resized[0]])}, not {list(wanted[resized[0]])}")
        raise InputError(f"--resume {where}: its 'state_dict' does not fit the run's model ({detail})")
    saved_optimizer = checkpoint["optimizer"]
    groups = saved_optimizer.get("param_groups") if isinstance(saved_optimizer, dict) else None
    fits = (isinstance(groups, list) and isinstance(saved_optimizer.get("state"), dict)
            and [len(group.get("params", ())) if isinstance(group, dict) else -1 for group in groups]
            == [len(group["params"]) for group in optimizer.param_groups])
    if not fits:
        raise InputError(f"--resume {where}: its 'optimizer' is not the saved state of the run's optimizer")


def check_resumed_images(checkpoint: dict, fingerprint: dict, config, name: str, where) -> None:
    """Refuse to resume on other training images than the run trained on (``config``'s setting
    ``name``: pretrain's DATA, lincls's TRAIN_DIR): the sampler draws image indices, so an image
    added or removed changes every batch after it. The image list (``ImageList.fingerprint()``,
    saved as ``checkpoint["images"]``) is compared, not the folder, so a moved or renamed folder
    resumes; a checkpoint without the fingerprint (of an older version) is compared by its
    folder, as that version did."""
    folder, label = getattr(config, name), config.label(name)
    saved = checkpoint.get("images")
    if saved is None:
        old = checkpoint.get("config", {}).get(name)
        if old and os.path.isabs(old) and os.path.realpath(old) != os.path.realpath(folder):
            raise InputError(f"{label} {folder}: the run being resumed ({where}) used {old}; a resumed run continues "
                             "with its own settings")
        return
    if fingerprint == saved:
        return
    change = fingerprint["count"] - saved["count"]
    how = (f"{change} more than the {saved['count']} the run being resumed ({where}) trained on: images added"
           if change > 0 else
           f"{-change} fewer than the {saved['count']} the run being resumed ({where}) trained on: images removed"
           if change < 0 else
           f"as many as the run being resumed ({where}) trained on, but not the same paths: images renamed, "
           "or some added and as many removed")
    raise InputError(f"{label} {folder}: {fingerprint['count']} images, {how}; a resumed run must see the images it "
                     "started with (restore them, or start a new run)")


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds a run worth keeping: one that saved a checkpoint. (A run that failed
    before its first checkpoint leaves only its config and log; the next start replaces them.)"""
    return bool(checkpoint_files(folder))


def checkpoint_files(folder: Path) -> list[Path]:
    """The checkpoints of the run in ``folder``: ``last.pth.tar`` and the numbered ones."""
    if not folder.is_dir():
        return []
    return [p for p in (folder / LAST, *folder.glob(NUMBERED_CHECKPOINTS)) if p.exists()]


def saved_since(folder: Path, since: float) -> bool:
    """Whether a checkpoint in ``folder`` was written at ``since`` (a ``time.time()``) or later."""
    for path in checkpoint_files(folder):
        try:
            if path.stat().st_mtime >= since:
                return True
        except OSError:  # replaced or removed meanwhile
            continue
    return False


def _read_config(config_file: Path) -> dict:
    """A run folder's config.json; empty when missing, unreadable or not an object."""
    try:
        values = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


def _written_by_a_run(config_file: Path) -> bool:
    """Whether ``config_file`` is the config.json of a simsiam run (pretrain or lincls)."""
    return {"preset", "batch_size", "epochs"} <= _read_config(config_file).keys()


def _run_command(config_file: Path) -> str | None:
    """Which command's run wrote ``config_file``: "pretrain" (its config names DATA), "lincls"
    (TRAIN_DIR), or None when unreadable."""
    values = _read_config(config_file)
    return "pretrain" if "data" in values else "lincls" if "train_dir" in values else None


def check_run_dir(out: Path, resume_from: str | os.PathLike | None, overwrite: bool, command: str) -> None:
    """Refuse a folder that holds another run unless resuming it (from a checkpoint inside it) or
    told to overwrite it. Only reads: every process checks, before any slow work. ``command``
    (pretrain, lincls): a run of the other one is named, since resuming it is no answer."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    if _resuming_in(out, resume_from) and overwrite:
        raise InputError(f"--overwrite: --resume continues the run in {out} and --overwrite would start it over; "
                         "give one of them (or --out another folder)")
    if _resuming_in(out, resume_from) or overwrite:
        return
    if holds_run(out):
        other = _run_command(out / CONFIG_FILE)
        if other is not None and other != command:
            raise InputError(f"--out {out}: already holds a simsiam {other} run; choose another --out, or pass "
                             "--overwrite to replace it")
        raise InputError(f"--out {out}: already holds a run; pass --resume {out} to continue it "
                         "or --overwrite to start over")
    strays = [n for n in RUN_FILES if (out / n).exists()]
    if strays and not _written_by_a_run(out / CONFIG_FILE):
        raise InputError(f"--out {out}: holds {', '.join(strays)} not written by simsiam; choose another folder "
                         "or pass --overwrite")


def _is_run_output(name: str | None, also: tuple[str, ...] = ()) -> bool:
    """Whether ``name`` is a file a pretrain or lincls run writes in its folder."""
    return name is not None and (name in RUN_FILES or name in also or fnmatch.fnmatch(name, NUMBERED_CHECKPOINTS))


def _replaced_files(out: Path) -> list[Path]:
    """The files of the run in ``out`` that a fresh run there removes first."""
    return [*(out / n for n in RUN_FILES), *out.glob(NUMBERED_CHECKPOINTS)]


def check_out_apart_from_inputs(config, overwrite: bool) -> None:
    """Refuse an ``--out`` that is, or is inside, a folder the run reads (DATA, --knn-train, TRAIN_DIR...):
    its checkpoints and logs would land among the images, and a run folder there once ``simsiam
    plot`` drew its curves.png is a new class of images to every later scan. An input folder inside
    ``--out`` is harmless: a run writes only its own few names at the top of ``--out``. Also refused:
    ``--overwrite`` removing an input file (lincls's CHECKPOINT in a pretraining run's folder)."""
    out = Path(config.out)
    here = Path(os.path.realpath(out))
    for name in config.PATHS:
        given = getattr(config, name)
        if not given:
            continue
        if os.path.isdir(given) and here.is_relative_to(os.path.realpath(given)):
            where = "is" if here == Path(os.path.realpath(given)) else "is inside"
            raise InputError(f"--out {out}: {where} {config.label(name)} {given}; the run's checkpoints and logs would "
                             "land among the images it reads: choose an --out outside it")
        if overwrite and os.path.isfile(given) and any(os.path.samefile(given, p) for p in _replaced_files(out)
                                                       if p.exists()):
            raise InputError(f"--overwrite: would remove {config.label(name)} {given}, which the run reads, with the "
                             f"run in --out {out}; choose another --out")


def _resuming_in(out: Path, resume_from: str | os.PathLike | None) -> bool:
    return resume_from is not None and Path(resume_from).resolve().parent == out.resolve()


def _step_of(line: str) -> float:
    """The step of a metrics line; infinite for a line cut short by a kill, so that it is dropped."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logging step and per epoch (main process only)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path = path
        self.enabled = enabled
        if enabled and resume_step is not None and path.exists():
            # a resumed run repeats the steps after its checkpoint: drop their old lines
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
            with atomic_write(path, "w") as f:
                f.writelines(line + "\n" for line in kept)
        elif enabled and resume_step is None:
            path.write_text("")

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
