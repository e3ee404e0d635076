"""Exception types shared by the library. Messages name the file, the problem and the fix."""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "FDNError", "IntegrityError", "ModelMismatchError"]


class FDNError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(FDNError, ValueError):
    """A configuration is malformed: unknown, missing or ill-typed keys, impossible values."""


class DataError(FDNError, ValueError):
    """Input data (image files, cohorts, caches) is missing, malformed or inconsistent."""


class IntegrityError(FDNError):
    """A file does not match the hash recorded for it (tampered, truncated or corrupted)."""


class ModelMismatchError(FDNError):
    """A database or cache was made with a different model than the one in use."""
