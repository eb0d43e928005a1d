"""``simsiam knn``: weighted kNN accuracy (DINO's protocol) of feature files or of a checkpoint."""

from __future__ import annotations

import json

import click

from .progress import plain_console
from .embedding import EmbeddingProgress, default_workers, model_options, options_given
from .paths import OUTPUT_FILE, PATH


# what embeds images: meaningless with feature files
CHECKPOINT_ONLY = ("train_dir", "val_dir", "save_features", "overwrite", "layer", "image_size", "resize", "batch_size",
                   "workers", "precision")


@click.command("knn")
@click.argument("checkpoint", required=False, type=PATH)
@click.option("--train", "train_file", type=PATH, help="Feature file of the labelled memory bank.")
@click.option("--val", "val_file", type=PATH, help="Feature file of the labelled images to classify.")
@click.option("--train-dir", type=PATH, help="With CHECKPOINT: labelled images (class/*.jpg) of the memory bank.")
@click.option("--val-dir", type=PATH, help="With CHECKPOINT: labelled images to classify.")
@click.option("--save-features", type=PATH, default=None,
              help="With CHECKPOINT: also write train.h5 and val.h5 into this folder.")
@click.option("-k", "ks", type=int, multiple=True, default=(20,), help="Neighbours; repeat for several (-k 10 -k 20 -k 200).")
@click.option("--temperature", type=float, default=0.07, help="T of the exp(sim / T) votes.")
@click.option("--backend", type=click.Choice(["auto", "faiss", "torch"]), default="auto",
              help="auto: faiss on GPU when faiss has GPUs, else torch on CUDA; on CPU faiss, or torch without it.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--chunk-size", type=click.IntRange(min=1), default=None,
              help="torch backend (chosen by giving it): queries per matrix product (memory: chunk x train size x "
                   "4 bytes). [default: auto]")
@click.option("--predictions", type=OUTPUT_FILE, default=None, help="Write one CSV row per image and k (an existing file is replaced; never an input).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--overwrite", is_flag=True, help="Replace train.h5 and val.h5 in the --save-features folder.")
@model_options
def command(checkpoint, train_file, val_file, train_dir, val_dir, save_features, ks, temperature, backend, device,
            chunk_size, predictions, as_json, overwrite, layer, image_size, resize, batch_size, workers, precision):
    """Weighted kNN top-1/top-5 of --val against --train: L2-normalised features, cosine similarity,
    k nearest, votes exp(sim / T) (DINO's eval_knn.py; k = 20, T = 0.07).

    \b
    From feature files:  simsiam knn --train train.h5 --val val.h5 -k 10 -k 20
    From a checkpoint:   simsiam knn CKPT --train-dir data/train --val-dir data/val
    """
    from retrieval.evaluate import evaluate_checkpoint, evaluate_files
    from retrieval.knn import write_predictions

    if chunk_size is not None:  # the torch backend's: silently ignored by faiss, which auto picks on CPU
        if backend == "faiss":
            raise click.UsageError("--chunk-size: sets the torch backend's chunks; --backend faiss has none")
        backend = "torch"
    if predictions is not None:  # before any work, and never over an input
        from simsiam.atomic import check_output

        check_output(predictions, "--predictions", True,
                     inputs=[p for p in (checkpoint, train_file, val_file, train_dir, val_dir) if p])
        if predictions.suffix.lower() != ".csv":  # it replaces what is there: not a feature file given by mistake
            raise click.UsageError(f"--predictions {predictions}: must end in .csv (the file written is CSV)")
    if checkpoint is None:
        ignored = options_given(CHECKPOINT_ONLY)
        if ignored:  # feature files were embedded already: refused, not silently ignored (--layer projector)
            raise click.UsageError(f"{ignored[0]}: only with CHECKPOINT (simsiam knn CHECKPOINT --train-dir DIR "
                                   "--val-dir DIR)" + ("; the --train/--val feature files are embedded already"
                                                       if train_file or val_file else ""))
        if not (train_file and val_file):
            raise click.UsageError("give --train FILE --val FILE, or CHECKPOINT --train-dir DIR --val-dir DIR")
        report, val_set = evaluate_files(train_file, val_file, ks, temperature, backend, device, chunk_size)
        sources = {"train": str(train_file), "val": str(val_file)}
    else:
        if not (train_dir and val_dir) or train_file or val_file:
            raise click.UsageError("with CHECKPOINT give --train-dir DIR --val-dir DIR (not --train/--val)")
        from simsiam.runtime import start

        runtime = start(device, precision)
        with EmbeddingProgress("knn") as progress:
            report, val_set = evaluate_checkpoint(checkpoint, train_dir, val_dir, runtime, ks, temperature, backend,
                                                  chunk_size, layer, image_size, resize, batch_size,
                                                  default_workers(workers), save_features, progress, overwrite)
        sources = {"checkpoint": str(checkpoint), "train": str(train_dir), "val": str(val_dir)}
    if predictions is not None:
        write_predictions(predictions, val_set, report)
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps({
            **sources, "train_size": report.train_size, "val_size": report.val_size, "classes": report.num_classes,
            "temperature": report.temperature, "backend": report.backend, "seconds": round(report.seconds, 3),
            "results": [{"k": r.k, "top1": r.top1, "top5": r.top5} for r in report.results],
            "warnings": report.warnings,
        }))
        return
    from rich.table import Table

    console = plain_console()
    console.print(f"weighted kNN, T={report.temperature:g}: {report.val_size:,} images classified against "
                  f"{report.train_size:,}, {report.num_classes} classes ({report.backend}, {report.seconds:.2f} s)")
    table = Table()
    for column in ("k", "top-1 %", "top-5 %"):
        table.add_column(column, justify="right")
    for r in report.results:
        table.add_row(str(r.k), f"{100 * r.top1:.2f}", f"{100 * r.top5:.2f}")
    console.print(table)
