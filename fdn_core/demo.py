"""``fdn demo``: the whole product on a fresh phantom cohort with the shipped model, ending in an HTML report.

Steps: (1) generate a phantom cohort (a seed the shipped model never saw), (2) load the shipped model bundle,
(3) index the reference cases, (4) run the paper's retrieval evaluation on held-out query cases for all
similarities and distances beside the trained baselines (the shipped SimSiam and Y-Net bundles), the trivial
baselines (random, level prior, pooled pixels) and the oracle, with the FDN's margin over the best baseline
per similarity, (5) write ``index.html`` with the Table-2-style results, query-and-top-5 montages (S_normal,
S_abnormal, S_sum, a composite query), reconstructions, the binarisation figures and RELAX explanations
(which pixels drive each method's representation; mass shares inside / outside the tumour).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fdn_core.errors import DataError
from fdn_core.fileio import atomic_path, atomic_write_json
from fdn_core.progress import Progress
from fdn_core.resources import shipped_model_dir

__all__ = ["DEFAULT_MODEL_DIR", "DemoSettings", "run_demo"]

log = logging.getLogger(__name__)

#: The shipped demo model (an inference bundle), installed with the package.
DEFAULT_MODEL_DIR = shipped_model_dir("demo")

#: Result columns of fdn_core.evaluation.retrieval_eval (keys) -> (title, search mode).
_COLUMNS = {
    "S_normal": ("S_normal (anatomy Dice)", "normal"),
    "S_abnormal": ("S_abnormal (tumour Dice)", "abnormal"),
    "S_sum": ("S_sum (mean of both)", "sum"),
    "S_sum_normalized": ("S_sum normalised (mean of both)", "sum_normalized"),
}


@dataclass(frozen=True)
class DemoSettings:
    """What the demo runs on. ``query_fraction`` of the tumour cases become held-out queries."""

    out: Path
    cases: int = 48
    seed: int = 2026
    shape: tuple[int, int, int] = (240, 240, 155)
    query_fraction: float = 0.25
    model: Path = DEFAULT_MODEL_DIR
    device: str = "auto"
    workers: int | None = None
    top: int = 10
    montage_top: int = 5
    #: FDN distances to evaluate; None: the paper's three and the learned one when the model has it.
    distances: tuple[str, ...] | None = None
    #: Trained baselines ranked beside the FDN: shipped names or bundle folders; None = the shipped ones.
    embeddings: tuple[str, ...] | None = None
    #: RELAX explanations: queries whose maps give the mass shares, and masks per map (0 queries: none).
    explain_queries: int = 3
    explain_masks: int = 500

    def __post_init__(self) -> None:
        if self.cases < 8:
            raise DataError(f"demo needs at least 8 cases for a held-out split, got {self.cases}")
        if not 0.05 <= self.query_fraction <= 0.5:
            raise DataError(f"query_fraction {self.query_fraction} must be between 0.05 and 0.5")


@dataclass
class _Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        result = fn()
        self.seconds[name] = time.perf_counter() - t0
        print(f"   done in {self.seconds[name]:.1f} s", flush=True)
        return result


def _cohort(settings: DemoSettings, progress: Progress | None) -> tuple[Path, dict[str, Any]]:
    """Generate (or reuse, when an identical one is already there) the demo cohort."""
    from fdn_core.data.phantom import GENERATOR_VERSION, generate_cohort

    cohort_dir = settings.out / "cohort"
    meta_path = cohort_dir / "cohort.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        same = (
            meta.get("generator_version") == GENERATOR_VERSION
            and meta.get("seed") == settings.seed
            and len(meta.get("cases", [])) == settings.cases
            and list(meta.get("shape", [])) == list(settings.shape)
        )
        if same:
            print(f"   reusing the cohort in {cohort_dir}")
            return cohort_dir, meta
    meta = generate_cohort(
        cohort_dir,
        n_cases=settings.cases,
        seed=settings.seed,
        shape=settings.shape,
        workers=settings.workers,
        progress=progress,
        overwrite=True,
    )
    return cohort_dir, meta


def split_cases(meta: dict[str, Any], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(references, queries): a seeded case-wise split; queries are tumour cases only."""
    cases = meta["cases"]
    order = np.random.default_rng(seed).permutation(len(cases))
    tumour = [cases[i]["case_id"] for i in order if not cases[i]["healthy"]]
    n_queries = max(2, round(fraction * len(cases)))
    queries = sorted(tumour[:n_queries])
    references = sorted(c["case_id"] for c in cases if c["case_id"] not in set(queries))
    return references, queries


