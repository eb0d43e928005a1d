"""What the commands that embed images share: their model and transform options, and a progress bar."""

from __future__ import annotations

import click
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn,
                           TimeRemainingColumn)
from rich.text import Text

from simsiam.config import MAX_IMAGE_SIZE, MAX_WORKERS

from .progress import plain_console

MAX_UNREADABLE_SHOWN = 10


def model_options(command):
    """--layer, --image-size, --resize, --batch-size, --workers, --precision."""
    options = [
        click.option("--layer", type=click.Choice(["backbone", "projector"]), default="backbone",
                     help="backbone: pooled ResNet features (2048-d for ResNet-50); projector: SimSiam's z."),
        click.option("--image-size", type=click.IntRange(min=1, max=MAX_IMAGE_SIZE), default=None,
                     help="Center crop. [default: the checkpoint's run's image size; else 224, or 32 for the CIFAR stem]"),
        click.option("--resize", type=click.IntRange(min=0, max=MAX_IMAGE_SIZE), default=None,
                     help="Short side before the crop, 0 for none. [default: the checkpoint's run's eval resize; else 256, "
                          "or none for the CIFAR stem]"),
        click.option("--batch-size", type=click.IntRange(min=1), default=256, help="Images per forward pass."),
        click.option("--workers", type=click.IntRange(min=0, max=MAX_WORKERS), default=None, help="DataLoader worker processes. [default: min(8, CPUs)]"),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
                     help="auto: bf16 autocast on a CUDA GPU from Ampere on (bf16 tensor cores), else fp32."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def options_given(names) -> list[str]:
    """The options among ``names`` (parameter names) that the user gave, on the command line or
    otherwise: to refuse, rather than ignore, embedding options where nothing is embedded."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    return [param.opts[0] for param in ctx.command.params
            if param.name in names and ctx.get_parameter_source(param.name) is not ParameterSource.DEFAULT]


def default_workers(workers: int | None) -> int:
    import os

    return min(8, os.cpu_count() or 1) if workers is None else workers


class ImagesPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        # the mean since the start: steadier than rich's windowed task.speed, and known after one batch
        elapsed = task.elapsed or 0.0
        return Text(f"{task.completed / elapsed:,.0f} img/s" if elapsed > 0 and task.completed else "- img/s")


class EmbeddingProgress:
    """A progress bar with images/s for the events of :mod:`retrieval.extract`; warnings for unreadable images."""

    def __init__(self, description: str = "embedding", console: Console | None = None):
        self.console = console or plain_console(stderr=True)  # paths printed whole, as they are
        self.description = description
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 ImagesPerSecond(), TimeRemainingColumn(), console=self.console)
        self.task = None
        self.unreadable = 0
        self.enabled = True
        self.share = ""  # under torchrun, the unreadable images counted are rank 0's share's

    def __enter__(self) -> "EmbeddingProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self.task is not None:
            self.progress.stop()
        if self.unreadable and self.enabled:
            self.console.print(f"warning: skipped {self.unreadable} unreadable image(s) in all{self.share}")

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "start":
            self.enabled = event["rank"] == 0  # one bar: rank 0's share under torchrun
            if not self.enabled:
                return
            where = (f", rank 0 of {event['world_size']} embeds its {event['images']:,}"
                     if event["world_size"] > 1 else "")
            self.share = " of rank 0's share" if event["world_size"] > 1 else ""
            self.console.print(f"{self.description}: {event['total_images']:,} images on {event['device']} "
                               f"({event['precision']}){where}")
            if self.task is None:
                self.progress.start()
            else:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(self.description, total=event["images"])
        elif kind == "warning" and self.enabled:
            self.console.print(f"warning: {event['message']}")
        elif kind == "batch" and self.enabled and self.task is not None:
            self.progress.advance(self.task, event["images"])
        elif kind == "unreadable":
            self.unreadable += 1
            if self.enabled and self.unreadable <= MAX_UNREADABLE_SHOWN:
                self.console.print(f"warning: skipped unreadable image {event['path']} ({event['reason']})")
