"""The one loader of Detectron2 configs: shipped names or a user's YAML, plus command-line overrides.

The configs are data in ``transfer/configs/*.yaml`` (files whose name starts with ``_`` are bases,
not run on their own). Detectron2 is imported only when a config is loaded, so that the rest of
the package, and name resolution here, work without it.
"""

from __future__ import annotations

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
        cfg.merge_from_file(str(path))
    except Exception as err:  # yacs raises KeyError, ValueError, AssertionError, yaml errors
        raise InputError(f"--config {path}: not a valid Detectron2 config ({_one_line(err)})") from None
    if len(opts) % 2:
        raise InputError(f"overrides {' '.join(opts)}: give KEY VALUE pairs (an odd number of words was given)")
    try:
        cfg.merge_from_list(list(opts))
    except Exception as err:
        raise InputError(f"overrides {' '.join(opts)}: {_one_line(err)}") from None
    return cfg


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
