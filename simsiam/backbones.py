"""ResNet backbones from torchvision, with the CIFAR stem of the paper's appendix D."""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models import ResNet

from .errors import InputError

# Every ResNet torchvision builds; a checkpoint's `arch` must be one of these.
RESNET_ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)


def build_resnet(
    arch: str,
    num_classes: int = 1000,
    cifar_stem: bool = False,
    zero_init_residual: bool = False,
) -> ResNet:
    """A randomly initialised torchvision ResNet.

    With ``cifar_stem`` the 7x7/2 stem conv becomes 3x3/1 and the max-pool is dropped, as the
    paper does for CIFAR-10 ("the first conv is 3x3 with stride 1 and no max-pooling", App. D),
    so 32x32 inputs keep enough resolution.
    """
    if arch not in RESNET_ARCHS:
        raise InputError(f"--arch {arch}: not a torchvision ResNet; choose one of {', '.join(RESNET_ARCHS)}")
    model = torchvision.models.get_model(
        arch, weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual
    )
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    return model


def _shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {
        k: tuple(v.shape)
        for k, v in state_dict.items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }


def infer_resnet_arch(backbone_state: dict[str, torch.Tensor]) -> tuple[str, bool]:
    """Which torchvision ResNet (and stem) has exactly these backbone parameter names and shapes.

    Returns ``(arch, cifar_stem)``; raises :class:`InputError` when none matches.
    """
    if "conv1.weight" not in backbone_state:
        raise InputError("no conv1.weight: these weights are not a ResNet backbone")
    cifar_stem = backbone_state["conv1.weight"].shape[-1] == 3
    wanted = _shapes(backbone_state)
    for arch in RESNET_ARCHS:
        with torch.device("meta"):  # shapes only: nothing is allocated or initialised for real
            reference = build_resnet(arch, cifar_stem=cifar_stem)
        if _shapes(reference.state_dict()) == wanted:
            return arch, cifar_stem
    raise InputError(
        f"the backbone's {len(wanted)} parameter tensors match no torchvision ResNet "
        f"({', '.join(RESNET_ARCHS)})"
    )


def pooled_backbone(resnet: ResNet) -> nn.Sequential:
    """The ResNet up to its global average pool, flattened: the "backbone" features.

    The modules are shared with ``resnet``, not copied.
    """
    return nn.Sequential(*(m for name, m in resnet.named_children() if name != "fc"), nn.Flatten(1))
