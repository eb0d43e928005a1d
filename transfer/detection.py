"""``simsiam detect train|eval``: Detectron2 fine-tuning and evaluation of a converted backbone.

:func:`plan_detection` checks everything a user gives (config, weights, data folders, GPUs) before
anything starts, and settles the config; :func:`run_detection` runs it through Detectron2's own
``launch`` (one process, several GPUs, or several machines), as MoCo's ``detection/train_net.py``.
The checks that need no Detectron2 come first, so they work where it is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from simsiam.atomic import atomic_write
from simsiam.errors import InputError

from .detection_datasets import check_data_root, locate_datasets
from .detectron2_config import (REFERENCE_GPUS, check_classes, check_settings, get_key, load_config,
                                require_detectron2, resolve_config, scale_schedule, use_plain_batchnorm)
from .detectron2_fit import check_weights_fit
from .detectron2_weights import TORCHVISION_INPUT_SETTINGS, WeightsFile, check_detectron2_weights

RESULTS_FILE = "eval_results.json"  # written by the main process after each evaluation
# Files by which Detectron2 marks an output folder as holding a training run.
RUN_MARKERS = ("last_checkpoint", "model_final.pth")
# The settled config of a training run (Detectron2's config.yaml is rewritten by any run, an
# evaluation too), against which a resume is checked.
TRAIN_CONFIG_FILE = "train_config.yaml"
# What a training run writes in its output folder (Detectron2's files, then ours), cleared when a
# training starts over (--overwrite): Detectron2 appends to metrics.json and log.txt, and a --resume
# would follow last_checkpoint to the old run's model.
RUN_FILES = ("last_checkpoint", "model_*.pth", "metrics.json", "log.txt", "config.yaml", "events.out.tfevents.*",
             "inference", RESULTS_FILE, TRAIN_CONFIG_FILE)
# What a resumed training run may change: where its weights come from (the checkpoint decides),
# its length, how often it saves and evaluates, the device and the loader's worker count.
RESUMABLE = ("MODEL.WEIGHTS", "OUTPUT_DIR", "MODEL.DEVICE", "SOLVER.MAX_ITER", "SOLVER.CHECKPOINT_PERIOD",
             "TEST.EVAL_PERIOD", "DATALOADER.NUM_WORKERS")


@dataclass
class DetectionRun:
    """What every process needs; Detectron2's ``launch`` pickles it to each one."""

    config_file: str
    config_yaml: str  # the settled config (CfgNode.dump())
    datasets: list  # DatasetLocation of every dataset the run reads
    eval_only: bool
    resume: bool


@dataclass
class DetectionPlan:
    run: DetectionRun
    output_dir: Path
    world_size: int
    num_gpus: int
    num_machines: int
    notes: list[str] = field(default_factory=list)  # what was changed or should be known, for the user
    # --overwrite: the earlier run's files go before the start, but never these (the --config and
    # --weights the run reads may lie in its output folder, under a run file's name)
    clear: bool = False
    inputs: tuple[str, ...] = ()


