"""Qt-free library of the FDN Retrieval Slicer module: every computation and every scene change.

Submodules (imported on demand, so that this package imports before fdn_core is installed):

- ``naming``: guess a volume's MR sequence from its node name (standard library only).
- ``deps``: plan and run the first-use install of fdn_core inside Slicer (standard library only).
- ``scene``: read the study from volume nodes; write segmentation, reconstruction, table, layout, views.
- ``workflow``: model + database, encoding, search, background tasks (numpy/torch, no MRML).
- ``scenario``: the end-to-end test body shared by pytest (slicer-core) and the module's self-test.

Every function takes the MRML scene (and the module logics it needs) as arguments; nothing here imports
``qt`` or uses ``slicer.app``.
"""

from __future__ import annotations

__all__ = ["deps", "naming", "scenario", "scene", "workflow"]
