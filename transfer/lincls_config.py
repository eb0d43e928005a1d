"""Linear evaluation settings and their presets (``simsiam lincls``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from simsiam.config import (MAX_EPOCHS, MAX_IMAGE_SIZE, MAX_WORKERS, RunSettings, check_crop_fits, check_seed,
                            preset_values)
from simsiam.errors import InputError

OPTIMIZERS = ("lars", "sgd")


@dataclass
class LinearEvalConfig(RunSettings):
    """Every setting of a linear evaluation; ``config.json`` of its output folder holds one.

    The defaults are the official ``main_lincls.py`` of SimSiam: a linear classifier on the frozen
    backbone (BN in eval mode), fc initialised N(0, 0.01) with zero bias, 90 epochs, batch 4096,
    lr 0.1 x batch / 256 with a per-epoch cosine decay, LARS (trust coefficient 0.001, no
    clipping) with momentum 0.9 and no weight decay.
    """

    checkpoint: str = ""
    train_dir: str = ""
    val_dir: str = ""
    out: str = ""
    preset: str = "imagenet"
    epochs: int = 90
    batch_size: int = 4096  # global, over all processes
    lr: float = 0.1  # base lr; the optimizer's is lr * batch_size / 256
    momentum: float = 0.9
    wd: float = 0.0
    optimizer: str = "lars"
    trust_coefficient: float = 0.001
    image_size: int = 224
    eval_resize: int = 256  # resize before the center crop of validation; 0: none
    crop_min_scale: float = 0.08  # RandomResizedCrop's default scale (0.08, 1)
    eval_every: int = 1  # epochs
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    strict: bool = False
    log_every: int = 10  # steps
    save_every_steps: int = 0  # also refresh last.pth.tar every N steps (0: at epoch ends only)

    ARGUMENTS = {"checkpoint": "CHECKPOINT", "train_dir": "TRAIN_DIR", "val_dir": "VAL_DIR"}
    PATHS = ("checkpoint", "train_dir", "val_dir")
    REQUIRED = ("checkpoint", "train_dir", "val_dir", "out")
    # TRAIN_DIR may name another folder (moved, renamed): the run compares its image list with the
    # checkpoint's instead (simsiam.run_dir.check_resumed_images). CHECKPOINT may name another file
    # alike: the run compares the backbone's fingerprint (transfer.lincls.check_resumed_backbone).
    # VAL_DIR only decides what is evaluated, as pretrain's --knn-val (a best top-1 measured on other
    # images starts anew: transfer.lincls.resumed_best).
    RESUME_MAY_CHANGE = RunSettings.RESUME_MAY_CHANGE | {"checkpoint", "train_dir", "val_dir"}

    def validate(self) -> None:
        self.check_required()
        self.check_ints(("batch_size", "eval_every", "log_every"), 1)
        self.check_ints(("epochs",), 1, MAX_EPOCHS)
        self.check_ints(("save_every_steps",), 0)
        self.check_ints(("image_size",), 1, MAX_IMAGE_SIZE)
        self.check_ints(("eval_resize",), 0, MAX_IMAGE_SIZE)
        self.check_ints(("workers",), 0, MAX_WORKERS)
        self.check_optimizer_values(("lr", "wd", "trust_coefficient"))
        if not 0 <= self.momentum < 1:  # SGD's and LARS's momentum diverges from 1 on
            raise InputError(f"--momentum {self.momentum}: must be in [0, 1)")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"--optimizer {self.optimizer}: choose one of {', '.join(OPTIMIZERS)}")
        if not 0 < self.crop_min_scale <= 1:
            raise InputError(f"--crop-min-scale {self.crop_min_scale}: must be in (0, 1]")
        check_crop_fits(self.label("eval_resize"), self.eval_resize, self.label("image_size"), self.image_size)
        check_seed(self.seed)


# "imagenet": the official main_lincls.py. "cifar": the same protocol on 32x32 images (the
# paper's App. D gives no linear recipe): no resize at validation, batch 512, 100 epochs, and a
# base lr of 1.0 so that LARS's relative steps (lr x trust per step) add up over the ~10k steps
# of CIFAR-10 to a budget of the order of the ImageNet recipe's (1.6e-3 x 28k steps).
PRESETS: dict[str, dict] = {
    "imagenet": dict(epochs=90, batch_size=4096, lr=0.1, optimizer="lars", image_size=224, eval_resize=256,
                     crop_min_scale=0.08),
    "cifar": dict(epochs=100, batch_size=512, lr=1.0, optimizer="lars", image_size=32, eval_resize=0,
                  crop_min_scale=0.08),
}


def preset_linear_config(name: str, **overrides) -> LinearEvalConfig:
    """The preset's settings with ``overrides`` (None values are ignored) on top."""
    if name not in PRESETS:
        raise InputError(f"--preset {name}: choose one of {', '.join(PRESETS)}")
    return LinearEvalConfig(preset=name, **preset_values(PRESETS[name], overrides)).with_absolute_paths()
