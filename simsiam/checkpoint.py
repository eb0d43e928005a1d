"""Reading and writing checkpoints: the one module that knows their layouts.

Written: ``{"epoch", "arch", "state_dict", "optimizer", ...}`` with ``state_dict`` keys exactly as
the official implementation saves them under DDP (``module.encoder.*``, ``module.predictor.*``),
so the official ``main_lincls.py`` loads ours unchanged. Files are written under a temporary
name and renamed, so a kill at any moment leaves either the old file or the new one.

Read (:func:`read_backbone`): ours, the official SimSiam checkpoints, the same without the
``module.`` prefix, MoCo's (v1/v2 ``encoder_q``, v3 ``base_encoder``), and plain torchvision ResNet
state dicts. Always with ``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .atomic import NOT_A_REGULAR_FILE, atomic_write
from .backbones import build_resnet, infer_resnet_arch
from .errors import InputError

LAST = "last.pth.tar"
_EPOCH_FILE = re.compile(r"^checkpoint_(\d{4,})\.pth\.tar$")


def epoch_checkpoint_name(epoch: int) -> str:
    """The official name: ``checkpoint_0099.pth.tar`` holds the state after epoch index 99."""
    return f"checkpoint_{epoch:04d}.pth.tar"


# how torch's zip writer reports a write that failed (a full disk), as a RuntimeError
WRITE_FAILED = ("unexpected pos", "failed writing", "file write failed")


def save_atomic(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (see :func:`simsiam.atomic.atomic_write`)."""
    with atomic_write(path) as f:
        try:
            torch.save(obj, f)
        except RuntimeError as err:
            text = str(err).strip()
            if not any(sign in text for sign in WRITE_FAILED):  # not a write: a bug, kept as it is
                raise
            raise OSError(errno.EIO, f"cannot write the checkpoint ({text.splitlines()[0]}); is its disk full?") from None


def check_checkpoint_file(path: str | os.PathLike) -> Path:
    """Refuse, from its first bytes, what cannot be a checkpoint: a folder, a missing file, another
    format. Cheap: commands call it before work that comes ahead of loading the checkpoint."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a checkpoint file{_run_folder_hint(path)}")
    if not path.is_file():
        raise InputError(f"{path}: {NOT_A_REGULAR_FILE if path.exists() else 'no such checkpoint file'}")
    problem = why_not_a_torch_save_file(path)
    if problem:
        raise InputError(f"{path}: {problem}")
    return path


def _run_folder_hint(folder: Path) -> str:
    """For a run folder given where a checkpoint of weights is wanted: its newest checkpoint, or,
    for a linear evaluation's folder (whose checkpoints hold a linear head), the backbone's."""
    newest = newest_checkpoint(folder)
    if newest is None:
        return ""
    try:
        config = load_checkpoint(newest, mmap=True).get("config")
    except InputError:
        config = None
    if isinstance(config, dict) and "train_dir" in config:  # simsiam lincls's run config
        return f"; it holds a linear evaluation of {config.get('checkpoint')}"
    return f"; its newest checkpoint is {newest}"


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict:
    """Load a checkpoint safely (tensors and plain containers only) onto the CPU.

    ``mmap``: map the file instead of reading it; tensors are read when touched (cheap peeks).
    Otherwise a zip-format file's checksums are verified first: torch.load does not check them, and
    a file damaged on disk or in a copy would load with wrong weights, silently.
    """
    path = check_checkpoint_file(path)
    is_zip = zipfile.is_zipfile(path)
    if mmap and not is_zip:
        mmap = False  # only the zip format (torch.save's since 1.6) maps; torch's own message misleads
    if is_zip:
        _check_archive(path, verify=not mmap)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it may not support; it fails if so
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        message = str(err)
        if "Unsupported global" in message:
            raise InputError(
                f"{path}: holds Python objects other than tensors; refusing to unpickle it (weights_only)"
            ) from None
        if not is_zip and first_bytes(path, 2) == b"PK":
            raise InputError(f"{path}: a damaged or truncated checkpoint (its zip archive cannot be read)") from None
        detail = message.split("WeightsUnpickler error:")[-1]
        reason = next((line.strip() for line in detail.splitlines() if line.strip()), "unpickling failed")
        operand = re.search(r"Unsupported operand (\d+)", reason)
        if operand and int(operand.group(1)) in _PROTOCOL_4_OPCODES:
            raise InputError(f"{path}: pickled with protocol 4 or later (torch.save's pickle_protocol), which the "
                             "safe loader cannot read; load it and torch.save it again with the default protocol") from None
        raise InputError(f"{path}: not a PyTorch checkpoint ({reason[:120]})") from None
    except Exception as err:  # noqa: BLE001  any bytes at all: the legacy unpickler fails in many ways
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if is_zip or first_bytes(path, 2) != b"PK":
            raise InputError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {reason[:120]})") from None
        raise InputError(f"{path}: a damaged or truncated checkpoint (its zip archive cannot be read)") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


# the opcodes pickle protocols 4 and 5 added (SHORT_BINUNICODE .. FRAME, BYTEARRAY8 .. READONLY_BUFFER),
# which torch's weights-only unpickler does not take
_PROTOCOL_4_OPCODES = frozenset(range(0x8C, 0x99))


def _check_archive(path: Path, verify: bool) -> None:
    """Refuse a zip that is not a checkpoint of weights (TorchScript), or, with ``verify``, whose
    stored checksums do not match its data."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if any(name == "constants.pkl" or name.endswith("/constants.pkl") for name in names):
                raise InputError(f"{path}: a TorchScript archive (torch.jit.save), not a checkpoint of weights; "
                                 "torch.save the model's state_dict() instead")
            damaged = _first_damaged(archive) if verify else None
    except (zipfile.BadZipFile, OSError, EOFError) as err:  # a cut-off member, a bad header
        raise InputError(f"{path}: a damaged or truncated checkpoint ({err})") from None
    if damaged is not None:
        raise InputError(f"{path}: a damaged checkpoint (the data of {damaged} does not match its checksum); "
                         "copy it again")


