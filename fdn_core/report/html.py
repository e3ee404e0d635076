"""A small self-contained HTML report: headed sections of text, tables and images (relative paths)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fdn_core.fileio import atomic_write_bytes

__all__ = ["Bullets", "Image", "Section", "Table", "write_html_report"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
figure { margin: .8em 0 1.6em; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .9em; color: #555; }
.note { color: #555; font-size: .92em; }
ul.bullets { margin: .4em 0 1.2em; } ul.bullets li { margin: .2em 0; }
"""


@dataclass(frozen=True)
class Table:
    """A table: header row, body rows (already formatted strings) and an optional caption."""

    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    caption: str = ""


@dataclass(frozen=True)
class Image:
    """An image file inside the report folder (relative path) with a caption."""

    path: str
    caption: str
    alt: str = ""


@dataclass(frozen=True)
class Bullets:
    """A bulleted list of plain sentences (e.g. one verdict per similarity)."""

    items: Sequence[str]


@dataclass
class Section:
    """A headed section holding paragraphs, tables, bulleted lists and images in order."""

    title: str
    items: list[str | Table | Image | Bullets] = field(default_factory=list)


def _render(item: str | Table | Image | Bullets) -> str:
    if isinstance(item, Table):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in item.header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in item.rows
        )
        cap = f"<caption>{html.escape(item.caption)}</caption>" if item.caption else ""
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(item, Bullets):
        return '<ul class="bullets">' + "".join(f"<li>{html.escape(s)}</li>" for s in item.items) + "</ul>"
    if isinstance(item, Image):
        alt = html.escape(item.alt or item.caption)
        return (
            f'<figure><img src="{html.escape(item.path)}" alt="{alt}">'
            f"<figcaption>{html.escape(item.caption)}</figcaption></figure>"
        )
    return f'<p class="note">{html.escape(item)}</p>'


def write_html_report(path: str | Path, title: str, sections: Sequence[Section]) -> Path:
    """Write a standalone ``index.html`` (inline CSS, relative image links) atomically; return its path."""
    path = Path(path)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts.extend(_render(item) for item in section.items)
    parts.append("</body></html>")
    atomic_write_bytes(path, "\n".join(parts).encode("utf-8"))
    return path
