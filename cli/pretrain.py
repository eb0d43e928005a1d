"""``simsiam pretrain``: SimSiam pretraining on a folder of images."""

from __future__ import annotations

import json
import os
import shlex

import click

from simsiam.config import PRESETS

from .paths import PATH, NonEmptyPath
from .presets import preset_help

PRESET_HELP = "imagenet: ResNet-50, the official recipe; cifar: ResNet-18 with 3x3 stem, paper App. D"


def _from_preset(key: str, help_text: str) -> str:
    return preset_help(PRESETS, key, help_text)


@click.command("pretrain")
@click.argument("data", required=False, type=PATH)
@click.option("--out", type=PATH, help="Run folder for checkpoints, config.json and metrics.jsonl.")
@click.option("--preset", type=click.Choice(["imagenet", "cifar"]), default=None, help=f"{PRESET_HELP} [default: imagenet]")
@click.option("--arch", default=None, help=_from_preset("arch", "Any torchvision ResNet."))
@click.option("--cifar-stem/--no-cifar-stem", default=None, help=_from_preset("cifar_stem", "3x3 stem conv, no max-pool."))
@click.option("--epochs", type=int, default=None, help=_from_preset("epochs", "Epochs."))
@click.option("--batch-size", type=int, default=None, help=_from_preset("batch_size", "Global batch size over all processes."))
@click.option("--lr", type=float, default=None, help=_from_preset("lr", "Base lr; the optimizer uses lr x batch / 256."))
@click.option("--wd", type=float, default=None, help=_from_preset("wd", "Weight decay."))
@click.option("--image-size", type=int, default=None, help=_from_preset("image_size", "Crop size."))
@click.option("--dim", type=int, default=None, help=_from_preset("dim", "Projector output dimension."))
@click.option("--pred-dim", type=int, default=None, help=_from_preset("pred_dim", "Predictor hidden dimension."))
@click.option("--proj-layers", type=click.IntRange(2, 3), default=None, help=_from_preset("proj_layers", "Projector fc layers."))
@click.option("--proj-hidden-dim", type=int, default=None,
              help=_from_preset("proj_hidden_dim", "Projector hidden width; 0: the backbone's width, as official."))
@click.option("--momentum", type=float, default=None, help="SGD momentum. [default: 0.9]")
@click.option("--crop-min-scale", type=float, default=None, help="Smallest RandomResizedCrop area. [default: 0.2]")
@click.option("--blur/--no-blur", default=None, help=_from_preset("blur", "Gaussian blur augmentation (p=0.5)."))
@click.option("--eval-resize", type=int, default=None,
              help=_from_preset("eval_resize", "Short side before the center crop of the kNN monitor; 0: none."))
@click.option("--fix-pred-lr/--no-fix-pred-lr", default=None, help=_from_preset("fix_pred_lr", "Keep the predictor's lr constant."))
@click.option("--warmup-epochs", type=int, default=None,
              help="Linear lr warmup epochs before the cosine (epoch e of N at (e+1)/(N+1) of the lr, the "
                   "predictor's fixed lr too; not in the official recipe). [default: 0]")
@click.option("--no-stop-grad", "stop_grad", flag_value=False, default=None,
              help="Remove the stop-gradient: the paper's collapse ablation (Sec. 4.1).")
@click.option("--workers", type=int, default=None, help="DataLoader worker processes. [default: min(8, CPUs)]")
@click.option("--seed", type=int, default=None, help="Random seed. [default: 0]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="[default: auto]")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=None,
              help="auto: bf16 autocast and channels_last on a CUDA GPU from Ampere on (bf16 tensor cores), else fp32. [default: auto]")
@click.option("--compile/--no-compile", default=None,
              help="torch.compile the model, the loss and the GPU augmentation (the first steps then take a minute or more). [default: off]")
