"""``fdn index build|add|remove|info``: make and maintain a code database of a cohort."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fdn_core.cli.args import (
    add_batch_size,
    add_data,
    add_db,
    add_device,
    add_model,
    add_no_progress,
    positive_int,
)

if TYPE_CHECKING:
    from fdn_core.model.bundle import InferenceBundle

__all__ = ["register", "run"]


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    add_model(parser)
    add_data(parser)
    add_device(parser)
    add_batch_size(parser)
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=2,
        help="threads that load and preprocess cases ahead of the encoder",
    )
    add_no_progress(parser)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``index`` subcommand and its ``build`` / ``add`` / ``remove`` / ``info`` actions."""
    parser = subparsers.add_parser(
        "index",
        help="build and maintain a code database (build, add, remove, info)",
        description="Encode a cohort into a searchable code database; add or remove cases; verify it.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    build = actions.add_parser(
        "build",
        help="encode a cohort into a new database",
        description=(
            "Encode every axial slice of every case (or the named cases) with the model and write a new "
            "database. "
            "The Hamming codes of the codebooks are fitted and stored with it."
        ),
    )
    _add_model_args(build)
    add_db(build, help="database folder to create")
    build.add_argument("--cases", nargs="+", default=None, help="case ids to index (default: all)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing database")
    build.add_argument(
        "--no-hamming",
        action="store_true",
        help="do not fit the Hamming codes now (they are fitted on the first Hamming search instead)",
    )
    build.set_defaults(func=run)

    add = actions.add_parser(
        "add",
        help="add cases to a database",
        description=(
            "Encode cases and add them to an existing database (default: every case of --data not in it yet)."
        ),
    )
    add_db(add, help="existing database folder")
    _add_model_args(add)
    add.add_argument("--cases", nargs="+", default=None, help="case ids to add (default: all new cases)")
    add.set_defaults(func=run)

    remove = actions.add_parser("remove", help="remove a case from a database")
    add_db(remove)
    remove.add_argument("--case", required=True, action="append", dest="cases", help="case id (repeatable)")
    remove.set_defaults(func=run)

    info = actions.add_parser(
        "info",
        help="summarise and verify a database",
        description=(
            "Print a summary of a database and verify every file's hash; exits with status 1 when it is "
            "corrupted."
        ),
    )
    info.add_argument("db", type=Path, help="database folder")
    info.add_argument("--cases", action="store_true", help="also list the cases")
    info.set_defaults(func=run)


def _load_bundle(args: argparse.Namespace) -> InferenceBundle:
    from fdn_core.model.bundle import load_bundle

    return load_bundle(args.model, device=args.device)


def _build(args: argparse.Namespace) -> int:
    from fdn_core.data.provenance import cases_of, warn_training_overlap
    from fdn_core.progress import tqdm_progress
    from fdn_core.retrieval import index_cohort

    bundle = _load_bundle(args)
    warn_training_overlap(bundle.metadata, cases_of(args.data, args.cases), "fdn index build")
    print(f"model {bundle.fingerprint[:12]} on {bundle.device}; indexing {args.data} -> {args.db}")
    db = index_cohort(
        bundle,
        args.data,
        args.db,
        cases=args.cases,
        progress=tqdm_progress(disable=args.no_progress),
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        fit_hamming=not args.no_hamming,
        workers=args.workers,
    )
    info = db.info()
    print(
        f"built {db.path}: {info['num_cases']} cases, {info['num_slices']} slices "
        f"({info['num_abnormal_slices']} with tumour)"
    )
    return 0


def _add(args: argparse.Namespace) -> int:
    from fdn_core.data.provenance import cases_of, warn_training_overlap
    from fdn_core.progress import tqdm_progress
    from fdn_core.retrieval import add_cases

    bundle = _load_bundle(args)
    warn_training_overlap(bundle.metadata, cases_of(args.data, args.cases), "fdn index add")
    added = add_cases(
        bundle,
        args.db,
        args.data,
        cases=args.cases,
        progress=tqdm_progress(disable=args.no_progress),
        batch_size=args.batch_size,
        workers=args.workers,
    )
    if added:
        print(f"added {len(added)} case(s) to {args.db}: {', '.join(added)}")
    else:
        print(f"nothing to add: every case of {args.data} is already in {args.db}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    from fdn_core.codes.database import CodeDatabase
    from fdn_core.errors import DataError

    db = CodeDatabase.open(args.db)
    unknown = [c for c in args.cases if c not in db]
    if unknown:
        raise DataError(
            f"{args.db}: no case(s) {unknown} in this database; `fdn index info --cases` lists them"
        )
    db.remove_cases(list(dict.fromkeys(args.cases)))
    print(f"removed {', '.join(args.cases)} from {args.db}; {len(db.cases)} case(s), {len(db)} slices left")
    return 0


def _info(args: argparse.Namespace) -> int:
    from fdn_core.codes.database import CodeDatabase
    from fdn_core.data.readers import resolve_source
    from fdn_core.errors import DataError, IntegrityError
    from fdn_core.retrieval import HAMMING_DIR, load_hamming_codes

    try:
        db = CodeDatabase.open(args.db, verify=True)
        hamming = load_hamming_codes(db)
    except (IntegrityError, DataError) as exc:
        if isinstance(exc, DataError) and not (Path(args.db) / "manifest.json").is_file():
            raise
        print(f"fdn index info: {args.db}: INTEGRITY CHECK FAILED: {exc}", file=sys.stderr)
        return 1
    info = db.info()
    lines = [
        f"database      {info['path']}",
        f"model         {info['fingerprint']}",
        f"code grid     {info['grid_shape'][0]}x{info['grid_shape'][1]}, K={info['num_codes']} codes of "
        f"D={info['code_dim']}",
        f"cases         {info['num_cases']}",
        f"slices        {info['num_slices']} ({info['num_abnormal_slices']} with tumour)",
        f"size          {info['size_bytes'] / 1e6:.2f} MB (format {info['format_version']}, "
        f"version {info['version']})",
        f"created       {info['created']['utc']} (fdn {info['created']['fdn_version']})",
        f"modified      {info['modified_utc']}",
    ]
    if hamming is None:
        lines.append(f"hamming codes none stored (fitted on first Hamming search into {HAMMING_DIR}/)")
    else:
        for name, codes in zip(("normal", "abnormal"), hamming):
            r = codes.report
            lines.append(
                f"hamming {name:<9} {r.bits_before} -> {r.bits_after} bits "
                f"({100 * r.compression_ratio:.2f} %)"
            )
    missing = []
    for case_id in db.cases:
        src = resolve_source(case_id, db.sources(case_id), db.path)
        paths = [*(src.get("images") or {}).values(), src.get("image4d"), src.get("seg"), src.get("anat")]
        if any(p is not None and not Path(p).is_file() for p in paths):
            missing.append(case_id)
    if args.cases:
        for case_id in db.cases:
            rows = db.case_rows(case_id)
            n_abn = int(db.has_abnormal[rows].sum())
            lines.append(f"  {case_id}: {rows.stop - rows.start} slices, {n_abn} with tumour")
    lines.append("integrity     OK (every file matches its recorded sha256)")
    if missing:
        lines.append(
            f"warning       {len(missing)} case(s) have source files that no longer exist, so their "
            f"volumes cannot be shown: {', '.join(missing[:10])}"
        )
    print("\n".join(lines))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``fdn index <action>``."""
    return {"build": _build, "add": _add, "remove": _remove, "info": _info}[args.action](args)
