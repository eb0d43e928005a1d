"""The Detectron2 weight format: converting a pretrained ResNet to it, and checking a weights file.

``simsiam convert-d2`` does what MoCo's ``detection/convert-pretrain-to-detectron2.py`` does, for
every checkpoint layout :func:`simsiam.checkpoint.read_backbone` accepts: torchvision names become
Detectron2's (``conv1``→``stem.conv1``, ``bn1``→``stem.conv1.norm``, ``layerN``→``res{N+1}``,
``bnK``→``convK.norm``, ``downsample.0/1``→``shortcut``/``shortcut.norm``) and the result is
pickled as ``{"model": {name: numpy array}, "__author__": ..., "matching_heuristics": True}``.

The names carry no ``backbone.`` or ``roi_heads.`` prefix: with ``matching_heuristics`` Detectron2's
``align_and_update_state_dicts`` matches each model parameter to the checkpoint name that is its
longest dot-separated suffix, so ``res4.0.conv1.weight`` lands in ``backbone.res4.0.conv1.weight``
(C4) or ``backbone.bottom_up.res4.0.conv1.weight`` (FPN), and ``res5.*`` in ``roi_heads.res5.*``
when the C4 ROI head holds the last stage. Nothing here imports Detectron2.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from simsiam import __version__
from simsiam.atomic import atomic_write, check_output
from simsiam.checkpoint import BackboneWeights, first_bytes, load_checkpoint, read_backbone, why_not_a_torch_save_file
from simsiam.errors import InputError

# Detectron2's ResNet (modeling/backbone/resnet.py) builds these; DEPTH is the number in the name.
# ResNeXt and wide ResNets are the same blocks with other NUM_GROUPS / WIDTH_PER_GROUP.
DETECTRON2_RESNETS: dict[str, dict[str, object]] = {
    "resnet18": {"MODEL.RESNETS.DEPTH": 18, "MODEL.RESNETS.RES2_OUT_CHANNELS": 64},
    "resnet34": {"MODEL.RESNETS.DEPTH": 34, "MODEL.RESNETS.RES2_OUT_CHANNELS": 64},
    "resnet50": {"MODEL.RESNETS.DEPTH": 50},
    "resnet101": {"MODEL.RESNETS.DEPTH": 101},
    "resnet152": {"MODEL.RESNETS.DEPTH": 152},
    "resnext50_32x4d": {"MODEL.RESNETS.DEPTH": 50, "MODEL.RESNETS.NUM_GROUPS": 32,
                        "MODEL.RESNETS.WIDTH_PER_GROUP": 4},
    "resnext101_32x8d": {"MODEL.RESNETS.DEPTH": 101, "MODEL.RESNETS.NUM_GROUPS": 32,
                         "MODEL.RESNETS.WIDTH_PER_GROUP": 8},
    "resnext101_64x4d": {"MODEL.RESNETS.DEPTH": 101, "MODEL.RESNETS.NUM_GROUPS": 64,
                         "MODEL.RESNETS.WIDTH_PER_GROUP": 4},
    "wide_resnet50_2": {"MODEL.RESNETS.DEPTH": 50, "MODEL.RESNETS.WIDTH_PER_GROUP": 128},
    "wide_resnet101_2": {"MODEL.RESNETS.DEPTH": 101, "MODEL.RESNETS.WIDTH_PER_GROUP": 128},
}
# The two stages of 18/34 are basic blocks; Detectron2's C4 ROI head builds res5 from bottlenecks.
BASIC_BLOCK_ARCHS = ("resnet18", "resnet34")

# What torchvision-trained weights need in any Detectron2 config (MoCo's *_moco.yaml): the stride
# sits in the 3x3 conv (torchvision) not the 1x1 (MSRA), and images are RGB normalised with the
# ImageNet statistics on the 0-255 scale.
TORCHVISION_INPUT_SETTINGS: dict[str, object] = {
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
    "INPUT.FORMAT": "RGB",
    "MODEL.PIXEL_MEAN": [123.675, 116.280, 103.530],
    "MODEL.PIXEL_STD": [58.395, 57.120, 57.375],
}

# The top-level modules of Detectron2's meta-architectures, as its state dicts name them.
_DETECTRON2_PREFIXES = ("backbone.", "proposal_generator.", "roi_heads.", "sem_seg_head.", "pixel_mean", "pixel_std")
_TORCHVISION_BN = re.compile(r"(^|\.)bn(\d)\.")
_TORCHVISION_STAGE = re.compile(r"^layer(\d)\.")


def detectron2_name(name: str) -> str:
    """One torchvision ResNet parameter name in Detectron2's spelling (MoCo's renaming rules)."""
    stage = _TORCHVISION_STAGE.match(name)
    if stage:
        name = f"res{int(stage.group(1)) + 1}.{name[stage.end():]}"
    else:
        name = f"stem.{name}"  # conv1.*, bn1.*
    name = _TORCHVISION_BN.sub(lambda m: f"{m.group(1)}conv{m.group(2)}.norm.", name)
    return name.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")


def to_detectron2_names(backbone: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision ResNet backbone state dict (no ``fc``) with Detectron2's names.

    BatchNorm's ``num_batches_tracked`` counters are left out: Detectron2's norms do not read them.
    """
    return {detectron2_name(k): v for k, v in backbone.items() if not k.endswith("num_batches_tracked")}


