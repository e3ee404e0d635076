"""Which study is which: a content fingerprint of a case's image files, independent of its name.

A code database records, for every case, the sha256 of its image files (``fdn_core.data.provenance.
case_fingerprint``), so that
"is this study already indexed?" and "is this query study a database case?" are decided by content (or by
the recorded file paths) and never by a folder name that another patient may share.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["image_paths_of_source", "same_image_paths"]


def image_paths_of_source(source: Mapping[str, Any]) -> dict[str, str]:
    """The image paths a recorded source names (``{"t1": ..., ...}`` or ``{"image4d": ...}``), resolved."""
    out: dict[str, str] = {}
    images = source.get("images")
    if isinstance(images, Mapping):
        for kind, p in images.items():
            if isinstance(p, str | os.PathLike):
                out[str(kind)] = str(Path(p).resolve())
    p4 = source.get("image4d")
    if isinstance(p4, str | os.PathLike):
        out["image4d"] = str(Path(p4).resolve())
    return out


def same_image_paths(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two recorded sources name the same image files (after resolving links)."""
    pa, pb = image_paths_of_source(a), image_paths_of_source(b)
    return bool(pa) and pa == pb
