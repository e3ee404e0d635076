"""``fdn web``: serve the retrieval workflow to a web browser (entry point of the ``fdn.commands`` group).

Registering the command imports nothing heavy (``fdn --help`` lists every command); trame-slicer, VTK and
torch are imported when the command runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["register", "resolve_settings", "run"]

log = logging.getLogger(__name__)

_EPILOG = """\
Without --model and --db the shipped demo model and a demo database are used: demo_out/db written by
'make demo' (in the current folder or the repository), or the Slicer panel's demo database. The server
listens on 127.0.0.1 (this computer only) unless --host says otherwise; every browser tab connected to one
server shares its session. Uploaded files go to a temporary folder removed when the server stops (Ctrl-C).
"""


def register(sub: Any) -> None:
    """Add ``fdn web`` to the ``fdn`` command line."""
    parser = sub.add_parser(
        "web",
        help="serve the retrieval (encode, search, results) to a web browser (trame-slicer)",
        description="Brain MR retrieval in a web browser: pick or upload a study, encode it, search the "
        "database with a slice and compare the most similar slices side by side.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from fdn_core.cli.args import model_folder

    parser.add_argument(
        "--model", type=model_folder, help="model bundle folder or shipped model name (default: demo)"
    )
    parser.add_argument("--db", type=Path, help="code database folder (default: a demo database, see below)")
    parser.add_argument(
        "--data",
        type=Path,
        help="a BraTS or Decathlon folder whose cases are offered as query studies (default: the demo's "
        "cohort when the demo database is used; the database's own cases are always offered)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 picks a free one)")
    parser.add_argument(
        "--device", default="auto", help="auto, cpu, cuda or cuda:N for encoding (default: auto)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for encoding (default: all cores but one, so the server keeps one to answer pages)",
    )
    parser.add_argument("--open-browser", action="store_true", help="open the page in the default browser")
    parser.set_defaults(func=run)


def _bundle_fingerprint(model: Path) -> str | None:
    try:
        record = json.loads((model / "bundle.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = record.get("fingerprint") if isinstance(record, dict) else None
    return str(value) if value else None


def resolve_settings(args: argparse.Namespace) -> Any:
    """The model, database and data folder to open: the command line's, else the demo's (see ``locate``)."""
    from fdn_core.errors import DataError
    from fdn_core.resources import shipped_model_dir

    from .app import WebSettings
    from .locate import find_demo_database

    model = args.model if args.model is not None else shipped_model_dir("demo")
    notes: list[str] = []
    database, data, origin = args.db, args.data, ""
    if database is None:
        demo = find_demo_database(_bundle_fingerprint(model))
        if demo is None:
            raise DataError(
                "no database given and no demo database found: run 'make demo' first (it writes "
                "demo_out/db), or pass --db DB (a folder made by 'fdn index build') and --model MODEL"
            )
        database, origin = demo.database, demo.origin
        if data is None:
            data = demo.cohort
        notes.append(f"Using the demo database from {demo.origin}.")
    for what, path in (("model folder", args.model), ("database", args.db), ("data folder", args.data)):
        if path is not None and not Path(path).is_dir():  # the demo's paths are checked by locate
            raise DataError(f"the {what} {path} does not exist (or is not a folder)")
    cores = os.cpu_count() or 1
    threads = args.threads if args.threads is not None else max(1, cores - 1)
    return WebSettings(
        model=Path(model),
        database=Path(database),
        data=data,
        device=args.device,
        threads=max(1, int(threads)),
        origin=origin,
        notes=notes,
    )


def _prepare_environment() -> None:
    """Settings that must precede importing VTK and trame."""
    # Offscreen rendering without an X server: VTK's EGL window (Mesa's software renderer works).
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    # trame would parse sys.argv (fdn's own options) a second time; give it none.
    os.environ.setdefault("TRAME_ARGS", "")


def run(args: argparse.Namespace) -> int:
    """Start the server and serve until Ctrl-C (or SIGTERM); the uploads folder is removed at exit."""
    from fdn_core.errors import DataError

    settings = resolve_settings(args)
    _prepare_environment()
    try:
        from .app import FDNWebApp
    except ImportError as exc:
        raise DataError(
            f"the web application cannot be loaded ({exc}); it needs its own environment: "
            "'bash scripts/setup.sh web' makes .venv-web, then run .venv-web/bin/fdn web"
        ) from exc
    if not getattr(args, "verbose", False):
        from vtkmodules.vtkCommonCore import vtkObject

        vtkObject.GlobalWarningDisplayOff()  # trame-slicer's views print deprecation warnings per view
        for name in ("trame_server", "trame_client", "trame_rca", "trame_slicer", "wslink", "aiohttp.access"):
            logging.getLogger(name).setLevel(logging.WARNING)
    app = FDNWebApp(settings)
    print(f"fdn web: uploads go to {app.uploads.root} (removed when the server stops)", flush=True)
    try:
        app.server.start(
            host=args.host,
            port=args.port,
            open_browser=args.open_browser,
            timeout=0,
            show_connection_info=True,
        )
    finally:
        app.close()
    return 0
