"""PNG montages of a query slice and its retrieved slices, with label overlays (``fdn query``, demo report).

Slices are shown in the radiological convention: anterior at the top, the subject's right on the viewer's
left (arrays follow docs/ARCHITECTURE.md: axis 0 left->right, axis 1 posterior->anterior).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fdn_core.errors import DataError
from fdn_core.fileio import atomic_path
from fdn_core.labels import ABNORMAL_COLORS, ABNORMAL_NAMES, ANATOMY_COLORS, ANATOMY_NAMES, MODALITIES

if TYPE_CHECKING:
    from fdn_core.codes.database import CodeDatabase
    from fdn_core.codes.search import Hit
    from fdn_core.data.readers import CaseVolume

__all__ = [
    "MontagePanel",
    "case_panel",
    "display_orientation",
    "draw_cohort_montage",
    "render_montage",
    "render_retrieval_montage",
]


@dataclass
class MontagePanel:
    """One tile: a 2D slice ``(X, Y)`` (one channel), optional label slices of the same shape, a caption."""

    image: np.ndarray
    title: str = ""
    seg: np.ndarray | None = None
    anat: np.ndarray | None = None
    highlight: bool = False


def display_orientation(slice2d: np.ndarray) -> np.ndarray:
    """``(X, Y)`` array in canonical RAS+ -> ``(rows, cols)`` for display (anterior up, right on the left)."""
    return np.ascontiguousarray(np.asarray(slice2d)[::-1, ::-1].T)


def _window(image: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] using the 1st-99th percentile of the non-zero voxels (robust to hot spots)."""
    img = np.asarray(image, dtype=np.float32)
    fg = img[img != 0]
    if fg.size == 0:
        return np.zeros_like(img)
    lo, hi = np.percentile(fg, [1.0, 99.0])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0)


def _overlay(
    rgb: np.ndarray, labels: np.ndarray, colors: dict[int, tuple[float, float, float]], alpha: float
) -> np.ndarray:
    out = rgb.copy()
    for value, color in colors.items():
        mask = labels == value
        if mask.any():
            out[mask] = (1.0 - alpha) * out[mask] + alpha * np.asarray(color, dtype=np.float32)
    return out


def _panel_rgb(panel: MontagePanel, show_anat: bool) -> np.ndarray:
    image = np.asarray(panel.image)
    if image.ndim != 2:
        raise DataError(f"montage panel {panel.title!r}: expected a 2D slice, got shape {image.shape}")
    gray = display_orientation(_window(image))
    rgb = np.repeat(gray[..., None], 3, axis=2)
    for labels, colors, alpha, enabled in (
        (panel.anat, ANATOMY_COLORS, 0.30, show_anat),
        (panel.seg, ABNORMAL_COLORS, 0.55, True),
    ):
        if labels is None or not enabled:
            continue
        labels = np.asarray(labels)
        if labels.shape != image.shape:
            raise DataError(
                f"montage panel {panel.title!r}: label shape {labels.shape} differs from image shape "
                f"{image.shape}"
            )
        rgb = _overlay(rgb, display_orientation(labels), colors, alpha)
    return np.clip(rgb, 0.0, 1.0)


def render_montage(
    panels: Sequence[MontagePanel],
    png_path: str | Path,
    title: str | None = None,
    ncols: int | None = None,
    show_anat: bool = False,
    tile_inches: float = 2.2,
    dpi: int = 100,
) -> Path:
    """Draw ``panels`` in a grid (first panel first, e.g. the query) and write a PNG atomically.

    Abnormal labels (``seg``) are always overlaid when given; anatomy labels (``anat``) when ``show_anat``.
    A legend names the overlaid classes. Returns the written path.
    """
    # Figure + Agg canvas directly (not pyplot): no global state, safe in threads and headless.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not panels:
        raise DataError(f"{png_path}: nothing to draw (no panels); give at least the query slice")
    n = len(panels)
    cols = max(1, min(ncols or min(n, 6), n))
    rows = (n + cols - 1) // cols
    legend_h = 0.45
    title_h = 0.4 if title else 0.0
    panel_title_h = 0.3  # the first row's panel titles (up to two lines) sit above its tiles
    height = rows * (tile_inches + 0.3) + legend_h + title_h + panel_title_h
    fig = Figure(figsize=(cols * tile_inches, height), dpi=dpi)
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title, fontsize=10)
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(_panel_rgb(panel, show_anat), interpolation="nearest")
        ax.set_title(panel.title, fontsize=7, color="tab:red" if panel.highlight else "black")
        ax.set_xticks([])
        ax.set_yticks([])
        if panel.highlight:
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:red")
                spine.set_linewidth(2.0)
    handles = [Patch(color=ABNORMAL_COLORS[c], label=ABNORMAL_NAMES[c]) for c in sorted(ABNORMAL_COLORS)]
    if show_anat:
        handles += [Patch(color=ANATOMY_COLORS[c], label=ANATOMY_NAMES[c]) for c in sorted(ANATOMY_COLORS)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=7, frameon=False)
    bottom = legend_h / fig.get_figheight()
    top = 1.0 - (title_h + panel_title_h) / fig.get_figheight()
    fig.subplots_adjust(left=0.01, right=0.99, bottom=bottom, top=top, wspace=0.05, hspace=0.25)
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    return png_path


