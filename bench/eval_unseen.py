"""Retrieval quality on phantom cohorts the model never saw, beside trained and trivial baselines and the
oracle.

For each seed: generate a phantom cohort (``fdn_core.data.phantom.generate_cohort``), index every case with
the model (``fdn index build``), and run the leave-one-out retrieval evaluation (``fdn eval-retrieval
--leave-one-out``: every tumour volume queries all the other volumes) with the FDN distances, the trained
baselines (``--embeddings``, default the shipped SimSiam and Y-Net bundles: seeds 003 and 004), the trivial
baselines (random, level prior, pooled pixels; random ones over seeded draws) and the oracle. Prints one
table per cohort, the ranking metrics (mAP@k, P@k, mP@1..k) under the relevance that fits each similarity,
the FDN's margin over the best trivial baseline and whether it beats the trained baselines per similarity,
and the targets, each marked met / missed with its figures (ratios of mean Dice to the oracle's; "FDN" = the
best distance):

- S_normal: FDN >= 0.90, and >= level prior + 0.10
- S_abnormal: FDN >= 0.76, and >= 2 x the best trivial baseline
- S_sum: FDN >= 0.85

Unseen means unseen: the script refuses a seed equal to the training cohort's seed (bundle metadata
``train_cohort_seed``, else ``--training-seed``, else the known seed of the shipped demo model) and, when the
bundle records ``train_case_fingerprints``, any generated case whose image files are identical to a training
case's. When it can check neither, it says so loudly.

With ``--explain-queries N`` (default 10; 0 skips it) the first N queries of every cohort are explained with
RELAX (``fdn_core.explain``, ``--explain-masks`` masks): the share of the FDN's abnormal-code map mass inside
the tumour and of its normal-code map outside it, each baseline's map inside the tumour, the relevance rank,
beside the chance level (the tumour's share of the brain), and one explanation figure.

Writes, under ``--out``: ``cohort_<seed>/`` and ``db_<seed>/`` (reused when already complete and identical;
``--fresh`` rebuilds), ``eval_<seed>/retrieval_eval.{json,md}``, ``eval_unseen.{json,md}`` (all cohorts,
the joint table, margins, targets, explanation shares), ``joint_S_*.png`` (one figure per similarity) and
``explanation.png``. Exit status 0 when it ran (targets met or not; ``--strict``: 1 when any target
is missed), 2 on an error.

Run: ``python bench/eval_unseen.py --model fdn_core/resources/models/demo --cases 40 --seeds 9101 9102
--out runs/unseen --workers 2`` (on 2 CPU cores about 4 s per case to generate and 1.5 s per case to index).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fdn_core.data.provenance import TRAIN_COHORT_SEED_KEY, training_cohort_seeds

if TYPE_CHECKING:
    from fdn_core.evaluation.retrieval_eval import RetrievalEvaluation
    from fdn_core.model.bundle import InferenceBundle
    from fdn_core.progress import Progress

__all__ = ["KNOWN_TRAINING_SEEDS", "Target", "evaluate_targets", "main", "training_seeds"]

#: Training-cohort seeds of bundles that predate ``train_cohort_seed`` in their metadata, by model
#: fingerprint: the first shipped demo model (since replaced) was trained on ``fdn phantom --seed 1``.
KNOWN_TRAINING_SEEDS: dict[str, tuple[int, ...]] = {
    "f4f5559c76c3f39c24fb6ccd069a4ac4636afb6ff3c42210aa3d2934d3755c76": (1,),
}


@dataclass(frozen=True)
class Target:
    """One target: the similarity, what is required, the figure, the bar it must reach, and whether it did."""

    similarity: str
    requirement: str
    value: float | None
    threshold: float | None
    met: bool
    detail: str


def training_seeds(bundle: InferenceBundle, override: Sequence[int] | None) -> tuple[list[int], str]:
    """The training cohort's seed(s) and where they come from (empty list when unknown)."""
    recorded = training_cohort_seeds(bundle.metadata)
    if recorded:
        key = TRAIN_COHORT_SEED_KEY if TRAIN_COHORT_SEED_KEY in bundle.metadata else "cohort"
        return recorded, f"bundle metadata {key!r}"
    if override:
        return [int(s) for s in override], "--training-seed"
    known = KNOWN_TRAINING_SEEDS.get(bundle.fingerprint)
    if known:
        return list(known), "the first shipped demo model's README (fdn phantom --seed 1)"
    return [], "nowhere: the bundle records no training cohort seed"


