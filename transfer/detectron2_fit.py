"""Whether weights fit the model a Detectron2 config builds, checked before any run starts.

Detectron2 loads what matches and only logs a warning for each tensor that does not: weights of
another ResNet (depth, width, groups; a ResNet-18's basic blocks where a C4 head builds res5 from
bottlenecks) or a detector trained with another config would train or evaluate a mostly random
network, its AP printed as if nothing were wrong. Here the names are matched as Detectron2 matches
them, and the shapes compared, from the model built on the meta device (no memory, no time).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Mapping, Sequence

from simsiam.errors import InputError

from .detectron2_weights import WeightsFile

if TYPE_CHECKING:
    from detectron2.config import CfgNode

# The ResNet's own tensors, wherever the meta-architecture puts them: backbone.res4 (C4),
# backbone.bottom_up.res4 (FPN), roi_heads.res5 (the C4 box head runs the last stage).
_RESNET = re.compile(r"(^|\.)(stem|res\d\.\d+)\.")  # not the C4 head's extra res5.norm
# The weights' block tensors a model should have a place for: not the stem's extras (Detectron2's and
# MoCo's converters keep torchvision's fc as stem.fc.*), not BN statistics (a GN config drops them).
_BLOCK_PARAMETER = re.compile(r"(^|\.)res\d\.\d+\.(?!.*running_(mean|var)$)")


def match_names(model_names: Sequence[str], weight_names: Sequence[str], heuristics: bool) -> dict[str, str]:
    """``{model name: weights name}`` as Detectron2 pairs them: the same name, or with
    ``matching_heuristics`` (convert-d2's pickles) the longest weights name that is a whole
    dot-separated suffix of the model's (``align_and_update_state_dicts``)."""
    if not heuristics:
        names = set(weight_names)
        return {name: name for name in model_names if name in names}
    pairs = {}
    for name in model_names:
        suffixes = [w for w in weight_names if name == w or name.endswith("." + w)]
        if suffixes:
            pairs[name] = max(suffixes, key=len)
    return pairs


def misfits(model: Mapping[str, tuple], weights: Mapping[str, tuple], heuristics: bool,
            whole_model: bool) -> list[str]:
    """What of the model the weights leave unloaded (every tensor with ``whole_model``, a detector to
    evaluate, else the ResNet's, a backbone to fine-tune from whose heads start from scratch), and the
    ResNet tensors of the weights that the model leaves out."""
    weights = {name: shape for name, shape in weights.items() if not name.endswith("num_batches_tracked")}
    pairs = match_names(list(model), list(weights), heuristics)
    wanted = [name for name in model if whole_model or _RESNET.search(name)]
    # other shapes first: they say best what differs (a width, a block type)
    problems = [f"{name} is {_shape(weights[pairs[name]])} in the weights, {_shape(model[name])} in the model"
                for name in wanted if name in pairs and tuple(weights[pairs[name]]) != tuple(model[name])]
    problems += [f"{name} is not in the weights" for name in wanted if name not in pairs]
    used = set(pairs.values())  # a ResNet-101's extra res4 blocks would be dropped from under a ResNet-50's
    problems += [f"{name} of the weights has no place in the model" for name in weights
                 if name not in used and _BLOCK_PARAMETER.search(name)]
    return problems


def model_shapes(cfg: "CfgNode") -> dict[str, tuple]:
    """The state dict shapes of the model ``cfg`` builds (BN's ``num_batches_tracked`` aside: Detectron2's
    own checkpoints and convert-d2's leave it out, and nothing reads it)."""
    import torch
    from detectron2.modeling import META_ARCH_REGISTRY

    try:
        with torch.device("meta"):  # shapes only: the model's build moves it to MODEL.DEVICE, which is skipped here
            model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    except Exception as err:  # noqa: BLE001 - Detectron2 asserts on settings it cannot build (R18 needs RES2_OUT_CHANNELS 64)
        text = " ".join((str(err) or type(err).__name__).split())
        raise InputError(f"the config's model cannot be built by Detectron2 ({text})") from None
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if not name.endswith("num_batches_tracked")}


def check_weights_fit(cfg: "CfgNode", weights: WeightsFile, whole_model: bool) -> None:
    """Refuse ``weights`` that leave part of what they should load unloaded (see :func:`misfits`)."""
    problems = misfits(model_shapes(cfg), weights.shapes, weights.heuristics, whole_model)
    if not problems:
        return
    more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
    if whole_model and not weights.detector:
        hint = "it holds a backbone, no whole detector: train one from it first (simsiam detect train)"
    elif weights.arch:  # convert-d2's pickle knows what it needs
        from .detectron2_weights import BASIC_BLOCK_ARCHS, DETECTRON2_RESNETS

        settings = " ".join(f"{k} {v}" for k, v in DETECTRON2_RESNETS[weights.arch].items())
        hint = (f"a {weights.arch} needs {settings}" +
                (" and an FPN config (the C4 head builds res5 from bottleneck blocks)"
                 if weights.arch in BASIC_BLOCK_ARCHS else ""))
    elif whole_model:
        hint = "give the --config and KEY VALUE pairs it was trained with (its run folder's train_config.yaml)"
    else:
        hint = "give the MODEL.RESNETS settings of the network the weights come from"
    raise InputError(f"--weights {weights.path}: {problems[0]}{more}; Detectron2 would go on without them and "
                     f"only warn; {hint}")


def _shape(shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"
