"""What the pack publishes about its nodes, generated from the node schemas: the help pages (``web/docs/``), the web
extension's list of nodes with a results box and ``node_list.json`` (ComfyUI Manager).

A help page is written by hand in ``docs/nodes/<node_id>.md`` (what the node is for, tips, example workflows), but
its numbers are not: in an input's line (``- **name** — ...``) ``{default}`` and ``{range}`` stand for that
input's default and range, filled in from the schema, which takes them from the settings classes where they are
declared. A node without a hand-written page (a newly registered solver) gets one made from its schema alone: its
description and every input's tooltip, default and range. ``scripts/build_docs.py`` writes the files; a test keeps
the files equal to what this module makes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["PAGE_SOURCES", "help_page", "node_list_json", "render_help", "text_nodes", "text_nodes_js"]

ROOT = Path(__file__).resolve().parents[1]
PAGE_SOURCES = ROOT / "docs" / "nodes"
_INPUT_LINE = re.compile(r"^- \*\*(\w+)\*\*")
_PLACEHOLDER = re.compile(r"\{(default|range)\}")


def _number(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 1e6:
            return f"{v:.1f}"
        return f"{v:.0e}".replace("e-0", "e-") if 0 < abs(v) < 1e-3 else f"{v:g}"
    return f"`{v}`"


def _inputs(info: dict) -> dict[str, tuple[str, dict]]:
    out = {}
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            out[name] = (spec[0], spec[1] if len(spec) > 1 else {})
    return out


def default_text(kind, opts: dict) -> str:
    """How a page writes an input's default (a number, or a choice / text in backticks)."""
    if "default" in opts:
        return _number(opts["default"])
    choices = kind if isinstance(kind, list) else opts.get("options")
    if choices:  # a combo without a declared default shows its first choice
        return _number(choices[0])
    return "none"


def _bound(v) -> str:
    if v is None:
        return "∞"
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return _number(v).replace("-", "−")


def range_text(opts: dict) -> str:
    """``min–max`` of a numeric input (``""`` for other inputs)."""
    lo, hi = opts.get("min"), opts.get("max")
    if lo is None and hi is None:
        return ""
    sep = " to " if lo is not None and lo < 0 else "–"
    return f"{'−∞' if lo is None else _bound(lo)}{sep}{_bound(hi)}"


def _fill(node_id: str, source: str, inputs: dict) -> str:
    lines, current = [], None
    for line in source.splitlines():
        m = _INPUT_LINE.match(line)
        current = m.group(1) if m else (current if line.startswith("  ") else None)
        if _PLACEHOLDER.search(line):
            if current not in inputs:
                raise ValueError(f"docs/nodes/{node_id}.md: {{default}}/{{range}} outside the line of an input "
                                 f"({line[:60]!r})")
            kind, opts = inputs[current]
            line = line.replace("{default}", default_text(kind, opts)).replace("{range}", range_text(opts))
        lines.append(line)
    return "\n".join(lines).rstrip() + "\n"


def _made_page(info: dict) -> str:
    """A page from the schema alone (a node nobody has written a page for yet)."""
    lines = [f"# {info['display_name']}", "", info.get("description", ""), "", "## Inputs"]
    for name, (kind, opts) in _inputs(info).items():
        facts = [f"Default {default_text(kind, opts)}"] if "default" in opts else []
        facts += [range_text(opts)] if range_text(opts) else []
        tail = f" {', '.join(facts)}." if facts else ""
        lines.append(f"- **{name}** — {opts.get('tooltip', '').strip()}{tail}")
    lines += ["", "## Outputs"]
    for name, tip in zip(info["output_name"], info.get("output_tooltips") or [], strict=False):
        lines.append(f"- **{name}** — {tip}")
    return "\n".join(lines) + "\n"


def render_help(node_cls, source: str | None) -> str:
    """The help page of ``node_cls`` from its hand-written ``source`` (None: made from the schema alone)."""
    info = node_cls.GET_NODE_INFO_V1()
    if source is None:
        return _made_page(info)
    return _fill(info["name"], source, _inputs(info))


def help_page(node_cls) -> str:
    """The help page of ``node_cls``, from ``docs/nodes/<node_id>.md`` when there is one."""
    node_id = node_cls.GET_NODE_INFO_V1()["name"]
    src = PAGE_SOURCES / f"{node_id}.md"
    return render_help(node_cls, src.read_text(encoding="utf-8") if src.is_file() else None)


def text_nodes(nodes) -> list[str]:
    """Ids of the nodes that show a text result in a box created with the node (``SHOWS_TEXT``)."""
    return [c.GET_NODE_INFO_V1()["name"] for c in nodes if getattr(c, "SHOWS_TEXT", False)]


def text_nodes_js(nodes) -> str:
    """``web/js/silo_nodes.js``: the web extension's list of :func:`text_nodes`."""
    return ("// Generated by scripts/build_docs.py from the node classes (SHOWS_TEXT); do not edit.\n"
            f"export const TEXT_NODES = {json.dumps(text_nodes(nodes))};\n")


def node_list_json(nodes) -> str:
    """``node_list.json``: every node id with its display name, for ComfyUI Manager."""
    listed = {c.GET_NODE_INFO_V1()["name"]: c.GET_NODE_INFO_V1()["display_name"] for c in nodes}
    return json.dumps(listed, indent=2, ensure_ascii=False) + "\n"
