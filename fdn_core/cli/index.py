"""``fdn index build|add|remove|info``: make and maintain a code database of a cohort."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    from fdn_core.errors import DataError
    from fdn_core.model.bundle import InferenceBundle
    from fdn_core.ray_index import RayEncoder
    from fdn_core.retrieval import IndexResult

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
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip cases that cannot be read or encoded (each is reported) instead of stopping",
    )
    parser.add_argument(
        "--commit-every",
        type=positive_int,
        default=16,
        metavar="N",
        help="commit the encoded cases every N cases (default 16) so an interruption keeps them",
    )
    parser.add_argument(
        "--commit-seconds",
        type=positive_int,
        default=120,
        metavar="S",
        help="... or every S seconds, whichever comes first (default 120)",
    )
    ray = parser.add_argument_group(
        "Ray cluster (optional extra: pip install 'fdn-retrieval[ray]')",
        "Read cases on the cluster's CPUs and encode them on its GPUs (CPUs without GPUs); this process "
        "commits them. Every node must see --data and --model at the same paths (shared storage). "
        "--device then chooses the encoders: auto (GPUs when the cluster has them), cuda or cpu.",
    )
    ray.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run on Ray: auto (the cluster this node belongs to), ray://HOST:10001 (Ray Client), or "
        "nothing (start a local Ray for this run)",
    )
    ray.add_argument(
        "--ray-workers",
        type=positive_int,
        default=None,
        metavar="N",
        help="encoder actors (default: one per GPU; without GPUs, half the cluster's CPUs)",
    )
    ray.add_argument(
        "--ray-cpus",
        type=positive_int,
        default=1,
        metavar="N",
        help="CPUs (torch threads) per CPU encoder actor (default 1)",
    )
    add_no_progress(parser)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``index`` subcommand and its build / add / remove / compact / info actions."""
    parser = subparsers.add_parser(
        "index",
        help="build and maintain a code database (build, add, remove, compact, info)",
        description=(
            "Encode a cohort into a searchable code database; add or remove cases; compact it; verify it. "
            "Writers take the database's lock, so several commands (and the Slicer module) may write one "
            "database: they take turns."
        ),
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    build = actions.add_parser(
        "build",
        help="encode a cohort into a new database",
        description=(
            "Encode every axial slice of every case (or the named cases) with the model and write a new "
            "database, committing every --commit-every cases: after an interruption, run the same command "
            "again and it continues where it stopped. The Hamming codes of the codebooks are fitted and "
            "stored with it."
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
            "Encode cases and add them to an existing database (default: every case of --data whose image "
            "files are not indexed yet). Running the same command again after an interruption continues it."
        ),
    )
    add_db(add, help="existing database folder")
    _add_model_args(add)
    add.add_argument("--cases", nargs="+", default=None, help="case ids to add (default: all new cases)")
    add.set_defaults(func=run)

    remove = actions.add_parser(
        "remove",
        help="remove a case from a database",
        description=(
            "Remove cases from a database (search no longer returns them). Their codes stay on disk until "
            "the database is compacted (--compact, or `fdn index compact`)."
        ),
    )
    add_db(remove)
    remove.add_argument("--case", required=True, action="append", dest="cases", help="case id (repeatable)")
    remove.add_argument(
        "--compact", action="store_true", help="compact right away: erase the removed cases' codes from disk"
    )
    remove.set_defaults(func=run)

    compact = actions.add_parser(
        "compact",
        help="merge a database's segments and erase removed cases",
        description="Merge every segment of a database into one and drop the rows of removed cases.",
    )
    add_db(compact)
    compact.set_defaults(func=run)

    info = actions.add_parser(
        "info",
        help="summarise and verify a database",
        description=(
            "Print a summary of a database and verify every file's hash and its case table; exits with "
            "status 1 when it is corrupted."
        ),
    )
    info.add_argument("db", type=Path, help="database folder")
    info.add_argument("--cases", action="store_true", help="also list the cases")
    info.set_defaults(func=run)


def _load_bundle(args: argparse.Namespace) -> InferenceBundle:
    from fdn_core.model.bundle import load_bundle

    # With --ray the encoders load the model where they run; this process only needs its codebooks.
    return load_bundle(args.model, device="cpu" if args.ray is not None else args.device)


def _ray_encoder(args: argparse.Namespace) -> RayEncoder | None:
    """The Ray encoder that --ray asks for (checked before the model is loaded), or None."""
    from fdn_core.errors import ConfigError

    if args.ray is None:
        if args.ray_workers is not None or args.ray_cpus != 1:
            raise ConfigError("--ray-workers and --ray-cpus need --ray [ADDRESS]")
        return None
    from fdn_core.ray_index import RayEncoder, require_ray

    require_ray()
    return RayEncoder(
        address=None if args.ray == "local" else args.ray,
        device=args.device,
        workers=args.ray_workers,
        cpus_per_worker=float(args.ray_cpus),
    )


def _report_ray(encoder: RayEncoder | None) -> None:
    run = None if encoder is None else encoder.last_run
    if run is None or not run.workers:
        return
    where = ", ".join(f"{n} on {w}" for w, n in sorted(run.encoded.items())) or "none"
    print(
        f"Ray: {run.workers} {'GPU' if run.gpu else 'CPU'} encoder(s); cases encoded: {where}"
        + (f"; {run.local} encoded here" if run.local else "")
        + (f"; {run.known} already indexed (not read again)" if run.known else "")
    )


def _cli_hint(exc: DataError) -> DataError:
    """The library's advice in command-line words (``skip_bad=True`` -> ``--skip-bad``)."""
    from fdn_core.errors import DataError

    text = str(exc).replace("(skip_bad=True)", "(--skip-bad)").replace("skip_bad=True", "--skip-bad")
    return DataError(text) if text != str(exc) else exc


def _report(result: IndexResult, what: str) -> None:
    if result.already:
        shown = ", ".join(result.already[:10]) + (" ..." if len(result.already) > 10 else "")
        print(f"already indexed (skipped): {len(result.already)} case(s): {shown}")
    if result.bad:
        print(f"skipped {len(result.bad)} bad case(s) ({what}):")
        for _case, problem in result.bad:
            print(f"  {problem}")


def _index_run(
    args: argparse.Namespace, index: Callable[..., IndexResult], *paths: Path, **options: Any
) -> IndexResult:
    """``fdn index build`` / ``add``: check --ray, load the model, warn about training cases, then run
    ``index(bundle, *paths, ...)`` with the options both commands share (and ``options``), with the command
    line's error messages; reports where Ray encoded the cases."""
    from fdn_core.data.provenance import cases_of, warn_training_overlap
    from fdn_core.errors import DataError
    from fdn_core.progress import tqdm_progress

    encoder = _ray_encoder(args)
    bundle = _load_bundle(args)
    warn_training_overlap(bundle.metadata, cases_of(args.data, args.cases), f"fdn index {args.action}")
    if args.action == "build":
        where = f"on Ray ({args.ray})" if encoder is not None else f"on {bundle.device}"
        print(f"model {bundle.fingerprint[:12]} {where}; indexing {args.data} -> {args.db}")
    try:
        result = index(
            bundle,
            *paths,
            cases=args.cases,
            progress=tqdm_progress(disable=args.no_progress),
            batch_size=args.batch_size,
            workers=args.workers,
            skip_bad=args.skip_bad,
            commit_every=args.commit_every,
            commit_seconds=float(args.commit_seconds),
            encoder=encoder,
            **options,
        )
    except DataError as exc:
        raise _cli_hint(exc) from exc
    except KeyboardInterrupt:
        print(
            f"fdn index {args.action}: interrupted; the cases committed so far are kept in {args.db}: run "
            "the same command again to continue",
            file=sys.stderr,
        )
        raise
    except OSError as exc:
        exc.add_note(
            f"nothing was half-written: {args.db} keeps its last committed state (run the same command "
            "again to continue once the problem is fixed)"
        )
        raise
    _report_ray(encoder)
    return result


def _build(args: argparse.Namespace) -> int:
    from fdn_core.retrieval import build_index

    result = _index_run(
        args,
        build_index,
        args.data,
        args.db,
        overwrite=args.overwrite,
        fit_hamming=not args.no_hamming,
    )
    db = result.database
    info = db.info()
    if result.resumed:
        print(f"resumed an interrupted build of {db.path}")
    _report(result, "not indexed")
    print(
        f"built {db.path}: {info['num_cases']} cases, {info['num_slices']} slices "
        f"({info['num_abnormal_slices']} with tumour)"
    )
    return 0


def _add(args: argparse.Namespace) -> int:
    from fdn_core.retrieval import add_to_index

    result = _index_run(args, add_to_index, args.db, args.data)
    _report(result, "not added")
    if result.added:
        print(f"added {len(result.added)} case(s) to {args.db}: {', '.join(result.added)}")
    else:
        print(f"nothing to add: every case of {args.data} is already in {args.db}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    from fdn_core.codes.database import CodeDatabase
    from fdn_core.errors import DataError

    db = CodeDatabase.open(args.db, verify=False)
    unknown = [c for c in args.cases if c not in db]
    if unknown:
        raise DataError(
            f"{args.db}: no case(s) {unknown} in this database; `fdn index info --cases` lists them"
        )
    try:
        db.remove_cases(list(dict.fromkeys(args.cases)))
        if args.compact:
            db.compact()
    except OSError as exc:
        exc.add_note(f"nothing was half-written: {args.db} keeps its last committed state")
        raise
    print(f"removed {', '.join(args.cases)} from {args.db}; {len(db.cases)} case(s), {len(db)} slices left")
    return 0


def _compact(args: argparse.Namespace) -> int:
    from fdn_core.codes.database import CodeDatabase

    db = CodeDatabase.open(args.db, verify=False)
    before = db.info()
    try:
        done = db.compact()
    except OSError as exc:
        exc.add_note(f"nothing was half-written: {args.db} keeps its last committed state")
        raise
    if not done:
        print(f"{args.db} is compact already (one segment, nothing removed)")
        return 0
    after = db.info()
    print(
        f"compacted {args.db}: {before['num_segments']} segment(s) -> {after['num_segments']}, "
        f"{before['removed_slices']} removed slice(s) erased, {before['size_bytes'] / 1e6:.2f} MB -> "
        f"{after['size_bytes'] / 1e6:.2f} MB"
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    from fdn_core.codes.database import CodeDatabase
    from fdn_core.data.readers import resolve_source
    from fdn_core.errors import DataError, IntegrityError
    from fdn_core.retrieval import HAMMING_DIR, load_hamming_codes

    try:
        db = CodeDatabase.open(args.db, verify=True)
        db.verify()
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
        f"cases         {info['num_cases']} ({info['cases_with_fingerprint']} with a source fingerprint)",
        f"slices        {info['num_slices']} ({info['num_abnormal_slices']} with tumour)",
        f"lesion flags  from tumour labels in {info['cases_flagged_by_labels']} case(s), from the model's "
        f"segmentation in {info['num_cases'] - info['cases_flagged_by_labels']}",
        f"segments      {info['num_segments']}"
        + (
            f"; {info['num_removed_cases']} removed case(s) ({info['removed_slices']} slices) still on disk "
            "until `fdn index compact`"
            if info["num_removed_cases"]
            else ""
        ),
        f"size          {info['size_bytes'] / 1e6:.2f} MB (format {info['format_version']}, "
        f"version {info['version']})",
        f"created       {info['created'].get('utc', '?')} (fdn {info['created'].get('fdn_version', '?')})",
        f"modified      {info['modified_utc']}",
    ]
    if (Path(args.db) / "build.json").is_file():
        lines.append(
            "build         an unfinished `fdn index build` is staged here: run it again to finish it"
        )
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
        if any(p is not None and not Path(p).exists() for p in paths):
            missing.append(case_id)
    if args.cases:
        for case_id in db.cases:
            rows = db.case_rows(case_id)
            n_abn = db.case_abnormal_count(case_id)
            lines.append(f"  {case_id}: {rows.stop - rows.start} slices, {n_abn} with tumour")
    lines.append(
        "integrity     OK (every file matches its recorded sha256; case table consistent, ids unique)"
    )
    if missing:
        lines.append(
            f"warning       {len(missing)} case(s) have source files that no longer exist, so their "
            f"volumes cannot be shown: {', '.join(missing[:10])}"
        )
    print("\n".join(lines))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``fdn index <action>``."""
    actions = {"build": _build, "add": _add, "remove": _remove, "compact": _compact, "info": _info}
    return actions[args.action](args)
