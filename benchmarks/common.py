"""Helpers shared by the benchmark scripts."""

from __future__ import annotations


def emit(lines: list[str], markdown: str | None) -> None:
    """Print a markdown table (given as lines) and, with ``markdown``, append it to that file."""
    text = "\n".join(lines) + "\n"
    print(text)
    if markdown:
        with open(markdown, "a") as f:
            f.write("\n" + text)
