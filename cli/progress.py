"""Progress display of training runs: a live bar, and a line per epoch."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

MAX_UNREADABLE_SHOWN = 10


def plain_console(stderr: bool = False) -> Console:
    """A console for the commands' lines and tables: text printed as it is (paths may hold
    [brackets], which rich would take for markup and drop), and, when the output is a file or a
    pipe, not folded at 80 columns (a path split over two lines is not found by grep)."""
    console = Console(stderr=stderr, markup=False, highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = 1 << 16
    return console


class TrainingProgress:
    """Turns the events of :func:`simsiam.train.pretrain` into a progress bar and log lines."""

    def __init__(self, console: Console | None = None, description: str = "pretrain"):
        self.console = console or plain_console(stderr=True)
        self.description = description
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} img/s"),
            TimeRemainingColumn(), console=self.console, transient=False,
        )
        self.task = None
        self.unreadable = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.task is not None:  # started by the run's first event: an error before it prints alone
            self.progress.stop()
        if self.unreadable:
            self.say(f"warning: skipped {self.unreadable} unreadable image(s) in all")

    def say(self, line: str) -> None:
        # paths may hold [brackets] (rich markup) and are long: print them as they are, unwrapped
        self.console.print(line, soft_wrap=True, markup=False, highlight=False)

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "start":
            self.say(f"{_count(event['images'], 'image')}, {_count(event['steps_per_epoch'], 'step')} per epoch, "
                     f"{_count(event['world_size'], 'process', 'es')} on {event['device']} ({event['precision']})")
            if event.get("resumed_from"):
                self.say(_resuming(event))
            self.progress.start()
            self.task = self.progress.add_task(self.description, total=event["total_steps"],
                                               completed=event["global_step"], loss="-", lr="-", speed="-")
        elif kind == "log":
            self.progress.update(self.task, completed=event["step"], loss=f"{event['loss']:.4f}",
                                 lr=f"{event['lr']:.4g}", speed=f"{event['images_per_s']:.0f}")
        elif kind == "epoch":
            knn = f"  knn top-1 {100 * event['knn_top1']:.2f}%" if "knn_top1" in event else ""
            self.say(
                f"epoch {event['epoch']}: loss {event['loss']:.4f}  collapse std x sqrt(d) "
                f"{event['collapse_std']:.3f}  {event['images_per_s']:.0f} img/s{knn}")
        elif kind == "warning":
            self.say(f"warning: {event['message']}")
        elif kind == "unreadable":
            self.unreadable += 1
            if self.unreadable <= MAX_UNREADABLE_SHOWN:
                self.say(f"warning: skipped unreadable image {event['path']} ({event['reason']})")


def _resuming(event: dict) -> str:
    epochs = event["total_steps"] // event["steps_per_epoch"]
    if event["global_step"] >= event["total_steps"]:  # lincls only: pretrain refuses a finished run
        return f"resuming {event['resumed_from']}: its {epochs} epochs are done; evaluating it again"
    return (f"resuming {event['resumed_from']}: epoch {event['epoch'] + 1} of {epochs}, "
            f"step {event['global_step']:,} of {event['total_steps']:,}")


def _count(n: int, noun: str, plural: str = "s") -> str:
    """"1 image", "8 images"."""
    return f"{n:,} {noun}{'' if n == 1 else plural}"
