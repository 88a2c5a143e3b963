"""Build UI-format workflow files (what the ComfyUI frontend saves and loads) from a short description.

Pure Python (no host import), the inverse of :func:`tools.workflow.ui_to_api`: nodes are given by type, position and
named widget values; links by output name. ``/object_info`` supplies the socket order, the output slots and the
frontend's widget order (including hidden helper widgets such as ``control_after_generate``), so the file opens in
the frontend exactly as if it had been drawn there. The shipped workflows (``workflows/``) are built this way by
``scripts/build_workflows.py``, and a test rebuilds them against the running host to catch drift.
"""

from __future__ import annotations

import copy
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .workflow import (
    WorkflowError,
    default_value,
    defined_inputs,
    input_type,
    is_widget_input,
    widget_layout,
)

NOTE_COLOR, NOTE_BGCOLOR = "#432", "#653"

# Node geometry as the frontend (ComfyUI frontend 1.27, litegraph) lays nodes out, measured in a real browser with
# LGraphNode.computeSize(): a node's minimum height is 6 + 20 per socket row (max of inputs and outputs) + 24 per
# widget (helper widgets such as control_after_generate and the upload button included) + 8, where a multiline text
# widget needs 54 instead of 24. The title bar (30) sits above ``pos``. The browser tier checks that every shipped
# node is at least this large and that nothing overlaps in the live layout.
TITLE_H = 30
ROW_H, WIDGET_H, MULTILINE_H, NODE_PAD = 20, 24, 54, 14
MIN_WIDTH = 220
GROUP_TITLE_H = 34  # a group's title band (font size 24)
# Nodes whose text result the pack's web extension (web/js/silo_text.js) shows in a box created with the node (the
# list scripts/build_docs.py generates from the node classes); the layout gives that box this much room.
_GENERATED_JS = Path(__file__).resolve().parents[1] / "web" / "js" / "silo_nodes.js"
TEXT_NODES = tuple(json.loads(re.search(r"TEXT_NODES = (\[.*?\]);", _GENERATED_JS.read_text(encoding="utf-8")).group(1)))
TEXT_BOX_H = 96
HELPER_DEFAULTS = {"control": "fixed", "filter": "", "toggle": False, "refresh": "refresh", "upload": "image",
                   "audio_ui": ""}
OUR_PACK = "comfyui-silo"


@dataclass
class NodeRef:
    id: int
    type: str
    outputs: list[tuple[str, str]]  # (name, type)

    def out(self, which: str | int = 0) -> tuple[NodeRef, int]:
        if isinstance(which, int):
            if not 0 <= which < len(self.outputs):
                raise WorkflowError(f"node {self.id} ({self.type}) has no output {which}")
            return self, which
        for i, (name, _type) in enumerate(self.outputs):
            if name == which:
                return self, i
        for i, (_name, typ) in enumerate(self.outputs):
            if typ == which:
                return self, i
        raise WorkflowError(f"node {self.id} ({self.type}) has no output {which!r}; it has "
                            f"{[n for n, _ in self.outputs]}")


# An input option of Degradation (SILO)'s per-type widgets (nodes/degradation.py): the web extension
# (web/js/silo_degradation.js) shows a widget only while the node's ``type`` is the one it names.
TYPE_OPTION = "silo_degradation_type"


def _hidden(slot, values: dict[str, Any]) -> bool:
    """Whether the web extension hides this widget for the node's chosen ``type`` (in ``values``)."""
    owner = (slot.spec[1] if slot.kind == "value" and len(slot.spec) > 1 else {}).get(TYPE_OPTION)
    return owner is not None and "type" in values and owner != values["type"]