def _fmt(mean: float | None, std: float | None = None) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


_FDN_NAMES = {
    "euclidean": "D_E (Euclidean)",
    "angular": "D_A (angular)",
    "hamming": "D_H (Hamming)",
    "learned": "D_L (learned embedding)",
}


def _results_tables(result: Any) -> tuple[Any, Any]:
    """The Dice table and the ratio table, one row per method: FDN distances, trivial baselines, oracle."""
    from fdn_core.evaluation.retrieval_eval import ordered_methods
    from fdn_core.report.html import Table

    summary = result.summary()
    top = result.top
    methods = ordered_methods(result, summary)
    cols = [c for c in _COLUMNS if c in summary[methods[0]]]
    dice_rows, ratio_rows = [], []
    for m in methods:
        s, info = summary[m], result.info(m)
        name = _FDN_NAMES.get(m, info.label) + (f" [{info.draws} draws]" if info.draws > 1 else "")
        dice_rows.append([name, *(_fmt(s[c]["mean_dice"], s[c]["std_dice"]) for c in cols)])
        if m != "oracle":
            ratios = []
            for c in cols:
                cell = _fmt(s[c]["ratio_to_oracle"])
                if s[c].get("ratio_draw_std") is not None:
                    cell += f" ± {s[c]['ratio_draw_std']:.3f}"
                ratios.append(cell)
            maps = [_fmt(s[c][f"mAP@{top}"]) for c in ("S_normal", "S_abnormal") if c in cols]
            ratio_rows.append([name, *ratios, *maps])
    dice = Table(
        ["Method", *(_COLUMNS[c][0] for c in cols)],
        dice_rows,
        caption=f"Mean ± std over queries of the Dice between the query and its top-{top} volume-wise hits; "
        "FDN distances, trivial baselines (random ones: mean over seeded draws) and the oracle on the same "
        "queries and references",
    )
    ratio = Table(
        ["Method", *(f"{c}: ratio to oracle" for c in cols), f"mAP@{top} (normal)", f"mAP@{top} (abnormal)"],
        ratio_rows,
        caption="Ratio of each method's mean Dice to the oracle's (random baselines: ± std over draws); "
        "mAP@k with has-tumour as relevance",
    )
    return dice, ratio


def _best_distance(summary: dict[str, Any], column: str) -> str:
    """The FDN distance with the highest mean Dice for ``column`` (baselines and the oracle never count)."""
    candidates = [(summary[d][column]["mean_dice"] or 0.0, d) for d in summary if d in _FDN_NAMES]
    return max(candidates)[1]


