"""The loss is the symmetrised negative cosine, with the stop-gradient on the targets."""

import math

import torch
import torch.nn.functional as F

from simsiam.backbones import build_resnet
from simsiam.loss import collapse_std, negative_cosine_similarity
from simsiam.model import SimSiam


def test_loss_is_minus_the_mean_of_both_cosines():
    p1, p2, z1, z2 = torch.randn(4, 8, 16).unbind(0)
    expected = -0.5 * (F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean())
    assert torch.allclose(negative_cosine_similarity(p1, p2, z1, z2), expected)
    assert math.isclose(negative_cosine_similarity(z2, z1, z1, z2).item(), -1.0, rel_tol=1e-6)


def tiny_model(stop_gradient: bool) -> SimSiam:
    torch.manual_seed(0)
    return SimSiam(build_resnet("resnet18", num_classes=32, cifar_stem=True), 32, 8, proj_layers=2,
                   proj_hidden_dim=32, stop_gradient=stop_gradient)


def test_no_gradient_flows_into_the_target_branch():
    model = tiny_model(stop_gradient=True)
    x1, x2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    p1, p2, z1, z2 = model(x1, x2)
    assert not z1.requires_grad and not z2.requires_grad and p1.requires_grad

    # The gradient must equal that of a loss where the targets are constants computed apart.
    loss = negative_cosine_similarity(p1, p2, z1, z2)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with torch.no_grad():
        t1, t2 = model.encoder(x1), model.encoder(x2)
    q1, q2 = model.predictor(model.encoder(x1)), model.predictor(model.encoder(x2))
    negative_cosine_similarity(q1, q2, t1, t2).backward()
    for name, p in model.named_parameters():
        if name in grads:
            assert torch.allclose(p.grad, grads[name], atol=1e-6), name


def test_without_stop_gradient_the_target_branch_gets_gradient():
    model = tiny_model(stop_gradient=False)
    p1, p2, z1, z2 = model(torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8))
    assert z1.requires_grad
    (g,) = torch.autograd.grad(negative_cosine_similarity(p1, p2, z1, z2), z1)
    assert g.abs().sum() > 0


def test_collapse_std_is_one_over_sqrt_d_for_spread_outputs_and_zero_for_collapsed():
    d = 256
    spread = torch.randn(4096, d)
    assert math.isclose(collapse_std(spread).item() * math.sqrt(d), 1.0, rel_tol=0.03)
    collapsed = torch.randn(1, d).expand(64, d) + 1e-6 * torch.randn(64, d)
    assert collapse_std(collapsed).item() * math.sqrt(d) < 1e-3


def test_collapse_std_over_ranks_is_the_global_batchs_even_with_one_image_per_rank():
    """Under torchrun each rank holds a share of the batch; the monitor sums every rank's moments."""
    torch.manual_seed(0)
    z = torch.randn(9, 32) + 3 * torch.randn(1, 32)  # outputs with a common direction: std well below 1/sqrt(d)
    for shares in ([4, 5], [1, 8], [1, 1, 7], [1] * 9):
        parts = z.split(shares)
        captured = []
        for part in parts[1:]:  # the other ranks' moments, as all_reduce would add them
            collapse_std(part, sum_over_ranks=captured.append)
        others = torch.stack(captured).sum(dim=0)
        global_std = collapse_std(parts[0], sum_over_ranks=lambda moments: moments.add_(others))
        assert math.isclose(global_std.item(), collapse_std(z).item(), rel_tol=1e-5), shares
    # one rank alone: the same as without ranks
    alone = collapse_std(z, sum_over_ranks=lambda moments: None)
    assert math.isclose(alone.item(), collapse_std(z).item(), rel_tol=1e-5)