def plan_detection(config: str, weights: str | None, data_root: str, output: str | None = None,
                   opts: Sequence[str] = (), num_gpus: int = 1, num_machines: int = 1, machine_rank: int = 0,
                   dist_url: str = "auto", scale: bool = False, eval_only: bool = False, resume: bool = False,
                   overwrite: bool = False) -> DetectionPlan:
    """Check the inputs and settle the Detectron2 config of a training or evaluation run. The paths
    may be strings or ``Path``s."""
    config, data_root = os.fspath(config), os.fspath(data_root)
    weights, output = (None if weights is None else os.fspath(weights)), (None if output is None else os.fspath(output))
    if num_gpus < 1 or num_machines < 1:
        raise InputError(f"--num-gpus {num_gpus} / --num-machines {num_machines}: must be at least 1")
    if not 0 <= machine_rank < num_machines:
        raise InputError(f"--machine-rank {machine_rank}: must be in 0..{num_machines - 1}")
    if num_machines > 1 and dist_url == "auto":
        raise InputError("--dist-url: a multi-machine run needs the tcp://HOST:PORT of machine 0")
    for key in opts[::2]:  # they would be replaced without a word by what the options give
        if key in ("MODEL.WEIGHTS", "OUTPUT_DIR"):
            raise InputError(f"{key}: give it as {'--weights' if key == 'MODEL.WEIGHTS' else '--out'}, "
                             "not as a KEY VALUE pair")
    config_file = resolve_config(config)
    weights_file = None
    if weights is not None:
        weights_file = check_detectron2_weights(weights)
    elif eval_only or not resume:
        raise InputError("--weights: needed (a convert-d2 .pkl to train from, a model_final.pth to evaluate)")
    check_data_root(data_root)
    require_detectron2()

    import torch

    cfg = load_config(config, opts)
    names = list(cfg.DATASETS.TEST) + ([] if eval_only else list(cfg.DATASETS.TRAIN))
    if not names:
        raise InputError(f"--config {config}: DATASETS.TEST and DATASETS.TRAIN name no dataset")
    datasets = locate_datasets(data_root, names)
    check_settings(cfg, eval_only)
    check_classes(cfg, [where.kind for where in datasets])
    if weights_file is not None:  # Detectron2 would only warn, tensor by tensor, and run a mostly random network
        check_weights_fit(cfg, weights_file, whole_model=eval_only)
    notes: list[str] = input_setting_notes(cfg, weights_file)

    world_size = num_gpus * num_machines
    if not torch.cuda.is_available():
        if world_size > 1:
            raise InputError(f"--num-gpus {num_gpus} --num-machines {num_machines}: no CUDA GPU is visible; "
                             "on a CPU run with one process")
        if cfg.MODEL.DEVICE != "cpu":
            cfg.MODEL.DEVICE = "cpu"
            notes.append("MODEL.DEVICE: cuda -> cpu (no CUDA GPU is visible)")
    elif num_gpus > torch.cuda.device_count():
        raise InputError(f"--num-gpus {num_gpus}: only {torch.cuda.device_count()} GPU(s) are visible")
    if cfg.MODEL.DEVICE == "cpu" and cfg.SOLVER.AMP.ENABLED and not eval_only:  # Detectron2's AMPTrainer asserts
        raise InputError("SOLVER.AMP.ENABLED True: mixed-precision training needs a CUDA GPU; this run is on the CPU")
    if world_size == 1:
        notes += use_plain_batchnorm(cfg)

    if not eval_only:
        if scale:
            notes += scale_schedule(cfg, world_size)
            try:  # a short schedule scaled to more GPUs than the reference can round down to 0
                check_settings(cfg)
            except InputError as err:
                raise InputError(f"--scale-schedule for {world_size} GPUs: {err}") from None
        elif world_size != REFERENCE_GPUS and cfg.SOLVER.REFERENCE_WORLD_SIZE in (0, world_size):
            notes.append(f"batch {cfg.SOLVER.IMS_PER_BATCH} over {world_size} GPU(s) instead of {REFERENCE_GPUS}: "
                         f"{cfg.SOLVER.IMS_PER_BATCH // world_size} images per GPU; --scale-schedule applies "
                         "the linear scaling rule instead")
        if cfg.SOLVER.IMS_PER_BATCH % world_size:
            raise InputError(f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH}: not divisible by the {world_size} "
                             "GPUs")

    # an evaluation writes its own config.yaml and results: by default not over a training's of that config
    out = Path(output) if output else Path("output") / config_file.stem / ("eval" if eval_only else "")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    holds_run = any((out / marker).exists() for marker in RUN_MARKERS)
    if not eval_only:
        if resume and not (out / "last_checkpoint").exists() and weights is None:
            raise InputError(f"--resume: {out} holds no checkpoint to resume from (last_checkpoint)")
        if resume and (out / "last_checkpoint").exists():
            _check_last_checkpoint(out)
        if holds_run and not resume and not overwrite:
            raise InputError(f"--out {out}: already holds a training run; pass --resume to continue it or "
                             "--overwrite to start over")
    cfg.MODEL.WEIGHTS = weights or ""
    cfg.OUTPUT_DIR = str(out)
    if resume and not eval_only:
        if (out / TRAIN_CONFIG_FILE).is_file():
            _check_resume(out, cfg)
        else:  # a run started by an earlier version
            notes.append(f"--resume: {out} holds no {TRAIN_CONFIG_FILE}, so the settings were not checked against "
                         "the run's start")
    cfg.freeze()
    run = DetectionRun(str(config_file), cfg.dump(), datasets, eval_only, resume)
    inputs = tuple(str(Path(p).resolve()) for p in (config_file, weights) if p and "://" not in str(p))
    return DetectionPlan(run, out, world_size, num_gpus, num_machines, notes,
                         clear=overwrite and not resume and not eval_only, inputs=inputs)


