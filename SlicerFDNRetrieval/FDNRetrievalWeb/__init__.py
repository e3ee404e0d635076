"""FDN retrieval in a web browser: ``fdn web`` serves the Slicer panel's workflow with trame-slicer.

Not part of the Slicer extension: a distribution of its own (``fdn-retrieval-web``, this folder's
``pyproject.toml``) installed in its own environment (``bash scripts/setup.sh web`` -> ``.venv-web``),
because trame-slicer 2.0.0 needs slicer-core 5.11 / vtk 9.6.0 where the test environment has slicer-core
5.13. It reuses the Slicer module's Qt-free library ``FDNRetrievalLib`` (installed beside it) and
``fdn_core``.

Modules (only ``command`` and ``locate`` are imported by ``fdn --help``; they use the standard library):

- ``command``: the ``fdn web`` command (entry point ``fdn.commands``), its defaults and the server's start.
- ``locate``: which demo database to open when none is named.
- ``studies``: the studies offered (data folder, database cases, uploads) and reading retrieved cases.
- ``viewer``: layouts and slice views on trame-slicer's MRML scene.
- ``app``: the page, its state, and the worker threads behind Encode and Search.
"""

__version__ = "0.1.0"
