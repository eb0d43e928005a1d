"""``simsiam search``: the nearest images of query images in a feature file or an index."""

from __future__ import annotations

import json

import click

from simsiam.config import MAX_WORKERS

from .progress import plain_console
from .embedding import EmbeddingProgress, options_given
from .paths import OUTPUT_FILE, PATH

SHOWN_QUERIES = 20  # the table; with --eval a few, as examples: the metrics are the point


def _class(result, label: int) -> str:
    classes = result.database.classes
    return classes[label] if 0 <= label < len(classes) else ("" if label < 0 else str(label))


def _as_dict(result) -> dict:
    queries = []
    for row, path in enumerate(result.queries.paths):
        neighbours = [{"rank": rank + 1, "path": result.database.paths[i], "score": float(result.scores[row, rank]),
                       "label": int(result.database.labels[i]), "class": _class(result, int(result.database.labels[i]))}
                      for rank, i in enumerate(result.indices[row]) if i >= 0]
        label = int(result.query_labels[row])
        queries.append({"path": path, "label": label, "class": _class(result, label), "neighbours": neighbours})
    return {"database_root": str(result.database.root), "query_root": str(result.queries.root),
            "backend": result.backend, "excluded_self": result.excluded_self > 0,
            "queries_in_database": result.excluded_self, "queries": queries,
            "metrics": result.metrics, "warnings": result.warnings}


@click.command("search")
@click.argument("database", type=PATH)
@click.option("--query", type=PATH, default=None, help="An image, or a folder of images, to search with.")
@click.option("--checkpoint", type=PATH, default=None,
              help="Embeds --query the way DATABASE was embedded (its layer and transform).")
@click.option("--query-h5", type=PATH, default=None, help="Query features from a feature file instead.")
@click.option("-k", "k", type=int, default=10, help="Neighbours per query.")
@click.option("--eval", "evaluate", is_flag=True, help="Also recall@1/5/10 and mAP@k, from the labels.")
@click.option("--grid", type=OUTPUT_FILE, default=None, help="Draw a PNG contact sheet: each query beside its k nearest (an existing file is replaced).")
@click.option("--grid-rows", type=click.IntRange(min=1), default=16, help="Queries drawn on the --grid sheet.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (every query) instead of a table.")
@click.option("--backend", type=click.Choice(["auto", "faiss", "torch"]), default="auto",
              help="Exact search of a feature file (an index searches itself).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
              help="Of embedding the --query images; auto: bf16 autocast on a CUDA GPU from Ampere on (bf16 tensor cores), else fp32.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, help="Query images per forward pass.")
@click.option("--workers", type=click.IntRange(min=0, max=MAX_WORKERS), default=0, help="DataLoader worker processes for the query images.")
def command(database, query, checkpoint, query_h5, k, evaluate, grid, grid_rows, as_json, backend, device, precision,
            batch_size, workers):
    """Find the k nearest images of each query in DATABASE (a feature file, or an index from simsiam index).

    \b
    simsiam search train.index --query cat.jpg --checkpoint ckpt.pth.tar -k 10 --grid cat.png
    simsiam search train.h5 --query-h5 val.h5 --eval
    """
    from retrieval.search import find_neighbours

    ignored = options_given(("batch_size", "workers", "precision")) if query_h5 is not None else []
    if ignored:  # they were silently ignored
        raise click.UsageError(f"{ignored[0]}: embeds --query images; --query-h5 holds features already")
    if grid is not None:  # before any work, and never over an input (a query image, say)
        from retrieval.contact_sheet import check_grid_name
        from simsiam.atomic import check_output

        check_grid_name(grid)
        check_output(grid, "--grid", True, inputs=[p for p in (database, query, checkpoint, query_h5) if p])
    with EmbeddingProgress("queries") as progress:
        result = find_neighbours(database, k, query, checkpoint, query_h5, evaluate, backend, device, precision,
                                 batch_size, workers, progress)
    if grid is not None:
        from retrieval.contact_sheet import draw_contact_sheet

        missing = draw_contact_sheet(result, grid, grid_rows)
        if missing:  # the sheet is written, but shows less than it should
            result.warnings.append(f"--grid: {len(missing)} image(s) could not be read and are drawn as 'missing', "
                                   f"e.g. {missing[0]} (moved since extraction? the feature file's root is "
                                   f"{result.database.root})")
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps(_as_dict(result)))
        return
    from rich.table import Table

    table = Table(title=f"{len(result.queries):,} quer{'y' if len(result.queries) == 1 else 'ies'}, {k} nearest in {database} ({result.backend})"
                        + (f", {result.excluded_self:,} of them database images, left out of their own results"
                           if result.excluded_self else ""))
    for column, justify in (("query", "left"), ("rank", "right"), ("score", "right"), ("neighbour", "left"),
                            ("class", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    shown = 3 if evaluate else SHOWN_QUERIES
    for row, path in enumerate(result.queries.paths[:shown]):
        for rank, i in enumerate(result.indices[row]):
            if i < 0:
                continue
            table.add_row(path if rank == 0 else "", str(rank + 1), f"{result.scores[row, rank]:.4f}",
                          result.database.paths[i], _class(result, int(result.database.labels[i])),
                          end_section=rank == len(result.indices[row]) - 1)
    console = plain_console()
    console.print(table)
    if len(result.queries) > shown:
        console.print(f"... {len(result.queries) - shown:,} more queries (--json prints all)")
    if result.metrics:
        m = result.metrics
        console.print("  ".join(f"{name} {value:.4f}" for name, value in m.items() if "@" in name)
                      + f"  ({m['queries_evaluated']:,} labelled queries"
                      + (f", {m['queries_left_out']:,} left out: no label or no image of their class" if m["queries_left_out"] else "")
                      + ")")
    if grid is not None:
        console.print(f"wrote {grid}")