def min_node_size(definition: dict, values: dict[str, Any] | None = None) -> tuple[float, float]:
    """The smallest (width, height) the frontend draws a node of this ``/object_info`` definition at (body only,
    without the title bar), with room for the results box of :data:`TEXT_NODES`; ``values`` (``{widget: value}``)
    leave out the widgets the web extension hides for them (Degradation (SILO)'s other types)."""
    sockets = [n for n, s, _ in defined_inputs(definition) if not is_widget_input(s)]
    outputs = definition.get("output") or []
    height = NODE_PAD + ROW_H * max(len(sockets), len(outputs))
    for slot in widget_layout(definition):
        if _hidden(slot, values or {}):
            continue
        multiline = slot.kind == "value" and bool((slot.spec[1] if len(slot.spec) > 1 else {}).get("multiline"))
        height += MULTILINE_H if multiline else WIDGET_H
    if definition.get("name") in TEXT_NODES:
        height += TEXT_BOX_H
    return float(MIN_WIDTH), float(height)


NOTE_CHAR_W, NOTE_LINE_H, NOTE_PAD = 6.6, 15.0, 24.0  # the Note textarea: 10 px monospace (6 px a character, ~12 px a line)


def note_height(text: str, width: float) -> float:
    """Height a Note needs to show ``text`` at ``width`` without a scroll bar (estimated generously from the
    textarea's font; the browser tier checks the shipped notes)."""
    per_line = max(int((width - NOTE_PAD) / NOTE_CHAR_W), 10)
    lines = 0
    for para in text.split("\n"):
        words, cur = para.split(" "), 0
        lines += 1
        for w in words:
            if cur and cur + 1 + len(w) > per_line:
                lines += 1
                cur = len(w)
            else:
                cur += (1 if cur else 0) + len(w)
    return float(math.ceil(lines * NOTE_LINE_H + NOTE_PAD))


class Column:
    """Stacks nodes top to bottom at one x: each :meth:`WorkflowBuilder.node` given a Column as ``pos`` is placed
    under the previous one (title bar included) with ``gap`` between them."""

    def __init__(self, x: float, y: float = 80.0, width: float = 360.0, gap: float = 30.0):
        self.x, self.y, self.width, self.gap = float(x), float(y), float(width), float(gap)

    def place(self, height: float) -> tuple[float, float]:
        pos = (self.x, self.y)
        self.y += height + TITLE_H + self.gap
        return pos

    def skip(self, dy: float) -> Column:
        self.y += dy
        return self

    @property
    def right(self) -> float:
        return self.x + self.width


@dataclass
class _Node:
    data: dict
    sockets: list[tuple[str, str]]
    links_in: dict[str, int] = field(default_factory=dict)


