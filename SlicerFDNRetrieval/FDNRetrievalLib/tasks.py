"""Long work off Slicer's main thread: a worker thread, polled from a QTimer (standard library only).

Why a thread polled with a waiting poll, and not a ``PythonSlicer`` subprocess (measured, see
``Testing/test_slicer_gil.py`` and docs/ARCHITECTURE.md):

- Slicer's main thread holds Python's GIL while it idles in the Qt event loop (nothing in Slicer or CTK
  releases it), so a worker thread only runs while the main thread is inside Python and lets go of the
  GIL. A poll that merely reads the task's status gives the worker almost no time: encoding a small study
  took 409 s instead of 1.9 s. A poll that *waits* on the worker with a short timeout releases the GIL for
  that time: the same encoding finishes at its standalone speed (``POLL_WAIT_S`` out of every
  ``POLL_WAIT_S + POLL_INTERVAL_MS`` goes to the worker), and the GUI still handles its events between
  polls (at least 20 times a second).
- A subprocess would also free the GUI, but each step would pay for a new Python, ``import torch``,
  fdn_core, loading and hash-checking the model and opening the database (6-8 s measured on our 2-core
  machines, before any work), while a search in the running process takes milliseconds. The model, the
  database and its search engine stay in memory between searches this way. A CUDA out-of-memory error is
  an ordinary Python exception in the worker (reported, with the advice to choose the CPU); it does not
  take Slicer down.

Cancel sets a flag that the work checks at each progress report (every batch of slices, every case); the
task then ends with ``status().cancelled``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

__all__ = [
    "POLL_INTERVAL_MS",
    "POLL_WAIT_S",
    "BackgroundTask",
    "TaskCancelled",
    "TaskPoller",
    "TaskProgress",
    "TaskStatus",
    "describe_failure",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Interval of the panel's QTimer (ms): short, the poll itself does the waiting.
POLL_INTERVAL_MS = 5
#: How long each poll waits on the worker (s). Waiting releases the GIL, so this is the worker's share of
#: the main thread's time; the GUI processes its events between polls, so it also bounds the GUI's latency.
POLL_WAIT_S = 0.04


class TaskProgress:
    """Progress callback and cancel flag handed to the work (the interface of ``fdn_core.progress.Progress``,
    which is used instead when fdn_core is installed)."""

    # A copy of fdn_core.progress.Progress on purpose: this module runs the first-use install of fdn_core
    # in Slicer, so it must work before fdn_core can be imported (standard library only).

    def __init__(self, callback: Callable[[int, int, str], None] | None = None) -> None:
        self.callback = callback
        self.cancel = threading.Event()

    def update(self, done: int, total: int, message: str = "") -> None:
        """Report progress, then stop if cancellation was requested."""
        if self.callback is not None:
            self.callback(done, total, message)
        self.check()

    def check(self) -> None:
        """Raise ``TaskCancelled`` if cancellation was requested."""
        if self.cancel.is_set():
            raise TaskCancelled("cancelled by the user")


class TaskCancelled(RuntimeError):
    """The work stopped because the user cancelled it (fdn_core raises its own ``Cancelled``)."""


#: Exception classes whose message is written for the user (bad input, damaged files, missing packages):
#: shown as they are, without a traceback.
_USER_ERRORS = ("FDNError", "DependencyError", "TaskCancelled")


def describe_failure(exc: BaseException) -> tuple[str, bool]:
    """(message for the user, whether it is an expected problem). Expected problems (bad input, a damaged
    file, a missing package, the GPU out of memory) are explained without a traceback; anything else is a bug
    and the caller shows its traceback as details."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    text = str(exc).strip() or type(exc).__name__
    if "OutOfMemoryError" in names or "out of memory" in text.lower():
        return (
            "The GPU ran out of memory. Choose 'cpu' in 'Compute on' (Model and database) and try again, or "
            "close other programs that use the GPU.",
            True,
        )
    if names & set(_USER_ERRORS):
        return text, True
    if isinstance(exc, MemoryError):
        return "The computer ran out of memory; close other programs or use a smaller study.", True
    return f"{type(exc).__name__}: {text}", False


def _make_progress(callback: Callable[[int, int, str], None]) -> Any:
    try:
        from fdn_core.progress import Progress
    except ImportError:  # before the first-use install: only standard-library work runs then
        return TaskProgress(callback)
    return Progress(callback=callback)


@dataclass
class TaskStatus:
    """A snapshot of a background task: progress, and how it ended (if it has)."""

    done: int = 0
    total: int = 0
    message: str = ""
    finished: bool = False
    cancelled: bool = False
    error: BaseException | None = None
    elapsed_s: float = 0.0

    @property
    def fraction(self) -> float:
        """Progress in [0, 1] (0 while the total is unknown)."""
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0


