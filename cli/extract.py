"""``simsiam extract``: embed a folder of images into an HDF5 feature file."""

from __future__ import annotations

import json
import time

import click

from .embedding import EmbeddingProgress, default_workers, model_options
from .paths import OUTPUT_FILE, PATH


@click.command("extract")
@click.argument("inputs", nargs=-1, required=True, type=PATH, metavar="[CHECKPOINT] DATA")
@click.option("--out", type=OUTPUT_FILE, required=True, help="The feature file to write (.h5).")
@click.option("--random-init", is_flag=True, help="No checkpoint: a randomly initialised encoder (a baseline).")
@click.option("--arch", default=None, help="The ResNet of --random-init (e.g. resnet50).")
@click.option("--cifar-stem", is_flag=True, help="With --random-init: the 3x3 stem without max-pool of the CIFAR recipe.")
@click.option("--seed", type=int, default=None, help="Seed of --random-init.  [default: 0]")
@model_options
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", help="Stored feature type.")
@click.option("--compression", type=click.Choice(["none", "gzip", "lzf"]), default="none",
              help="HDF5 compression of the datasets (gzip: smaller, lzf: faster).")
@click.option("--normalize", is_flag=True, help="Store L2-normalised features.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--gpu-decode", is_flag=True,
              help="Workers only read files; JPEGs are decoded (nvjpeg), resized and cropped on the GPU in batches.")
@click.option("--strict", is_flag=True, help="Stop at the first unreadable image instead of skipping it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (what was written) instead of a line.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def command(inputs, out, random_init, arch, cifar_stem, seed, layer, image_size, resize, batch_size, workers,
            precision, dtype, compression, normalize, device, gpu_decode, strict, as_json, overwrite):
    """Embed the images of DATA (an ImageFolder class/*.jpg, or a flat folder) into --out.

    CHECKPOINT: ours, an official SimSiam or MoCo checkpoint, or a torchvision ResNet state dict;
    or --random-init --arch ARCH instead. Rows follow the images' sorted order; unreadable images are
    skipped and counted.

    \b
    One GPU or CPU:  simsiam extract runs/r50/checkpoint_0099.pth.tar /data/imagenet/val --out val.h5
    Eight GPUs:      torchrun --nproc_per_node=8 -m cli extract CKPT /data/imagenet/train --out train.h5
    """
    from retrieval.extract import extract_to_file
    from retrieval.feature_model import load_feature_model
    from simsiam.atomic import check_output
    from simsiam.errors import SimSiamError
    from simsiam.runtime import agreement, start, stop

    expected = 1 if random_init else 2
    if len(inputs) != expected:
        raise click.UsageError("expected DATA with --random-init" if random_init else "expected CHECKPOINT DATA "
                               "(or --random-init --arch ARCH DATA)")
    checkpoint = None if random_init else inputs[0]
    began = time.perf_counter()
    runtime = start(device, precision)
    together = False  # every process ends here: finished, or on an error they agreed on
    try:
        with agreement(runtime):  # under torchrun: every process checks, and all stop when one fails
            check_output(out, "--out", overwrite, inputs=inputs)  # before loading a model: never over an input
            model = load_feature_model(checkpoint, layer, random_init, arch, cifar_stem, seed)
        with EmbeddingProgress("extract") as progress:
            summary = extract_to_file(model, inputs[-1], out, runtime, image_size, resize, dtype, compression,
                                      batch_size, default_workers(workers), normalize, strict, overwrite, progress,
                                      gpu_decode)
        if runtime.is_main and as_json:
            click.echo(json.dumps({"out": str(summary.path), "images": summary.images, "skipped": summary.skipped,
                                   "dim": summary.dim, "dtype": dtype, "arch": model.arch, "layer": layer,
                                   "processes": summary.processes, "seconds": round(time.perf_counter() - began, 3)}))
        elif runtime.is_main:
            processes = f" by {summary.processes} processes" if summary.processes > 1 else ""
            skipped = f", {summary.skipped} unreadable skipped" if summary.skipped else ""
            click.echo(f"wrote {summary.path}: {summary.images:,} x {summary.dim} {dtype} features "
                       f"({model.arch} {layer}){processes}{skipped}")
        together = True
    except SimSiamError as err:
        together = err.agreed
        raise
    finally:  # also on an error: a process leaving with its process group in use can abort (SIGABRT)
        stop(runtime, together)
