"""Build UI-format workflow files (what the ComfyUI frontend saves and loads) from a short description.

Pure Python (no host import), the inverse of :func:`tools.workflow.ui_to_api`: nodes are given by type, position and
named widget values; links by output name. ``/object_info`` supplies the socket order, the output slots and the
frontend's widget order (including hidden helper widgets such as ``control_after_generate``), so the file opens in
the frontend exactly as if it had been drawn there. The shipped workflows (``workflows/``) are built this way by
``scripts/build_workflows.py``, and a test rebuilds them against the running host to catch drift.
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass, field
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
    def node(self, type: str, pos: tuple[float, float], widgets: dict[str, Any] | None = None,
             inputs: dict[str, tuple[NodeRef, int] | NodeRef] | None = None, *, title: str | None = None,
             size: tuple[float, float] | None = None, helpers: dict[str, Any] | None = None) -> NodeRef:
        """Add a node. ``widgets``: ``{input: value}`` (others keep their defaults); ``inputs``: ``{socket:
        ref.out("NAME")}``; ``helpers``: values of helper widgets by the input they follow (e.g. ``{"seed":
        "randomize"}`` for its control_after_generate)."""
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
        last_value = ""
        for slot in widget_layout(definition):
            if slot.kind == "value":
                last_value = slot.name
                values.append(widgets[slot.name] if slot.name in widgets else default_value(slot.spec))
            else:
                values.append(helpers.get(last_value, HELPER_DEFAULTS.get(slot.helper, "")))
        sockets = [(n, input_type(s)) for n, s, _ in defined_inputs(definition) if not is_widget_input(s)]
        outputs = list(zip(definition.get("output_name") or definition.get("output") or [],
                           definition.get("output") or [], strict=False))
        node_id = len(self.nodes) + 1
        module = str(definition.get("python_module", ""))
        pack = OUR_PACK if module.startswith("custom_nodes.") else "comfy-core"
        n_rows = max(len(sockets), len(outputs))
        n_widgets = sum(1 for s in widget_layout(definition) if s.kind == "value" or s.helper == "control")
        data = {
            "id": node_id, "type": type, "pos": [float(pos[0]), float(pos[1])],
            "size": list(size) if size else [320.0, float(46 + 22 * n_rows + 26 * n_widgets)],
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

    def note(self, text: str, pos: tuple[float, float], size: tuple[float, float] = (360.0, 200.0),
             title: str = "Note") -> None:
        node_id = len(self.nodes) + 1
        data = {"id": node_id, "type": "Note", "pos": [float(pos[0]), float(pos[1])], "size": list(size),
                "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [], "title": title,
                "properties": {"text": ""}, "widgets_values": [text], "color": NOTE_COLOR, "bgcolor": NOTE_BGCOLOR}
        self.nodes.append(_Node(data, []))

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
