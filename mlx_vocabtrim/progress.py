"""Progress of long work on stderr: click's bar on a terminal; elsewhere (a log file, a pipe, nohup),
where click prints only the label, a line at the start and at steps at most `LINE_EVERY` seconds apart,
so the log of an hours-long benchmark says how far it is and how long is left."""

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

LINE_EVERY = 30.0  # seconds between progress lines off a terminal (the last step always gets one)


def duration(seconds: float) -> str:
    """e.g. '45 s', '12 min', '3 h 05 min'."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class Lines:
    """click's progress bar interface (`update`), as lines: 'Label: 3/13 (23%), 12 min so far, about 40 min left'."""

    def __init__(self, length: int, label: str, show: Callable[[Any], str | None] | None = None, done: int = 0):
        self.length, self.label, self.show = length, label, show
        self.pos = self.base = done  # steps done before this sitting (a resumed run) are not timed
        self.start = self.last = time.monotonic()
        self._line(None)

    def update(self, steps: int, current_item: Any = None) -> None:
        self.pos += steps
        now = time.monotonic()
        if now - self.last >= LINE_EVERY or self.pos >= self.length:
            self.last = now
            self._line(current_item)

    def _line(self, item: Any) -> None:
        elapsed = time.monotonic() - self.start
        line = f"{self.label}: {self.pos}/{self.length} ({self.pos / max(self.length, 1):.0%})"
        if self.base and self.pos == self.base:
            line += f", {self.base} done before"
        elif self.pos:
            line += f", {duration(elapsed)} so far"
            if self.pos < self.length:
                line += f", about {duration(elapsed / (self.pos - self.base) * (self.length - self.pos))} left"
        shown = self.show(item) if self.show is not None else None
        click.echo(line + (f", {shown}" if shown else ""), err=True)


@contextmanager
def progress(length: int, label: str, show: Callable[[Any], str | None] | None = None, done: int = 0) -> Iterator[Any]:
    """A progress display with `update(steps, current_item=None)`; `show` adds text from the current item.
    `done`: steps a resumed run finished before, shown as done and left out of the time estimate (on a
    terminal the bar covers the steps left, its label says how many were done)."""
    if sys.stderr.isatty():
        label = f"{label} ({done} of {length} done before)" if done else label
        with click.progressbar(
            length=length - done, label=label, file=sys.stderr, show_eta=True, show_percent=True, item_show_func=show
        ) as bar:
            yield bar
    else:
        yield Lines(length, label, show, done)
