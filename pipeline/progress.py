"""The one way this project shows progress: a tqdm bar on a terminal, log lines off it.

On a terminal a bar shows how far a loop is. Off a terminal (DVC's captured stage output, CI,
a Prefect run) a bar would be noise, but silence makes a long stage look hung, so the long loops
(``progress_items``) log a line at INFO as they go, with the time spent and an estimate of what remains:

    adaround: 3/21 conv2 done in 12.1 s, about 3 min 10 s left
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from tqdm import tqdm

Item = TypeVar("Item")

logger = logging.getLogger(__name__)

# Off a terminal, a loop of many quick steps logs at most one line per this many seconds (and none when it is done
# sooner): often enough to tell a long loop from a hung one, rarely enough to keep a log readable.
LOG_INTERVAL_S = 30.0


def progress_bar(iterable: Iterable[Item], desc: str, progress: bool | None = None, **tqdm_options: Any) -> tqdm:
    """A bar over ``iterable`` labelled ``desc``, cleared when done.

    ``progress=None`` shows it only when stderr is a terminal, so CI logs and
    DVC's captured output stay quiet; True or False force it on or off.
    """
    return tqdm(iterable, desc=desc, disable=None if progress is None else not progress, leave=False, **tqdm_options)


def logs_progress(progress: bool | None) -> bool:
    """Whether progress goes to the log as lines: ``progress=None`` with stderr not a terminal (where no bar shows)."""
    return progress is None and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())


def format_duration(seconds: float) -> str:
    """A duration for people: "12.1 s", "3 min 10 s", "2 h 5 min".

    >>> [format_duration(s) for s in (0.04, 12.14, 190.4, 7500)]
    ['0.0 s', '12.1 s', '3 min 10 s', '2 h 5 min']
    """
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = round(seconds) // 60
    if minutes < 60:
        return f"{minutes} min {round(seconds) % 60} s"
    return f"{minutes // 60} h {minutes % 60} min"


def progress_line(desc: str, done: int, total: int, elapsed: float, item: str = "", item_seconds: float | None = None) -> str:
    """One progress line: ``done`` of ``total`` items after ``elapsed`` seconds, and the time left at the mean pace so far.

    With ``item_seconds`` the line reports one finished item (named ``item``): the last one says the time in all.

    >>> progress_line("adaround", 3, 21, 27.5, "conv2", 12.1)
    'adaround: 3/21 conv2 done in 12.1 s, about 2 min 45 s left'
    >>> progress_line("adaround", 21, 21, 200.0, "fc", 1.0)
    'adaround: 21/21 fc done in 1.0 s, 3 min 20 s in all'
    >>> progress_line("adaround conv1", 500, 2000, 30.0)
    'adaround conv1: 500/2000 after 30.0 s, about 1 min 30 s left'
    """
    where = f"{desc}: {done}/{total}" + (f" {item}" if item else "")
    if item_seconds is None:
        what = f"{where} after {format_duration(elapsed)}"
    else:
        what = f"{where} done in {format_duration(item_seconds)}"
    if done >= total:
        return f"{what}, {format_duration(elapsed)} in all"
    return f"{what}, about {format_duration(elapsed / done * (total - done))} left"


def progress_items(
    items: Sequence[Item],
    desc: str,
    progress: bool | None = None,
    name: Callable[[Item], str] | None = None,
    every_item: bool = True,
) -> Iterator[Item]:
    """Each of ``items`` in order, with its progress shown: ``progress_bar`` on a terminal (or as ``progress`` forces);
    off a terminal (``logs_progress``), a ``progress_line`` logged at INFO as items finish.

    ``every_item``: a line for each item (layers, epochs: few and slow, named by ``name``); False for many quick
    steps: a line at most every ``LOG_INTERVAL_S`` seconds, none for a loop done sooner.
    """
    if not logs_progress(progress):
        yield from progress_bar(items, desc, progress)
        return
    started = last_line = time.perf_counter()
    for done, item in enumerate(items, 1):
        item_started = time.perf_counter()
        yield item  # the caller works on the item until it asks for the next
        now = time.perf_counter()
        if every_item:
            logger.info(progress_line(desc, done, len(items), now - started, name(item) if name else "",
                                      now - item_started))
        elif now - last_line >= LOG_INTERVAL_S and done < len(items):
            logger.info(progress_line(desc, done, len(items), now - started))
            last_line = now


__all__ = ["LOG_INTERVAL_S", "format_duration", "logs_progress", "progress_bar", "progress_items", "progress_line"]
