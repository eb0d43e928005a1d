"""``Res5ROIHeadsExtraNorm``, the C4 ROI head of MoCo's and SimSiam's detection transfer.

Importing this module registers the head with Detectron2 (it imports Detectron2: import it only
when a detection command runs).
"""

from __future__ import annotations

from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """Detectron2's ``Res5ROIHeads`` with one more norm layer after the res5 stage.

    MoCo's ``detection/train_net.py``: "As described in the MOCO paper, there is an extra BN
    layer following the res5 stage." The norm is ``MODEL.RESNETS.NORM``, the backbone's, and is
    initialised as a fresh BN (weight 1, bias 0): pretrained checkpoints have nothing for it.
    """

    def __init__(self, cfg, input_shape: dict[str, ShapeSpec]):
        super().__init__(cfg, input_shape)
        self.res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, self.res5[-1].out_channels))
