"""Qt-free library of the FDN Retrieval Slicer module: every computation and every scene change.

Submodules (imported on demand, so that this package imports before fdn_core is installed):

- ``compat``: the Slicer version check (standard library, loads on any Slicer).
- ``naming``: guess a volume's MR sequence from its node name (standard library only).
- ``deps``: plan and run the first-use install of fdn_core inside Slicer; check the torch range (standard
  library only).
- ``tasks``: the worker thread and the GUI timer's GIL-releasing poll (standard library only).
- ``demo``: build, find and remove the demo cohort and database (standard library at import).
- ``capture``: copy the study's volumes out of the scene (main thread).
- ``scene``: check and resample the study; write segmentation, reconstruction, table, layout, views.
- ``views``: which view the query slice comes from; one result shown large beside the query.
- ``workflow``: model + database, encoding, search (numpy/torch, no MRML).
- ``explain``: RELAX explanation of a result (worker) and its overlay on the query view (main thread).
- ``scenario``: the end-to-end test body shared by pytest (slicer-core) and the module's self-test.

Every function takes the MRML scene (and the module logics it needs) as arguments; no Qt, and the
application object is never used here (the Slicer module passes folders such as its cache in).
"""

from __future__ import annotations

__all__ = [
    "capture",
    "compat",
    "demo",
    "deps",
    "explain",
    "naming",
    "scenario",
    "scene",
    "tasks",
    "views",
    "workflow",
]
