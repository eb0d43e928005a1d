"""``simsiam lincls``: the linear evaluation of a pretrained backbone."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import click

from transfer.lincls_config import PRESETS

from .paths import PATH
from .presets import preset_help
from .progress import TrainingProgress


def _from_preset(key: str, help_text: str) -> str:
    return preset_help(PRESETS, key, help_text)


class LinearEvalProgress(TrainingProgress):
    """The pretraining progress bar, with validation accuracy on the epoch lines."""

    def __call__(self, event: dict) -> None:
        if event["event"] == "start":
            self.console.print(f"{event['arch']} backbone frozen; {event['classes']} classes, "
                               f"{event['val_images']} validation images")
            if event.get("dropped_best_top1") is not None:
                self.console.print(f"VAL_DIR holds other images than the best top-1 so far "
                                   f"({event['dropped_best_top1']:.2f}%) was measured on: the best starts anew")
        if event["event"] == "epoch":
            accuracy = (f"  val top-1 {event['top1']:.2f}%  top-{event['topk']} {event['top5']:.2f}%"
                        if "top1" in event else "")
            self.console.print(f"epoch {event['epoch']}: loss {event['loss']:.4f}  train top-1 "
                               f"{event['train_top1']:.2f}%{accuracy}")
            return
        super().__call__(event)


@click.command("lincls")
@click.argument("checkpoint", required=False, type=PATH)
@click.argument("train_dir", required=False, type=PATH)
@click.argument("val_dir", required=False, type=PATH)
@click.option("--out", type=PATH, default=None,
              help="Output folder (last.pth.tar, linear_head.pth, metrics.jsonl, config.json). [default: CHECKPOINT's "
                   "folder/lincls]")
@click.option("--preset", type=click.Choice(["imagenet", "cifar"]), default=None,
              help="imagenet: the official recipe at 224; cifar: the same at 32x32, batch 512, 100 epochs, lr 1.0 "
                   "[default: cifar for a checkpoint with the CIFAR stem, else imagenet]")
@click.option("--epochs", type=int, default=None, help=_from_preset("epochs", "Epochs."))
@click.option("--batch-size", type=int, default=None, help=_from_preset("batch_size", "Global batch size over all processes."))
@click.option("--lr", type=float, default=None, help=_from_preset("lr", "Base lr; the optimizer uses lr x batch / 256."))
@click.option("--momentum", type=float, default=None, help="SGD momentum. [default: 0.9]")
@click.option("--wd", type=float, default=None, help="Weight decay. [default: 0]")
@click.option("--optimizer", type=click.Choice(["lars", "sgd"]), default=None, help=_from_preset("optimizer", "Optimizer."))
@click.option("--trust-coefficient", type=float, default=None, help="LARS trust coefficient. [default: 0.001]")
@click.option("--image-size", type=int, default=None, help=_from_preset("image_size", "Crop size."))
@click.option("--eval-resize", type=int, default=None,
              help=_from_preset("eval_resize", "Resize of the short side before the validation center crop; 0: none."))
@click.option("--crop-min-scale", type=float, default=None, help=_from_preset("crop_min_scale", "RandomResizedCrop's smallest scale."))
@click.option("--eval-every", type=int, default=None, help="Epochs between validations. [default: 1]")
@click.option("--workers", type=int, default=None, help="DataLoader worker processes. [default: min(8, CPUs)]")
@click.option("--seed", type=int, default=None, help="Random seed. [default: 0]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="[default: auto]")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=None,
              help="auto: the frozen backbone in bf16 autocast on a CUDA GPU from Ampere on, else fp32; the head is always fp32. "
                   "[default: auto]")
@click.option("--strict/--no-strict", default=None, help="Stop at the first unreadable image instead of skipping it.")
@click.option("--log-every", type=int, default=None, help="Steps between metrics lines. [default: 10]")
@click.option("--save-every-steps", type=int, default=None,
              help="Also refresh last.pth.tar every N steps, for mid-epoch resume; each save also writes a metrics "
                   "line (the interval it closes). [default: 0, epoch ends only]")
@click.option("--resume", type=PATH, default=None,
              help="Continue a linear evaluation: its output folder or its last.pth.tar.")
@click.option("--overwrite", is_flag=True, help="Start over in an --out folder that holds a run.")
@click.option("--json", "as_json", is_flag=True,
              help="End with one JSON object (the final metrics, as metrics.jsonl has them: top-1 in %) instead of lines.")
def command(checkpoint, train_dir, val_dir, out, preset, resume, overwrite, as_json, **options):
    """Linear evaluation of CHECKPOINT's frozen backbone: train on TRAIN_DIR, report top-1/top-5 on VAL_DIR.

    \b
    Both folders are ImageFolders (class/*.jpg). The official protocol by default: 90 epochs,
    batch 4096, LARS, lr 0.1 x batch/256, cosine; every setting can be overridden.
    ImageNet:  simsiam lincls runs/r50/checkpoint_0099.pth.tar /data/imagenet/train /data/imagenet/val
    8 GPUs:    torchrun --nproc_per_node=8 -m cli lincls CHECKPOINT TRAIN_DIR VAL_DIR --out runs/r50/lincls
    Resume:    simsiam lincls --resume runs/r50/lincls
    """
    from transfer.lincls import BEST_HEAD_FILE, HEAD_FILE, linear_eval
    from simsiam.checkpoint import read_backbone
    from transfer.lincls_config import LinearEvalConfig, preset_linear_config

    from .resume import epochs_option, resume_hint, saved_run

    explicit = {k: v for k, v in options.items() if v is not None}
    if resume is not None:
        checkpoint_path, saved = saved_run(resume, preset, "lincls", required="train_dir")
        arguments = {"checkpoint": checkpoint, "train_dir": train_dir, "val_dir": val_dir}
        explicit.update({name: str(value) for name, value in arguments.items() if value is not None})
        config = LinearEvalConfig.for_resume(saved, explicit, str(checkpoint_path))
        config.out = str(out or checkpoint_path.parent)
    else:
        if val_dir is None:
            missing = [name for name, value in (("CHECKPOINT", checkpoint), ("TRAIN_DIR", train_dir), ("VAL_DIR", val_dir))
                       if value is None]  # positional: only the last ones can be missing
            raise click.UsageError(f"Missing argument{'s' if len(missing) > 1 else ''}: {' '.join(missing)} (needed "
                                   "unless --resume is given).")
        if preset is None:  # the checkpoint's own recipe, as extract and knn take its evaluation transform
            preset = "cifar" if read_backbone(checkpoint, mmap=True).cifar_stem else "imagenet"  # shapes only
        config = preset_linear_config(preset, checkpoint=str(checkpoint), train_dir=str(train_dir),
                                      val_dir=str(val_dir), **explicit)
        config.out = str(out or Path(checkpoint).parent / "lincls")
        checkpoint_path, saved = None, None

    continuing = epochs_option(config, saved)
    # CHECKPOINT, TRAIN_DIR or VAL_DIR given anew: the checkpoints so far name the old paths (and
    # all three are positional, so all three are repeated)
    if resume is not None and (checkpoint or train_dir or val_dir):
        continuing += [shlex.quote(path) for path in (config.checkpoint, config.train_dir, config.val_dir)]
    hint = resume_hint("lincls", config.out, checkpoint_path, continuing)
    with LinearEvalProgress(description="lincls") as progress, hint:
        final = linear_eval(config, resume_from=checkpoint_path, overwrite=overwrite, on_event=progress)
    if not final or os.environ.get("RANK", "0") != "0":  # torchrun: one report, from rank 0
        return
    if as_json:
        click.echo(json.dumps({"out": config.out, "head": str(Path(config.out) / HEAD_FILE),
                               **{name: value for name, value in final.items() if name != "kind"}}))
        return
    click.echo(f"top-1 {final['top1']:.2f}%  top-{final['topk']} {final['top5']:.2f}%  (best top-1 "
               f"{final['best_top1']:.2f}%) after {final['epoch']} epoch{'s' if final['epoch'] != 1 else ''}; linear head in "
               f"{Path(config.out) / HEAD_FILE}, the best top-1's in {BEST_HEAD_FILE}")
    click.echo("checked: the backbone's weights are those of the checkpoint, unchanged by training")
