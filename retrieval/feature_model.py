"""The network that turns images into features: a checkpoint's (or a random) encoder up to a layer.

``backbone``: the ResNet's globally pooled features (2048-d for ResNet-50), what the paper's
linear and kNN evaluations use. ``projector``: the SimSiam projector's output z (Sec. 3, the
"projection MLP" of the encoder f), the features the loss compares.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from simsiam.backbones import build_resnet
from simsiam.checkpoint import BackboneWeights, build_backbone, read_backbone
from simsiam.config import check_seed, preset_config
from simsiam.errors import InputError
from simsiam.model import SimSiam
from simsiam.train import build_model

LAYERS = ("backbone", "projector")
# The evaluation transform of the two recipes: ImageNet resizes to 256 and center-crops 224;
# the CIFAR recipe (3x3 stem) evaluates 32x32 images as they are.
IMAGENET_EVAL = (224, 256)
CIFAR_EVAL = (32, 0)


@dataclass
class FeatureModel:
    """A network returning ``[B, dim]`` features, with what a feature file records about it."""

    module: nn.Module
    arch: str
    layer: str
    dim: int
    checkpoint: str  # the path, or a description of a random initialisation
    checkpoint_sha256: str  # "" for a random initialisation
    image_size: int  # the evaluation transform the checkpoint was trained for
    resize: int  # 0: no resize before the center crop


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _projector_shape(projector: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """``(layers, hidden width, output dim)`` of a projector from its ``fc.N.weight`` matrices (a
    single Linear, as MoCo v1's ``fc.weight``, counts as one layer)."""
    linear = sorted((int(index) if index.isdigit() else -1, v.shape) for k, v in projector.items()
                    if k.endswith("weight") and v.dim() == 2 for index in [k.split(".")[0]])
    if not linear:
        return 0, 0, 0
    return len(linear), linear[0][1][0], linear[-1][1][0]


def _with_projector(weights: BackboneWeights, where: str, hint: str) -> nn.Module:
    if not weights.projector:
        raise InputError(f"{where}: has no SimSiam projector ({weights.layout} layout); {hint}")
    if weights.layout == "moco":  # MoCo v2's and v3's heads are their own (no bias, other widths and BNs)
        raise InputError(f"{where}: holds MoCo's projector, not SimSiam's; {hint}")
    layers, hidden, dim = _projector_shape(weights.projector)
    if layers not in (2, 3):
        raise InputError(f"{where}: a projector of {layers} linear layer{'' if layers == 1 else 's'}; "
                         "SimSiam's has 2 or 3")
    model = SimSiam(build_resnet(weights.arch, num_classes=dim, cifar_stem=weights.cifar_stem), dim=dim,
                    proj_layers=layers, proj_hidden_dim=hidden)
    state = {**weights.backbone, **{f"fc.{k}": v for k, v in weights.projector.items()}}
    try:
        model.encoder.load_state_dict(state)
    except RuntimeError as err:
        # torch's first line only says "Error(s) in loading state_dict for ResNet:"; the next says which
        detail = [line.strip() for line in str(err).splitlines() if line.strip()][1:2] or [str(err).strip()]
        raise InputError(f"{where}: its projector does not fit SimSiam's layout ({detail[0][:200]})") from None
    return model.encoder


def _eval_defaults(weights: BackboneWeights) -> tuple[int, int]:
    """The checkpoint's own evaluation transform when it records one (ours), else by its stem."""
    config = weights.source.get("config")
    if isinstance(config, dict) and isinstance(config.get("image_size"), int):
        return config["image_size"], int(config.get("eval_resize") or 0)
    return CIFAR_EVAL if weights.cifar_stem else IMAGENET_EVAL


def _output_dim(module: nn.Module, image_size: int) -> int:
    was_training = module.training
    module.eval()
    with torch.no_grad():
        dim = module(torch.zeros(1, 3, image_size, image_size)).shape[1]
    module.train(was_training)
    return int(dim)


def load_feature_model(checkpoint: str | os.PathLike | None = None, layer: str = "backbone",
                       random_init: bool = False, arch: str | None = None, cifar_stem: bool = False,
                       seed: int | None = None, projector_hint: str = "use --layer backbone") -> FeatureModel:
    """The encoder of ``checkpoint`` (any layout :func:`simsiam.checkpoint.read_backbone` reads) up to ``layer``.

    With ``random_init``: the encoder ``simsiam pretrain`` starts from (torchvision init,
    zero-initialised last BN of each residual block, as the official script), seeded by ``seed``:
    the baseline a pretrained encoder is compared against. ``seed`` (default 0) only with ``random_init``.
    ``projector_hint``: what the user can do when ``layer`` is the projector and the checkpoint has
    none, in the terms of the command that asked (search has no ``--layer``).
    """
    if layer not in LAYERS:
        raise InputError(f"--layer {layer}: choose one of {', '.join(LAYERS)}")
    if random_init:
        if checkpoint is not None:
            raise InputError(f"{checkpoint}: give a checkpoint or --random-init, not both")
        if not arch:
            raise InputError("--random-init: needs --arch (e.g. --arch resnet50)")
        seed = 0 if seed is None else seed
        check_seed(seed)
        # the very model `simsiam pretrain --seed` starts from (the preset of that stem), seeded here
        # without resetting the caller's generator; the projector is drawn after the backbone, as there
        config = preset_config("cifar" if cifar_stem else "imagenet", arch=arch, seed=seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = build_model(config).encoder
        if layer == "backbone":
            encoder.fc = nn.Identity()
        module = encoder
        image_size, resize = CIFAR_EVAL if cifar_stem else IMAGENET_EVAL
        description = f"random-init {arch}{' cifar-stem' if cifar_stem else ''} seed {seed}"
        return FeatureModel(module.eval(), arch, layer, _output_dim(module, 32), description, "", image_size, resize)
    if checkpoint is None:
        raise InputError("no checkpoint given: pass CHECKPOINT, or --random-init --arch ARCH for a baseline")
    if cifar_stem:
        raise InputError(f"--cifar-stem: only with --random-init; {checkpoint} says which stem it has")
    if seed is not None:
        raise InputError(f"--seed: only with --random-init; the weights of {checkpoint} are not drawn at random")
    weights = read_backbone(checkpoint)
    if arch and arch != weights.arch:
        raise InputError(f"--arch {arch}: {checkpoint} holds a {weights.arch}")
    with torch.random.fork_rng(devices=[]):  # the initialisation the weights replace: not from the caller's generator
        module = (_with_projector(weights, str(checkpoint), projector_hint) if layer == "projector"
                  else build_backbone(weights))
    image_size, resize = _eval_defaults(weights)
    return FeatureModel(module.eval(), weights.arch, layer, _output_dim(module, 32), str(Path(checkpoint).resolve()),
                        file_sha256(checkpoint), image_size, resize)
