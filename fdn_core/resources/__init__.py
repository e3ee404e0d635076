"""Files shipped inside the package: the demo model bundle (``models/demo``) and its training record.

They travel with every install of ``fdn-retrieval`` (wheel, editable, or the Slicer extension's copy), so
``fdn demo`` and the Slicer panel find the model wherever the package is.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["MODELS_DIR", "shipped_model_dir"]

#: Folder of the shipped model bundles.
MODELS_DIR = Path(__file__).resolve().parent / "models"


def shipped_model_dir(name: str = "demo") -> Path:
    """The folder of a shipped model bundle (it may be absent only in a broken install)."""
    return MODELS_DIR / name
