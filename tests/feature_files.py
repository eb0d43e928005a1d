"""Helpers of the retrieval tests: clustered features and feature files made without a network."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retrieval.features import FeatureSet, write_features
from cli_runner import assert_user_error, run  # noqa: F401 (the tests import them from here)


def clustered(n: int, classes: int = 8, dim: int = 32, noise: float = 0.5, seed: int = 0,
              centres_seed: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """``(features [n, dim] float32, labels [n])``: points around one fixed random centre per class."""
    centres = np.random.default_rng(centres_seed).normal(size=(classes, dim))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    return (centres[labels] + noise * rng.normal(size=(n, dim))).astype(np.float32), labels


def feature_file(path: Path, features: np.ndarray, labels: np.ndarray | None = None, layer: str = "backbone",
                 checkpoint: str = "ckpt.pth.tar", sha: str = "ab" * 32, dtype: str = "float32",
                 classes: list[str] | None = None, root: str = "/images") -> Path:
    labels = np.full(len(features), -1) if labels is None else labels
    if classes is None:
        classes = [f"class{c}" for c in range(int(labels.max()) + 1)] if (labels >= 0).any() else []
    attrs = {"root": root, "classes": classes, "arch": "resnet18", "layer": layer, "checkpoint": checkpoint,
             "checkpoint_sha256": sha, "image_size": 16, "resize": 0, "normalized": False}
    paths = [f"{classes[l] if l >= 0 else 'x'}/img{i:05d}.png" for i, l in enumerate(labels)]
    return write_features(path, FeatureSet(features, np.asarray(labels), paths, attrs), dtype=dtype)


def save_resnet18_checkpoints(folder: Path, seed: int = 0) -> dict[str, Path]:
    """One random ResNet-18 (with a SimSiam projector) saved in three layouts.

    ``torchvision``: the plain state dict; ``official``: as the official SimSiam saves it under DDP
    (``module.encoder.*`` with the projector at ``module.encoder.fc.*``, ``module.predictor.*``);
    the ``model`` entry of the returned dict is the path of the reference network itself.
    """
    import torch
    import torchvision

    from simsiam.model import SimSiam

    torch.manual_seed(seed)
    simsiam_model = SimSiam(torchvision.models.resnet18(num_classes=64), dim=64, pred_dim=16, proj_layers=2)
    for module in simsiam_model.modules():  # non-trivial BN statistics, as after training
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state = simsiam_model.state_dict()
    official = {"epoch": 1, "arch": "resnet18", "state_dict": {f"module.{k}": v for k, v in state.items()}}
    backbone = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.") and ".fc." not in k
                and not k.startswith("encoder.fc.")}
    reference = torchvision.models.resnet18()
    backbone_with_fc = {**backbone, "fc.weight": reference.fc.weight.detach(), "fc.bias": reference.fc.bias.detach()}
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"official": folder / "official.pth.tar", "torchvision": folder / "resnet18.pth",
             "simsiam": folder / "simsiam_model.pt"}
    torch.save(official, paths["official"])
    torch.save(backbone_with_fc, paths["torchvision"])
    torch.save(simsiam_model.state_dict(), paths["simsiam"])
    return paths
