"""Pretraining settings and the paper's two recipes (presets)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from .atomic import atomic_write
from .errors import InputError


SEED_LIMIT = 2**63  # torch.manual_seed takes a signed 64-bit integer, numpy's generators none below 0
# Upper bounds of integer options, far above any real use: beyond them torch's and PIL's sizes
# overflow (a traceback, not an out-of-memory message) or, for workers, processes are forked
# until the OOM killer ends the run.
MAX_IMAGE_SIZE = 4096  # crop and resize sides
MAX_WIDTH = 65536  # projector and predictor layers
MAX_WORKERS = 128  # DataLoader processes, per training process
MAX_EPOCHS = 100_000  # the paper's longest is 800; --epochs 10**20 would run until stopped
FLOAT32_MAX = 3.4028234663852886e38  # the weights' type: torch cannot step them with a larger lr or weight decay


def check_seed(seed: int) -> None:
    if not 0 <= seed < SEED_LIMIT:
        raise InputError(f"--seed {seed}: must be from 0 to {SEED_LIMIT - 1}")


def check_int(label: str, value: int, low: int, high: int | None = None) -> None:
    """Refuse ``value`` of the option ``label`` below ``low`` or above ``high``."""
    if value < low:
        raise InputError(f"{label} {value}: must be at least {low}")
    if high is not None and value > high:
        raise InputError(f"{label} {value}: must be at most {high}")


def check_crop_fits(resize_label: str, resize: int, size_label: str, image_size: int) -> None:
    """Refuse a resize (0: none) smaller than the centre crop: torchvision's CenterCrop would pad
    the crop with black, and every feature would carry the border."""
    if resize and resize < image_size:
        raise InputError(f"{resize_label} {resize}: smaller than {size_label} {image_size}, the centre crop would be "
                         f"padded with black; resize to at least {image_size} (the ImageNet recipe's 256/224: "
                         f"{round(image_size * 256 / 224)}), or 0 for none")


def preset_values(preset: dict, overrides: dict) -> dict:
    """A preset's settings with ``overrides`` (None values are ignored) on top. Another crop size,
    without ``eval_resize`` given, gets the resize at the preset's ratio (the ImageNet recipe's
    256/224: 288 -> 329, 160 -> 183, 32 -> 37), as timm's crop_pct: the preset's own resize would pad
    a larger crop, and a small one would see the middle of the image only (32 of 256: 1/64 of it)."""
    values = {**preset, **{k: v for k, v in overrides.items() if v is not None}}
    if overrides.get("eval_resize") is None and preset["eval_resize"] and values["image_size"] != preset["image_size"]:
        values["eval_resize"] = round(values["image_size"] * preset["eval_resize"] / preset["image_size"])
    return values


class RunSettings:
    """What the settings dataclasses of runs share: a JSON round trip and the lr scaling rule."""

    @property
    def init_lr(self) -> float:
        """The linear scaling rule of the paper: lr x batch / 256."""
        return self.lr * self.batch_size / 256

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    ARGUMENTS: dict[str, str] = {"data": "DATA"}  # settings given as positional arguments, by their metavar
    # Settings that name files or folders: saved absolute, so that a run resumes from any folder.
    PATHS: tuple[str, ...] = ("data", "knn_train", "knn_val")
    REQUIRED: tuple[str, ...] = ("data", "out")  # no default: "" would quietly mean the current folder
    # Settings a resumed run may be given anew: how it runs, what it logs and saves, and
    # more epochs (the cosine schedule is then recomputed over the new total). Every other setting
    # decides what the saved weights and optimizer state are, so changing it is refused. DATA may
    # name another folder (moved, renamed): the run compares its image list with the checkpoint's
    # instead (simsiam.run_dir.check_resumed_images).
    RESUME_MAY_CHANGE = frozenset({"data", "epochs", "eval_resize", "workers", "device", "precision", "compile",
                                   "data_on_gpu", "gpu_decode", "strict", "log_every", "save_every_epochs",
                                   "save_every_steps", "knn_train", "knn_val", "knn_every", "knn_k",
                                   "knn_temperature", "eval_every"})

    @classmethod
    def from_dict(cls, values: dict):
        """Settings from a saved dict; keys this version does not know are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def for_resume(cls, saved: dict, given: dict, where: str):
        """The saved settings of the run at ``where``, with the ``given`` ones a resumed run may change.

        A path is the same when it names the same file or folder (relative or absolute, through a
        symbolic link or not). A relative one in the config.json of an older version names a place
        relative to a folder no longer known: the user's spelling is taken; none given, it is
        looked up from here as before. A saved path that is not there (moved, or relative) is
        refused by name, asking for it again.
        """
        absolute = {**given, **{k: os.path.abspath(v) for k, v in given.items() if k in cls.PATHS and v}}
        cls._check_unchanged(saved, absolute, given, where)
        for name in cls.PATHS:
            old = saved.get(name)
            if old and name not in given and not os.path.exists(old):
                why = "which is no longer there" if os.path.isabs(old) else "relative to the folder it was started from"
                raise InputError(f"--resume {where}: its run names {cls.label(name)} as {old!r}, {why}; "
                                 f"give {cls.label(name)} again")
        return cls.from_dict({**saved, **absolute}).with_absolute_paths()

    def check_resumes(self, saved: dict, where: str) -> None:
        """Refuse settings of this config that a resume of the run saved with ``saved`` may not
        change (:data:`RESUME_MAY_CHANGE` may; the output folder and the preset's name may too).
        The CLI makes its config with :meth:`for_resume`; this guards library callers alike."""
        mine = {k: v for k, v in self.to_dict().items() if k not in ("out", "preset")}
        self._check_unchanged(saved, mine, mine, where)

    @classmethod
    def _check_unchanged(cls, saved: dict, values: dict, shown: dict, where: str) -> None:
        for name, value in values.items():
            if name in cls.RESUME_MAY_CHANGE or name not in saved:
                continue
            if name in cls.PATHS and saved[name]:
                same = not os.path.isabs(saved[name]) or os.path.realpath(saved[name]) == os.path.realpath(value)
            else:
                same = saved[name] == value
            if not same and isinstance(value, bool):  # a flag: --blur or --no-blur, not "--blur False"
                flag = cls.label(name) if value else f"--no-{cls.label(name)[2:]}"
                raise InputError(f"{flag}: the run being resumed ({where}) did not use it; a resumed run continues "
                                 "with its own settings")
            if not same:
                raise InputError(f"{cls.label(name)} {shown[name]}: the run being resumed ({where}) used "
                                 f"{saved[name]}; a resumed run continues with its own settings")

    @classmethod
    def label(cls, name: str) -> str:
        """How the command line spells a setting: DATA, or --batch-size."""
        return cls.ARGUMENTS.get(name, f"--{name.replace('_', '-')}")

    def check_ints(self, names, low: int, high: int | None = None) -> None:
        for name in names:
            check_int(self.label(name), getattr(self, name), low, high)

    def check_optimizer_values(self, names) -> None:
        """``names`` (lr, wd, ...) finite, not negative, and they and the scaled lr within float32."""
        for name in names:
            value = getattr(self, name)
            if not 0 <= value < float("inf"):  # NaN compares false
                raise InputError(f"{self.label(name)} {value}: must be a finite number, not negative")
            if value > FLOAT32_MAX:
                raise InputError(f"{self.label(name)} {value}: must be at most {FLOAT32_MAX:.4g} (float32, the "
                                 "weights' type)")
        if self.init_lr > FLOAT32_MAX:
            raise InputError(f"--lr {self.lr}: the optimizer's lr, lr x batch / 256 = {self.init_lr:.4g}, must be at "
                             f"most {FLOAT32_MAX:.4g} (float32, the weights' type)")

    def check_required(self) -> None:
        missing = [name for name in self.REQUIRED if not getattr(self, name)]
        if missing:
            raise InputError(f"{', '.join(missing)}: not set; {'they name' if len(missing) > 1 else 'it names'} "
                             "a folder or file the run needs")

    def with_absolute_paths(self):
        for name in self.PATHS:
            if getattr(self, name):
                setattr(self, name, os.path.abspath(getattr(self, name)))
        return self


