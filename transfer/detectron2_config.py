"""The one loader of Detectron2 configs: shipped names or a user's YAML, plus command-line overrides.

The configs are data in ``transfer/configs/*.yaml`` (files whose name starts with ``_`` are bases,
not run on their own). Detectron2 is imported only when a config is loaded, so that the rest of
the package, and name resolution here, work without it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from simsiam.errors import InputError, SimSiamError

if TYPE_CHECKING:
    from detectron2.config import CfgNode

CONFIG_DIR = Path(__file__).parent / "configs"
# MoCo's and SimSiam's detection numbers are for 8 GPUs with 2 images each.
REFERENCE_GPUS = 8
# The norms of Detectron2 that synchronise statistics over processes (layers/batch_norm.py: get_norm).
SYNC_NORMS = ("SyncBN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N")
NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM")
# What Detectron2's DefaultTrainer.auto_scale_workers changes, and the precise-BN iterations.
SCHEDULE_KEYS = ("SOLVER.IMS_PER_BATCH", "SOLVER.BASE_LR", "SOLVER.MAX_ITER", "SOLVER.WARMUP_ITERS",
                 "SOLVER.STEPS", "TEST.EVAL_PERIOD", "SOLVER.CHECKPOINT_PERIOD", "TEST.PRECISE_BN.NUM_ITER")

# Settings Detectron2 takes unchecked and then fails on deep in a run, with a traceback (a zero
# checkpoint period divides by zero, a negative MAX_ITER breaks the lr schedule), or misuses in
# silence (a negative checkpoint period saves every iteration): (key, lowest value, training only).
# 0 is allowed where Detectron2 gives it a meaning: INPUT.MIN_SIZE_* 0 is no resize, TEST.EVAL_PERIOD
# 0 evaluates at the end only, SOLVER.WARMUP_ITERS 0 is no warmup.
LOWEST = (
    ("SOLVER.MAX_ITER", 1, True), ("SOLVER.IMS_PER_BATCH", 1, True), ("SOLVER.STEPS", 1, True),
    ("SOLVER.WARMUP_ITERS", 0, True), ("SOLVER.CHECKPOINT_PERIOD", 1, True), ("TEST.EVAL_PERIOD", 0, True),
    ("INPUT.MIN_SIZE_TRAIN", 0, True), ("INPUT.MAX_SIZE_TRAIN", 1, True),
    ("MODEL.RPN.BATCH_SIZE_PER_IMAGE", 1, True), ("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 1, True),
    ("INPUT.MIN_SIZE_TEST", 0, False), ("INPUT.MAX_SIZE_TEST", 1, False), ("DATALOADER.NUM_WORKERS", 0, False),
)
POSITIVE = ("SOLVER.BASE_LR", "SOLVER.GAMMA")  # finite and above 0
# The classes of the datasets simsiam registers (Detectron2's builtin metadata).
DATASET_CLASSES = {"voc": 20, "coco": 80}

INSTALL_HINT = ("pip install 'setuptools<81' wheel && pip install --no-build-isolation "
                "'git+https://github.com/facebookresearch/detectron2.git'")


class Detectron2NotInstalled(SimSiamError, ImportError):
    """A detection command ran where Detectron2 cannot be imported."""


def require_detectron2() -> None:
    """Raise :class:`Detectron2NotInstalled`, with the install command, when Detectron2 is missing."""
    try:
        import detectron2  # noqa: F401
        from detectron2 import _C  # noqa: F401  the compiled ops: a half-built install fails here
    except ImportError as err:
        raise Detectron2NotInstalled(
            f"Detectron2 is not installed ({err}); it is not on PyPI, install it from source with: "
            f"{INSTALL_HINT} (see README.md, Detection transfer)") from None


def config_names() -> list[str]:
    """The configs shipped in the package, by name (``voc-r50-c4``, ...)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("_"))


