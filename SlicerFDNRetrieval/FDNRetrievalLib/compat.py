"""Which Slicer the module runs on (standard library; imports on Python 3.9: no 3.10+ syntax at run time).

Slicer 5.10 is the first release with Python 3.12; Slicer 5.8 ships Python 3.9, on which ``tomllib`` and
fdn_core (``requires-python >= 3.11``) cannot load. The module checks this first and, on an older Slicer,
shows ``version_problem``'s message instead of failing with an import error.
"""

from __future__ import annotations

import sys

__all__ = ["MINIMUM_PYTHON", "MINIMUM_SLICER", "version_problem"]

MINIMUM_SLICER: tuple[int, int] = (5, 10)
MINIMUM_PYTHON: tuple[int, int] = (3, 11)


def version_problem(
    slicer_version: tuple[int, int], python_version: tuple[int, int] | None = None
) -> str | None:
    """A message for the user when this Slicer (``(major, minor)``) or its Python is too old, else None."""
    python = tuple(python_version or sys.version_info[:2])
    slicer = tuple(slicer_version)
    if slicer >= MINIMUM_SLICER and python >= MINIMUM_PYTHON:
        return None
    need, have = ".".join(map(str, MINIMUM_SLICER)), ".".join(map(str, slicer[:2]))
    need_py, have_py = ".".join(map(str, MINIMUM_PYTHON)), ".".join(map(str, python[:2]))
    return (
        f"FDN Retrieval needs 3D Slicer {need} or newer (Python {need_py} or newer); this is Slicer {have} "
        f"with Python {have_py}. Install a current Slicer from https://download.slicer.org and install the "
        "FDNRetrieval extension there."
    )
