"""The demo reference database, built on this computer at first use: no download, no source checkout.

``build_demo`` writes a small phantom cohort (``fdn_core.data.phantom``) and indexes it with the shipped
demo model into ``<root>/demo`` (``root``: a folder in Slicer's cache, chosen by the module):

    <root>/demo/demo.json   what was built, with which model, how long it took, sample-data checksums
    <root>/demo/cohort/     the phantom cases (BraTS layout, NIfTI)
    <root>/demo/db/         the code database; it records the cases as ``../cohort/...`` (relative paths)

Everything is built in a temporary folder beside ``<root>/demo`` and renamed into place when complete, so a
cancelled or failed build leaves nothing behind. This module imports only the standard library at load time
(the panel asks for the demo's status before fdn_core is installed); fdn_core is imported when building.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEMO_DIRNAME",
    "DEMO_FORMAT",
    "DemoPlan",
    "DemoStatus",
    "SampleStudy",
    "build_demo",
    "demo_sample_studies",
    "demo_status",
    "folder_bytes",
    "remove_demo",
]

DEMO_DIRNAME = "demo"
DEMO_FORMAT = "fdn-slicer-demo"
RECORD_NAME = "demo.json"
SEQUENCES = ("t1", "t1ce", "t2", "flair")

# Measured on our 2-core development VM (shared with other jobs, load average 4-8), shipped demo model:
# 12 cases at 120 x 120 x 78 took 67 s (phantom 10 s, indexing 57 s) and 17 MB; 16 cases took 127 s
# (phantom 23 s, indexing 104 s) and 23 MB (22.9 MB: cohort 21.6 MB, database 1.3 MB).
_BYTES_PER_CASE = 1_430_000
_SECONDS_PER_CASE = 8.0


@dataclass(frozen=True)
class DemoPlan:
    """What ``build_demo`` makes: how many phantom cases, at which voxel grid, from which seed.

    The defaults keep the build at about a minute or two on a laptop CPU: 16 cases (so that a search for
    ten results, one per case, has enough other cases) at 120 x 120 x 78 voxels (2 mm; the phantom keeps the
    240 x 240 x 155 mm field of view of BraTS).
    """

    n_cases: int = 16
    shape: tuple[int, int, int] = (120, 120, 78)
    seed: int = 2021
    samples: int = 2

    def estimated_bytes(self) -> int:
        """Disk space the demo will take (cohort + database), from measured sizes."""
        scale = (self.shape[0] * self.shape[1] * self.shape[2]) / (120 * 120 * 78)
        return int(self.n_cases * _BYTES_PER_CASE * scale)

    def estimated_seconds(self) -> float:
        """Build time on a 2-core CPU, from measured times (a laptop is usually faster)."""
        return self.n_cases * _SECONDS_PER_CASE * self.shape[2] / 78

    def describe(self) -> str:
        """One sentence for the confirmation dialog: what, how big, how long."""
        minutes = max(1, round(self.estimated_seconds() / 60))
        return (
            f"{self.n_cases} synthetic phantom cases ({self.shape[0]} x {self.shape[1]} x {self.shape[2]} "
            f"voxels) and their code database: about {self.estimated_bytes() / 1e6:.0f} MB on disk, about "
            f"{minutes} minute{'s' if minutes > 1 else ''} of computing on the CPU. Nothing is downloaded."
        )


@dataclass(frozen=True)
class SampleStudy:
    """One demo case offered in the Sample Data module (arguments of registerCustomSampleDataSource)."""

    case_id: str
    uris: list[str]
    file_names: list[str]
    node_names: list[str]
    checksums: list[str]


@dataclass
class DemoStatus:
    """Where the demo is and whether it can be used with the current model."""

    root: Path
    ready: bool
    message: str
    database: Path | None = None
    cohort: Path | None = None
    record: dict[str, Any] = field(default_factory=dict)


def folder_bytes(path: str | Path) -> int:
    """Total size of the files under ``path`` (0 when it does not exist)."""
    path = Path(path)
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _read_record(folder: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((folder / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == DEMO_FORMAT else None


def demo_status(root: str | Path, model_fingerprint: str | None = None) -> DemoStatus:
    """Is there a usable demo under ``root``? Reads ``demo.json`` only (cheap, standard library).

    Not ready when it is missing, incomplete, or was built with another model than ``model_fingerprint``
    (after an update of the extension): the message then says what to do.
    """
    root = Path(root)
    folder = root / DEMO_DIRNAME
    record = _read_record(folder)
    if record is None:
        return DemoStatus(root, False, "No demo database on this computer yet: press 'Build demo database'.")
    database, cohort = folder / "db", folder / "cohort"
    if not (database / "manifest.json").is_file() or not (cohort / "cohort.json").is_file():
        return DemoStatus(
            root, False, f"The demo in {folder} is incomplete; remove it and build it again.", record=record
        )
    if model_fingerprint is not None and record.get("model_fingerprint") != model_fingerprint:
        return DemoStatus(
            root,
            False,
            "The demo database was built with another version of the demo model; press 'Build demo "
            "database' to rebuild it.",
            record=record,
        )
    size = record.get("bytes", 0) / 1e6
    return DemoStatus(
        root,
        True,
        f"Demo database: {record.get('n_cases')} phantom cases, {size:.0f} MB in {folder}.",
        database=database,
        cohort=cohort,
        record=record,
    )


def _phase(progress: Any, offset: int, span: int, total: int, message: str) -> Any:
    """A progress for one phase of the build (steps ``offset .. offset + span`` of ``total``) that reports
    into the overall ``progress`` (same cancel). The phase's own sub-steps (cases, then e.g. fitting the
    Hamming codes) are scaled into its span and never move the bar backwards."""
    from fdn_core.progress import Progress

    if progress is None:
        return None
    reached = [offset]

    def report(done: int, phase_total: int, _message: str) -> None:
        reached[0] = max(reached[0], offset + round(span * done / max(phase_total, 1)))
        progress.update(reached[0], total, message)

    return Progress(callback=report, cancel=progress.cancel)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sample_entries(cohort: Path, meta: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` tumour cases of the cohort, with the SHA256 of their four sequence files."""
    entries = []
    for case in meta.get("cases", []):
        if case.get("healthy", True):
            continue
        cid = str(case["case_id"])
        files = [f"{cid}/{cid}_{seq}.nii.gz" for seq in SEQUENCES]
        if not all((cohort / f).is_file() for f in files):
            continue
        entries.append({"case_id": cid, "files": files, "sha256": [_sha256(cohort / f) for f in files]})
        if len(entries) >= limit:
            break
    return entries