@dataclass
class Detectron2Weights:
    """A backbone converted for Detectron2, and the config settings it needs there."""

    arch: str
    model: dict[str, np.ndarray]
    settings: dict[str, object]
    notes: list[str] = field(default_factory=list)

    def to_pickle_dict(self) -> dict:
        return {"model": self.model, "__author__": f"simsiam {__version__} ({self.arch})",
                "matching_heuristics": True}


def detectron2_settings(arch: str) -> dict[str, object]:
    """The Detectron2 config values that weights of a torchvision ``arch`` need."""
    return {**DETECTRON2_RESNETS[arch], **TORCHVISION_INPUT_SETTINGS}


def convert_backbone(weights: BackboneWeights, where: str) -> Detectron2Weights:
    """Convert a backbone read by :func:`simsiam.checkpoint.read_backbone`."""
    if weights.arch not in DETECTRON2_RESNETS:
        raise InputError(f"{where}: a {weights.arch} backbone, which Detectron2's ResNet cannot build")
    if weights.cifar_stem:
        raise InputError(
            f"{where}: a {weights.arch} with the CIFAR 3x3 stem; Detectron2's ResNet stem is a 7x7/2 conv "
            "with max-pool, so these weights cannot be loaded into it")
    # float32 whatever the checkpoint's precision, as Detectron2's own weights (NumPy has no bfloat16)
    model = {name: (tensor.float() if tensor.is_floating_point() else tensor).detach().cpu().numpy()
             for name, tensor in to_detectron2_names(weights.backbone).items()}
    broken = [name for name, array in model.items() if array.dtype.kind == "f" and not np.isfinite(array).all()]
    if broken:  # a diverged run's weights: they would train a detector on NaNs
        raise InputError(f"{where}: {len(broken)} tensor(s) hold NaN or infinite values ({broken[0]}, ...); "
                         "its weights are broken")
    notes = []
    if weights.arch in BASIC_BLOCK_ARCHS:
        notes.append("use an FPN config (voc-r50-fpn, coco-r50-fpn-1x): Detectron2's C4 ROI head builds "
                     "res5 from bottleneck blocks, which a ResNet-18/34 does not have")
    return Detectron2Weights(weights.arch, model, detectron2_settings(weights.arch), notes)


def convert_checkpoint(path: str | os.PathLike) -> Detectron2Weights:
    """The backbone of a checkpoint of any supported layout, in Detectron2's format.

    Projector, predictor and a classifier ``fc`` are left out: only the backbone transfers.
    """
    if _is_arrays_pickle(Path(path)):
        if Path(path).suffix == ".pkl":
            raise InputError(f"{path}: already Detectron2 weights (a pickle of NumPy arrays); give it to simsiam "
                             "detect train --weights as it is")
        raise InputError(f"{path}: already Detectron2 weights (a pickle of NumPy arrays); rename it to end in .pkl "
                         "(Detectron2 reads pickles only under that name), then give it to simsiam detect train --weights")
    return convert_backbone(read_backbone(path), str(path))


def _is_arrays_pickle(path: Path) -> bool:
    """Whether ``path`` is a pickle of Detectron2's format (a 'model' or 'blobs' dict), whatever its name."""
    if not path.is_file() or zipfile.is_zipfile(path) or first_bytes(path, 1) != b"\x80":  # pickles of protocol 2+
        return False
    try:
        data = _read_arrays_pickle(path)
    except Exception:  # noqa: BLE001  any bytes: the unpickler fails in many ways (MemoryError, OverflowError)
        return False
    return isinstance(data, dict) and isinstance(data.get("model", data.get("blobs")), dict)


def check_pickle_path(out: str | os.PathLike) -> Path:
    """Detectron2 reads its pickle format only from files named ``*.pkl``."""
    out = Path(out)
    if out.is_dir():
        raise InputError(f"--out {out}: is a folder; give a file name ending in .pkl")
    if out.suffix != ".pkl":
        raise InputError(f"--out {out}: must end in .pkl (Detectron2 picks its pickle reader by that suffix)")
    return out


