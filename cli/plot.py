"""``simsiam plot``: the training curves of a run folder."""

from __future__ import annotations

import click

from .paths import OUTPUT_FILE, PATH


@click.command("plot")
@click.argument("run_dir", type=PATH)
@click.option("--out", type=OUTPUT_FILE, default=None, help="PNG to write; an existing one is replaced, so re-plotting a run under way is one command. "
                   "[default: RUN_DIR/curves.png]")
def command(run_dir, out):
    """Draw the training curves of RUN_DIR/metrics.jsonl into a PNG: loss, collapse monitor, kNN top-1 and
    lr of a pretraining run; loss, train and validation top-1 and lr of a linear evaluation."""
    from simsiam.training_curves import plot_training_curves

    click.echo(f"wrote {plot_training_curves(run_dir, out)}")
