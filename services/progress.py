"""Progress on a terminal: steps, rollouts/s, ETA. Sparse plain lines when not a TTY."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class StepProgress:
    def __init__(self, total: int, first: int = 0, mode: str = "auto", label: str = "train"):
        self.total, self.first = total, first
        tty = sys.stderr.isatty()
        self.live = mode == "always" or (mode == "auto" and tty)
        self.quiet = mode == "never"
        self.every = max(1, (total - first) // 10)
        self.started = time.perf_counter()
        self._progress = None
        if self.live:
            self._progress = Progress(
                TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False,
            )
            self._task = self._progress.add_task(label, total=total, completed=first, info="")
            self._progress.start()

    def update(self, step: int, info: str) -> None:
        done = step + 1
        if self._progress is not None:
            self._progress.update(self._task, completed=done, info=info)
        elif not self.quiet and ((done - self.first) % self.every == 0 or done == self.total):
            elapsed = time.perf_counter() - self.started
            eta = elapsed / (done - self.first) * (self.total - done)
            print(f"step {done}/{self.total} {info} eta {eta:.0f}s", file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        """A line of its own (above the bar when live); nothing when quiet."""
        if self._progress is not None:
            self._progress.console.print(message, highlight=False)
        elif not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