def resolve_config(name_or_yaml: str) -> Path:
    """The YAML file of a shipped config name, or of a user's ``.yaml`` path."""
    if name_or_yaml.endswith((".yaml", ".yml")) or "/" in name_or_yaml:
        path = Path(name_or_yaml)
        if not path.is_file():
            raise InputError(f"--config {name_or_yaml}: no such YAML file")
        return path
    if name_or_yaml not in config_names():
        raise InputError(f"--config {name_or_yaml}: unknown config; choose one of {', '.join(config_names())} "
                         "or give the path of a Detectron2 YAML file")
    return CONFIG_DIR / f"{name_or_yaml}.yaml"


def load_config(name_or_yaml: str, opts: Sequence[str] = ()) -> "CfgNode":
    """Detectron2's defaults, then the YAML (following ``_BASE_``), then ``KEY VALUE`` overrides.

    Importing :mod:`transfer.roi_heads` registers ``Res5ROIHeadsExtraNorm`` for the C4 configs.
    """
    require_detectron2()
    from detectron2.config import get_cfg

    from . import roi_heads  # noqa: F401  registers the ROI head the configs name

    path = resolve_config(name_or_yaml)
    cfg = get_cfg()
    try:
        shipped_base = _shipped_base(path)
        if shipped_base is None:
            cfg.merge_from_file(str(path))
        else:  # the shipped config first, then the user's YAML without its _BASE_
            from detectron2.config import CfgNode

            cfg.merge_from_file(str(shipped_base))
            cfg.merge_from_other_cfg(CfgNode({k: v for k, v in _read_yaml(path).items() if k != "_BASE_"}))
    except InputError:
        raise
    except Exception as err:  # yacs raises KeyError, ValueError, AssertionError, yaml errors
        raise InputError(f"--config {path}: not a valid Detectron2 config ({_one_line(err)})") from None
    if len(opts) % 2:
        raise InputError(f"overrides {' '.join(opts)}: give KEY VALUE pairs (an odd number of words was given)")
    for key, value in zip(opts[::2], opts[1::2]):  # one at a time, so that an error names its pair
        try:
            cfg.merge_from_list([key, _as_float_where_float(cfg, key, value)])
        except Exception as err:
            raise InputError(f"{key} {value}: {_one_line(err)}") from None
    return cfg


def _read_yaml(path: Path) -> dict:
    import yaml

    loaded = yaml.safe_load(path.read_text())
    return loaded if isinstance(loaded, dict) else {}


def _shipped_base(path: Path) -> Path | None:
    """The shipped config a user's YAML names as its ``_BASE_`` (``voc-r50-c4`` or ``voc-r50-c4.yaml``),
    when no such file lies beside it (Detectron2 reads ``_BASE_`` relative to the YAML's folder)."""
    if path.parent == CONFIG_DIR:
        return None
    base = _read_yaml(path).get("_BASE_")
    if not isinstance(base, str) or "/" in base or (path.parent / base).exists():
        return None
    name = base.removesuffix(".yaml")
    return CONFIG_DIR / f"{name}.yaml" if name in config_names() else None


def _as_float_where_float(cfg: "CfgNode", key: str, value: str) -> str:
    """``value`` written as a float when the setting is a float and the value an integer: yacs
    refuses ``SOLVER.BASE_LR 1`` as an int for a float ("Type mismatch")."""
    try:
        current = get_key(cfg, key)
        return repr(float(int(value))) if isinstance(current, float) else value
    except (KeyError, ValueError):
        return value


def check_settings(cfg: "CfgNode", eval_only: bool = False) -> None:
    """Refuse values of the config that Detectron2 would fail on mid-run or misuse (see :data:`LOWEST`)."""
    for key, lowest, training_only in LOWEST:
        value = get_key(cfg, key)
        if (not training_only or not eval_only) and any(v < lowest for v in _values(value)):
            raise InputError(f"{key} {_show(value)}: must be at least {lowest}" + ("" if key != "SOLVER.STEPS" else
                             " (the iterations at which the lr drops)"))
    for key in POSITIVE if not eval_only else ():
        value = get_key(cfg, key)
        if not 0 < value < math.inf:
            raise InputError(f"{key} {_show(value)}: must be a positive number")
    if cfg.TEST.PRECISE_BN.ENABLED and cfg.TEST.PRECISE_BN.NUM_ITER < 1:
        raise InputError(f"TEST.PRECISE_BN.NUM_ITER {cfg.TEST.PRECISE_BN.NUM_ITER}: must be at least 1; "
                         "TEST.PRECISE_BN.ENABLED False turns precise BN off")
    if not (cfg.MODEL.DEVICE == "cpu" or cfg.MODEL.DEVICE.split(":")[0] == "cuda"):
        raise InputError(f"MODEL.DEVICE {cfg.MODEL.DEVICE}: must be cpu, cuda or cuda:N")