class WorkflowBuilder:
    """Collects nodes, links, notes and groups; :meth:`to_json` returns the UI-format workflow dict."""

    def __init__(self, object_info: dict, name: str):
        self.object_info = object_info
        self.name = name
        self.nodes: list[_Node] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    # ---------------------------------------------------------------------------------------------------- nodes
    def node(self, type: str, pos: tuple[float, float] | Column, widgets: dict[str, Any] | None = None,
             inputs: dict[str, tuple[NodeRef, int] | NodeRef] | None = None, *, title: str | None = None,
             size: tuple[float, float] | None = None, helpers: dict[str, Any] | None = None) -> NodeRef:
        """Add a node. ``widgets``: ``{input: value}`` (others keep their defaults); ``inputs``: ``{socket:
        ref.out("NAME")}``; ``helpers``: values of helper widgets by the input they follow (e.g. ``{"seed":
        "randomize"}`` for its control_after_generate). ``pos`` may be a :class:`Column`: the node goes under the
        column's previous node, as wide as the column. ``size`` is a wish: the node is never made smaller than the
        frontend draws it (:func:`min_node_size`)."""
        if type not in self.object_info:
            raise WorkflowError(f"{self.name}: node type {type!r} is not in /object_info")
        definition = self.object_info[type]
        widgets = dict(widgets or {})
        helpers = dict(helpers or {})
        known = {n for n, s, _ in defined_inputs(definition) if is_widget_input(s)}
        unknown = set(widgets) - known
        if unknown:
            raise WorkflowError(f"{self.name}: {type} has no widget(s) {sorted(unknown)}; it has {sorted(known)}")
        values: list[Any] = []
        chosen: dict[str, Any] = {}
        last_value = ""
        for slot in widget_layout(definition):
            if slot.kind == "value":
                last_value = slot.name
                values.append(widgets[slot.name] if slot.name in widgets else default_value(slot.spec))
                chosen[slot.name] = values[-1]
            else:
                values.append(helpers.get(last_value, HELPER_DEFAULTS.get(slot.helper, "")))
        sockets = [(n, input_type(s)) for n, s, _ in defined_inputs(definition) if not is_widget_input(s)]
        outputs = list(zip(definition.get("output_name") or definition.get("output") or [],
                           definition.get("output") or [], strict=False))
        node_id = len(self.nodes) + 1
        module = str(definition.get("python_module", ""))
        pack = OUR_PACK if module.startswith("custom_nodes.") else "comfy-core"
        min_w, min_h = min_node_size({**definition, "name": type}, chosen)
        width = pos.width if isinstance(pos, Column) else (size[0] if size else 320.0)
        size = [float(max(width, min_w)), float(max(size[1] if size else 0.0, min_h))]
        if isinstance(pos, Column):
            pos = pos.place(size[1])
        data = {
            "id": node_id, "type": type, "pos": [float(pos[0]), float(pos[1])],
            "size": size,
            "flags": {}, "order": 0, "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in sockets],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
            "properties": {"cnr_id": pack, "Node name for S&R": type},
            "widgets_values": values,
        }
        if title:
            data["title"] = title
        entry = _Node(data, sockets)
        self.nodes.append(entry)
        for socket, src in (inputs or {}).items():
            self.connect(src, NodeRef(node_id, type, outputs), socket)
        return NodeRef(node_id, type, outputs)

    def connect(self, src: tuple[NodeRef, int] | NodeRef, dst: NodeRef, socket: str) -> None:
        ref, slot = src.out(0) if isinstance(src, NodeRef) else src
        target = self.nodes[dst.id - 1]
        names = [n for n, _ in target.sockets]
        if socket not in names:
            raise WorkflowError(f"{self.name}: {dst.type} has no input socket {socket!r}; it has {names}")
        to_slot = names.index(socket)
        out_type = ref.outputs[slot][1]
        in_type = target.sockets[to_slot][1]
        if in_type not in ("*", out_type) and out_type != "*":
            raise WorkflowError(f"{self.name}: cannot connect {ref.type}.{ref.outputs[slot][0]} ({out_type}) to "
                                f"{dst.type}.{socket} ({in_type})")
        link_id = len(self.links) + 1
        self.links.append([link_id, ref.id, slot, dst.id, to_slot, out_type])
        target.data["inputs"][to_slot]["link"] = link_id
        self.nodes[ref.id - 1].data["outputs"][slot]["links"].append(link_id)

    def note(self, text: str, pos: tuple[float, float] | Column, size: tuple[float, float] = (360.0, 200.0),
             title: str = "Note") -> NodeRef:
        node_id = len(self.nodes) + 1
        size = (float(size[0]), max(float(size[1]), note_height(text, size[0])))
        if isinstance(pos, Column):
            size = (pos.width, size[1])
            pos = pos.place(size[1])
        data = {"id": node_id, "type": "Note", "pos": [float(pos[0]), float(pos[1])], "size": list(size),
                "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [], "title": title,
                "properties": {"text": ""}, "widgets_values": [text], "color": NOTE_COLOR, "bgcolor": NOTE_BGCOLOR}
        self.nodes.append(_Node(data, []))
        return NodeRef(node_id, "Note", [])

    def group_around(self, title: str, refs: list[NodeRef], color: str = "#3f789e", pad: float = 12.0) -> None:
        """A group just large enough to hold ``refs`` (title bars included) below its own title band."""
        boxes = [self.bounds(r.id) for r in refs]
        x0 = min(b[0] for b in boxes) - pad
        y0 = min(b[1] for b in boxes) - pad - GROUP_TITLE_H
        x1 = max(b[0] + b[2] for b in boxes) + pad
        y1 = max(b[1] + b[3] for b in boxes) + pad
        self.group(title, (x0, y0, x1 - x0, y1 - y0), color)

    def bounds(self, node_id: int) -> tuple[float, float, float, float]:
        """(x, y, w, h) of a node as drawn, title bar included."""
        d = self.nodes[node_id - 1].data
        return d["pos"][0], d["pos"][1] - TITLE_H, d["size"][0], d["size"][1] + TITLE_H

    def group(self, title: str, bounding: tuple[float, float, float, float], color: str = "#3f789e") -> None:
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [float(v) for v in bounding],
                            "color": color, "font_size": 24, "flags": {}})

    # ---------------------------------------------------------------------------------------------------- output
    def _execution_order(self) -> list[int]:
        deps = {n.data["id"]: set() for n in self.nodes}
        for _lid, src, _s, dst, _t, _typ in self.links:
            deps[dst].add(src)
        order, done = [], set()
        while len(order) < len(deps):
            ready = sorted(i for i, d in deps.items() if i not in done and d <= done)
            if not ready:
                raise WorkflowError(f"{self.name}: the graph has a cycle")
            for i in ready:
                order.append(i)
                done.add(i)
        return order

    def to_json(self) -> dict:
        nodes = copy.deepcopy([n.data for n in self.nodes])
        for rank, node_id in enumerate(self._execution_order()):
            nodes[node_id - 1]["order"] = rank
        for n in nodes:
            for out in n["outputs"]:
                if not out["links"]:
                    out["links"] = None
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-silo/workflows/{self.name}")),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": nodes,
            "links": copy.deepcopy(self.links),
            "groups": copy.deepcopy(self.groups),
            "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [40.0, 40.0]}},
            "version": 0.4,
        }


