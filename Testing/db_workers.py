"""Helpers of the database tests that run in worker processes (imports numpy and the database only, so
forked workers start fast), and a writer of the old format-1 layout."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from fdn_core.codes.database import CaseCodes, CodeDatabase
from fdn_core.fileio import sha256_file

K, D, GRID = 16, 4, (2, 3)
FP = "f" * 64


def books(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two (K, D) float32 codebooks."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(K, D)).astype(np.float32), rng.normal(size=(K, D)).astype(np.float32)


def source(case_id: str) -> dict[str, Any]:
    """A recorded source of a BraTS-layout case."""
    return {
        "layout": "brats",
        "images": {m: f"/data/{case_id}/{case_id}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")},
        "image4d": None,
        "seg": f"/data/{case_id}/{case_id}_seg.nii.gz",
        "anat": None,
    }


def case(case_id: str, slices: int, seed: int, sha: str | None = None) -> CaseCodes:
    """A case of random codes."""
    rng = np.random.default_rng(seed)
    return CaseCodes(
        case_id=case_id,
        normal=rng.integers(0, K, (slices, *GRID)).astype(np.uint16),
        abnormal=rng.integers(0, K, (slices, *GRID)).astype(np.uint16),
        has_abnormal=rng.random(slices) < 0.5,
        source=source(case_id),
        source_sha256=sha,
    )


def new_db(path: Path) -> CodeDatabase:
    """An empty database of the test codebooks."""
    bn, ba = books()
    return CodeDatabase.create(
        path, fingerprint=FP, codebook_normal=bn, codebook_abnormal=ba, grid_shape=GRID
    )


# ------------------------------------------------------------------------------------ worker processes


def add_one(path: str, case_id: str, seed: int, start_at: float) -> str:
    """Process body: wait until ``start_at`` (so two writers collide), then add one case."""
    db = CodeDatabase.open(path, verify=False)
    time.sleep(max(0.0, start_at - time.time()))
    db.add_cases([case(case_id, 3, seed)])
    return case_id


def commit_stream(path: str, seconds: float) -> int:
    """Process body: commit adds, removals and compactions for ``seconds``; returns the commits made."""
    db = CodeDatabase.open(path, verify=False)
    db.merge_fanout = 1000
    commits, i = 0, 0
    end = time.time() + seconds
    while time.time() < end:
        i += 1
        db.add_cases([case(f"S{i}", 2, i)])
        commits += 1
        if i % 3 == 0:
            db.remove_cases([f"S{i - 1}"])
            commits += 1
        if i % 4 == 0:
            db.compact()
            commits += 1
    return commits


# ---------------------------------------------------------------------------------- the format-1 layout


def write_v1(
    path: Path,
    cases: list[CaseCodes],
    version: int = 3,
    fingerprint: str = FP,
    codebooks: tuple[np.ndarray, np.ndarray] | None = None,
    grid: tuple[int, int] = GRID,
) -> None:
    """Write a database in the old format 1 (one vNNNNNN folder, the case table in the manifest)."""
    path.mkdir(parents=True)
    vname = f"v{version:06d}"
    vdir = path / vname
    vdir.mkdir()
    bn, ba = books() if codebooks is None else codebooks
    h, w = grid
    arrays = {
        "normal_codes": np.concatenate([c.normal.reshape(-1, h * w) for c in cases]).astype(np.uint16),
        "abnormal_codes": np.concatenate([c.abnormal.reshape(-1, h * w) for c in cases]).astype(np.uint16),
        "slice_indices": np.concatenate(
            [np.arange(c.normal.shape[0]) if c.slice_indices is None else c.slice_indices for c in cases]
        ).astype(np.int32),
        "has_abnormal": np.concatenate([c.has_abnormal for c in cases]).astype(bool),
        "codebook_normal": bn,
        "codebook_abnormal": ba,
    }
    files = {}
    for name, arr in arrays.items():
        np.save(vdir / f"{name}.npy", arr, allow_pickle=False)
        files[name] = {
            "sha256": sha256_file(vdir / f"{name}.npy"),
            "dtype": str(arr.dtype),
            "shape": list(arr.shape),
        }
    rows, n = [], 0
    for c in cases:
        rows.append(
            {"case_id": c.case_id, "start": n, "stop": n + c.normal.shape[0], "source": dict(c.source)}
        )
        n += c.normal.shape[0]
    manifest = {
        "format": "fdn-code-database",
        "format_version": 1,
        "fingerprint": fingerprint,
        "grid_shape": list(grid),
        "num_codes": int(bn.shape[0]),
        "code_dim": int(bn.shape[1]),
        "created": {"utc": "2026-01-01T00:00:00+00:00", "fdn_version": "0.0.9"},
        "modified_utc": "2026-01-01T00:00:00+00:00",
        "version": version,
        "current": vname,
        "num_slices": n,
        "cases": rows,
        "files": files,
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