def _reconstruction_figure(bundle: Any, cases: list[Any], slices: list[int], png: Path) -> Path:
    """Input / full reconstruction / normal-appearing reconstruction / true and predicted labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    from fdn_core.data.preprocess import volume_to_slices
    from fdn_core.labels import MIN_LESION_ML
    from fdn_core.model.lesions import remove_small_lesions
    from fdn_core.report.montage import display_orientation

    cmap = ListedColormap([(0, 0, 0, 0), (0.9, 0.1, 0.1, 0.7), (0.1, 0.8, 0.2, 0.55), (1.0, 0.85, 0.0, 0.8)])
    titles = [
        "FLAIR input",
        "FLAIR full recon.",
        "FLAIR normal-appearing",
        "T1ce input",
        "T1ce normal-appearing",
        "true labels",
        f"predicted (>= {MIN_LESION_ML:g} mL)",
    ]
    fig = Figure(figsize=(2.0 * len(titles), 2.15 * len(cases)), dpi=90)
    FigureCanvasAgg(fig)
    for row, (case, k) in enumerate(zip(cases, slices)):
        stack = volume_to_slices(case, bundle.preprocess)
        x = stack.images[k : k + 1]
        full, normal, _ = bundle.reconstruct(x)
        assert stack.voxel_ml is not None
        # the segmentation as the interfaces show it: the size rule needs the whole volume's prediction
        seg_pred, _ = remove_small_lesions(bundle.encode_slices(stack.images).seg, stack.voxel_ml)
        flair, t1ce = 3, 1
        lo, hi = np.percentile(x[0, flair][x[0, flair] != 0], [1, 99]) if np.any(x[0, flair]) else (0, 1)
        panels = [
            (x[0, flair], None),
            (full[0, flair], None),
            (normal[0, flair], None),
            (x[0, t1ce], None),
            (normal[0, t1ce], None),
            (x[0, flair], stack.seg[k] if stack.seg is not None else None),
            (x[0, flair], seg_pred[k]),
        ]
        for col, (img, lab) in enumerate(panels):
            ax = fig.add_subplot(len(cases), len(titles), row * len(titles) + col + 1)
            ax.imshow(display_orientation(img), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            if lab is not None:
                ax.imshow(display_orientation(lab), cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[col], fontsize=8)
            if col == 0:
                ax.set_ylabel(f"{case.case_id}\nslice {k}", fontsize=7)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    return png


def _binarization_figure(reports: dict[str, Any], png: Path) -> Path:
    """Jaccard concordance of top-1/5/10 neighbours (Hamming, shortened vs Euclidean) per codebook."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ks = [1, 5, 10]
    width = 0.2
    paper = {"normal": [0.81, 0.89, 0.90], "abnormal": [0.81, 0.88, 0.90]}
    for i, (name, rep) in enumerate(reports.items()):
        vals = [rep.concordance.get(k, float("nan")) for k in ks]
        ax.bar(np.arange(3) + (i - 1.5) * width, vals, width, label=f"{name} (ours)")
        ax.bar(np.arange(3) + (i + 0.5) * width, paper[name], width, label=f"{name} (paper)", alpha=0.45)
    ax.set_xticks(np.arange(3), [f"top-{k}" for k in ks])
    ax.set_ylim(0, 1)
    ax.set_ylabel("Jaccard concordance")
    ax.legend(fontsize=7, ncols=2, loc="lower right")
    ax.set_title("Neighbour concordance: shortened binary codes vs Euclidean", fontsize=9)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    return png


