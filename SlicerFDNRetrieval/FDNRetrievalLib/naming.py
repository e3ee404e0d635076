"""Guess which MR sequence a volume is from its node name (standard library only: used before install)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["ROLE_ATTRIBUTE", "SEQUENCE_LABELS", "describe_missing", "guess_sequence", "match_sequence_nodes"]

#: Node attribute set on every node this module creates (outputs, loaded reference cases); such nodes are
#: never offered as the study's input.
ROLE_ATTRIBUTE = "FDNRetrieval.Role"

SEQUENCE_LABELS = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}

# Most specific first: a contrast-enhanced T1 also contains "t1", and "t2flair" also contains "t2".
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "t1ce",
        re.compile(
            r"t1[\s_\-]*(?:ce|gd|c|post|contrast|gad|\+c)(?![a-z])"
            r"|(?:ce|gd|gad|post)[\s_\-]*t1(?![a-z0-9])"
        ),
    ),
    ("flair", re.compile(r"flair")),
    ("t2", re.compile(r"t2(?:w)?(?![a-z0-9*])")),
    ("t1", re.compile(r"t1(?:w)?(?![a-z0-9])")),
)


def guess_sequence(name: str) -> str | None:
    """The sequence key ("t1", "t1ce", "t2", "flair") a node name suggests, or None (case-insensitive)."""
    lowered = name.lower()
    for key, pattern in _PATTERNS:
        if pattern.search(lowered):
            return key
    return None


def match_sequence_nodes(nodes: Iterable[Any]) -> dict[str, Any | None]:
    """Map each sequence to the first node (in the given order) whose name suggests it.

    ``nodes`` are MRML volume nodes (anything with ``GetName()`` and ``GetAttribute()``); label maps and
    nodes made by this module are skipped. A node is used for one sequence at most.
    """
    found: dict[str, Any | None] = dict.fromkeys(SEQUENCE_LABELS)
    for node in nodes:
        if node is None or node.GetAttribute(ROLE_ATTRIBUTE):
            continue
        if hasattr(node, "IsA") and node.IsA("vtkMRMLLabelMapVolumeNode"):
            continue
        key = guess_sequence(node.GetName() or "")
        if key is not None and found[key] is None:
            found[key] = node
    return found


def describe_missing(selection: Mapping[str, Any | None]) -> list[str]:
    """Human-readable labels ("T1ce", ...) of the sequences with no node selected."""
    return [SEQUENCE_LABELS[key] for key in SEQUENCE_LABELS if selection.get(key) is None]
