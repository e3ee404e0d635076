"""The ``fdn`` command line: ``fdn <command> --help`` for each command.

The commands of this package (phantom, inspect, index, query, eval-retrieval, eval-model, demo) are always
there. Other installed distributions add theirs through the entry-point group ``fdn.commands``: each entry
is a ``register(subparsers)`` callable (the training harness ``fdn-training`` adds ``train``, ``export``
and ``train-baseline``; the browser viewer ``fdn-retrieval-web`` adds ``web``). An entry that cannot be
loaded is still listed, and running it says why and how to repair it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from fdn_core.data.readers import (
    OBLIQUE_ENV,
    OBLIQUE_POLICIES,
    OBLIQUE_TOLERANCE_DEG,
    set_oblique_policy,
)
from fdn_core.errors import FDNError
from fdn_core.fileio import describe_os_error

__all__ = ["COMMAND_MODULES", "ENTRY_POINT_GROUP", "build_parser", "main"]

#: The commands this package provides, one module each in ``fdn_core.cli`` exposing ``register``.
COMMAND_MODULES = ("phantom", "inspect", "index", "query", "eval_retrieval", "eval_model", "demo")
#: Entry-point group through which other distributions add commands.
ENTRY_POINT_GROUP = "fdn.commands"


def _broken_command(sub: Any, ep: EntryPoint, exc: BaseException) -> None:
    """List a command whose module failed to load; running it reports the failure instead of hiding it."""
    reason = f"{type(exc).__name__}: {exc}"
    dist = ep.dist.name if ep.dist is not None else "the package that provides it"
    parser = sub.add_parser(ep.name, help=f"(cannot be loaded: {reason})", add_help=False)
    parser.add_argument("rest", nargs=argparse.REMAINDER)

    def run(args: argparse.Namespace) -> int:
        raise FDNError(
            f"the command could not be loaded from {ep.value} ({reason}); reinstall {dist} "
            "(for a source checkout: bash scripts/setup.sh)"
        )

    parser.set_defaults(func=run)


def _plugin_commands() -> list[EntryPoint]:
    eps = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
    seen: dict[str, EntryPoint] = {}
    for ep in eps:  # one distribution installed twice (e.g. editable + wheel) lists an entry twice
        seen.setdefault(ep.name, ep)
    return list(seen.values())


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every command of this package and of the installed plugins."""
    parser = argparse.ArgumentParser(
        prog="fdn",
        description="Brain MR retrieval with normal/abnormal anatomy codes (feature decomposing network).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--oblique",
        choices=OBLIQUE_POLICIES,
        default=None,
        help=(
            f"images whose voxel axes are rotated more than {OBLIQUE_TOLERANCE_DEG:g} degree against the "
            "scanner axes: auto (default; resampled in query studies, refused in cohorts), resample (onto an "
            "axis-aligned grid), refuse, or accept (read in the nearest axis-aligned orientation, tilt kept)"
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"fdn_core.cli.{name}").register(sub)
    for ep in _plugin_commands():
        if ep.name in sub.choices:
            continue  # never let a plugin replace a core command
        try:
            register: Callable[[Any], None] = ep.load()
            register(sub)
        except Exception as exc:  # a broken plugin must not take the other commands down: it is listed
            _broken_command(sub, ep, exc)
    return parser


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[list[int]]:
    """Handle SIGTERM (and SIGHUP) like Ctrl-C while a command runs: KeyboardInterrupt unwinds it, so
    temporary files and folders are removed and committed work is kept. Yields the signals received."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: object) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:  # nohup stays nohup
            with contextlib.suppress(OSError, ValueError):
                previous[sig] = signal.signal(sig, handler)
    try:
        yield received
    finally:
        for sig, old in previous.items():
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, old)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fdn`` script; returns the process exit code.

    Errors the library raises on purpose (``FDNError``), operating-system errors (disk full, read-only
    folder, device busy: the path, the errno in words and what to do) and running out of memory print one
    message and exit 2; Ctrl-C exits 130 and SIGTERM 143, after the command has cleaned up."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.oblique is not None:  # also for worker processes (data loaders) started by the command
        set_oblique_policy(args.oblique)
        os.environ[OBLIQUE_ENV] = args.oblique
    with _terminate_as_interrupt() as received:
        try:
            return int(args.func(args) or 0)
        except FDNError as exc:
            print(f"fdn {args.command}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            signum = received[-1] if received else int(signal.SIGINT)
            what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
            print(f"fdn {args.command}: {what}", file=sys.stderr)
            return 128 + signum
        except OSError as exc:
            notes = "".join(f"; {n}" for n in getattr(exc, "__notes__", []))
            print(f"fdn {args.command}: error: {describe_os_error(exc)}{notes}", file=sys.stderr)
            return 2
        except MemoryError:
            print(
                f"fdn {args.command}: error: out of memory; free memory (close other programs), lower "
                "--batch-size / --workers where the command has them, or use a machine with more memory",
                file=sys.stderr,
            )
            return 2


if __name__ == "__main__":
    sys.exit(main())