def _read_csv(path: Path) -> list[dict[str, str]]:
    import csv

    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _training_curve(model_dir: Path, png: Path) -> Path | None:
    """Plot the shipped model's training record (``train_log.csv``, ``val_log.csv`` beside the bundle)."""
    curves = {
        "train total": (_read_csv(model_dir / "train_log.csv"), "total"),
        "validation loss": (_read_csv(model_dir / "val_log.csv"), "val_loss"),
        "validation Dice": (_read_csv(model_dir / "val_log.csv"), "val_dice"),
    }
    if not any(rows for rows, _ in curves.values()):
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 3.0), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss = fig.add_subplot(1, 2, 1)
    ax_dice = fig.add_subplot(1, 2, 2)
    for label, (rows, key) in curves.items():
        pts = [(float(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "", "nan", "inf")]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax = ax_dice if "Dice" in label else ax_loss
        ax.plot(xs, ys, label=label, marker="o" if "validation" in label else None, ms=3)
    ax_loss.set_yscale("log")
    for ax, title in ((ax_loss, "losses"), (ax_dice, "validation Dice (pooled)")):
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    return png


def _load_baselines(settings: DemoSettings) -> list[Any]:
    """The trained baselines of the demo (shipped SimSiam and Y-Net when present, or the given ones)."""
    from fdn_core.baselines.bundle import load_baseline
    from fdn_core.baselines.methods import SHIPPED_BASELINES, resolve_baseline_path
    from fdn_core.resources import shipped_model_dir

    if settings.embeddings is None:
        specs = [n for n in SHIPPED_BASELINES if (shipped_model_dir(n) / "baseline.json").is_file()]
    else:
        specs = list(settings.embeddings)
    return [load_baseline(resolve_baseline_path(s), device=settings.device) for s in specs]


def _explain_section(explained: dict[str, Any], settings: DemoSettings) -> Any:
    """The report's explanation section: the figure and the mass-share table."""
    from fdn_core.report.html import Image, Section, Table

    items: list[Any] = [
        "RELAX (Wickstrøm et al.; fdn_core/explain.py): random smooth masks occlude the query slice; a "
        "pixel's importance is the mean cosine similarity between the masked and the unmasked representation "
        "over the masks that keep it, shown centred (red: keeping it raises the similarity). The FDN has one "
        "map per code (its continuous latents z_e); the baselines one map for their retrieval vector. "
        "'Against' compares the masked query with the method's first retrieved slice instead.",
    ]
    if explained.get("png"):
        items.append(Image(Path(explained["png"]).name, "Query, RELAX maps, retrieved slice, pair maps"))
    shares = explained.get("shares")
    if shares:
        rows = []
        for method, codes in shares["summary"].items():
            for code, stats in codes.items():
                rows.append(
                    [
                        f"{method} / {code}",
                        _fmt(stats["share_in_tumour"]["mean"], stats["share_in_tumour"]["std"]),
                        _fmt(stats["share_outside_tumour"]["mean"], stats["share_outside_tumour"]["std"]),
                        _fmt(stats["relevance_rank_tumour"]["mean"]),
                    ]
                )
        chance = shares["chance_tumour_share_of_brain"]
        items.append(
            Table(
                ["Map", "mass inside the tumour", "mass outside the tumour", "relevance rank (tumour)"],
                rows,
                caption=f"Over {shares['num_queries']} queries, {settings.explain_masks} masks; chance "
                f"level (the tumour's share of the brain area): {_fmt(chance['mean'], chance['std'])}. The "
                "abnormal map should sit on the tumour, the normal map outside it. Seconds per explanation: "
                + ", ".join(f"{k} {v:.1f}" for k, v in shares["seconds_per_explanation"].items()),
            )
        )
    return Section("Explanations (RELAX)", items)


def run_demo(settings: DemoSettings, progress_factory: Callable[[], Progress | None] = lambda: None) -> Path:
    """Run the demo end to end; returns the path of the report's ``index.html``."""
    from fdn_core.baselines.methods import BaselineEmbedding
    from fdn_core.codes.database import CodeDatabase
    from fdn_core.data.readers import find_cases, load_case
    from fdn_core.evaluation.retrieval_eval import evaluate_retrieval, margin_lines, write_retrieval_report
    from fdn_core.explain import RelaxConfig
    from fdn_core.model.bundle import load_bundle
    from fdn_core.report.explain_figure import explain_evaluation
    from fdn_core.report.html import Bullets, Image, Section, Table, write_html_report
    from fdn_core.report.montage import render_retrieval_montage
    from fdn_core.retrieval import Retriever, index_cohort, load_hamming_codes

    t_start = time.perf_counter()
    out = Path(settings.out)
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    timer = _Timer()

    cohort_dir, meta = timer.run(
        f"1/5 phantom cohort: {settings.cases} cases, seed {settings.seed}",
        lambda: _cohort(settings, progress_factory()),
    )
    bundle = timer.run(
        f"2/5 load model bundle {settings.model}", lambda: load_bundle(settings.model, settings.device)
    )
    print(f"   model {bundle.fingerprint[:12]} on {bundle.device}")
    baselines = _load_baselines(settings)
    if baselines:
        print(f"   baselines: {', '.join(f'{b.name} ({b.fingerprint[:12]})' for b in baselines)}")
    references, queries = split_cases(meta, settings.query_fraction, settings.seed)
    print(f"   {len(references)} reference cases, {len(queries)} held-out query cases")
    db_path = out / "db"
    db: CodeDatabase = timer.run(
        "3/5 index the reference cases",
        lambda: index_cohort(
            bundle, cohort_dir, db_path, cases=references, progress=progress_factory(), overwrite=True
        ),
    )
    result = timer.run(
        "4/5 retrieval evaluation (paper protocol, all similarities and distances, baselines, oracle)",
        lambda: evaluate_retrieval(
            bundle,
            db,
            cohort_dir,
            queries=queries,
            top=settings.top,
            distances=settings.distances,
            progress=progress_factory(),
            methods=[BaselineEmbedding(b) for b in baselines],
        ),
    )
    json_path, md_path = write_retrieval_report(result, report_dir)
    summary = result.summary()

    def figures() -> dict[str, Any]:
        retriever = Retriever(db, bundle, load_hamming_codes(db))
        files = {c.case_id: c for c in find_cases(cohort_dir)}
        q_infos = sorted(result.queries, key=lambda q: -q.tumour_pixels)
        qa, qb = q_infos[0], q_infos[1 % len(q_infos)]
        vol_a, vol_b = load_case(files[qa.case_id]), load_case(files[qb.case_id])
        slice_a = retriever.slice_from_case(vol_a, qa.slice_index)
        slice_b = retriever.slice_from_case(vol_b, qb.slice_index)

        def montage(name: str, mode: str, dist: str, title: str, composite: bool = False) -> str:
            """Search with slice A (+ slice B's abnormal codes if ``composite``); the montage's file name."""
            hits = retriever.search(
                slice_a,
                mode=mode,
                distance=dist,
                top=settings.montage_top,
                abnormal_from=slice_b if composite else None,
            )
            png = report_dir / f"montage_{name}.png"
            render_retrieval_montage(
                db,
                vol_a,
                qa.slice_index,
                hits,
                png,
                title=title,
                show_anat=mode == "normal",
                abnormal_from=(vol_b, qb.slice_index) if composite else None,
            )
            return png.name

        made: dict[str, Any] = {}
        for column in ("S_normal", "S_abnormal", "S_sum"):
            dist = _best_distance(summary, column)
            mode = _COLUMNS[column][1]
            title = f"{_COLUMNS[column][0]} with {dist}: query {qa.case_id} slice {qa.slice_index}"
            made[column] = (montage(mode, mode, dist, title), dist)
        dist = _best_distance(summary, "S_sum")
        title = (
            f"Composite: anatomy of {qa.case_id}:{qa.slice_index} + lesion of {qb.case_id}:{qb.slice_index}"
        )
        made["composite"] = (montage("composite", "sum", dist, title, composite=True), dist, qa, qb)
        recon_cases = [vol_a, vol_b]
        recon_slices = [qa.slice_index, qb.slice_index]
        if len(q_infos) > 2:
            qc = q_infos[2]
            recon_cases.append(load_case(files[qc.case_id]))
            recon_slices.append(qc.slice_index)
        made["recon"] = _reconstruction_figure(
            bundle, recon_cases, recon_slices, report_dir / "reconstructions.png"
        )
        hamming = load_hamming_codes(db)
        if hamming is not None:
            reports = {"normal": hamming[0].report, "abnormal": hamming[1].report}
            made["binarization"] = (reports, _binarization_figure(reports, report_dir / "binarization.png"))
        made["curve"] = _training_curve(Path(settings.model), report_dir / "training_curve.png")
        if settings.explain_queries > 0:
            made["explain"] = explain_evaluation(
                bundle,
                baselines,
                result,
                settings.explain_queries,
                RelaxConfig(num_masks=settings.explain_masks),
                report_dir / "explanation.png",
            )
        return made

    made = timer.run("5/5 report figures", figures)
    total = time.perf_counter() - t_start

    dice_table, ratio_table = _results_tables(result)
    overview = Section(
        "Overview",
        [
            "Every axial slice is encoded by the feature decomposing network into a normal-anatomy code "
            "and an abnormal-anatomy code (grids of codebook indices). The reference cases are indexed in a "
            "code "
            "database; each held-out query case is searched with the slice of its largest tumour.",
            Table(
                ["Setting", "Value"],
                [
                    [
                        "cohort",
                        f"{settings.cases} phantom cases, seed {settings.seed}, shape {settings.shape}",
                    ],
                    [
                        "split",
                        f"{len(references)} reference cases ({len(db)} slices), {len(queries)} query cases",
                    ],
                    [
                        "model",
                        f"{settings.model} (fingerprint {bundle.fingerprint[:16]}, device {bundle.device})",
                    ],
                    [
                        "grid / codebooks",
                        f"{bundle.grid_shape}, K = {bundle.config.num_codes}, "
                        f"D = {bundle.config.code_dim}, input {bundle.preprocess.image_size} px",
                    ],
                    *[[f"time: {k}", f"{v:.1f} s"] for k, v in timer.seconds.items()],
                    ["time: total", f"{total:.1f} s"],
                ],
            ),
        ],
    )
    results = Section(
        "Retrieval results (paper Table 2 protocol)",
        [
            f"Queries: the largest-tumour slice of each held-out case; references: every other volume; top-"
            f"{settings.top} volume-wise. Full per-query results: retrieval_eval.json / retrieval_eval.md.",
            dice_table,
            ratio_table,
            "FDN against the best trivial baseline, per similarity (ratios to the oracle):",
            Bullets(margin_lines(result)),
            "Paper (BraTS 2019, D_E / D_A / D_H / oracle): S_normal 0.50/0.47/0.48/0.62, "
            "S_abnormal 0.28/0.27/0.28/0.37, S_sum 0.20/0.30/0.23/0.42.",
        ],
    )
    montages = Section("Query and top-5 retrieved slices")
    for column in ("S_normal", "S_abnormal", "S_sum"):
        name, dist = made[column]
        montages.items.append(Image(name, f"{_COLUMNS[column][0]}, {dist} distance (query outlined first)"))
    name, dist, qa, qb = made["composite"]
    montages.items.append(
        Image(
            name,
            f"Composite query (S_sum, {dist}): normal code of {qa.case_id} slice {qa.slice_index} with "
            f"abnormal code of {qb.case_id} slice {qb.slice_index}",
        )
    )
    recon = Section(
        "Reconstructions",
        [
            Image(
                made["recon"].name,
                "Input, full reconstruction (from the normal code, conditioned on the predicted lesion) and "
                "normal-appearing reconstruction (the same normal code without the lesion), with true and "
                "predicted abnormal labels (red NCR/NET, green oedema, yellow enhancing).",
            )
        ],
    )
    sections = [overview, results, montages, recon]
    if "binarization" in made:
        reports, png = made["binarization"]
        rows = [
            [
                name,
                str(r.bits_before),
                str(r.bits_after),
                f"{100 * r.compression_ratio:.2f} %",
                f"{r.concordance.get(1, float('nan')):.2f} / {r.concordance.get(5, float('nan')):.2f} / "
                f"{r.concordance.get(10, float('nan')):.2f}",
                f"{r.compactness:.2f}",
                f"{r.runtime_s:.1f} s",
            ]
            for name, r in reports.items()
        ]
        sections.append(
            Section(
                "Binary hashing (hyperplane bits shortened by Algorithm A.1)",
                [
                    Table(
                        [
                            "Codebook",
                            "bits before",
                            "bits after",
                            "E*/E",
                            "concordance top-1/5/10",
                            "compactness",
                            "fit time",
                        ],
                        rows,
                        caption="Paper: 130,816 -> 789 (0.60 %) normal, 292 (0.22 %) abnormal; "
                        "concordance 0.81/0.89/0.90 and 0.81/0.88/0.90",
                    ),
                    Image(png.name, "Jaccard concordance of top-k neighbours, ours beside the paper's"),
                ],
            )
        )
    if made.get("explain") is not None:
        sections.append(_explain_section(made["explain"], settings))
    if made["curve"] is not None:
        sections.append(Section("Shipped model", [Image(made["curve"].name, "Training curve")]))
    index = write_html_report(report_dir / "index.html", "FDN retrieval demo report", sections)
    atomic_write_json(
        report_dir / "demo_summary.json",
        {
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in settings.__dict__.items()},
            "seconds": timer.seconds,
            "total_seconds": total,
            "references": references,
            "queries": queries,
            "summary": summary,
            "margins": result.margins(),
            "explanations": (made.get("explain") or {}).get("shares"),
            "retrieval_json": json_path.name,
            "retrieval_md": md_path.name,
        },
    )
    print(f"\nRetrieval table ({md_path}):")
    print(md_path.read_text())
    print(f"Demo finished in {total:.0f} s. Report: {index}")
    return index
