"""Where a case came from: a fingerprint of its image content.

Case ids are not identities (every phantom cohort has a ``phantom_0000``, and a real cohort may be renamed),
so a case is identified by the content of its images: ``case_fingerprint`` is a sha256 streamed over the
bytes of its four image files in ``MODALITIES`` order (a Decathlon case: its one 4D image file). Labels are
left out: the same images relabelled are still the same training input. ``fdn train`` records the
fingerprints of its training cases in the bundle metadata (``train_case_fingerprints``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fdn_core.data.readers import CaseFiles
from fdn_core.errors import DataError
from fdn_core.labels import MODALITIES

__all__ = ["FINGERPRINTS_KEY", "case_fingerprint"]

#: Bundle metadata key of the training cases' fingerprints (a mapping case id -> fingerprint).
FINGERPRINTS_KEY = "train_case_fingerprints"
_CHUNK = 1 << 20


def case_fingerprint(files: CaseFiles) -> str:
    """sha256 (hex) streamed over the bytes of the case's image files, in ``MODALITIES`` order."""
    if files.images:
        missing = [m for m in MODALITIES if m not in files.images]
        if missing:
            raise DataError(f"case {files.case_id}: no {missing} image file(s); a case needs all four")
        paths = [Path(files.images[m]) for m in MODALITIES]
    elif files.image4d is not None:
        paths = [Path(files.image4d)]
    else:
        raise DataError(f"case {files.case_id}: no image files recorded, so it cannot be fingerprinted")
    digest = hashlib.sha256()
    for path in paths:
        try:
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
        except OSError as exc:
            raise DataError(
                f"case {files.case_id}: cannot read {path} to fingerprint it ({exc}); check the file"
            ) from exc
    return digest.hexdigest()
