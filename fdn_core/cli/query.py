"""``fdn query``: the slices of a database closest to one query slice, as a ranked table and a PNG montage."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from fdn_core.cli.args import add_db, add_device, add_model

__all__ = ["register", "run"]

log = logging.getLogger("fdn_core.cli.query")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``query`` subcommand."""
    from fdn_core.labels import DISTANCES, LESION_FILTERS, MIN_LESION_ML, MODE_CHOICES

    parser = subparsers.add_parser(
        "query",
        help="retrieve the slices closest to a query slice",
        description=(
            "Search a code database with one axial slice. The query case is a case id of the database, a "
            "BraTS-style case folder, or its image files <case>_{t1,t1ce,t2,flair}.nii.gz (optionally with "
            "_seg/_anat; also .nii, .nrrd, .nhdr, .mha, .mhd, or a folder holding one DICOM series), or "
            "KIND=PATH for files named otherwise (e.g. t1ce=dicom/series7). Sequences on another voxel grid "
            "than the T1ce are resampled onto it. The query's own volume is never returned. Modes: normal "
            "(S_normal), abnormal (S_abnormal), sum (S_sum) and sum-normalized (each distance divided by its "
            "typical size)."
        ),
    )
    add_db(parser, help="code database folder (fdn index build)")
    add_model(parser, help="inference bundle the database was built with")
    parser.add_argument(
        "--case",
        required=True,
        nargs="+",
        metavar="CASE",
        help="database case id, case folder, or image files / DICOM folders (or KIND=PATH)",
    )
    parser.add_argument("--slice", required=True, type=int, help="axial slice index k (volume[..., k])")
    parser.add_argument(
        "--mode",
        default="sum",
        choices=MODE_CHOICES,
        type=lambda s: s.replace("normalised", "normalized"),
        help="similarity: normal (S_normal), abnormal (S_abnormal), sum (S_sum), sum-normalized (each "
        "distance divided by its typical size; 'both' in the Slicer panel) (default: sum)",
    )
    parser.add_argument(
        "--distance",
        default="euclidean",
        choices=DISTANCES,
        help="distance between code grids: the paper's euclidean (default), angular, hamming, or learned "
        "(the cosine of a code embedding trained so that it ranks like the Dice of label maps; needs a "
        "model with a retrieval embedding, as the demo model has: `fdn train-embedding`)",
    )
    parser.add_argument("--top", type=int, default=10, help="number of results (default 10)")
    parser.add_argument(
        "--abnormal-from",
        metavar="CASE:SLICE",
        default=None,
        help="composite query: take the abnormal codes from this database slice instead",
    )
    parser.add_argument(
        "--slice-wise", action="store_true", help="rank slices (default: volume-wise, best slice per volume)"
    )
    parser.add_argument(
        "--context",
        action="store_true",
        help="axial context: the normal codes' distance also compares the slices 3 and 6 above and below "
        "the query with those around each reference slice (weights 0.5 and 0.25), which pins down the "
        "anatomical level (README, 'Retrieval quality'); the abnormal distance stays one slice",
    )
    parser.add_argument(
        "--lesion",
        default="any",
        choices=LESION_FILTERS,
        help="which reference slices may be returned: any (default); without: only slices without a lesion "
        "(the same anatomy with no lesion); with: only slices with a lesion (a similar lesion wherever it "
        "sits). Each slice's flag comes from its case's tumour labels when it has them, else from the "
        f"model's segmentation (lesions under {MIN_LESION_ML:g} mL removed). Volume-wise, each case is "
        "ranked by its best such slice and a case without one is left out",
    )
    parser.add_argument("--montage", type=Path, default=None, help="write a PNG of the query and the results")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    parser.add_argument(
        "--explain",
        type=Path,
        default=None,
        metavar="PNG",
        help="write RELAX explanations: which pixels of the query drive its code(s) of this mode, alone and "
        "against the result of --explain-rank (fdn_core.explain)",
    )
    parser.add_argument(
        "--explain-masks", type=int, default=2000, help="RELAX masks per map (default 2000; paper 3000)"
    )
    parser.add_argument("--explain-rank", type=int, default=1, help="result to explain against (default 1)")
    parser.add_argument(
        "--explain-with",
        nargs="*",
        default=[],
        metavar="NAME|FOLDER",
        help="also explain these baselines' representations (simsiam, ynet, or bundle folders)",
    )
    add_device(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``fdn query``."""
    from fdn_core.data.readers import CaseFiles, case_files_from_paths, load_case
    from fdn_core.errors import ConfigError, DataError
    from fdn_core.fileio import atomic_write_json
    from fdn_core.labels import LESION_FILTER_LABELS
    from fdn_core.model.bundle import load_bundle
    from fdn_core.report.montage import render_retrieval_montage
    from fdn_core.retrieval import Retriever, parse_case_slice

    if args.top < 1:
        raise ConfigError(f"--top {args.top}: must be >= 1")
    if args.slice < 0:
        raise ConfigError(f"--slice {args.slice}: must be >= 0")
    if any(not str(c).strip() for c in args.case):
        raise ConfigError("--case: an empty argument; give a database case id, a case folder or image files")
    for flag, path in (("--json", args.json), ("--montage", args.montage)):
        if path is not None and path.is_dir():
            raise ConfigError(f"{flag} {path}: is a folder; give a file path (e.g. {path / 'query.json'})")
    bundle = load_bundle(args.model, device=args.device)
    retriever = Retriever.open(args.db, bundle)
    db = retriever.db

    case_arg = args.case
    if len(case_arg) == 1 and not Path(case_arg[0]).exists():
        if case_arg[0] not in db:
            raise DataError(
                f"--case {case_arg[0]}: neither a case of {args.db} nor an existing file or folder; give a "
                "database case id (fdn index info --cases), a case folder, or the case's image files"
            )
        try:
            query = retriever.slice_from_database(case_arg[0], args.slice)
        except DataError as exc:
            raise DataError(f"--slice {args.slice}: {exc}") from exc
        volume = None
    else:
        volume = load_case(case_files_from_paths(case_arg))
        if volume.oblique_deg and volume.resampled:
            print(
                f"resampled onto an axis-aligned grid (the T1ce is {volume.oblique_deg:.1f} degrees "
                f"oblique): {', '.join(volume.resampled)}"
            )
        elif volume.oblique_deg:
            print(
                f"read with its tilt kept (--oblique accept): the T1ce is {volume.oblique_deg:.1f} "
                "degrees oblique"
            )
        elif volume.resampled:
            print(f"resampled onto the T1ce grid: {', '.join(volume.resampled)}")
        depth = volume.image.shape[-1]
        if args.slice >= depth:
            raise DataError(
                f"--slice {args.slice}: study {volume.case_id} ({case_arg[0]}) has axial slices "
                f"0..{depth - 1}; give a slice in that range"
            )
        if not (volume.image[..., args.slice] > 0).any():
            log.warning(
                "slice %d of study %s (%s) is empty (no voxel above 0 in any sequence: outside the head); "
                "its codes are those of every empty slice, so the results are arbitrary empty slices at "
                "distance 0: give a slice through the brain",
                args.slice,
                volume.case_id,
                case_arg[0],
            )
        query = retriever.slice_from_case(volume, args.slice)

    abnormal_from = None
    if args.abnormal_from is not None:
        try:
            case_id, k = parse_case_slice(args.abnormal_from)
        except DataError as exc:
            raise DataError(f"--abnormal-from: {exc}; give CASE:SLICE of a database slice") from exc
        if case_id not in db:
            raise DataError(
                f"--abnormal-from {args.abnormal_from}: case {case_id!r} is not in {args.db}; give a "
                "database case (`fdn index info --cases` lists them)"
            )
        try:
            abnormal_from = retriever.slice_from_database(case_id, k)
        except DataError as exc:
            raise DataError(f"--abnormal-from {args.abnormal_from}: {exc}") from exc

    hits = retriever.search(
        query,
        mode=args.mode,
        distance=args.distance,
        top=args.top,
        slice_wise=args.slice_wise,
        abnormal_from=abnormal_from,
        context=args.context,
        lesion=args.lesion,
    )
    unit = "slice-wise" if args.slice_wise else "volume-wise"
    if args.context:
        unit += ", axial context"
    if args.lesion != "any":
        unit += f", references {LESION_FILTER_LABELS[args.lesion]}"
    composite = f", abnormal codes from {args.abnormal_from}" if abnormal_from is not None else ""
    where = "in the database, excluded from results" if query.in_database else "not in the database"
    print(f"query {query.case_id}:{query.slice_index} ({where}){composite}")
    print(f"mode {args.mode}, distance {args.distance}, {unit} top {args.top}: {len(hits)} result(s)")
    print(f"{'rank':>4}  {'case':<24} {'slice':>5}  {'distance':>12}")
    for h in hits:
        print(f"{h.rank:>4}  {h.case_id:<24} {h.slice_index:>5}  {h.distance:>12.6g}")
    if args.json is not None:
        atomic_write_json(
            args.json,
            {
                "query": {
                    "case_id": query.case_id,
                    "slice_index": query.slice_index,
                    "in_database": query.in_database,
                },
                "abnormal_from": args.abnormal_from,
                "mode": args.mode,
                "distance": args.distance,
                "per": "slice-wise" if args.slice_wise else "volume-wise",
                "axial_context": args.context,
                "lesion": args.lesion,
                "top": args.top,
                "database": str(db.path),
                "model_fingerprint": bundle.fingerprint,
                "hits": [
                    {
                        "rank": h.rank,
                        "case_id": h.case_id,
                        "slice_index": h.slice_index,
                        "distance": h.distance,
                        "distance_normal": h.distance_normal,
                        "distance_abnormal": h.distance_abnormal,
                    }
                    for h in hits
                ],
            },
        )
        print(f"wrote {args.json}")
    if args.montage is not None:
        if volume is None:
            volume = load_case(CaseFiles.from_database(db, query.case_id))
        title = (
            f"{query.case_id}:{query.slice_index} - {args.mode}, {args.distance}, {unit} top {args.top}"
            f"{composite}"
        )
        extra = None
        if abnormal_from is not None:
            extra = (
                load_case(CaseFiles.from_database(db, abnormal_from.case_id)),
                abnormal_from.slice_index,
            )
        render_retrieval_montage(
            db,
            volume,
            query.slice_index,
            hits,
            args.montage,
            title=title,
            show_anat=args.mode == "normal",
            abnormal_from=extra,
        )
        print(f"wrote {args.montage}")
    if args.explain is not None:
        if volume is None:
            volume = load_case(CaseFiles.from_database(db, query.case_id))
        _explain(args, bundle, db, volume, query.slice_index, hits)
    return 0


def _explain(args: argparse.Namespace, bundle: Any, db: Any, volume: Any, k: int, hits: list[Any]) -> None:
    """``--explain``: RELAX maps of the query (and against one result) for the FDN and any baselines."""
    import torch

    from fdn_core.baselines.methods import load_embedding_methods
    from fdn_core.data.preprocess import volume_to_slices
    from fdn_core.data.readers import CaseFiles, load_case
    from fdn_core.errors import ConfigError
    from fdn_core.explain import RelaxConfig, Representation, baseline_representation, fdn_representation
    from fdn_core.report.explain_figure import explain_query_and_hit

    if args.explain_masks < 2 or args.explain_rank < 1:
        raise ConfigError("--explain-masks must be >= 2 and --explain-rank >= 1")
    codes = {"normal": ("normal",), "abnormal": ("abnormal",)}.get(args.mode, ("normal", "abnormal"))
    fdn = fdn_representation(bundle)

    def fdn_codes(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {c: v for c, v in fdn(x).items() if c in codes}

    methods: dict[str, Representation] = {"FDN": fdn_codes}
    for m in load_embedding_methods(args.explain_with, device=args.device):
        methods[m.bundle.name] = baseline_representation(m.bundle)
    stack = volume_to_slices(volume, bundle.preprocess)
    query = (stack.images[k], None if stack.seg is None else stack.seg[k])
    hit_slice = None
    if len(hits) >= args.explain_rank:
        h = hits[args.explain_rank - 1]
        h_stack = volume_to_slices(load_case(CaseFiles.from_database(db, h.case_id)), bundle.preprocess)
        hit_slice = (
            h_stack.images[h.slice_index],
            None if h_stack.seg is None else h_stack.seg[h.slice_index],
        )
        against = f"; against result {h.rank} ({h.case_id}:{h.slice_index})"
    else:
        against = ""
    info = explain_query_and_hit(
        methods,
        query,
        dict.fromkeys(methods, hit_slice),
        RelaxConfig(num_masks=args.explain_masks),
        args.explain,
        title=f"RELAX, {args.explain_masks} masks: query {volume.case_id}:{k}, mode {args.mode}{against}",
        device=bundle.device,
    )
    for row, entry in info["rows"].items():
        share = entry.get("share_in_tumour")
        extra = "" if share is None else f", {share:.2f} of its positive mass on the tumour"
        print(f"explained {row} in {entry['seconds']:.1f} s{extra}")
    if "chance_tumour_share_of_brain" in info:
        print(
            f"(the tumour covers {info['chance_tumour_share_of_brain']:.2f} of the slice's brain: "
            "chance level)"
        )
    print(f"wrote {args.explain}")