def build_demo(
    root: str | Path,
    model_dir: str | Path | None = None,
    plan: DemoPlan | None = None,
    progress: Any = None,
    device: str = "cpu",
) -> DemoStatus:
    """Generate the phantom cohort and index it with the model at ``model_dir`` (default: the shipped demo
    model) into ``<root>/demo``, replacing an older demo only once the new one is complete.

    ``progress``: an ``fdn_core.progress.Progress`` (cases generated, then cases indexed; cancel honoured
    between cases). Needs nilearn (the phantom's brain template); DataError says how to install it.
    """
    from fdn_core.data.phantom import generate_cohort
    from fdn_core.fileio import atomic_dir
    from fdn_core.model.bundle import load_bundle
    from fdn_core.resources import shipped_model_dir
    from fdn_core.retrieval import index_cohort

    plan = plan or DemoPlan()
    root = Path(root)
    model_dir = Path(model_dir) if model_dir is not None else shipped_model_dir("demo")
    total = 2 * plan.n_cases
    started = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / DEMO_DIRNAME
    with atomic_dir(folder, overwrite=folder.exists()) as tmp:
        meta = generate_cohort(
            tmp / "cohort",
            plan.n_cases,
            plan.seed,
            shape=plan.shape,
            workers=1,  # never spawn processes from inside Slicer (its executable is not a Python)
            progress=_phase(progress, 0, plan.n_cases, total, "Generating phantom cases"),
        )
        bundle = load_bundle(model_dir, device=device)
        index_cohort(
            bundle,
            tmp / "cohort",
            tmp / "db",
            progress=_phase(progress, plan.n_cases, plan.n_cases, total, "Indexing phantom cases"),
            workers=1,
        )
        record = {
            "format": DEMO_FORMAT,
            "plan": asdict(plan),
            "n_cases": plan.n_cases,
            "model": str(model_dir),
            "model_fingerprint": bundle.fingerprint,
            "built_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.perf_counter() - started, 1),
            "samples": _sample_entries(tmp / "cohort", meta, plan.samples),
        }
        record["bytes"] = folder_bytes(tmp)
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return demo_status(root, bundle.fingerprint)


def remove_demo(root: str | Path) -> int:
    """Delete ``<root>/demo`` and leftovers of interrupted builds; returns the bytes freed.

    Only folders this module made are deleted (``demo.json`` with our format, or the temporary build
    folders beside it); anything else under ``root`` is left alone.
    """
    root = Path(root)
    freed = 0
    folder = root / DEMO_DIRNAME
    candidates = [folder] if _read_record(folder) is not None else []
    candidates += [p for p in root.glob(f".{DEMO_DIRNAME}.*") if p.is_dir()] if root.is_dir() else []
    for path in candidates:
        freed += folder_bytes(path)
        shutil.rmtree(path)
    return freed


def demo_sample_studies(root: str | Path) -> list[SampleStudy]:
    """The demo's sample cases as Sample Data sources (local file URIs, SHA256 from ``demo.json``)."""
    status = demo_status(root)
    if not status.ready or status.cohort is None:
        return []
    studies = []
    for entry in status.record.get("samples", []):
        files = [status.cohort / f for f in entry["files"]]
        if not all(f.is_file() for f in files):
            continue
        cid = str(entry["case_id"])
        studies.append(
            SampleStudy(
                case_id=cid,
                uris=[f.resolve().as_uri() for f in files],
                file_names=[f.name for f in files],
                node_names=[f"{cid}_{seq}" for seq in SEQUENCES],
                checksums=[f"SHA256:{digest}" for digest in entry["sha256"]],
            )
        )
    return studies
