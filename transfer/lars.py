"""LARS: SGD with a layer-wise trust ratio, as the official linear evaluation uses it."""

from __future__ import annotations

from typing import Callable, Iterable

import torch


class LARS(torch.optim.SGD):
    """SGD (with momentum) whose gradient of each parameter tensor is first rescaled by LARS's ratio.

    You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks": the local lr of
    a layer is ``trust * ||w|| / (||grad|| + wd * ||w||)``. This follows NVIDIA apex's
    ``LARC(optimizer, trust_coefficient=0.001, clip=False)`` exactly, which SimSiam's and MoCo v3's
    ``main_lincls.py`` wrap around SGD: weight decay is added to the gradient, the sum is scaled by
    the ratio, then plain SGD steps with the group's lr; a tensor whose weight or gradient norm is
    zero (the zero-initialised bias at the first step) is left untouched, weight decay included.
    No clipping of the ratio (``clip=False``).
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        for group in self.param_groups:
            group.setdefault("trust_coefficient", trust_coefficient)
            group.setdefault("eps", eps)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        decays = []
        for group in self.param_groups:
            weight_decay = group["weight_decay"]
            decays.append(weight_decay)
            for p in group["params"]:
                if p.grad is None:
                    continue
                param_norm = torch.linalg.vector_norm(p)
                grad_norm = torch.linalg.vector_norm(p.grad)
                ratio = group["trust_coefficient"] * param_norm / (
                    grad_norm + param_norm * weight_decay + group["eps"])
                # kept on the device: no synchronisation per tensor
                scale = torch.where((param_norm > 0) & (grad_norm > 0), ratio, torch.ones_like(ratio))
                decay = torch.where((param_norm > 0) & (grad_norm > 0), weight_decay, 0.0)
                p.grad.add_(p * decay).mul_(scale)
            group["weight_decay"] = 0.0  # already in the gradient
        try:
            super().step()
        finally:
            for group, weight_decay in zip(self.param_groups, decays):
                group["weight_decay"] = weight_decay
        return loss
