"""``simsiam convert-d2``: a pretrained ResNet in Detectron2's weight format."""

from __future__ import annotations

from pathlib import Path

import click

from .paths import OUTPUT_FILE, PATH


@click.command("convert-d2")
@click.argument("checkpoint", type=PATH)
@click.option("--out", required=True, type=OUTPUT_FILE,
              help="The Detectron2 pickle to write; must end in .pkl.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def command(checkpoint: Path, out: Path, overwrite: bool) -> None:
    """Convert the ResNet backbone of CHECKPOINT for Detectron2.

    CHECKPOINT: a simsiam pretrain checkpoint, an official SimSiam or MoCo one, or a torchvision
    ResNet state dict (ResNet-18/34/50/101/152). The projector, predictor and fc are left out.
    Needs no Detectron2.
    """
    from simsiam.atomic import check_output
    from transfer.detectron2_weights import check_pickle_path, convert_checkpoint, write_detectron2_pickle

    check_pickle_path(out)  # before the (slow) read of a large checkpoint; the writer checks again
    check_output(out, "--out", overwrite, inputs=[checkpoint])
    weights = convert_checkpoint(checkpoint)
    write_detectron2_pickle(weights, out, overwrite, inputs=[checkpoint])
    click.echo(f"wrote {len(weights.model)} tensors of the {weights.arch} backbone to {out} "
               "(projector, predictor and fc left out)")
    click.echo("Detectron2 settings these weights need (KEY VALUE form; the shipped configs set those of a ResNet-50):")
    for key, value in weights.settings.items():
        click.echo(f"  {key} {_yacs(value)}")
    for note in weights.notes:
        click.echo(f"note: {note}")


def _yacs(value) -> str:
    """A value as Detectron2's command-line overrides spell it."""
    if isinstance(value, list):
        return "[" + ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + "]"
    return str(value)