def _check_last_checkpoint(out: Path) -> None:
    """The checkpoint ``last_checkpoint`` names is there and whole enough to open (a zip, as torch.save
    writes): Detectron2 would stop with an AssertionError or a PytorchStreamReader traceback."""
    name = (out / "last_checkpoint").read_text().strip()
    checkpoint = out / name
    if not checkpoint.is_file():
        raise InputError(f"--resume: {out}/last_checkpoint names {name}, which is not there; write the name of "
                         "another model_*.pth of the run into it, or start over with --overwrite")
    if not zipfile.is_zipfile(checkpoint):
        raise InputError(f"--resume: {checkpoint} (named by last_checkpoint) is cut short or not a checkpoint; "
                         "write the name of another model_*.pth of the run into last_checkpoint, or start over with "
                         "--overwrite")


def input_setting_notes(cfg, weights_file: WeightsFile | None) -> list[str]:
    """What of the config differs from the input settings convert-d2's weights were trained with
    (a torchvision ResNet: stride in the 3x3 conv, RGB, ImageNet mean and std): Detectron2 loads
    them all the same, and the network sees other inputs than those it learnt from."""
    if weights_file is None or weights_file.arch is None:
        return []
    notes = []
    for key, wanted in TORCHVISION_INPUT_SETTINGS.items():
        value = get_key(cfg, key)
        same = (len(value) == len(wanted) and all(abs(a - b) < 1e-3 for a, b in zip(value, wanted))
                if isinstance(wanted, list) else value == wanted)
        if not same:
            notes.append(f"{key} {value}: the weights of {weights_file.path} (a torchvision {weights_file.arch}) "
                         f"were trained with {wanted}")
    return notes


def changed_settings(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """``KEY: old -> new`` for each setting of the config ``now`` (nested dicts, as its YAML loads)
    that differs from ``saved``, those in :data:`RESUMABLE` aside."""
    changes = []
    for key in sorted(saved.keys() | now.keys()):
        name, old, new = prefix + key, saved.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += changed_settings(old, new, name + ".")
        elif old != new and name not in RESUMABLE:
            changes.append(f"{name}: {old} -> {new}")
    return changes


def _check_resume(out: Path, cfg) -> None:
    """Refuse a resume whose settled config is not the run's: Detectron2 would go on with the new
    settings (another batch, schedule or norm) from the old run's checkpoint, and say nothing."""
    import yaml

    changes = changed_settings(yaml.safe_load((out / TRAIN_CONFIG_FILE).read_text()), yaml.safe_load(cfg.dump()))
    if changes:
        more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
        raise InputError(f"--resume: the run in {out} was started with other settings ({'; '.join(changes[:3])}{more}); "
                         "give the --config, --num-gpus, --num-machines, --scale-schedule and KEY VALUE pairs it was "
                         f"started with (they are in {out / TRAIN_CONFIG_FILE})")


def run_detection(plan: DetectionPlan, machine_rank: int = 0, dist_url: str = "auto") -> dict | None:
    """Train (then evaluate) or only evaluate, in every process; the main process's results.

    Returns ``{dataset: {task: {metric: value}}}`` (AP, AP50, AP75, ...) on the machine of rank
    0, None elsewhere.
    """
    from detectron2.engine import launch

    from .detectron2_trainer import detection_worker

    results_path = plan.output_dir / RESULTS_FILE
    if machine_rank == 0:
        plan.output_dir.mkdir(parents=True, exist_ok=True)
        results_path.unlink(missing_ok=True)  # never report the numbers of an earlier run
        if plan.clear:
            clear_run_files(plan.output_dir, keep=plan.inputs)
        if not plan.run.eval_only:
            with atomic_write(plan.output_dir / TRAIN_CONFIG_FILE, "w") as f:
                f.write(plan.run.config_yaml)
    launch(detection_worker, plan.num_gpus, num_machines=plan.num_machines, machine_rank=machine_rank,
           dist_url=dist_url, args=(plan.run,))
    if machine_rank != 0 or not results_path.exists():
        return None
    return json.loads(results_path.read_text())


def clear_run_files(output_dir: Path, keep: Sequence[str] = ()) -> None:
    """Remove what an earlier training run wrote in ``output_dir`` (:data:`RUN_FILES`), nothing else,
    and none of ``keep`` (resolved paths: the run's own inputs)."""
    for pattern in RUN_FILES:
        for path in output_dir.glob(pattern):
            if str(path.resolve()) in keep or any(Path(k).is_relative_to(path.resolve()) for k in keep):
                continue
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def write_results(results: dict, output_dir: str | os.PathLike) -> None:
    from simsiam.config import write_json_atomic

    write_json_atomic(results, Path(output_dir) / RESULTS_FILE)
