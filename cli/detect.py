"""``simsiam detect train|eval|make-toy-voc``: Detectron2 detection transfer."""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

import click

from .paths import PATH, NonEmptyPath

if TYPE_CHECKING:
    from transfer.detection import DetectionPlan

CONFIG_HELP = "A shipped config (voc-r50-c4, coco-r50-c4-1x, coco-r50-c4-2x, voc-r50-fpn, coco-r50-fpn-1x) or a YAML path."

# For a CPU: small images, few iterations, few proposals and RoIs (the C4 head runs res5 on each
# RoI), a short precise-BN pass.
TOY_OVERRIDES = ("SOLVER.IMS_PER_BATCH 2 SOLVER.MAX_ITER 20 SOLVER.STEPS '(15,)' SOLVER.WARMUP_ITERS 5 "
                 "INPUT.MIN_SIZE_TRAIN '(120,)' INPUT.MAX_SIZE_TRAIN 200 INPUT.MIN_SIZE_TEST 120 "
                 "INPUT.MAX_SIZE_TEST 200 MODEL.RPN.POST_NMS_TOPK_TRAIN 100 MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE 32 "
                 "MODEL.RPN.PRE_NMS_TOPK_TEST 300 MODEL.RPN.POST_NMS_TOPK_TEST 20 TEST.PRECISE_BN.NUM_ITER 5 "
                 "DATALOADER.NUM_WORKERS 0")


def _run_options(function):
    """Options shared by train and eval."""
    for option in reversed([
        click.option("--config", "config", required=True, help=CONFIG_HELP),
        click.option("--data-root", required=True, type=PATH,
                     help="Folder holding VOCdevkit/VOC2007, VOCdevkit/VOC2012 and/or COCO's annotations/, "
                          "train2017/, val2017/."),
        # --output too: what this command took before it said --out as the other commands do
        click.option("--out", "--output", "output", type=PATH, default=None,
                     help="Output folder (checkpoints, logs, config.yaml). [default: output/CONFIG; eval: output/CONFIG/eval]"),
        click.option("--num-gpus", type=int, default=1, help="GPUs (processes) on this machine."),
        click.option("--num-machines", type=int, default=1, help="Machines taking part."),
        click.option("--machine-rank", type=int, default=0, help="Rank of this machine (0 runs the evaluation report)."),
        click.option("--dist-url", default="auto",
                     help="tcp://HOST:PORT of machine 0 for multi-machine runs; auto picks a free local port."),
        click.argument("opts", nargs=-1, metavar="[KEY VALUE]..."),
    ]):
        function = option(function)
    return function


@click.group("detect")
def command() -> None:
    """Fine-tune and evaluate Detectron2 detectors from a converted backbone (needs Detectron2).

    \b
    simsiam convert-d2 runs/r50/checkpoint_0099.pth.tar --out r50.pkl
    simsiam detect train --config voc-r50-c4 --weights r50.pkl --data-root /data --num-gpus 8
    simsiam detect eval --config voc-r50-c4 --weights output/voc-r50-c4/model_final.pth --data-root /data
    """


# ignore_unknown_options lets a KEY VALUE pair take a negative value (SOLVER.MAX_ITER -5 was
# "No such option '-5'"); options misspelt still end as click's own error, in _overrides.
OVERRIDES = {"ignore_unknown_options": True}


@command.command("train", context_settings=OVERRIDES)
@_run_options
@click.option("--weights", type=NonEmptyPath(), default=None, help="Backbone weights from simsiam convert-d2 (.pkl).")
@click.option("--scale-schedule", is_flag=True,
              help="With fewer (or more) than 8 GPUs, apply the linear scaling rule to batch, lr, warmup, "
                   "steps and iterations.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Start over in an --out folder that holds a run.")