def _channel_index(channel: str) -> int:
    if channel not in MODALITIES:
        raise DataError(f"unknown channel {channel!r}; choose one of {list(MODALITIES)}")
    return MODALITIES.index(channel)


def case_panel(
    case: CaseVolume, slice_index: int, title: str, channel: str = "flair", highlight: bool = False
) -> MontagePanel:
    """A panel of axial slice ``slice_index`` of a loaded volume (original resolution), with its labels."""
    z = case.image.shape[-1]
    if not 0 <= slice_index < z:
        raise DataError(f"case {case.case_id}: slice {slice_index} is outside 0..{z - 1}")
    return MontagePanel(
        image=case.image[_channel_index(channel), :, :, slice_index],
        title=title,
        seg=None if case.seg is None else case.seg[:, :, slice_index],
        anat=None if case.anat is None else case.anat[:, :, slice_index],
        highlight=highlight,
    )


def render_retrieval_montage(
    db: CodeDatabase,
    query_case: CaseVolume,
    query_slice: int,
    hits: Sequence[Hit],
    png_path: str | Path,
    title: str | None = None,
    show_anat: bool = False,
    channel: str = "flair",
    ncols: int | None = None,
    abnormal_from: tuple[CaseVolume, int] | None = None,
) -> Path:
    """Montage of the query slice (first, outlined) and each hit's slice, loaded from the database's sources.

    ``abnormal_from`` (volume, slice) of a composite query is shown, outlined too, after the query. A hit
    whose source files can no longer be read is drawn as an empty tile that says so (and logged).
    """
    import logging

    from fdn_core.data.readers import CaseFiles, load_case

    log = logging.getLogger(__name__)
    panels = [case_panel(query_case, query_slice, f"query {query_case.case_id}:{query_slice}", channel, True)]
    if abnormal_from is not None:
        vol, k = abnormal_from
        panels.append(case_panel(vol, k, f"abnormal codes from\n{vol.case_id}:{k}", channel, True))
    volumes: dict[str, CaseVolume | str] = {}
    for hit in hits:
        if hit.case_id not in volumes:
            try:
                volumes[hit.case_id] = load_case(CaseFiles.from_database(db, hit.case_id))
            except DataError as exc:
                log.warning("montage: cannot show case %s: %s", hit.case_id, exc)
                volumes[hit.case_id] = str(exc)
        entry = volumes[hit.case_id]
        caption = f"#{hit.rank} {hit.case_id}:{hit.slice_index}\nd={hit.distance:.4g}"
        if isinstance(entry, str):
            size = query_case.image.shape[1:3]
            panels.append(MontagePanel(np.zeros(size, np.float32), caption + "\n(files missing)"))
        else:
            panels.append(case_panel(entry, hit.slice_index, caption, channel))
    return render_montage(panels, png_path, title=title, ncols=ncols, show_anat=show_anat)


def draw_cohort_montage(
    cohort_dir: str | Path, png_path: str | Path, cases: Sequence[str] | None = None
) -> Path:
    """A PNG of a phantom cohort: one row per case (four sequences, tumour labels on FLAIR, anatomy on T1)
    through the largest tumour cross-section (healthy cases: the largest ventricle cross-section).

    ``cases`` are case ids; by default up to three cases with tumours and one healthy case.
    """
    from fdn_core.data.phantom import read_cohort_json
    from fdn_core.data.readers import find_cases, load_case

    cohort_dir = Path(cohort_dir)
    entries = {c["case_id"]: c for c in read_cohort_json(cohort_dir)["cases"]}
    if cases is None:
        chosen = [c for c, e in entries.items() if not e["healthy"]][:3]
        chosen += [c for c, e in entries.items() if e["healthy"]][:1]
    else:
        chosen = list(cases)
        unknown = [c for c in chosen if c not in entries]
        if unknown:
            raise DataError(
                f"{cohort_dir}: no case(s) {unknown} in cohort.json; known cases: {sorted(entries)[:5]}..."
            )
    if not chosen:
        raise DataError(f"{cohort_dir}: cohort.json lists no cases to draw")
    files = {f.case_id: f for f in find_cases(cohort_dir)}
    panels: list[MontagePanel] = []
    for case_id in chosen:
        if case_id not in files:
            raise DataError(
                f"{cohort_dir / case_id}: missing or incomplete; regenerate it with `fdn phantom`"
            )
        case = load_case(files[case_id])
        seg = case.seg if case.seg is not None else np.zeros(case.image.shape[1:], np.uint8)
        anat = case.anat if case.anat is not None else np.zeros_like(seg)
        area = (seg > 0).sum(axis=(0, 1)) if seg.any() else (anat >= 5).sum(axis=(0, 1))
        k = int(np.argmax(area))
        state = "healthy" if entries[case_id]["healthy"] else "tumour"
        for c, name in enumerate(MODALITIES):
            title = f"{case_id} ({state}, z={k})\n{name}" if c == 0 else name
            panels.append(MontagePanel(case.image[c, :, :, k], title))
        flair, t1 = MODALITIES.index("flair"), MODALITIES.index("t1")
        panels.append(MontagePanel(case.image[flair, :, :, k], "tumour on FLAIR", seg=seg[:, :, k]))
        panels.append(MontagePanel(case.image[t1, :, :, k], "anatomy on T1", anat=anat[:, :, k]))
    return render_montage(panels, png_path, ncols=len(MODALITIES) + 2, show_anat=True, tile_inches=1.9)
