"""The SimSiam model, laid out as the official ``simsiam/builder.py`` so checkpoints interchange."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import ResNet


class SimSiam(nn.Module):
    """Build a SimSiam model: encoder f = backbone + projection MLP, and prediction MLP h.

    "The projection MLP (in f) has BN applied to each fully-connected (fc) layer, including its
    output fc. Its output fc has no ReLU. [...] This MLP has 3 layers. The prediction MLP (h)
    has BN applied to its hidden fc layers. Its output fc does not have BN or ReLU. This MLP has
    2 layers." (Sec. 4.) For CIFAR the projector has 2 layers (App. D): ``proj_layers=2``.

    The projector replaces ``encoder.fc`` and the predictor is ``predictor``, so the state dict
    keys are those of the official implementation (``encoder.fc.6`` is the output fc of the
    3-layer projector).

    Example:
        >>> from simsiam.backbones import build_resnet
        >>> model = SimSiam(build_resnet("resnet50", num_classes=2048, zero_init_residual=True))
        >>> p1, p2, z1, z2 = model(torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64))
    """

    def __init__(
        self,
        encoder: ResNet,
        dim: int = 2048,
        pred_dim: int = 512,
        proj_layers: int = 3,
        proj_hidden_dim: int | None = None,
        stop_gradient: bool = True,
    ):
        """
        encoder: a torchvision ResNet; its ``fc`` is replaced by the projector
        dim: feature dimension (default: 2048)
        pred_dim: hidden dimension of the predictor (default: 512)
        proj_layers: number of fc layers of the projector, 2 or 3
        proj_hidden_dim: width of the projector's hidden layers (default: the backbone's width)
        stop_gradient: False only for the paper's collapse ablation (Sec. 4.1, Fig. 2)
        """
        super().__init__()
        if proj_layers not in (2, 3):
            raise ValueError(f"proj_layers must be 2 or 3, got {proj_layers}")
        self.stop_gradient = stop_gradient
        self.encoder = encoder
        prev_dim = encoder.fc.in_features
        hidden_dim = proj_hidden_dim or prev_dim

        # build the projector: (fc, BN, ReLU) hidden layers, then an output fc with BN, no ReLU
        layers: list[nn.Module] = []
        in_dim = prev_dim
        for _ in range(proj_layers - 1):
            layers += [nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            in_dim = hidden_dim
        output = nn.Linear(in_dim, dim)
        output.bias.requires_grad = False  # as official: the bias is followed by BN, so unused
        self.encoder.fc = nn.Sequential(*layers, output, nn.BatchNorm1d(dim, affine=False))

        # build a 2-layer predictor
        self.predictor = nn.Sequential(
            nn.Linear(dim, pred_dim, bias=False),
            nn.BatchNorm1d(pred_dim),
            nn.ReLU(inplace=True),  # hidden layer
            nn.Linear(pred_dim, dim),  # output layer
        )

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        """
        x1, x2: two augmented views of the same images (each view normalised by its own BN batch)
        returns p1, p2, z1, z2: predictors and targets; z1 and z2 carry no gradient (Eq. 5)
        """
        z1 = self.encoder(x1)  # NxC
        z2 = self.encoder(x2)  # NxC

        p1 = self.predictor(z1)  # NxC
        p2 = self.predictor(z2)  # NxC

        if self.stop_gradient:
            return p1, p2, z1.detach(), z2.detach()
        return p1, p2, z1, z2
