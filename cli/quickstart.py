"""``simsiam quickstart``: the built-in default run on scikit-learn's digits, CPU, minutes."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from .paths import PATH


@click.command("quickstart")
@click.option("--out", type=PATH, default=Path("simsiam-quickstart"),
              help="Folder for the digits images and the run.")
# the default is quickstart_config's (not imported here: it would load torch for every --help)
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Pretraining epochs. [default: 6]")
def command(out, epochs):
    """Pretrain a small SimSiam on scikit-learn's handwritten digits and show what it learned.

    Needs no data and no GPU: the 1,797 8x8 digits ship inside scikit-learn. Runs the workflow
    (pretrain, extract, knn, plot, convert-d2) and prints the weighted-kNN top-1 on held-out
    digits of the encoder at random initialisation and after pretraining.
    """
    from rich.table import Table

    from simsiam.quickstart import run_quickstart

    from .progress import TrainingProgress, plain_console

    overrides = {"epochs": epochs} if epochs is not None else {}
    console = plain_console(stderr=True)
    with TrainingProgress(console, description="quickstart") as progress:
        result = run_quickstart(out, on_event=progress, **overrides)
    table = Table(title=f"weighted kNN (k=20, T=0.07): {result.test_images} held-out digits, "
                        f"{result.train_images} in the memory bank")
    table.add_column("encoder")
    table.add_column("top-1 %", justify="right")
    table.add_row("random initialisation (where pretraining starts)", f"{100 * result.random_init_top1:.1f}")
    table.add_row("SimSiam pretrained", f"{100 * result.trained_top1:.1f}")
    plain_console().print(table)
    click.echo(f"run folder:         {result.checkpoint.parent}  (training curves: {result.curves.name})")
    click.echo(f"features (HDF5):    {result.train_features}, {result.test_features}")
    click.echo(f"Detectron2 weights: {result.detectron2_weights}")
    click.echo("next:")
    # commands to paste: paths quoted for the shell (a folder with a space)
    train, test, run_dir = (shlex.quote(str(p)) for p in (result.train_features, result.test_features,
                                                          result.checkpoint.parent))
    click.echo(f"  simsiam knn --train {train} --val {test} -k 10 -k 20")
    click.echo(f"  simsiam search {train} --query-h5 {test} --eval")
    click.echo(f"  simsiam pretrain --resume {run_dir} --epochs {max(20, 2 * result.epochs)}   # train longer")
