"""The one way this project shows progress: a tqdm bar that is quiet when nobody is watching."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

Item = TypeVar("Item")


def progress_bar(iterable: Iterable[Item], desc: str, progress: bool | None = None, **tqdm_options: Any) -> tqdm:
    """A bar over ``iterable`` labelled ``desc``, cleared when done.

    ``progress=None`` shows it only when stderr is a terminal, so CI logs and
    DVC's captured output stay quiet; True or False force it on or off.
    """
    return tqdm(iterable, desc=desc, disable=None if progress is None else not progress, leave=False, **tqdm_options)
