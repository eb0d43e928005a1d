"""The Detectron2 side of ``simsiam detect``: the trainer and the function each process runs.

Imports Detectron2: only :func:`transfer.detection.run_detection` imports this module.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from argparse import Namespace

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.utils import comm

from simsiam.errors import TrainingDiverged

from . import roi_heads  # noqa: F401  registers Res5ROIHeadsExtraNorm in every process
from .detection import DetectionRun, write_results
from .detection_datasets import register_datasets


class Trainer(DefaultTrainer):
    """Detectron2's ``DefaultTrainer`` with the evaluator of each dataset, as MoCo's train_net.py.

    PASCAL VOC: ``PascalVOCDetectionEvaluator`` (AP50, and AP, AP75 averaged over IoU 0.5:0.95);
    COCO: ``COCOEvaluator`` (box AP, and mask AP for Mask R-CNN). Each evaluation's numbers are
    also written to ``OUTPUT_DIR/eval_results.json`` for ``simsiam detect`` to report.
    """

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        if dataset_name.startswith("coco"):
            return COCOEvaluator(dataset_name, output_dir=output_folder)
        return PascalVOCDetectionEvaluator(dataset_name)

    @classmethod
    def test(cls, cfg: CfgNode, model, evaluators=None):
        results = super().test(cfg, model, evaluators)
        if len(cfg.DATASETS.TEST) == 1:  # DefaultTrainer.test unwraps a single dataset's results
            results = {cfg.DATASETS.TEST[0]: results}
        if comm.is_main_process():
            write_results(_plain(results), cfg.OUTPUT_DIR)
        return results


def _plain(results) -> dict:
    """Evaluator output (OrderedDicts of numpy floats) as JSON-ready dicts; NaN becomes None."""
    if isinstance(results, dict):
        return {str(k): _plain(v) for k, v in results.items()}
    value = float(results)
    return None if math.isnan(value) else value


def detection_worker(run: DetectionRun) -> None:
    """What each process runs (Detectron2's ``launch`` calls it once per GPU)."""
    cfg = get_cfg()
    cfg.merge_from_other_cfg(CfgNode.load_cfg(run.config_yaml))
    cfg.freeze()
    register_datasets(run.datasets)
    default_setup(cfg, Namespace(config_file=run.config_file, eval_only=run.eval_only, resume=run.resume))
    if run.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
        Trainer.test(cfg, model)
        return
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=run.resume)
    _keep_divergence_tracebacks_in_the_log_file()
    try:
        trainer.train()
    except FloatingPointError as err:  # Detectron2's words for a loss or boxes gone NaN/Inf
        raise TrainingDiverged(f"training diverged at iteration {trainer.iter} ({err}); lower SOLVER.BASE_LR "
                               f"(now {cfg.SOLVER.BASE_LR:g}); log in {os.path.join(cfg.OUTPUT_DIR, 'log.txt')}") from None


def _keep_divergence_tracebacks_in_the_log_file() -> None:
    """Detectron2 logs every training exception with its traceback; on the console the CLI's one
    line says it for a diverged run, so its traceback goes to log.txt only."""
    def not_divergence(record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], FloatingPointError))

    for handler in logging.getLogger("detectron2").handlers:  # log.txt's is a StreamHandler too
        if getattr(handler, "stream", None) in (sys.stdout, sys.stderr):
            handler.addFilter(not_divergence)
