"""User-facing text built from untrusted values (file metadata, specs): always bounded in length.

A string read from a file may be megabytes long; echoing it into an error or a node's UI text would turn one bad
file into megabytes of log. Every message that quotes such a value goes through :func:`bounded`.
"""

from __future__ import annotations

__all__ = ["MAX_QUOTED_CHARS", "bounded"]

#: Longest excerpt of an untrusted value quoted in a message or shown on a node.
MAX_QUOTED_CHARS = 200


def bounded(value, limit: int = MAX_QUOTED_CHARS) -> str:
    """``str(value)`` cut to ``limit`` characters, ending in "…" (and the full length) when cut.

    Strings are cut before any conversion, so a huge string costs no extra allocation beyond its excerpt.
    """
    if isinstance(value, str):
        text = value
    else:
        text = str(value)  # containers of untrusted strings: their repr can be long, so it is cut below
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"