@dataclass
class BackgroundTask(Generic[T]):
    """Runs ``work(progress)`` in a worker thread (no MRML, no Qt there); the main thread polls it.

    Inside Slicer a ``qt.QTimer`` calls ``poll()``, which waits up to ``POLL_WAIT_S`` on the worker (so
    that the worker gets the GIL) and returns the status; results are applied to the scene on the main
    thread. ``cancel()`` makes the work stop at its next progress report.
    """

    work: Callable[[Any], T]
    name: str = "FDN retrieval"
    _status: TaskStatus = field(default_factory=TaskStatus)
    _result: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _finished: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _progress: Any = None
    _started: float = 0.0

    def start(self) -> BackgroundTask[T]:
        """Start the worker thread (once)."""
        if self._thread is not None:
            raise RuntimeError(f"task {self.name!r} was already started")
        self._progress = _make_progress(self._report)
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def _report(self, done: int, total: int, message: str) -> None:
        with self._lock:
            self._status.done, self._status.total, self._status.message = done, total, message

    def _run(self) -> None:
        try:
            result = self.work(self._progress)
        except BaseException as exc:
            cancelled = self._progress.cancel.is_set()
            if not cancelled:
                log.debug("background task %s failed", self.name, exc_info=True)
            with self._lock:
                self._status.cancelled, self._status.error = cancelled, exc
        else:
            with self._lock:
                self._result = result
        finally:
            with self._lock:
                self._status.finished = True
                self._status.elapsed_s = time.perf_counter() - self._started
            self._finished.set()

    @property
    def started(self) -> bool:
        """True once ``start()`` was called."""
        return self._thread is not None

    def cancel(self) -> None:
        """Ask the work to stop at its next progress report."""
        if self._progress is not None:
            self._progress.cancel.set()

    def status(self) -> TaskStatus:
        """A copy of the current status (safe to call from any thread)."""
        with self._lock:
            status = replace(self._status)
        if not status.finished and self._started:
            status.elapsed_s = time.perf_counter() - self._started
        return status

    def poll(self, wait_s: float = POLL_WAIT_S) -> TaskStatus:
        """The GUI's timer step: wait up to ``wait_s`` for the work to end (releasing the GIL meanwhile, so
        the worker runs), then return the status. Never blocks longer than ``wait_s``."""
        if self._thread is not None and wait_s > 0:
            self._finished.wait(wait_s)
        return self.status()

    def wait(self, timeout: float | None = None) -> TaskStatus:
        """Block until the work ends (scripts and tests; the GUI polls instead)."""
        if self._thread is not None:
            self._finished.wait(timeout)
        return self.status()

    def result(self) -> T:
        """The work's return value; re-raises its exception (the cancel exception when cancelled)."""
        status = self.status()
        if not status.finished:
            raise RuntimeError(f"task {self.name!r} has not finished")
        if status.error is not None:
            raise status.error
        return self._result  # type: ignore[no-any-return]


class TaskPoller:
    """The panel's timer slot: runs one task at a time and, at each ``tick()``, waits briefly on it.

    The widget connects its ``qt.QTimer`` (interval ``POLL_INTERVAL_MS``) to ``tick``; the tests call ``tick``
    the same way from a simulated event loop that holds the GIL between ticks, as Slicer's does.
    ``on_progress(status)`` runs after each tick, ``on_done(kind, task, status)`` once when the task ends
    (finished, failed or cancelled), both on the calling (main) thread.
    """

    def __init__(
        self,
        on_progress: Callable[[TaskStatus], None] | None = None,
        wait_s: float = POLL_WAIT_S,
    ) -> None:
        self.on_progress = on_progress
        self.wait_s = wait_s
        self.task: BackgroundTask[Any] | None = None
        self.kind = ""
        self._on_done: Callable[[str, BackgroundTask[Any], TaskStatus], None] | None = None

    @property
    def busy(self) -> bool:
        """A task is running (or finished but not yet handed to ``on_done``)."""
        return self.task is not None

    def start(
        self,
        task: BackgroundTask[Any],
        kind: str,
        on_done: Callable[[str, BackgroundTask[Any], TaskStatus], None] | None = None,
    ) -> None:
        """Start ``task`` (``kind`` names it in messages); RuntimeError while another one runs."""
        if self.task is not None:
            raise RuntimeError(f"cannot start {kind!r}: {self.kind!r} is still running")
        self.task, self.kind, self._on_done = task, kind, on_done
        if not task.started:
            task.start()

    def tick(self) -> TaskStatus | None:
        """One timer step: wait up to ``wait_s`` on the task, report progress, hand over the end. Returns the
        status (None when idle)."""
        task = self.task
        if task is None:
            return None
        status = task.poll(self.wait_s)
        if self.on_progress is not None:
            self.on_progress(status)
        if status.finished:
            kind, on_done = self.kind, self._on_done
            self.task, self.kind, self._on_done = None, "", None
            if on_done is not None:
                on_done(kind, task, status)
        return status

    def cancel(self) -> None:
        """Ask the running task to stop (it ends at its next progress report; ``tick`` then reports it)."""
        if self.task is not None:
            self.task.cancel()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel and forget the running task (scene close, module cleanup); ``on_done`` is not called."""
        task = self.task
        self.task, self.kind, self._on_done = None, "", None
        if task is not None:
            task.cancel()
            task.wait(timeout)
