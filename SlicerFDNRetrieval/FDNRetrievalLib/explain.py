"""The panel's "Explain" overlay: which pixels of the query slice drive its similarity to a selected result.

Two steps, as every long action of the panel:

- ``compute_explanation`` (worker thread; numpy/torch, no MRML): RELAX maps (``fdn_core.explain``) of the
  query slice's normal and/or abnormal code (as the search mode uses them) against the selected result's
  slice, mapped from the model grid back onto the study's canonical (X, Y) slice grid;
- ``add_explanation_overlay`` (main thread): one scalar volume per map on the T1ce node's grid, zero except
  the query slice, shown in the given views as a thresholded heat foreground (only the positive part: the
  pixels whose presence raises the similarity).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fdn_core.errors import DataError

if TYPE_CHECKING:
    from fdn_core.data.readers import CaseFiles
    from fdn_core.model.bundle import InferenceBundle
    from fdn_core.progress import Progress
    from FDNRetrievalLib.scene import StudyVolumes

__all__ = [
    "EXPLAIN_COLOR_NODE",
    "EXPLAIN_ROLE",
    "Explanation",
    "add_explanation_overlay",
    "codes_for_mode",
    "compute_explanation",
    "reference_slice",
]

#: Node role attribute value of explanation overlays (``scene.ROLE_ATTRIBUTE``).
EXPLAIN_ROLE = "explanation"
#: Colour of the overlay (Slicer's PET heat scale; present in every scene with default colour nodes).
EXPLAIN_COLOR_NODE = "vtkMRMLPETProceduralColorNodePET-Heat"


@dataclass
class Explanation:
    """RELAX maps of one query slice: ``maps`` code type -> centred importance on the canonical (X, Y) grid,
    ``query_slice`` its axial index, ``against`` the result (case, slice) or None, timing and mask count."""

    query_slice: int
    maps: dict[str, np.ndarray]
    against: tuple[str, int] | None
    seconds: float
    num_masks: int


def codes_for_mode(mode: str) -> tuple[str, ...]:
    """The code types a search mode compares ("both" / "sum*": both)."""
    if mode == "normal":
        return ("normal",)
    if mode == "abnormal":
        return ("abnormal",)
    return ("normal", "abnormal")


def reference_slice(bundle: InferenceBundle, files: CaseFiles, slice_index: int) -> np.ndarray:
    """Worker: a database case's axial slice as model input (C, S, S), preprocessed like the database."""
    from fdn_core.data.preprocess import volume_to_slices
    from fdn_core.data.readers import load_case

    stack = volume_to_slices(load_case(files), bundle.preprocess)
    if not 0 <= slice_index < stack.images.shape[0]:
        raise DataError(f"case {files.case_id} has no slice {slice_index}")
    return np.asarray(stack.images[slice_index])


def compute_explanation(
    bundle: InferenceBundle,
    study: StudyVolumes,
    query_slice: int,
    mode: str,
    against: tuple[str, int, np.ndarray] | None = None,
    num_masks: int = 1000,
    progress: Progress | None = None,
) -> Explanation:
    """Worker: RELAX maps of the study's ``query_slice`` for the codes of ``mode``, against ``against`` =
    (case id, slice, model-input slice (C, S, S)) or the query's own codes when None."""
    import torch

    from fdn_core.data.preprocess import volume_to_slices
    from fdn_core.data.readers import CaseFiles, CaseVolume
    from fdn_core.explain import RelaxConfig, fdn_representation, relax

    z = study.shape[2]
    if not 0 <= query_slice < z:
        raise DataError(f"query slice {query_slice} is outside the study (0..{z - 1})")
    # the whole volume's z-scoring, exactly as the study was encoded (workflow.encode_study)
    case = CaseVolume(
        case_id="query",
        image=np.asarray(study.image, dtype=np.float32),
        seg=None,
        anat=None,
        affine=np.asarray(study.affine, dtype=np.float64),
        spacing=study.spacing,
        files=CaseFiles("query", "brats", None, None, None, None),
    )
    stack = volume_to_slices(case, bundle.preprocess)
    geometry = stack.geometry
    image = np.asarray(stack.images[query_slice])
    codes = codes_for_mode(mode)
    represent = fdn_representation(bundle)

    def chosen(t: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v for k, v in represent(t).items() if k in codes}

    reference = None
    if against is not None:
        with torch.inference_mode():
            reference = {
                k: v[0] for k, v in chosen(torch.as_tensor(against[2], dtype=torch.float32)[None]).items()
            }
    t0 = time.perf_counter()
    maps = relax(chosen, image, RelaxConfig(num_masks=num_masks), reference, bundle.device, progress=progress)
    out = {
        k: np.asarray(geometry.to_volume(m.centred[None].astype(np.float32), mode="bilinear"))[0]
        for k, m in maps.items()
    }
    return Explanation(
        query_slice=int(query_slice),
        maps=out,
        against=None if against is None else (against[0], int(against[1])),
        seconds=time.perf_counter() - t0,
        num_masks=num_masks,
    )


def add_explanation_overlay(
    scene: Any, study: StudyVolumes, explanation: Explanation, base_name: str, views: Sequence[str] = ()
) -> list[Any]:
    """Main thread: one volume node per map (zero except the query slice; the positive part shown with a heat
    colour scale, other voxels transparent) on the T1ce grid; shown as foreground (opacity 0.5) in ``views``.
    Returns the nodes."""
    from FDNRetrievalLib import scene as sc

    nodes = []
    for code, heat in explanation.maps.items():
        canonical = np.zeros(study.shape, dtype=np.float32)
        canonical[..., explanation.query_slice] = np.clip(heat, 0.0, None)
        against = (
            "" if explanation.against is None else f" vs {explanation.against[0]}:{explanation.against[1]}"
        )
        name = f"{base_name} explain {code}{against}"
        node = sc.add_scalar_volume(
            scene, study.to_reference_grid(canonical), study.reference_ijk_to_ras, name, EXPLAIN_ROLE
        )
        top = float(canonical.max())
        display = node.GetDisplayNode()
        if display is not None:
            display.SetAndObserveColorNodeID(EXPLAIN_COLOR_NODE)
            display.SetAutoWindowLevel(False)
            display.SetWindowLevelMinMax(0.0, top if top > 0 else 1.0)
            display.SetApplyThreshold(True)
            display.SetLowerThreshold(top * 1e-3 if top > 0 else 1.0)
            display.SetUpperThreshold(max(top, 1.0) * 10.0)
        node.SetAttribute("FDNRetrieval.ExplainCode", code)
        nodes.append(node)
    if nodes:
        for view in views:
            composite = sc.composite_node(scene, view)
            composite.SetForegroundVolumeID(nodes[-1].GetID())
            composite.SetForegroundOpacity(0.5)
    return nodes
