"""Which study is which: a content fingerprint of a case's image files, independent of its name.

A code database records, for every case, the sha256 of its image files (``source_fingerprint``), so that
"is this study already indexed?" and "is this query study a database case?" are decided by content (or by
the recorded file paths) and never by a folder name that another patient may share.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fdn_core.data.readers import CaseFiles

__all__ = ["image_paths_of_source", "same_image_paths", "source_fingerprint"]

_CHUNK = 1 << 20


def _hash_path(h: Any, path: Path) -> None:
    """Feed one file (or every file of a DICOM series folder, by relative name) into ``h``, streamed."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        h.update(f"dir\0{len(files)}\0".encode())
        for p in files:
            h.update(f"{p.relative_to(path).as_posix()}\0".encode())
            _hash_path(h, p)
        return
    h.update(f"file\0{path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)


def source_fingerprint(files: CaseFiles) -> str:
    """Hex sha256 over a case's image files (the four sequences by name, or the 4D image), read in 1 MiB
    blocks. Label files are left out: adding labels later does not make another study."""
    h = hashlib.sha256(b"fdn-source-v1\0")
    if files.images:
        for kind in sorted(files.images):
            h.update(f"{kind}\0".encode())
            _hash_path(h, Path(files.images[kind]))
    if files.image4d is not None:
        h.update(b"image4d\0")
        _hash_path(h, Path(files.image4d))
    return h.hexdigest()


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