@dataclass
class PretrainConfig(RunSettings):
    """Every setting of a pretraining run; ``config.json`` of a run folder holds one of these."""

    data: str = ""
    out: str = ""
    preset: str = "imagenet"
    arch: str = "resnet50"
    cifar_stem: bool = False
    epochs: int = 100
    batch_size: int = 512  # global, over all processes
    lr: float = 0.05  # base lr; the optimizer's is lr * batch_size / 256
    wd: float = 1e-4
    momentum: float = 0.9
    image_size: int = 224
    crop_min_scale: float = 0.2
    blur: bool = True
    eval_resize: int = 256  # resize before the center crop of evaluation; 0: none
    dim: int = 2048
    pred_dim: int = 512
    proj_layers: int = 3
    proj_hidden_dim: int = 0  # 0: the backbone's width, as official
    fix_pred_lr: bool = True
    warmup_epochs: int = 0
    stop_grad: bool = True
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False  # torch.compile the model and the loss
    data_on_gpu: bool | None = None  # hold the decoded dataset on the GPU; None: auto (when it fits)
    gpu_decode: bool = False  # decode JPEG batches on the GPU (when the dataset is not held there)
    strict: bool = False
    log_every: int = 10  # steps; the official print_freq
    save_every_epochs: int = 1  # numbered checkpoint_XXXX.pth.tar files; the last epoch always
    save_every_steps: int = 0  # also refresh last.pth.tar every N steps (0: at epoch ends only)
    knn_train: str = ""
    knn_val: str = ""
    knn_every: int = 1
    knn_k: int = 20
    knn_temperature: float = 0.07

    def validate(self) -> None:
        self.check_required()
        self.check_ints(("batch_size", "log_every", "save_every_epochs", "knn_every", "knn_k"), 1)
        self.check_ints(("epochs",), 1, MAX_EPOCHS)
        self.check_ints(("warmup_epochs", "save_every_steps"), 0)
        self.check_ints(("image_size",), 1, MAX_IMAGE_SIZE)
        self.check_ints(("eval_resize",), 0, MAX_IMAGE_SIZE)
        check_crop_fits(self.label("eval_resize"), self.eval_resize, self.label("image_size"), self.image_size)
        self.check_ints(("dim", "pred_dim"), 1, MAX_WIDTH)
        self.check_ints(("proj_hidden_dim",), 0, MAX_WIDTH)
        self.check_ints(("workers",), 0, MAX_WORKERS)
        self.check_optimizer_values(("lr", "wd"))
        if not 0 <= self.momentum < 1:
            raise InputError(f"--momentum {self.momentum}: must be in [0, 1)")
        if self.batch_size < 2:
            raise InputError(f"--batch-size {self.batch_size}: BatchNorm needs at least 2 images a batch")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs:
            raise InputError(f"--warmup-epochs {self.warmup_epochs}: must be fewer than --epochs {self.epochs}")
        from .backbones import RESNET_ARCHS

        if self.arch not in RESNET_ARCHS:
            raise InputError(f"--arch {self.arch}: not a torchvision ResNet; choose one of {', '.join(RESNET_ARCHS)}")
        if self.proj_layers not in (2, 3):
            raise InputError(f"--proj-layers {self.proj_layers}: must be 2 or 3")
        if not 0 < self.crop_min_scale <= 1:
            raise InputError(f"--crop-min-scale {self.crop_min_scale}: must be in (0, 1]")
        if bool(self.knn_train) != bool(self.knn_val):
            raise InputError("--knn-train and --knn-val: give both or neither")
        if self.data_on_gpu not in (None, True, False):
            raise InputError(f"--data-on-gpu {self.data_on_gpu!r}: must be on, off or auto (unset)")
        if not 0 < self.knn_temperature < float("inf"):  # NaN compares false
            raise InputError(f"--knn-temperature {self.knn_temperature}: must be a positive finite number")
        check_seed(self.seed)


