"""fdn_core: feature decomposing network (FDN) and content-based brain MR retrieval.

Data flows one way: ``data`` (readers, phantom, preprocessing) -> ``model`` -> ``codes``
(database, binarisation, search) -> ``retrieval`` / ``evaluation``. This package never
imports the training harness or Slicer.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