def train(config, weights, data_root, output, num_gpus, num_machines, machine_rank, dist_url, opts,
          scale_schedule, resume, overwrite) -> None:
    """Fine-tune a detector from --weights, then evaluate it.

    KEY VALUE pairs override the config, as with Detectron2's tools
    (e.g. SOLVER.MAX_ITER 1000 TEST.PRECISE_BN.NUM_ITER 50).
    """
    from transfer.detection import plan_detection, run_detection

    plan = plan_detection(config, weights, str(data_root), output and str(output), _overrides(opts), num_gpus,
                          num_machines, machine_rank, dist_url, scale=scale_schedule, resume=resume, overwrite=overwrite)
    _report_plan(plan)
    _report_results(run_detection(plan, machine_rank, dist_url), plan)


@command.command("eval", context_settings=OVERRIDES)
@_run_options
@click.option("--weights", type=NonEmptyPath(), required=True, help="A trained detector (model_final.pth) or Detectron2 weights.")
def evaluate(config, weights, data_root, output, num_gpus, num_machines, machine_rank, dist_url, opts) -> None:
    """Evaluate --weights on the config's test set(s) and print AP numbers."""
    from transfer.detection import plan_detection, run_detection

    plan = plan_detection(config, weights, str(data_root), output and str(output), _overrides(opts), num_gpus,
                          num_machines, machine_rank, dist_url, eval_only=True)
    _report_plan(plan)
    _report_results(run_detection(plan, machine_rank, dist_url), plan)


@command.command("make-toy-voc")
@click.argument("root", type=PATH)
@click.option("--train-images", type=int, default=40, help="Images of VOC2007 trainval (VOC2012 gets half).")
@click.option("--test-images", type=int, default=20, help="Images of VOC2007 test (at least 20, one per class).")
@click.option("--size", type=(int, int), default=(160, 120), help="Width and height of the images.")
@click.option("--seed", type=int, default=0, help="Random seed.")
def make_toy_voc_command(root, train_images, test_images, size, seed) -> None:
    """Write a tiny synthetic VOC dataset in ROOT/VOCdevkit to try the detection path on a CPU."""
    from transfer.toy_voc import make_toy_voc

    summary = make_toy_voc(root, train_images, test_images, size[0], size[1], seed)
    counts = ", ".join(f"{split} {n}" for split, n in summary.images.items())
    click.echo(f"wrote {root}/VOCdevkit: {counts} images, {summary.objects} boxes")
    click.echo("try it (a few minutes on a CPU):")
    click.echo(f"  simsiam detect train --config voc-r50-c4 --weights r50.pkl --data-root {shlex.quote(str(root))} "
               f"--out {shlex.quote(f'{root}/run')} {TOY_OVERRIDES}")  # to paste: quoted for the shell


def _overrides(opts: tuple[str, ...]) -> tuple[str, ...]:
    """The KEY VALUE pairs, refusing a word in a KEY's place that looks like an option (a typo)."""
    import difflib

    ctx = click.get_current_context()
    for key in opts[::2]:
        if key.startswith("-"):  # suggestions as click's parser makes them
            names = [name for param in ctx.command.params for name in param.opts]
            raise click.NoSuchOption(key, possibilities=difflib.get_close_matches(key, names), ctx=ctx)
    return opts


def _report_plan(plan: "DetectionPlan") -> None:
    for note in plan.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"{'evaluating' if plan.run.eval_only else 'training'} on {plan.world_size} process(es); "
               f"output in {plan.output_dir}", err=True)


def _report_results(results: dict | None, plan: "DetectionPlan") -> None:
    if results is None:
        if plan.run.eval_only or plan.num_machines == 1:
            click.echo("no evaluation results were written", err=True)
        return
    for dataset, tasks in results.items():
        for task, metrics in tasks.items():
            shown = "  ".join(f"{name} {_number(value)}" for name, value in metrics.items() if "-" not in name)
            click.echo(f"{dataset} {task}: {shown}")
    click.echo(f"results in {plan.output_dir / 'eval_results.json'}")


def _number(value) -> str:
    return "nan" if value is None else f"{value:.2f}"
