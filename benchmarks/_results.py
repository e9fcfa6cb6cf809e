"""Writing a benchmark's section into benchmarks/RESULTS.md."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, heading: str, text: str) -> None:
    """Replace the section whose heading starts with `heading` (e.g. "## Soak: ")
    with `text`, or append it: a rerun updates its figures in place."""
    old = path.read_text() if path.exists() else ""
    start = old.find(heading)
    if start >= 0:
        end = old.find("\n## ", start + 1)
        old = old[:start] + text + (old[end + 1:] if end >= 0 else "")
    else:
        old = old.rstrip() + "\n\n" + text
    path.write_text(old)


def report(path: Path | None, heading: str, text: str) -> None:
    """The section into `path` (write_section), or on stdout without one."""
    if path:
        write_section(path, heading, text)
    else:
        print(text)