# The paper's recipes. "imagenet": Sec. 4 and the official main_simsiam.py; "cifar": App. D.
PRESETS: dict[str, dict] = {
    "imagenet": dict(
        arch="resnet50", cifar_stem=False, epochs=100, batch_size=512, lr=0.05, wd=1e-4,
        image_size=224, blur=True, eval_resize=256, dim=2048, pred_dim=512, proj_layers=3,
        proj_hidden_dim=0, fix_pred_lr=True, save_every_epochs=1,
    ),
    "cifar": dict(
        arch="resnet18", cifar_stem=True, epochs=800, batch_size=512, lr=0.03, wd=5e-4,
        image_size=32, blur=False, eval_resize=0, dim=2048, pred_dim=512, proj_layers=2,
        proj_hidden_dim=2048, fix_pred_lr=True, save_every_epochs=50,
    ),
}


def preset_config(name: str, **overrides) -> PretrainConfig:
    """The preset's settings with ``overrides`` (None values are ignored) on top."""
    if name not in PRESETS:
        raise InputError(f"--preset {name}: choose one of {', '.join(PRESETS)}")
    return PretrainConfig(preset=name, **preset_values(PRESETS[name], overrides)).with_absolute_paths()


def write_json_atomic(obj, path: str | os.PathLike) -> None:
    with atomic_write(path, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
