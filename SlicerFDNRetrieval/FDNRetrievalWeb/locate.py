"""Which model, database and data folder ``fdn web`` opens when the command line names none.

The shipped demo model, and the first demo database that exists and was built with it:

1. ``demo_out/db`` (what ``make demo`` / ``fdn demo --out demo_out`` writes) in the current folder, then in
   the repository this package lives in;
2. the Slicer panel's demo database, ``<Slicer cache>/FDNRetrieval/demo/db``: the cache folder from Slicer's
   settings (``Cache/Path`` in ``slicer.org/Slicer.ini``) or under the platform's cache folder
   (``~/.cache/slicer.org`` on Linux).

The demo's cohort (``demo_out/cohort``, ``.../demo/cohort``) becomes the data folder, so the held-out phantom
cases (not in the database) can be picked as queries. Standard library only: this runs before anything heavy
is imported.
"""

from __future__ import annotations

import configparser
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DemoChoice", "find_demo_database", "slicer_cache_roots"]

#: The repository root when this package runs from a source checkout (SlicerFDNRetrieval/FDNRetrievalWeb/).
_REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class DemoChoice:
    """A demo database found on this computer, with the cohort its cases come from (None if absent)."""

    database: Path
    cohort: Path | None
    origin: str


def _fingerprint(db: Path) -> str | None:
    try:
        manifest = json.loads((db / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = manifest.get("fingerprint") if isinstance(manifest, dict) else None
    return str(value) if value else None


def slicer_cache_roots() -> list[Path]:
    """Folders where 3D Slicer may keep its cache: the one set in Slicer's settings, then the platform's."""
    home = Path.home()
    if sys.platform == "darwin":
        config, cache = home / "Library" / "Preferences", home / "Library" / "Caches"
    elif os.name == "nt":
        appdata = Path(os.environ.get("APPDATA", home / "AppData" / "Roaming"))
        config, cache = appdata, Path(os.environ.get("LOCALAPPDATA", home / "AppData" / "Local"))
    else:
        config = Path(os.environ.get("XDG_CONFIG_HOME", home / ".config"))
        cache = Path(os.environ.get("XDG_CACHE_HOME", home / ".cache"))
    roots: list[Path] = []
    for ini in (config / "slicer.org" / "Slicer.ini", config / "NA-MIC" / "Slicer.ini"):
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        try:
            parser.read(ini, encoding="utf-8")
            path = parser.get("Cache", "Path", fallback="").strip().strip('"')
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        if path:
            roots.append(Path(path))
    roots.append(cache / "slicer.org")
    return roots


def _panel_demos(root: Path) -> list[Path]:
    """``.../FDNRetrieval/demo`` folders at most three levels below ``root``."""
    found = []
    for pattern in ("FDNRetrieval/demo", "*/FDNRetrieval/demo", "*/*/FDNRetrieval/demo"):
        found += sorted(root.glob(pattern))
    return found


def find_demo_database(model_fingerprint: str | None = None) -> DemoChoice | None:
    """The first demo database (see the module docstring) whose manifest names ``model_fingerprint`` (any
    when None); None when there is none."""
    candidates: list[tuple[Path, Path, str]] = []
    for base in dict.fromkeys((Path.cwd(), _REPO)):
        out = base / "demo_out"
        candidates.append((out / "db", out / "cohort", f"make demo ({out})"))
    for root in slicer_cache_roots():
        for demo in _panel_demos(root):
            candidates.append((demo / "db", demo / "cohort", f"the Slicer panel's demo ({demo})"))
    for db, cohort, origin in candidates:
        if not (db / "manifest.json").is_file():
            continue
        if model_fingerprint is not None and _fingerprint(db) not in (None, model_fingerprint):
            continue
        return DemoChoice(db.resolve(), cohort.resolve() if cohort.is_dir() else None, origin)
    return None
