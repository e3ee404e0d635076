"""Figures of RELAX explanations (``fdn_core.explain``): a query, a retrieved slice and what drives each
method's similarity (``fdn query --explain``, the demo report, the unseen-cohort benchmark).

Maps are drawn centred (importance minus the mean similarity over masks) with a diverging colour map over
the slice (red: keeping the pixel raises the similarity; blue: lowers it), within the brain; the tumour is
outlined in white. Orientation as in ``fdn_core.report.montage`` (radiological).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fdn_core.errors import DataError
from fdn_core.fileio import atomic_path
from fdn_core.report.montage import display_orientation

if TYPE_CHECKING:
    from fdn_core.explain import RelaxConfig, RelaxMap, Representation

__all__ = ["ExplainPanel", "explain_evaluation", "explain_query_and_hit", "render_explanation_grid"]

#: The channel shown under the maps (FLAIR shows oedema best).
_SHOW_CHANNEL = 3


@dataclass
class ExplainPanel:
    """One tile: a model-grid slice (C, S, S) or (S, S), an optional centred map (S, S), an optional tumour
    outline (S, S) bool, a caption."""

    image: np.ndarray
    title: str = ""
    heat: np.ndarray | None = None
    outline: np.ndarray | None = None


def _gray(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:
        img = img[_SHOW_CHANNEL]
    fg = img[img != 0]
    if fg.size == 0:
        return np.zeros_like(img)
    lo, hi = np.percentile(fg, [1.0, 99.0])
    return np.clip((img - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def render_explanation_grid(
    rows: Sequence[Sequence[ExplainPanel]], png: str | Path, title: str = "", tile_inches: float = 2.0
) -> Path:
    """Draw rows of panels (maps over their slices) and write a PNG atomically; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows or not any(rows):
        raise DataError(f"{png}: no panels to draw")
    ncols = max(len(r) for r in rows)
    fig = Figure(figsize=(ncols * tile_inches, len(rows) * (tile_inches + 0.35) + (0.4 if title else 0.1)))
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title, fontsize=9)
    for i, row in enumerate(rows):
        for j, panel in enumerate(row):
            ax = fig.add_subplot(len(rows), ncols, i * ncols + j + 1)
            gray = display_orientation(_gray(panel.image))
            ax.imshow(gray, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if panel.heat is not None:
                heat = np.asarray(panel.heat, dtype=np.float64)
                img = np.asarray(panel.image)
                brain = (img != 0).any(axis=0) if img.ndim == 3 else img != 0
                scale = float(np.abs(heat[brain]).max()) if brain.any() else float(np.abs(heat).max())
                shown = np.ma.masked_where(~display_orientation(brain), display_orientation(heat))
                ax.imshow(shown, cmap="bwr", vmin=-scale, vmax=scale, alpha=0.6, interpolation="bilinear")
            if panel.outline is not None and np.asarray(panel.outline).any():
                ax.contour(display_orientation(np.asarray(panel.outline, dtype=float)), levels=[0.5],
                           colors="white", linewidths=0.8)  # fmt: skip
            ax.set_title(panel.title, fontsize=6.5)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.subplots_adjust(
        left=0.01, right=0.99, bottom=0.01, top=0.92 if title else 0.97, wspace=0.04, hspace=0.3
    )
    png = Path(png)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return png


def explain_query_and_hit(
    methods: Mapping[str, Representation],
    query: tuple[np.ndarray, np.ndarray | None],
    hits: Mapping[str, tuple[np.ndarray, np.ndarray | None] | None],
    config: RelaxConfig,
    png: str | Path,
    title: str = "",
    device: Any = None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """RELAX maps of a query slice (and of the query against a retrieved slice) for every method, drawn as one
    row per (method, map): query | its own map | the retrieved slice | the query's map against it.

    ``query`` and ``hits[method]`` (the slice that method's map is paired with; None or missing: no pair):
    (image (C,S,S), tumour labels (S,S) or None). Returns per row the maps' mass shares inside the tumour
    (when labels are given), the chance level and the seconds per explanation."""
    from fdn_core.explain import brain_mask, mass_share, relax, relevance_rank_accuracy

    q_img, q_seg = query
    brain = brain_mask(q_img)
    tumour = None if q_seg is None else (np.asarray(q_seg) > 0) & brain
    rows: list[list[ExplainPanel]] = []
    info: dict[str, Any] = {"rows": {}}
    if tumour is not None and brain.any():
        info["chance_tumour_share_of_brain"] = float(tumour.sum() / brain.sum())
    for name, represent in methods.items():
        own = relax(represent, q_img, config, device=device)
        pair: dict[str, RelaxMap] = {}
        hit = hits.get(name)
        if hit is not None:
            import torch

            with torch.inference_mode():
                ref = {
                    k: v[0]
                    for k, v in represent(torch.as_tensor(np.asarray(hit[0], np.float32))[None]).items()
                }
            pair = relax(represent, q_img, config, reference=ref, device=device)
        for code, rmap in own.items():
            label = (labels or {}).get(f"{name}/{code}", f"{name} / {code}")
            row = [
                ExplainPanel(q_img, f"query ({label})", outline=tumour),
                ExplainPanel(q_img, f"RELAX: {label}", heat=rmap.centred, outline=tumour),
            ]
            entry: dict[str, Any] = {"seconds": rmap.seconds}
            if tumour is not None and tumour.any():
                entry["share_in_tumour"] = mass_share(rmap.centred, tumour, brain)
                entry["relevance_rank_tumour"] = relevance_rank_accuracy(rmap.centred, tumour, brain)
            if hit is not None:
                h_img, h_seg = hit
                h_outline = None if h_seg is None else np.asarray(h_seg) > 0
                row.append(ExplainPanel(h_img, "retrieved slice", outline=h_outline))
                row.append(
                    ExplainPanel(
                        q_img, f"query vs retrieved: {label}", heat=pair[code].centred, outline=tumour
                    )
                )
                if tumour is not None and tumour.any():
                    entry["pair_share_in_tumour"] = mass_share(pair[code].centred, tumour, brain)
            rows.append(row)
            info["rows"][f"{name}/{code}"] = entry
    render_explanation_grid(rows, png, title)
    info["png"] = str(png)
    return info


def explain_evaluation(
    bundle: Any,
    baselines: Sequence[Any],
    result: Any,
    num_queries: int,
    config: RelaxConfig,
    png: str | Path | None = None,
) -> dict[str, Any]:
    """RELAX over a retrieval evaluation (``RetrievalEvaluation``): mass shares and relevance rank of the
    FDN's two maps and each baseline's map over the first ``num_queries`` protocol queries
    (``fdn_core.explain.explanation_shares``), and with ``png`` the figure of the first query, each method
    against its own first S_sum result (the FDN: its best distance for S_sum)."""
    from fdn_core.data.preprocess import volume_to_slices
    from fdn_core.data.readers import load_case
    from fdn_core.explain import baseline_representation, explanation_shares, fdn_representation

    def model_slice(case_id: str, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        stack = volume_to_slices(load_case(result.cases[case_id]), bundle.preprocess)
        return stack.images[k], None if stack.seg is None else stack.seg[k]

    methods: dict[str, Representation] = {"FDN": fdn_representation(bundle)}
    for b in baselines:
        methods[b.name] = baseline_representation(b)
    queries = result.queries[: max(num_queries, 0)]
    slices = [model_slice(q.case_id, q.slice_index) for q in queries]
    labelled = [(img, seg) for img, seg in slices if seg is not None]
    shares = explanation_shares(methods, labelled, config, device=bundle.device) if labelled else None
    out: dict[str, Any] = {"shares": shares, "png": None}
    if png is not None and result.queries:
        summary = result.summary()
        fdn = [m for m in summary if result.info(m).kind == "fdn" and "S_sum" in summary[m]]
        best = max(fdn, key=lambda m: summary[m]["S_sum"]["ratio_to_oracle"] or 0.0) if fdn else None
        keys = {"FDN": best, **{b.name: b.kind for b in baselines}}
        hits = {}
        for name, key in keys.items():
            if key is not None and key in result.retrieved and result.retrieved[key]["S_sum"][0]:
                hits[name] = model_slice(*result.retrieved[key]["S_sum"][0][0])
        q = result.queries[0]
        query = slices[0] if slices else model_slice(q.case_id, q.slice_index)
        info = explain_query_and_hit(
            methods,
            query,
            hits,
            config,
            png,
            title=f"RELAX ({config.num_masks} masks): query {q.case_id}:{q.slice_index}; each method alone "
            "and against its own first S_sum result",
            device=bundle.device,
        )
        out["png"] = str(png)
        out["figure"] = info
    return out
