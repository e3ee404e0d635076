"""The joint comparison of every retrieval method over several evaluations (e.g. the two unseen phantom
cohorts): one markdown table and one figure per similarity.

Cells and bars are each method's ratio of mean Dice to the oracle's (1.0 = the technical upper bound), one
value per evaluation; the FDN appears once per distance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fdn_core.errors import DataError
from fdn_core.fileio import atomic_path

__all__ = ["JOINT_COLUMNS", "draw_similarity_figures", "joint_table_markdown", "verdict_lines"]

#: Similarities of the joint table and figures.
JOINT_COLUMNS: tuple[str, ...] = ("S_normal", "S_abnormal", "S_sum")


def _ratio(summary: Mapping[str, Any], method: str, col: str) -> float | None:
    cell = summary.get(method, {}).get(col)
    return None if cell is None else cell.get("ratio_to_oracle")


def joint_table_markdown(
    summaries: Mapping[str, Mapping[str, Any]], methods: Sequence[str], labels: Mapping[str, str]
) -> list[str]:
    """Rows: methods; columns: similarities; cells: ratio to the oracle in each evaluation, "a / b"."""
    names = list(summaries)
    lines = [
        "| Method | " + " | ".join(JOINT_COLUMNS) + " |",
        "|---|" + "---|" * len(JOINT_COLUMNS),
    ]
    for m in methods:
        cells = []
        for col in JOINT_COLUMNS:
            vals = [_ratio(summaries[n], m, col) for n in names]
            cells.append(" / ".join("n/a" if v is None else f"{v:.2f}" for v in vals))
        lines.append(f"| {labels.get(m, m)} | " + " | ".join(cells) + " |")
    return lines


def verdict_lines(
    summaries: Mapping[str, Mapping[str, Any]],
    fdn: Sequence[str],
    others: Sequence[str],
    labels: Mapping[str, str],
) -> list[str]:
    """Per similarity and evaluation, plainly: does the best FDN distance beat every other method, and which
    method is best otherwise (by ratio to the oracle)."""
    lines = []
    for col in JOINT_COLUMNS:
        parts = []
        for name, summary in summaries.items():
            f = [(r, m) for m in fdn if (r := _ratio(summary, m, col)) is not None]
            o = [(r, m) for m in others if (r := _ratio(summary, m, col)) is not None]
            if not f or not o:
                continue
            # ties go to the method listed first (a distance before its axial-context variant)
            bf = max(f, key=lambda t: (t[0], -list(fdn).index(t[1])))
            bo = max(o, key=lambda t: (t[0], -list(others).index(t[1])))
            verdict = "FDN wins" if bf[0] > bo[0] else "FDN does NOT win"
            parts.append(
                f"{name}: {verdict} ({labels.get(bf[1], bf[1])} {bf[0]:.2f} vs best other "
                f"{labels.get(bo[1], bo[1])} {bo[0]:.2f}, {bf[0] - bo[0]:+.2f})"
            )
        if parts:
            lines.append(f"{col}: " + "; ".join(parts))
    return lines


def draw_similarity_figures(
    summaries: Mapping[str, Mapping[str, Any]],
    methods: Sequence[str],
    labels: Mapping[str, str],
    out_dir: str | Path,
    prefix: str = "joint",
) -> list[Path]:
    """One PNG per similarity (``<prefix>_<similarity>.png``): horizontal bars of each method's ratio to the
    oracle, one bar per evaluation. Returns the written paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not methods or not summaries:
        raise DataError("draw_similarity_figures: no methods or evaluations to draw")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(summaries)
    paths = []
    height = 0.8 / max(len(names), 1)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for col in JOINT_COLUMNS:
        fig = Figure(figsize=(6.5, 0.45 * len(methods) + 1.2))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for i, name in enumerate(names):
            vals = [_ratio(summaries[name], m, col) or 0.0 for m in methods]
            ys = [j + i * height for j in range(len(methods))]
            ax.barh(ys, vals, height=height, color=colors[i % len(colors)], label=name)
            for y, v in zip(ys, vals):
                ax.text(v + 0.01, y, f"{v:.2f}", va="center", fontsize=6)
        ax.set_yticks([j + height * (len(names) - 1) / 2 for j in range(len(methods))])
        ax.set_yticklabels([labels.get(m, m) for m in methods], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.1)
        ax.axvline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xlabel("mean Dice / oracle's mean Dice", fontsize=8)
        ax.set_title(f"{col}: ratio to the oracle", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = out_dir / f"{prefix}_{col}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        paths.append(path)
    return paths
