"""Which cohort a training run learns from: recorded when the run starts, compared when it is resumed.

``RUN/data.json`` holds the data folder and a fingerprint of its case list (each case id with the names
and sizes of its files: cheap, and unchanged when a cohort is copied or moved). ``fdn train --resume`` with
another ``--data`` whose case list differs is refused unless ``--allow-data-change`` is given; a moved copy of
the same cohort is accepted with a note. Runs started before this record existed are compared by the case ids
their checkpoint lists (``train_cases`` + ``val_cases``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from fdn_core.errors import ConfigError
from fdn_core.fileio import atomic_write_json

__all__ = ["DATA_RECORD", "case_list_record", "check_resume_data", "record_run_data"]

log = logging.getLogger("fdn_training.train")

#: File of a run folder recording its data folder and case-list fingerprint.
DATA_RECORD = "data.json"


def case_list_record(data_dir: Path) -> dict[str, Any]:
    """``{"data_dir", "n_cases", "case_list_sha256", "cases": {id: sha256 of its file names and sizes}}``."""
    from fdn_core.data.readers import find_cases

    cases: dict[str, str] = {}
    for files in find_cases(data_dir):
        listing = sorted([p.name, p.stat().st_size] for p in files.all_paths() if p.is_file())
        cases[files.case_id] = hashlib.sha256(json.dumps(listing).encode("utf-8")).hexdigest()
    digest = hashlib.sha256(json.dumps(sorted(cases.items())).encode("utf-8")).hexdigest()
    return {
        "data_dir": str(Path(data_dir).resolve()),
        "n_cases": len(cases),
        "case_list_sha256": digest,
        "cases": cases,
    }


def record_run_data(run_dir: Path, record: dict[str, Any]) -> None:
    """Write ``RUN/data.json`` (atomically)."""
    atomic_write_json(run_dir / DATA_RECORD, record)


def _recorded(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / DATA_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{path}: unreadable ({type(exc).__name__}: {exc}); delete it to resume without the data check"
        ) from exc
    if not isinstance(record, dict) or not isinstance(record.get("cases"), dict):
        raise ConfigError(
            f"{path}: not a data record of fdn train; delete it to resume without the data check"
        )
    return record


def _difference(old: dict[str, str], new: dict[str, str]) -> str:
    """Cases added, removed and changed, in words."""
    parts = []
    for what, ids in (
        ("added", sorted(set(new) - set(old))),
        ("removed", sorted(set(old) - set(new))),
        ("changed", sorted(k for k in set(old) & set(new) if old[k] != new[k])),
    ):
        if ids:
            parts.append(f"{len(ids)} case(s) {what} (e.g. {', '.join(ids[:3])})")
    return "; ".join(parts) or "same cases"


def check_resume_data(
    run_dir: Path, data_dir: Path, payload: dict[str, Any], allow_change: bool, is_main: bool
) -> dict[str, Any]:
    """Compare ``data_dir`` with the data the run in ``run_dir`` was trained on (``payload``: its last
    checkpoint). ConfigError when the case list differs, unless ``allow_change`` (then a warning, and the
    record is updated). Returns the current record."""
    current = case_list_record(data_dir)
    recorded = _recorded(run_dir)
    if recorded is None:
        old_ids = sorted({*payload.get("train_cases", []), *payload.get("val_cases", [])})
        if old_ids == sorted(current["cases"]):
            if is_main:
                record_run_data(run_dir, current)
            return current
        old = {k: "" for k in old_ids}
        diff = _difference(old, {k: "" for k in current["cases"]})
        where = "the cases its checkpoint lists"
    else:
        if recorded.get("case_list_sha256") == current["case_list_sha256"]:
            if recorded.get("data_dir") != current["data_dir"]:
                log.info(
                    "%s: resuming on %s, a copy of the cohort it started on (%s): same case list",
                    run_dir,
                    current["data_dir"],
                    recorded.get("data_dir"),
                )
            return current
        diff = _difference(recorded["cases"], current["cases"])
        where = f"{recorded.get('data_dir')} ({recorded.get('n_cases')} cases)"
    message = (
        f"{run_dir}: --resume with --data {data_dir} ({current['n_cases']} cases), but the run was trained "
        f"on {where}: {diff}"
    )
    if not allow_change:
        raise ConfigError(
            f"{message}. Resume with the run's own --data, start a new run (another --out, or --init-from "
            "to warm-start from this one), or pass --allow-data-change to continue on the new data"
        )
    log.warning("%s; continuing on the new data (--allow-data-change)", message)
    if is_main:
        record_run_data(run_dir, current)
    return current
