"""The model matches the official implementation: parameter counts and checkpoint keys."""

import math

import pytest
import torch

from simsiam.backbones import build_resnet
from simsiam.checkpoint import to_official_layout
from simsiam.model import SimSiam


def official_resnet50_simsiam() -> SimSiam:
    # builder.SimSiam(models.resnet50, 2048, 512)
    with torch.device("meta"):
        return SimSiam(build_resnet("resnet50", num_classes=2048, zero_init_residual=True), 2048, 512)


def count(params) -> int:
    return sum(p.numel() for p in params)


def test_resnet50_parameter_counts_match_the_official_model():
    model = official_resnet50_simsiam()
    assert count(model.parameters()) == 38_201_408
    assert count(p for p in model.parameters() if p.requires_grad) == 38_199_360
    backbone = [p for n, p in model.encoder.named_parameters() if not n.startswith("fc.")]
    assert count(backbone) == 23_508_032
    assert count(model.encoder.fc.parameters()) == 12_593_152
    assert count(model.predictor.parameters()) == 2_100_224
    assert len(model.state_dict()) == 343


def test_projector_and_predictor_are_laid_out_as_official():
    model = official_resnet50_simsiam()
    keys = to_official_layout(model.state_dict())
    # builder.py: fc = [Linear, BN, ReLU, Linear, BN, ReLU, Linear(prev_dim, dim), BN(affine=False)]
    assert keys["module.encoder.fc.0.weight"].shape == (2048, 2048)
    assert keys["module.encoder.fc.6.weight"].shape == (2048, 2048)
    assert keys["module.encoder.fc.6.bias"].shape == (2048,)
    assert "module.encoder.fc.7.running_mean" in keys and "module.encoder.fc.7.weight" not in keys
    assert keys["module.predictor.0.weight"].shape == (512, 2048)
    assert keys["module.predictor.3.weight"].shape == (2048, 512)
    assert not model.encoder.fc[6].bias.requires_grad


def test_checkpoint_keys_load_into_official_main_lincls_logic(tmp_path):
    import torchvision

    from simsiam.checkpoint import save_atomic
    from simsiam.config import preset_config
    from simsiam.train import _checkpoint, build_model, build_optimizer

    config = preset_config("imagenet")  # ResNet-50, 2048, 512: the official model
    torch.manual_seed(0)
    model = build_model(config)
    path = tmp_path / "checkpoint_0099.pth.tar"
    save_atomic(_checkpoint(config, None, model, build_optimizer(model, config), 100, 0, 0, {}), path)

    # main_lincls.py: models.__dict__[args.arch](), then "load from pre-trained, before
    # DistributedDataParallel constructor" (torch.load of the whole file, as the official script does)
    linear = torchvision.models.__dict__["resnet50"]()
    state_dict = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    for k in list(state_dict.keys()):
        if k.startswith("module.encoder") and not k.startswith("module.encoder.fc"):
            state_dict[k[len("module.encoder."):]] = state_dict[k]
        del state_dict[k]
    msg = linear.load_state_dict(state_dict, strict=False)
    assert set(msg.missing_keys) == {"fc.weight", "fc.bias"}
    assert msg.unexpected_keys == []
    assert torch.equal(linear.layer4[2].conv3.weight, model.encoder.layer4[2].conv3.weight)
    assert torch.equal(linear.bn1.running_var, model.encoder.bn1.running_var)


def test_cifar_variant_has_a_3x3_stem_no_maxpool_and_a_2_layer_projector():
    model = SimSiam(build_resnet("resnet18", num_classes=2048, cifar_stem=True, zero_init_residual=True),
                    2048, 512, proj_layers=2, proj_hidden_dim=2048)
    assert model.encoder.conv1.kernel_size == (3, 3) and model.encoder.conv1.stride == (1, 1)
    assert isinstance(model.encoder.maxpool, torch.nn.Identity)
    linears = [m for m in model.encoder.fc if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(2048, 512), (2048, 2048)]
    p1, p2, z1, z2 = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert p1.shape == z2.shape == (4, 2048)


@pytest.mark.parametrize("fix_pred_lr", [True, False])
def test_warmup_ramps_every_group_to_the_cosines_peak_reached_once(fix_pred_lr):
    from simsiam.config import preset_config
    from simsiam.train import build_model, build_optimizer, set_learning_rate

    config = preset_config("cifar", epochs=10, warmup_epochs=3, fix_pred_lr=fix_pred_lr, arch="resnet18")
    optimizer = build_optimizer(build_model(config), config)
    peak, lrs = config.init_lr, []
    for epoch in range(10):
        set_learning_rate(optimizer, config, epoch)
        lrs.append([group["lr"] for group in optimizer.param_groups])
    encoder = [lr[0] for lr in lrs]
    assert encoder[:4] == pytest.approx([peak / 4, peak / 2, 3 * peak / 4, peak])  # then the official cosine
    assert all(a > b for a, b in zip(encoder[3:], encoder[4:]))
    assert encoder[4] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi / 7)))
    if fix_pred_lr:  # the predictor: the same warmup, then held at the peak (never decayed)
        assert [lr[1] for lr in lrs] == pytest.approx(encoder[:4] + [peak] * 6)