@click.option("--data-on-gpu/--no-data-on-gpu", default=None,  # 25%: simsiam.device_data.DATA_ON_GPU_MEMORY_FRACTION
              help="Decode the dataset once into GPU memory and augment both views there; images of one size "
                   "(on a CPU run: held in memory, augmented in batches by the same code). "
                   "[default: auto, on with a GPU when the decoded images take at most 25% of its memory]")
@click.option("--gpu-decode/--no-gpu-decode", default=None,
              help="When the dataset is not held on the GPU: workers only read files, JPEGs are decoded and "
                   "augmented on the GPU in batches. [default: off]")
@click.option("--strict/--no-strict", default=None, help="Stop at the first unreadable image instead of skipping it.")
@click.option("--log-every", type=int, default=None, help="Steps between metrics lines. [default: 10]")
@click.option("--save-every-epochs", type=int, default=None, help=_from_preset("save_every_epochs", "Epochs between numbered checkpoints."))
@click.option("--save-every-steps", type=int, default=None,
              help="Also refresh last.pth.tar every N steps, for mid-epoch resume; each save also writes a metrics "
                   "line (the interval it closes). [default: 0, epoch ends only]")
@click.option("--knn-train", type=NonEmptyPath(), default=None, help="Labelled images for the kNN monitor's memory bank.")
@click.option("--knn-val", type=NonEmptyPath(), default=None, help="Labelled images the kNN monitor classifies.")
@click.option("--knn-every", type=int, default=None, help="Epochs between kNN evaluations. [default: 1]")
@click.option("--knn-k", type=int, default=None, help="k of the kNN monitor. [default: 20]")
@click.option("--resume", type=PATH, default=None,
              help="Continue a run exactly: its run folder or one of its checkpoints.")
@click.option("--overwrite", is_flag=True, help="Start over in an --out folder that holds a run.")
@click.option("--json", "as_json", is_flag=True,
              help="End with one JSON object (the last epoch's metrics, as metrics.jsonl has them) instead of a line.")
def command(data, out, preset, resume, overwrite, as_json, **options):
    """Pretrain SimSiam on DATA, an ImageFolder (class/*.jpg) or a flat folder of images.

    \b
    One GPU or CPU:  simsiam pretrain /data/imagenet/train --out runs/r50
    Eight GPUs:      torchrun --nproc_per_node=8 -m cli pretrain /data/imagenet/train --out runs/r50
    Resume:          simsiam pretrain --resume runs/r50
    """
    from simsiam.config import PretrainConfig, preset_config
    from simsiam.train import pretrain

    from .progress import TrainingProgress
    from .resume import epochs_option, resume_hint, saved_run

    explicit = {k: v for k, v in options.items() if v is not None}
    if data is not None:
        explicit["data"] = str(data)
    if resume is not None:
        checkpoint_path, saved = saved_run(resume, preset, "pretrain", required="data")
        config = PretrainConfig.for_resume(saved, explicit, str(checkpoint_path))
        config.out = str(out or checkpoint_path.parent)
    else:
        if data is None:
            raise click.UsageError("Missing argument 'DATA' (needed unless --resume is given).")
        if out is None:
            raise click.UsageError("Missing option '--out'.")
        config = preset_config(preset or "imagenet", **explicit)
        config.out = str(out)
        checkpoint_path, saved = None, None

    continuing = epochs_option(config, saved)
    if resume is not None and data is not None:  # DATA given anew: the checkpoints so far name the old folder
        continuing.append(shlex.quote(config.data))
    hint = resume_hint("pretrain", config.out, checkpoint_path, continuing)
    with TrainingProgress() as progress, hint:
        final = pretrain(config, resume_from=checkpoint_path, overwrite=overwrite, on_event=progress)
    if final and os.environ.get("RANK", "0") == "0":  # torchrun: one report, from rank 0
        if as_json:
            click.echo(json.dumps({"out": config.out, **{name: value for name, value in final.items() if name != "kind"}}))
        else:
            click.echo(f"done: epoch {final['epoch']}, loss {final['loss']:.4f}; checkpoints in {config.out}")