def _ratio(summary: Mapping[str, Any], method: str, col: str) -> float | None:
    cell = summary.get(method, {}).get(col)
    return None if cell is None else cell.get("ratio_to_oracle")


def evaluate_targets(result: RetrievalEvaluation) -> list[Target]:
    """The script's targets on one evaluation (module docstring), from its summary and margins."""
    summary, margins = result.summary(), result.margins()
    targets: list[Target] = []

    def best(col: str) -> tuple[str, float | None]:
        m = margins.get(col)
        return ("n/a", None) if m is None else (result.info(m["best_fdn"]).label, m["best_fdn_ratio"])

    def add(col: str, requirement: str, value: float | None, threshold: float | None, detail: str) -> None:
        met = value is not None and threshold is not None and value >= threshold - 1e-12
        targets.append(Target(col, requirement, value, threshold, met, detail))

    name, fdn = best("S_normal")
    add("S_normal", "FDN >= 0.90", fdn, 0.90, f"best FDN {name}")
    level = _ratio(summary, "level_prior", "S_normal")
    add(
        "S_normal",
        "FDN >= level prior + 0.10",
        fdn,
        None if level is None else level + 0.10,
        f"best FDN {name}; level prior {'n/a' if level is None else f'{level:.3f}'}",
    )
    name, fdn = best("S_abnormal")
    add("S_abnormal", "FDN >= 0.76", fdn, 0.76, f"best FDN {name}")
    m = margins.get("S_abnormal")
    base = None if m is None else m["best_baseline_ratio"]
    base_name = "n/a" if m is None else result.info(m["best_baseline"]).label
    add(
        "S_abnormal",
        "FDN >= 2 x best trivial baseline",
        fdn,
        None if base is None else 2.0 * base,
        f"best FDN {name}; best baseline {base_name} {'n/a' if base is None else f'{base:.3f}'}",
    )
    name, fdn = best("S_sum")
    add("S_sum", "FDN >= 0.85", fdn, 0.85, f"best FDN {name}")
    return targets


def targets_markdown(targets: Sequence[Target]) -> list[str]:
    """The targets as a markdown table."""
    lines = ["| Similarity | Target | FDN ratio | Needed | Result | Details |", "|---|---|---|---|---|---|"]
    for t in targets:
        value = "n/a" if t.value is None else f"{t.value:.3f}"
        needed = "n/a" if t.threshold is None else f">= {t.threshold:.3f}"
        verdict = "**met**" if t.met else "**MISSED**"
        lines.append(f"| {t.similarity} | {t.requirement} | {value} | {needed} | {verdict} | {t.detail} |")
    return lines