def check_classes(cfg: "CfgNode", kinds: Sequence[str]) -> None:
    """The box head must predict as many classes as the datasets have: Detectron2 fails mid-run with an
    IndexError ("Target 11 is out of bounds") when it predicts fewer, and never trains the rest when more."""
    for kind in sorted(set(kinds)):
        if cfg.MODEL.ROI_HEADS.NUM_CLASSES != DATASET_CLASSES[kind]:
            raise InputError(f"MODEL.ROI_HEADS.NUM_CLASSES {cfg.MODEL.ROI_HEADS.NUM_CLASSES}: "
                             f"{kind.upper()} has {DATASET_CLASSES[kind]} classes")


def _values(value) -> list:
    return list(value) if isinstance(value, (tuple, list)) else [value]


def _one_line(err: BaseException) -> str:
    text = str(err).strip().strip("'\"") or type(err).__name__
    return " ".join(text.split())


def get_key(cfg: "CfgNode", key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def set_key(cfg: "CfgNode", key: str, value) -> None:
    *parents, last = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[last] = value


def use_plain_batchnorm(cfg: "CfgNode") -> list[str]:
    """In one process, replace every synchronised BN by plain BN; say what changed.

    There is nothing to synchronise with one process, and PyTorch's SyncBatchNorm (``SyncBN``)
    fails without a process group; ``naiveSyncBN`` already computes plain BN there.
    """
    changes = []
    for key in NORM_KEYS:
        try:
            norm = get_key(cfg, key)
        except KeyError:
            continue
        if norm in SYNC_NORMS:
            set_key(cfg, key, "BN")
            changes.append(f"{key}: {norm} -> BN (one process: nothing to synchronise)")
    return changes


def scale_schedule(cfg: "CfgNode", world_size: int) -> list[str]:
    """The linear scaling rule from the reference 8 GPUs to ``world_size``; say what changed.

    Goyal et al. 2017, "Accurate, Large Minibatch SGD": when the batch is multiplied by k,
    multiply the learning rate by k (and, for the same number of epochs, divide the iterations
    and lr steps by k). Detectron2 implements it in ``DefaultTrainer.auto_scale_workers``.
    """
    from detectron2.engine import DefaultTrainer

    reference = cfg.SOLVER.REFERENCE_WORLD_SIZE or REFERENCE_GPUS
    if cfg.SOLVER.IMS_PER_BATCH % reference:
        raise InputError(f"--scale-schedule: SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} is not divisible by "
                         f"the reference {reference} GPUs")
    before = {key: get_key(cfg, key) for key in SCHEDULE_KEYS}
    cfg.SOLVER.REFERENCE_WORLD_SIZE = reference
    # returns a scaled copy whose REFERENCE_WORLD_SIZE is world_size, so the trainer scales no more
    scaled = DefaultTrainer.auto_scale_workers(cfg, world_size)
    cfg.merge_from_other_cfg(scaled)
    # Detectron2 leaves precise BN's iterations alone; scale them too, so that its statistics are
    # recomputed over as many images as in the reference run.
    cfg.TEST.PRECISE_BN.NUM_ITER = int(round(before["TEST.PRECISE_BN.NUM_ITER"] * reference / world_size))
    changes = [f"{key}: {_show(before[key])} -> {_show(get_key(cfg, key))}"
               for key in SCHEDULE_KEYS if before[key] != get_key(cfg, key)]
    if changes:
        changes.insert(0, f"linear scaling rule for {world_size} GPU(s) instead of {reference}:")
    return changes


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(map(str, value)) + ")"
    return str(value)
