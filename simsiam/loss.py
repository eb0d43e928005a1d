"""The SimSiam loss and the collapse monitor."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def negative_cosine_similarity(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """The symmetrised loss L = D(p1, z2)/2 + D(p2, z1)/2 with D(p, z) = -cos(p, z) (Eq. 1-2).

    The stop-gradient of Eq. 3 is applied by the model, which hands over detached z1, z2.
    The minimum is -1.
    """
    return -(F.cosine_similarity(p1, z2, dim=1).mean() + F.cosine_similarity(p2, z1, dim=1).mean()) * 0.5


@torch.no_grad()
def collapse_std(z: torch.Tensor, sum_over_ranks: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Per-channel std of the L2-normalised outputs z/||z||, averaged over channels (Sec. 4.1).

    About 1/sqrt(d) for outputs spread over the unit sphere, 0 when they collapse to a constant;
    the training log multiplies it by sqrt(d) so that healthy is near 1. Measured on a training
    batch of N behind the projector's output BN it cannot fall below 2 sqrt(N-1) / (N sqrt(d)):
    BN keeps every channel's batch variance at 1, so the collapsed batch is N-1 equal outputs
    and one opposite outlier.

    Under torchrun, ``sum_over_ranks`` (``torch.distributed.all_reduce``) makes it the std of the
    global batch, from every rank's count, sums and sums of squares, rather than of one rank's
    share (which reads otherwise, and is NaN for a share of one image).
    """
    unit = F.normalize(z.float(), dim=1)
    if sum_over_ranks is None:
        return unit.std(dim=0).mean()
    unit = unit.double()  # sums of squares minus a square: float64 keeps the difference exact enough
    moments = torch.cat([unit.new_tensor([len(unit)]), unit.sum(dim=0), (unit * unit).sum(dim=0)])
    sum_over_ranks(moments)
    count, sums, squares = moments[0], *moments[1:].chunk(2)
    variance = (squares - sums * sums / count) / (count - 1)
    return variance.clamp_min(0).sqrt().mean().float()
