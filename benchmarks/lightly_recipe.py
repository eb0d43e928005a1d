"""lightly's SimSiam (``pip install lightly``): its projection and prediction heads, its loss and
its ``SimSiamTransform``, on the same torchvision ResNet backbone and batch as ours.

As lightly's own CIFAR-10 benchmark: a 2-layer projection head (512 -> 2048 -> 2048, BN on both)
and ``SimSiamPredictionHead(2048, 512, 2048)`` for ResNet-18, ``SimSiamTransform`` without blur at
32x32; for ResNet-50, ``SimSiamProjectionHead(2048, 2048, 2048)`` and the default transform at 224;
no zero-initialised residual BN; SGD at lr 0.06 (not scaled with the batch; used at 224 too, where
only throughput is measured), momentum 0.9, weight decay 5e-4 (1e-4 at 224). The loss is ``0.5 *
(D(z0, p1) + D(z1, p0))`` with lightly's ``NegativeCosineSimilarity``; fp32 and no
``cudnn.benchmark`` (Lightning's defaults); PIL images from an ``ImageFolder`` through a
``DataLoader`` with workers and pinned memory (lightly's example pins none; pinning favours
lightly). The step is a plain PyTorch step (lightly's benchmark drives it with a Lightning
``Trainer``, whose overhead is left out here, to lightly's advantage).
"""

from __future__ import annotations

import time

import torch
import torchvision
from torch import nn

from simsiam.backbones import build_resnet

from .harness import Method, loader_queue


class LightlySimSiam(nn.Module):
    def __init__(self, backbone: nn.Module, features: int, cifar: bool):
        from lightly.models.modules.heads import ProjectionHead, SimSiamPredictionHead, SimSiamProjectionHead

        super().__init__()
        self.backbone = backbone
        if cifar:
            self.projection_head = ProjectionHead([(features, 2048, nn.BatchNorm1d(2048), nn.ReLU(inplace=True)),
                                                   (2048, 2048, nn.BatchNorm1d(2048), None)])
        else:
            self.projection_head = SimSiamProjectionHead(features, 2048, 2048)
        self.prediction_head = SimSiamPredictionHead(2048, 512, 2048)

    def forward(self, x):
        z = self.projection_head(self.backbone(x).flatten(start_dim=1))
        p = self.prediction_head(z)
        return z.detach(), p


def build(config, device: torch.device, passes: int = 1) -> Method:
    """lightly's SimSiam for a :class:`simsiam.config.PretrainConfig`'s backbone, data, batch size and
    worker count; the folder's images ``passes`` times over in an epoch (for timing)."""
    from lightly.loss import NegativeCosineSimilarity
    from lightly.transforms import SimSiamTransform

    start = time.perf_counter()
    torch.manual_seed(0)
    # lightly's benchmarks build the ResNet without zero-initialised residual BN
    resnet = build_resnet(config.arch, cifar_stem=config.cifar_stem, zero_init_residual=False)
    features = resnet.fc.in_features
    backbone = nn.Sequential(*list(resnet.children())[:-1])
    cifar = config.cifar_stem
    model = LightlySimSiam(backbone, features, cifar).to(device)
    criterion = NegativeCosineSimilarity()
    # lightly's CIFAR-10 benchmark: lr 0.06 whatever the batch ("no lr-scaling, results in better
    # training stability"), weight decay 5e-4; the rate does not change a step's speed
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4 if cifar else 1e-4)
    transform = SimSiamTransform(input_size=config.image_size, gaussian_blur=0.0 if cifar else 0.5)
    dataset = torchvision.datasets.ImageFolder(config.data, transform)
    if passes > 1:
        dataset = torch.utils.data.ConcatDataset([dataset] * passes)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
                                         num_workers=config.workers, pin_memory=device.type == "cuda")

    def step(batch):
        (x0, x1), _ = batch
        z0, p0 = model(x0.to(device, non_blocking=True))
        z1, p1 = model(x1.to(device, non_blocking=True))
        loss = 0.5 * (criterion(z0, p1) + criterion(z1, p0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss

    model.train()
    import lightly

    workers, queue = loader_queue(loader)
    method = Method("lightly", lambda: loader, step, config.batch_size, setup_s=time.perf_counter() - start,
                    notes=f"lightly {lightly.__version__}, fp32, PIL transforms"
                          + (", no cudnn.benchmark (as Lightning), pinned memory" if device.type == "cuda" else ""),
                    workers=workers, queue=queue)
    method.model, method.optimizer = model, optimizer  # for a run of whole epochs (time to accuracy)
    return method
