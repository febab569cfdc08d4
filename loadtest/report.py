"""BENCHMARKS.md is written by the benchmarks: each owns a section between HTML comment markers."""

from __future__ import annotations

from pathlib import Path

HEADER = "# Benchmarks\n\nFigures written by `make bench` and its parts; do not edit the marked sections by hand.\n"


def update_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the section `name` of the markdown file."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else HEADER
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + f"\n\n## {name.capitalize()}\n\n{block}\n"
    path.write_text(text)