def _first_damaged(archive: zipfile.ZipFile) -> str | None:
    """The first member whose data does not match its stored checksum (zipfile checks it on reading
    to the end). torch.save with ``compute_crc32`` off stores 0 for every member: not checked."""
    for info in archive.infolist():
        if info.CRC == 0 and info.file_size:
            continue
        try:
            with archive.open(info) as member:
                while member.read(1 << 24):
                    pass
        except zipfile.BadZipFile:
            return info.filename
    return None


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def first_bytes(path: Path, count: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(count)


def why_not_a_torch_save_file(path: Path) -> str | None:
    """Why ``path`` cannot be a ``torch.save`` file, judged from its first bytes; None if it may be one.

    torch.save writes a zip archive (``PK``), or in its legacy format a pickle whose first object is
    a long magic number (protocol byte, then ``LONG1`` of 10 bytes). Anything else would only give
    the unpickler's cryptic complaints ("KeyError: 101", "Unsupported operand 149").
    """
    head = first_bytes(path, 16)
    if not head:
        return "is empty, not a checkpoint"
    if head.startswith(HDF5_SIGNATURE):  # the likeliest mix-up: the feature file made from a checkpoint
        return "an HDF5 file (a feature file of simsiam extract?), not a PyTorch checkpoint"
    if head.startswith(b"PK"):
        return None
    if head[:1] == b"\x80":  # pickle protocol 2+; protocol 4+ frames its data first (FRAME + 8-byte length)
        body = head[11:] if head[2:3] == b"\x95" else head[2:]
        if body.startswith(b"\x8a\n"):
            return None
    return "not a PyTorch checkpoint (neither torch.save's zip format nor its legacy pickle format)"


def is_torch_save_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a torch.save file (for hints; not a full check): its legacy
    pickle, or a zip archive holding the ``data.pkl`` that torch.save writes (not any zip: .npz)."""
    path = Path(path)
    if not path.is_file() or why_not_a_torch_save_file(path) is not None:
        return False
    if not zipfile.is_zipfile(path):
        return True
    with zipfile.ZipFile(path) as archive:
        return any(name == "data.pkl" or name.endswith("/data.pkl") for name in archive.namelist())


def to_official_layout(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as the official DDP-wrapped model saves them: ``module.encoder.*``, ``module.predictor.*``."""
    return {k if k.startswith("module.") else f"module.{k}": v for k, v in model_state.items()}


def from_official_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


@dataclass
class BackboneWeights:
    """A ResNet backbone read from any supported checkpoint layout.

    ``backbone``: torchvision ResNet names, without ``fc``. ``projector``: the SimSiam projector
    (``fc.*`` names of the encoder) when the checkpoint has one, else empty.
    """

    arch: str
    cifar_stem: bool
    backbone: dict[str, torch.Tensor]
    projector: dict[str, torch.Tensor]
    layout: str  # "simsiam", "moco", "torchvision"
    source: dict  # the checkpoint's other top-level entries (epoch, config, ...)


def _tensor_dict(obj) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    return None


def split_backbone(state_dict: dict[str, torch.Tensor], where: str) -> tuple[str, dict, dict]:
    """``(layout, backbone, projector)`` from the state dict of any supported layout."""
    state = from_official_layout(state_dict)
    # MoCo v1/v2's query encoder, MoCo v3's base encoder (its fc is MoCo v3's projector)
    for prefix, layout in (("encoder.", "simsiam"), ("encoder_q.", "moco"), ("base_encoder.", "moco")):
        if any(k.startswith(prefix) for k in state):
            encoder = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            backbone = {k: v for k, v in encoder.items() if not k.startswith("fc.")}
            projector = {k[3:]: v for k, v in encoder.items() if k.startswith("fc.")}
            return layout, backbone, projector
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
        head = {k[3:]: v for k, v in state.items() if k.startswith("fc.")}
        if head and "weight" not in head:  # an MLP at fc (fc.0.weight, ...): a SimSiam encoder's projector
            return "simsiam", backbone, head  # model.encoder.state_dict()
        return "torchvision", backbone, {}
    sample = ", ".join(list(state_dict)[:3])  # as the file has them
    raise InputError(
        f"{where}: unknown checkpoint layout (found keys like {sample}); expected a SimSiam "
        "checkpoint (module.encoder.*), a MoCo one (module.encoder_q.*, module.base_encoder.*) or a "
        "torchvision ResNet state dict"
    )


def read_backbone(path: str | os.PathLike, mmap: bool = False) -> BackboneWeights:
    """The ResNet backbone (and projector, when present) of a checkpoint of any supported layout.
    ``mmap``: tensors read when touched (a peek at the layout and shapes costs little)."""
    checkpoint = load_checkpoint(path, mmap=mmap)
    state = None
    for key in ("state_dict", "model", "module"):
        state = _tensor_dict(checkpoint.get(key))
        if state is not None:
            break
    if state is None:
        state = _tensor_dict(checkpoint)
    if state is None:
        found = ", ".join(map(str, list(checkpoint)[:5]))
        raise InputError(f"{path}: unknown checkpoint layout (top-level entries: {found}); no state dict of tensors")
    config = checkpoint.get("config")
    if isinstance(config, dict) and "train_dir" in config and all(k.startswith("fc.") for k in state):
        raise InputError(f"{path}: a simsiam lincls checkpoint, which holds only the linear head; give the "
                         f"checkpoint it evaluated ({config.get('checkpoint')})")
    layout, backbone, projector = split_backbone(state, str(path))
    try:
        arch, cifar_stem = infer_resnet_arch(backbone)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    source = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "model", "module", "optimizer")}
    if isinstance(source.get("arch"), str) and source["arch"] != arch:
        raise InputError(f"{path}: says arch {source['arch']} but its weights are those of a {arch}")
    return BackboneWeights(arch, cifar_stem, backbone, projector, layout, source)


def build_backbone(weights: BackboneWeights) -> nn.Module:
    """The torchvision ResNet of ``weights`` with ``fc`` replaced by Identity: it returns pooled features."""
    model = build_resnet(weights.arch, cifar_stem=weights.cifar_stem)
    model.fc = nn.Identity()
    model.load_state_dict(weights.backbone)
    return model


def find_resume_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint to resume from: a file as given, or a run folder's newest complete one."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise InputError(f"--resume {path}: {NOT_A_REGULAR_FILE if path.exists() else 'no such checkpoint file or run folder'}")
    newest = newest_checkpoint(path)
    if newest is None:
        raise InputError(f"--resume {path}: the folder holds no checkpoint to resume from")
    return newest


def newest_checkpoint(folder: Path) -> Path | None:
    """A run folder's newest complete checkpoint: ``last.pth.tar``, else the highest-numbered one;
    None in a folder without one. Temporary files of an interrupted write never match."""
    if (folder / LAST).is_file():
        return folder / LAST
    epochs = sorted((int(m.group(1)), f) for f in folder.iterdir() if (m := _EPOCH_FILE.match(f.name)))
    return epochs[-1][1] if epochs else None