def write_detectron2_pickle(weights: Detectron2Weights, out: str | os.PathLike, overwrite: bool = False,
                            inputs=()) -> Path:
    """Pickle ``weights`` to ``out`` atomically: a temporary file in the same folder, then a rename.
    An existing ``out`` is replaced only with ``overwrite``, and never when it is one of ``inputs``
    (the checkpoint converted, say)."""
    out = check_output(check_pickle_path(out), "--out", overwrite, inputs)
    with atomic_write(out, replace=overwrite) as f:
        pickle.dump(weights.to_pickle_dict(), f, protocol=4)
    return out


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays and nothing else: a weights file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"holds a {module}.{name} object")


def _read_arrays_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _ArraysOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, AttributeError) as err:
        raise InputError(f"--weights {path}: not a Detectron2 pickle ({str(err) or type(err).__name__})") from None


@dataclass
class WeightsFile:
    """What a ``--weights`` file holds, to check against the model a config builds
    (:mod:`transfer.detectron2_fit`)."""

    path: str
    shapes: dict[str, tuple]  # tensor name -> shape
    heuristics: bool  # Detectron2 pairs names by suffix (convert-d2's pickles), else by equality
    arch: str | None  # the torchvision arch convert-d2 converted, when it wrote the file
    detector: bool  # a whole detector (backbone.*, roi_heads.* names), not a backbone alone


_CONVERTED_BY = re.compile(r"^simsiam \S+ \((\w+)\)$")  # to_pickle_dict's __author__


def _shapes(state: dict) -> dict[str, tuple]:
    return {str(k): tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}


def check_detectron2_weights(weights: str) -> WeightsFile | None:
    """Check that ``--weights`` is something Detectron2's checkpointer loads, and say what it holds;
    None where that is not read here: a URL (Detectron2 downloads it itself) or a Caffe2 pickle
    (Detectron2 renames its blobs first).

    Accepted: a ``.pkl`` in the Detectron2 format (``convert-d2``'s output, Detectron2's model zoo,
    or a Caffe2 ``blobs`` pickle), a Detectron2 ``.pth`` checkpoint (``model_final.pth``), or a URL
    (``detectron2://...``, ``https://...``).
    """
    weights = os.fspath(weights)  # a Path too
    if "://" in weights:
        return None
    path = Path(weights)
    if path.is_dir():
        raise InputError(f"--weights {path}: is a folder; give a file in it (model_final.pth, or the newest "
                         "model_*.pth of an unfinished run)")
    if not path.is_file():
        hint = ""
        if path.name == "model_final.pth" and sorted(path.parent.glob("model_*.pth")):
            hint = (f" (the run there did not finish; its newest checkpoint is "
                    f"{sorted(path.parent.glob('model_*.pth'))[-1].name})")
        raise InputError(f"--weights {path}: no such file{hint}")
    if path.suffix == ".pkl":
        data = _read_arrays_pickle(path)
        state = data.get("model", data.get("blobs")) if isinstance(data, dict) else None
        if not isinstance(state, dict) or not state or not all(isinstance(v, np.ndarray) for v in state.values()):
            raise InputError(f"--weights {path}: not a Detectron2 pickle (expected a dict with a 'model' dict of "
                             "numpy arrays, as simsiam convert-d2 writes)")
        if not ("model" in data and "__author__" in data):  # Detectron2 reads it as Caffe2 blobs
            return None
        converted = _CONVERTED_BY.match(str(data["__author__"]))
        arch = converted.group(1) if converted and converted.group(1) in DETECTRON2_RESNETS else None
        return WeightsFile(str(path), _shapes(state), bool(data.get("matching_heuristics")), arch,
                           any(str(k).startswith(_DETECTRON2_PREFIXES) for k in state))
    if _is_arrays_pickle(path):
        raise InputError(f"--weights {path}: a Detectron2 pickle not named *.pkl; Detectron2 reads pickles only "
                         "under that name (else with torch.load, which fails): rename it")
    if why_not_a_torch_save_file(path) is not None:
        raise InputError(f"--weights {path}: neither a Detectron2 .pkl nor a PyTorch checkpoint "
                         "(convert a SimSiam checkpoint with simsiam convert-d2 first)")
    checkpoint = load_checkpoint(path, mmap=True)  # torch.save's zip format, or its legacy one
    model = checkpoint.get("model", checkpoint)  # Detectron2 also loads a bare state dict
    if isinstance(model, dict) and any(str(k).startswith(_DETECTRON2_PREFIXES) for k in model):
        return WeightsFile(str(path), _shapes(model), False, None, True)  # a whole detector (model_final.pth)
    if "state_dict" in checkpoint or any(str(k).startswith(("module.", "encoder", "conv1.", "layer1.")) for k in model):
        raise InputError(f"--weights {path}: a SimSiam/MoCo/torchvision checkpoint, not Detectron2 weights; "
                         "convert it first: simsiam convert-d2 CHECKPOINT --out model.pkl")
    raise InputError(f"--weights {path}: a PyTorch file without Detectron2 model weights "
                     "(no 'model' entry with backbone.*, roi_heads.* names)")