# ------------------------------------------------------------------------------------------------------- layout checks

Rect = tuple[float, float, float, float]  # x, y, w, h


def _intersect(a: Rect, b: Rect) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _contains(outer: Rect, inner: Rect) -> bool:
    return (outer[0] <= inner[0] and outer[1] <= inner[1] and inner[0] + inner[2] <= outer[0] + outer[2]
            and inner[1] + inner[3] <= outer[1] + outer[3])


def layout_problems(nodes: dict[str, Rect], groups: dict[str, Rect]) -> list[str]:
    """What is wrong with a layout, as readable lines (empty when it opens clean).

    ``nodes``: ``{label: (x, y, w, h)}`` of each node as drawn, title bar included; ``groups``: ``{title: bounding}``.
    Checks: no two nodes overlap (notes included); every node lies fully inside a group's area below its title band,
    or fully outside the group; groups do not overlap one another.
    """
    problems = []
    items = list(nodes.items())
    for i, (a, ra) in enumerate(items):
        for b, rb in items[i + 1:]:
            if _intersect(ra, rb):
                problems.append(f"{a} overlaps {b}")
    for g, rg in groups.items():
        body = (rg[0], rg[1] + GROUP_TITLE_H, rg[2], rg[3] - GROUP_TITLE_H)
        for a, ra in items:
            if _intersect(rg, ra) and not _contains(body, ra):
                problems.append(f"{a} is partly outside group {g!r} (or covers its title)")
    glist = list(groups.items())
    for i, (a, ra) in enumerate(glist):
        for b, rb in glist[i + 1:]:
            if _intersect(ra, rb):
                problems.append(f"group {a!r} overlaps group {b!r}")
    return problems


def saved_layout(workflow: dict) -> tuple[dict[str, Rect], dict[str, Rect]]:
    """The node rectangles (title bar included; collapsed nodes as drawn collapsed are not special-cased) and group
    boundings of a UI-format workflow, labelled ``"<id> <title or type>"``."""
    nodes = {}
    for n in workflow.get("nodes", []):
        x, y = n["pos"][0], n["pos"][1]
        w, h = n["size"][0], n["size"][1]
        nodes[f"{n['id']} {n.get('title') or n['type']}"] = (float(x), float(y) - TITLE_H, float(w), float(h) + TITLE_H)
    groups = {f"{g.get('id', i)} {g.get('title', '')}": tuple(float(v) for v in g["bounding"])
              for i, g in enumerate(workflow.get("groups", []))}
    return nodes, groups
