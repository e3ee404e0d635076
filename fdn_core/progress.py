"""Progress reporting and cancellation shared by the CLI (tqdm bars) and Slicer (progress dialog).

Long-running library functions take ``progress: Progress | None``. The CLI passes a tqdm-backed
``Progress``; Slicer passes one whose callback updates its progress bar and whose ``cancel`` event
is set by the Cancel button.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from fdn_core.errors import FDNError

__all__ = ["Cancelled", "Progress", "iterate", "tqdm_progress"]

T = TypeVar("T")


class Cancelled(FDNError):
    """The user cancelled a long operation; whatever it was writing is left untouched."""


@dataclass
class Progress:
    """A callback ``(done, total, message)`` plus a cancel flag checked between work items."""

    callback: Callable[[int, int, str], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def update(self, done: int, total: int, message: str = "") -> None:
        """Report progress, then raise Cancelled if cancellation was requested."""
        if self.callback is not None:
            self.callback(done, total, message)
        self.check()

    def check(self) -> None:
        """Raise Cancelled if cancellation was requested."""
        if self.cancel.is_set():
            raise Cancelled("cancelled by the user")


def iterate(items: Iterable[T], total: int, message: str, progress: Progress | None) -> Iterator[T]:
    """Yield ``items``, reporting progress (and honouring cancel) after each one."""
    if progress is not None:
        progress.update(0, total, message)
    for i, item in enumerate(items, 1):
        yield item
        if progress is not None:
            progress.update(i, total, message)


def tqdm_progress(disable: bool = False) -> Progress:
    """A Progress that draws tqdm bars with ETA on stderr (one bar per distinct message)."""
    from tqdm.auto import tqdm

    state: dict[str, object] = {"bar": None, "message": None}

    def callback(done: int, total: int, message: str) -> None:
        bar = state["bar"]
        if bar is None or state["message"] != message or getattr(bar, "total", None) != total:
            if bar is not None:
                bar.close()  # type: ignore[attr-defined]
            bar = tqdm(total=total, desc=message, disable=disable, dynamic_ncols=True)
            state["bar"], state["message"] = bar, message
        bar.n = done  # type: ignore[attr-defined]
        bar.refresh()  # type: ignore[attr-defined]
        if done >= total:
            bar.close()  # type: ignore[attr-defined]
            state["bar"] = None

    return Progress(callback=callback)
