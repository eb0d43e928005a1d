"""``simsiam index``: a FAISS index over a feature file, for image search."""

from __future__ import annotations

import json

import click

from .paths import OUTPUT_FILE, PATH


@click.command("index")
@click.argument("features", type=PATH)
@click.option("--out", type=OUTPUT_FILE, required=True,
              help="The index file; OUT.json beside it records its feature file and settings.")
@click.option("--kind", type=click.Choice(["auto", "flat", "hnsw", "ivf-pq"]), default="auto",
              help="auto: Flat (exact) up to 100,000 vectors, HNSW up to 1,000,000, else IVF-PQ, within --max-memory.")
@click.option("--max-memory", default=None, help="Memory the finished index may take (e.g. 4G, 512M); building it also holds the vectors "
                   "as float32 (rows x dim x 4 bytes), and one index at a time (the trial index that tunes the search, "
                   "then the finished one). "
                   "[default: no limit]")
@click.option("--target-recall", type=float, default=0.95,
              help="Search settings are tuned to the cheapest that reach this recall@10 against exact search.")
@click.option("--recall-sample", type=click.IntRange(min=1), default=1000, help="Vectors used as queries to tune the search settings, and as many again to measure recall@10.")
@click.option("--seed", type=int, default=0, help="Seed of the training and recall samples.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--overwrite", is_flag=True, help="Replace --out (and OUT.json) if they exist.")
def command(features, out, kind, max_memory, target_recall, recall_sample, seed, as_json, overwrite):
    """Build a FAISS index over FEATURES (a feature file from simsiam extract) and report its recall@10.

    \b
    simsiam index train.h5 --out train.index
    simsiam index train.h5 --out train.index --kind ivf-pq --max-memory 2G
    """
    from retrieval.index import build_index, human_bytes, parse_memory

    budget = parse_memory(max_memory) if max_memory is not None else None
    say = (lambda message: None) if as_json else (lambda message: click.echo(message, err=True))
    report = build_index(features, out, kind, budget, target_recall, recall_sample, seed, say, overwrite)
    warnings = [] if report.target_reached else [
        f"recall@10 {report.recall_at_10:.4f} is below --target-recall {report.target_recall}: the best search "
        "setting found is kept (a flat index is exact; more --max-memory allows a finer one)"]
    if as_json:  # warnings as knn --json has them
        click.echo(json.dumps({**report.as_json(), "warnings": warnings}))
        return
    settings = f" ({report.search_parameters})" if report.search_parameters else ""
    click.echo(f"{report.kind}: {report.factory}{settings}, {report.rows:,} x {report.dim}, "
               f"about {human_bytes(report.estimated_bytes)}; {report.reason}")
    if report.kind == "flat":
        click.echo("recall@10 vs exact search: 1 (a flat index is exact search; not sampled)")
    else:
        click.echo(f"recall@10 vs exact search: {report.recall_at_10:.4f} on {report.recall_sample:,} sampled queries")
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"wrote {report.path} in {report.seconds:.1f} s")