def overview_markdown(per_seed: Mapping[int, Sequence[Target]]) -> list[str]:
    """Every target (rows) of every cohort (columns): FDN ratio, what it needed, met / MISSED."""
    seeds = list(per_seed)
    if not seeds:
        return []
    lines = [
        "| Similarity | Target | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    for i, t in enumerate(per_seed[seeds[0]]):
        cells = []
        for s in seeds:
            u = per_seed[s][i]
            value = "n/a" if u.value is None else f"{u.value:.3f}"
            needed = "n/a" if u.threshold is None else f"{u.threshold:.3f}"
            cells.append(f"{value} (needs {needed}) {'met' if u.met else 'MISSED'}")
        lines.append(f"| {t.similarity} | {t.requirement} | " + " | ".join(cells) + " |")
    met = sum(u.met for ts in per_seed.values() for u in ts)
    total = sum(len(ts) for ts in per_seed.values())
    return [*lines, "", f"{met} of {total} targets met."]


def cohort_markdown(seed: int, result: RetrievalEvaluation, targets: Sequence[Target]) -> str:
    """One cohort's table of every method, the margin lines and the targets."""
    from fdn_core.evaluation.retrieval_eval import margin_lines, method_table_rows

    cols, rows = method_table_rows(result)
    s = result.settings
    lines = [
        f"## Cohort seed {seed}: {s['num_reference_volumes']} volumes, {s['num_queries']} tumour queries "
        f"(leave-one-out), top-{result.top}",
        "",
        "Mean Dice ± std over queries (ratio to the oracle; random baselines: ± std over draws)",
        "",
        "| Method | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
        *(f"| {' | '.join(r)} |" for r in rows),
        "",
        *(f"- {line}" for line in margin_lines(result)),
        "",
        *targets_markdown(targets),
        "",
    ]
    return "\n".join(lines)


def _progress(no_progress: bool) -> Progress | None:
    from fdn_core.progress import tqdm_progress

    return None if no_progress else tqdm_progress()


def _cohort(out: Path, seed: int, args: argparse.Namespace) -> tuple[Path, bool]:
    """Generate the cohort of ``seed`` (or reuse an identical complete one); returns (folder, reused)."""
    from fdn_core.data.phantom import GENERATOR_VERSION, generate_cohort

    folder = out / f"cohort_{seed}"
    meta_path = folder / "cohort.json"
    if meta_path.is_file() and not args.fresh:
        meta = json.loads(meta_path.read_text())
        if (
            meta.get("seed") == seed
            and meta.get("generator_version") == GENERATOR_VERSION
            and len(meta.get("cases", [])) == args.cases
            and list(meta.get("shape", [])) == list(args.shape)
        ):
            print(f"   reusing {folder}", flush=True)
            return folder, True
    generate_cohort(
        folder,
        n_cases=args.cases,
        seed=seed,
        shape=tuple(args.shape),
        workers=args.workers,
        progress=_progress(args.no_progress),
        overwrite=True,
    )
    return folder, False


def _database(bundle: InferenceBundle, cohort: Path, out: Path, seed: int, reuse: bool, args: Any) -> Path:
    """Index the cohort (or reuse a complete database of it built with this model)."""
    from fdn_core.codes.database import CodeDatabase
    from fdn_core.data.readers import find_cases
    from fdn_core.errors import FDNError
    from fdn_core.retrieval import index_cohort

    db_path = out / f"db_{seed}"
    if reuse and (db_path / "manifest.json").is_file():
        try:
            db = CodeDatabase.open(db_path, expected_fingerprint=bundle.fingerprint)
            if sorted(db.cases) == sorted(c.case_id for c in find_cases(cohort)):
                print(f"   reusing {db_path}", flush=True)
                return db_path
        except FDNError as exc:
            print(f"   rebuilding {db_path} ({exc})", flush=True)
    index_cohort(
        bundle,
        cohort,
        db_path,
        progress=_progress(args.no_progress),
        overwrite=True,
        workers=args.workers or 2,
    )
    return db_path


def _check_fingerprints(bundle: Any, cohort: Path, seed: int | None) -> str:
    """Refuse a cohort holding a training case (by image fingerprint); say how the check was done."""
    from fdn_core.data.provenance import FINGERPRINTS_KEY, cases_of, training_overlap
    from fdn_core.errors import ConfigError

    if not bundle.metadata.get(FINGERPRINTS_KEY):
        return "no training-case fingerprints in the bundle: case content not compared"
    overlap = training_overlap(bundle.metadata, cases_of(cohort))
    if overlap:
        where = f"cohort seed {seed}" if seed is not None else str(cohort)
        raise ConfigError(
            f"{where}: {len(overlap)} case(s) have the same image files as training cases "
            f"({', '.join(overlap[:10])}); choose another seed"
        )
    return "no case's image files match a training case's (fingerprints compared)"


def _parser() -> argparse.ArgumentParser:
    from fdn_core.cli.args import add_device, add_model, positive_int

    parser = argparse.ArgumentParser(
        prog="eval_unseen.py",
        description="Leave-one-out retrieval on fresh phantom cohorts, with baselines and targets.",
    )
    add_model(parser)
    parser.add_argument("--cases", type=positive_int, default=40, help="cases per cohort")
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="phantom seeds, one cohort each")
    parser.add_argument("--out", type=Path, required=True, help="folder for cohorts, databases and reports")
    parser.add_argument(
        "--shape", type=positive_int, nargs=3, default=(240, 240, 155), help="phantom volume shape"
    )
    parser.add_argument("--workers", type=positive_int, default=None, help="phantom and loading workers")
    parser.add_argument("--top", type=positive_int, default=10, help="k of the volume-wise top-k")
    parser.add_argument("--draws", type=positive_int, default=10, help="draws of the random baselines")
    parser.add_argument(
        "--training-seed",
        type=int,
        nargs="+",
        default=None,
        help="seed(s) of the training cohort, for bundles that do not record it",
    )
    parser.add_argument(
        "--embeddings",
        nargs="*",
        default=None,
        metavar="NAME|FOLDER",
        help="trained baselines to rank beside the FDN (default: the shipped simsiam and ynet bundles; give "
        "none to skip them)",
    )
    parser.add_argument(
        "--explain-queries",
        type=int,
        default=10,
        help="queries per cohort explained with RELAX for the mass shares (0: none)",
    )
    parser.add_argument("--explain-masks", type=positive_int, default=1000, help="RELAX masks per map")
    parser.add_argument("--fresh", action="store_true", help="regenerate cohorts and databases")
    parser.add_argument("--strict", action="store_true", help="exit status 1 when any target is missed")
    add_device(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _baselines(args: argparse.Namespace) -> list[Any]:
    """The trained baselines' bundles (``--embeddings``; default: the shipped ones that are present)."""
    from fdn_core.baselines.bundle import load_baseline
    from fdn_core.baselines.methods import SHIPPED_BASELINES, resolve_baseline_path
    from fdn_core.resources import shipped_model_dir

    if args.embeddings is None:
        specs = [n for n in SHIPPED_BASELINES if (shipped_model_dir(n) / "baseline.json").is_file()]
    else:
        specs = list(args.embeddings)
    return [load_baseline(resolve_baseline_path(spec), device=args.device) for spec in specs]


def focused_relevance_markdown(result: RetrievalEvaluation) -> list[str]:
    """mAP@k / P@k / mP@1..k per method under the relevance that fits each similarity: S_normal - same level,
    S_abnormal - same lesion-class set, S_sum - both."""
    from fdn_core.evaluation.retrieval_eval import ordered_methods

    pairs = (("S_normal", "level"), ("S_abnormal", "lesion_classes"), ("S_sum", "classes_and_level"))
    summary = result.summary()
    k = result.top
    lines = [
        f"Ranking metrics, mAP@{k} / P@{k} / mP@1..{k} (mP@1..k: seed 003's 'MAP'); relevance: "
        "S_normal - same "
        "level, S_abnormal - same lesion-class set, S_sum - both",
        "",
        "| Method | S_normal [level] | S_abnormal [lesion_classes] | S_sum [classes_and_level] |",
        "|---|---|---|---|",
    ]
    for m in ordered_methods(result, summary):
        cells = []
        for col, rel in pairs:
            e = summary[m].get(col, {})
            vals = [e.get(f"mAP@{k}[{rel}]"), e.get(f"P@{k}[{rel}]"), e.get(f"mP@1..{k}[{rel}]")]
            cells.append(" / ".join("n/a" if v is None else f"{v:.3f}" for v in vals))
        lines.append(f"| {result.info(m).label} | " + " | ".join(cells) + " |")
    return lines


def explanation_markdown(shares_by_seed: Mapping[int, Mapping[str, Any]]) -> list[str]:
    """The mass shares of every cohort: FDN abnormal map inside the tumour, normal map outside it, baselines'
    maps inside, relevance rank, chance level."""
    lines = [
        "| Map | " + " | ".join(f"seed {s}" for s in shares_by_seed) + " |",
        "|---|" + "---|" * len(shares_by_seed),
    ]

    def cell(sh: Mapping[str, Any], method: str, code: str, key: str) -> str:
        v = sh["summary"].get(method, {}).get(code, {}).get(key, {})
        return "n/a" if v.get("mean") is None else f"{v['mean']:.2f} ± {v['std']:.2f}"

    rows = [("FDN", "abnormal", "share_in_tumour", "FDN abnormal-code map: mass inside the tumour")]
    rows.append(("FDN", "normal", "share_outside_tumour", "FDN normal-code map: mass outside the tumour"))
    rows.append(
        ("FDN", "abnormal", "relevance_rank_tumour", "FDN abnormal-code map: relevance rank (tumour)")
    )
    rows.append(("FDN", "normal", "share_in_tumour", "FDN normal-code map: mass inside the tumour"))
    methods = {m for sh in shares_by_seed.values() for m in sh["summary"]} - {"FDN"}
    for m in sorted(methods):
        rows.append((m, "embedding", "share_in_tumour", f"{m} map: mass inside the tumour"))
        rows.append((m, "embedding", "relevance_rank_tumour", f"{m} map: relevance rank (tumour)"))
    for method, code, key, title in rows:
        lines.append(
            f"| {title} | " + " | ".join(cell(sh, method, code, key) for sh in shares_by_seed.values()) + " |"
        )
    chance = []
    for sh in shares_by_seed.values():
        c = sh["chance_tumour_share_of_brain"]
        chance.append("n/a" if c["mean"] is None else f"{c['mean']:.2f} ± {c['std']:.2f}")
    lines.append("| chance: the tumour's share of the brain area | " + " | ".join(chance) + " |")
    secs = {
        m: round(t, 1) for sh in shares_by_seed.values() for m, t in sh["seconds_per_explanation"].items()
    }
    first = next(iter(shares_by_seed.values()))
    lines += [
        "",
        f"Queries per cohort: {', '.join(str(sh['num_queries']) for sh in shares_by_seed.values())}; RELAX "
        f"{first['relax']['num_masks']} masks ({first['relax']['grid']}x{first['relax']['grid']} cells, p = "
        f"{first['relax']['keep_prob']}); seconds per explanation (CPU, shared machine): {secs}. "
        "Mass = positive "
        "part of the centred importance, within the brain (fdn_core/explain.py).",
    ]
    return lines


def run(args: argparse.Namespace) -> int:
    """Evaluate every seed's cohort; returns the exit status."""
    from fdn_core.baselines.methods import BaselineEmbedding
    from fdn_core.errors import ConfigError
    from fdn_core.evaluation.retrieval_eval import evaluate_retrieval, ordered_methods, write_retrieval_report
    from fdn_core.explain import RelaxConfig
    from fdn_core.fileio import atomic_write_bytes, atomic_write_json
    from fdn_core.model.bundle import load_bundle
    from fdn_core.report.comparison import draw_similarity_figures, joint_table_markdown, verdict_lines
    from fdn_core.report.explain_figure import explain_evaluation

    seeds = list(dict.fromkeys(args.seeds))
    bundle = load_bundle(args.model, device=args.device)
    baselines = _baselines(args)
    train_seeds, source = training_seeds(bundle, args.training_seed)
    seen = [s for s in seeds if s in train_seeds]
    if seen:
        raise ConfigError(
            f"seed(s) {seen} are the training cohort's seed (from {source}): those cohorts are the training "
            "data, not unseen data; choose other seeds"
        )
    for b in baselines:
        recorded_seeds = training_cohort_seeds(b.metadata)
        if any(s in seeds for s in recorded_seeds):
            recorded = recorded_seeds[0]
            raise ConfigError(
                f"seed {recorded} is the training cohort of the {b.name} bundle {b.path}: not unseen data; "
                "choose other seeds"
            )
    if not train_seeds:
        print(
            "WARNING: the training cohort's seed is unknown (the bundle records no train_cohort_seed; pass "
            "--training-seed): these cohorts cannot be verified to be unseen",
            file=sys.stderr,
            flush=True,
        )
    else:
        print(f"training cohort seed(s) {train_seeds} (from {source}); evaluating seeds {seeds}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "model": str(args.model),
        "model_fingerprint": bundle.fingerprint,
        "training_seeds": train_seeds,
        "training_seed_source": source,
        "baselines": {
            b.kind: {
                "path": str(b.path),
                "fingerprint": b.fingerprint,
                "train_cohort_seed": (training_cohort_seeds(b.metadata) or [None])[0],
                "budget": b.metadata.get("budget"),
            }
            for b in baselines
        },
        "cases": args.cases,
        "shape": list(args.shape),
        "top": args.top,
        "draws": args.draws,
        "cohorts": {},
    }
    md = [
        "# Retrieval on unseen phantom cohorts (leave-one-out: FDN vs trained and trivial baselines vs "
        "oracle)",
        "",
        f"- model `{args.model}` ({bundle.fingerprint[:16]}), training cohort seed(s) "
        f"{train_seeds or 'unknown'} (from {source})",
        *(
            f"- {b.name}: `{b.path}` ({b.fingerprint[:16]}), trained on cohort seed "
            f"{(training_cohort_seeds(b.metadata) or ['unknown'])[0]}"
            for b in baselines
        ),
        f"- {args.cases} cases per cohort, shape {tuple(args.shape)}, volume-wise top-{args.top}, "
        f"random baselines over {args.draws} draws",
        "",
    ]
    all_met = True
    per_seed: dict[int, list[Target]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    labels: dict[str, str] = {}
    order: list[str] = []
    fdn_keys: list[str] = []
    trained_keys: list[str] = []
    shares_by_seed: dict[int, dict[str, Any]] = {}
    figure = ""
    for seed in seeds:
        t0 = time.perf_counter()
        print(f"== cohort seed {seed}: {args.cases} cases", flush=True)
        cohort, reused = _cohort(out, seed, args)
        t_cohort = time.perf_counter() - t0
        provenance = _check_fingerprints(bundle, cohort, seed)
        for b in baselines:
            _check_fingerprints(b, cohort, seed)
        print(f"   {provenance}", flush=True)
        t1 = time.perf_counter()
        print(f"== index cohort seed {seed}", flush=True)
        db_path = _database(bundle, cohort, out, seed, reused and not args.fresh, args)
        t_index = time.perf_counter() - t1
        t2 = time.perf_counter()
        print(f"== leave-one-out evaluation, seed {seed}", flush=True)
        result = evaluate_retrieval(
            bundle,
            db_path,
            cohort,
            top=args.top,
            progress=_progress(args.no_progress),
            leave_one_out=True,
            draws=args.draws,
            workers=args.workers or 2,
            methods=[BaselineEmbedding(b) for b in baselines],  # fresh per cohort: they keep embeddings
        )
        t_eval = time.perf_counter() - t2
        result.notes.append(f"cohort provenance: phantom seed {seed}; {provenance}")
        write_retrieval_report(result, out / f"eval_{seed}")
        targets = evaluate_targets(result)
        per_seed[seed] = targets
        all_met &= all(t.met for t in targets)
        summary = result.summary()
        summaries[f"seed {seed}"] = summary
        order = ordered_methods(result, summary)
        labels.update({m: result.info(m).label for m in order})
        fdn_keys = [m for m in order if result.info(m).kind == "fdn"]
        trained_keys = [m for m in order if result.info(m).kind == "embedding"]
        text = cohort_markdown(seed, result, targets)
        extra = ["", *focused_relevance_markdown(result), ""]
        if trained_keys:
            extra += [
                "FDN against the trained baselines (best FDN distance vs best of "
                f"{', '.join(labels[m] for m in trained_keys)}; ratios to the oracle):",
                "",
                *(
                    f"- {line}"
                    for line in verdict_lines({f"seed {seed}": summary}, fdn_keys, trained_keys, labels)
                ),
                "",
            ]
        text += "\n".join(extra)
        print("\n" + text, flush=True)
        t3 = time.perf_counter()
        shares = None
        if args.explain_queries > 0:
            print(f"== RELAX explanations, seed {seed}: {args.explain_queries} queries", flush=True)
            explained = explain_evaluation(
                bundle,
                baselines,
                result,
                args.explain_queries,
                RelaxConfig(num_masks=args.explain_masks),
                png=out / "explanation.png" if not shares_by_seed else None,
            )
            shares = explained["shares"]
            if shares is not None:
                shares_by_seed[seed] = shares
            if explained["png"] is not None:
                figure = f"{Path(explained['png']).name} (first query of seed {seed})"
        t_explain = time.perf_counter() - t3
        seconds = {"cohort": t_cohort, "index": t_index, "evaluation": t_eval, "explanations": t_explain}
        timing = (
            f"Time: cohort {t_cohort:.0f} s, indexing {t_index:.0f} s, evaluation {t_eval:.0f} s, "
            f"explanations {t_explain:.0f} s."
        )
        print(timing, flush=True)
        md += [text, timing, ""]
        report["cohorts"][str(seed)] = {
            "provenance": provenance,
            "seconds": seconds,
            "num_queries": len(result.queries),
            "summary": summary,
            "margins": result.margins(),
            "targets": [asdict(t) for t in targets],
            "notes": result.notes,
            "explanations": shares,
        }
    verdict = "all targets met" if all_met else "some targets MISSED"
    overview = ["## Targets of every cohort (ratios to the oracle; FDN = its best distance)", ""]
    overview += overview_markdown(per_seed)
    print("\n" + "\n".join(overview), flush=True)
    joint = [
        "## Joint table: ratio of mean Dice to the oracle's, " + " / ".join(summaries),
        "",
        *joint_table_markdown(summaries, order, labels),
        "",
    ]
    others = [m for m in order if m not in fdn_keys and m != "oracle"]
    if others:
        joint += [
            "Where the FDN wins and where it does not (best FDN distance vs the best other method, "
            "trained or "
            "trivial):",
            "",
            *(f"- {line}" for line in verdict_lines(summaries, fdn_keys, others, labels)),
            "",
        ]
    figures = draw_similarity_figures(summaries, order, labels, out)
    joint += [f"Figures: {', '.join(p.name for p in figures)}", ""]
    print("\n" + "\n".join(joint), flush=True)
    md += [*joint, *overview, "", f"**Overall: {verdict}.**", ""]
    if shares_by_seed:
        expl = [
            "## RELAX explanations: where the maps put their mass",
            "",
            *explanation_markdown(shares_by_seed),
        ]
        if figure:
            expl += ["", f"Figure: {figure}"]
        print("\n" + "\n".join(expl), flush=True)
        md += [*expl, ""]
    report["joint"] = {"columns": ["S_normal", "S_abnormal", "S_sum"], "methods": order, "labels": labels}
    atomic_write_json(out / "eval_unseen.json", report)
    atomic_write_bytes(out / "eval_unseen.md", "\n".join(md).encode("utf-8"))
    print(f"Overall: {verdict}. Wrote {out / 'eval_unseen.md'} and {out / 'eval_unseen.json'}", flush=True)
    return 1 if args.strict and not all_met else 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; errors print ``eval_unseen: error: ...`` and return 2."""
    from fdn_core.errors import FDNError

    args = _parser().parse_args(argv)
    try:
        return run(args)
    except FDNError as exc:
        print(f"eval_unseen: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
