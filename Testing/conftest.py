"""Shared pytest fixtures: a tiny deterministic phantom cohort and a tiny model bundle (once per session)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# The Slicer module's Qt-free library is imported from its folder, as Slicer itself does (only the Slicer
# tests import it; the core tests never import vtk or Slicer).
sys.path.insert(0, str(ROOT / "SlicerFDNRetrieval"))

os.environ.setdefault("OMP_NUM_THREADS", "2")

TINY_SHAPE = (64, 64, 40)


@pytest.fixture(autouse=True)
def _seed() -> None:
    import torch

    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-case phantom cohort at 64x64x40 in BraTS layout (at least one healthy, several with tumour)."""
    from fdn_core.data.phantom import generate_cohort

    out = tmp_path_factory.mktemp("cohort") / "phantom"
    generate_cohort(out, n_cases=6, seed=1234, shape=TINY_SHAPE, workers=1)
    return out


def make_tiny_bundle(out: Path, seed: int = 0) -> Path:
    """A freshly initialised, seeded tiny FDN saved as a real inference bundle (untrained: retrieval runs
    mechanically on it, its scores mean nothing)."""
    from fdn_core.model.bundle import save_untrained_bundle

    return save_untrained_bundle(out, seed=seed)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny untrained bundle (seed 0) shared by the session."""
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny", seed=0)


@pytest.fixture(scope="session")
def bundle_factory() -> Callable[[Path, int], Path]:
    """``make_tiny_bundle`` for tests that need several tiny bundles (e.g. two different models)."""
    return make_tiny_bundle
