"""ComfyUI workflow files: the frontend's UI format to the API format the server executes.

Pure Python (no host import): give it the workflow JSON the frontend saves and the server's ``/object_info``.

The UI format stores each node's widget values as a positional list (``widgets_values``). The frontend builds one
widget per widget input of the node definition, in the order of ``input.required`` then ``input.optional``, plus a
few hidden helper widgets whose values are stored too (the ``control_after_generate`` combo after a seed, the upload
button of image loaders, ...). :func:`ui_to_api` rebuilds that layout from ``/object_info`` to name the values,
resolves links through reroutes, primitives, bypassed nodes and subgraphs, and drops frontend-only and muted nodes.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any

# Node types that exist only in the frontend (never sent to the server).
FRONTEND_ONLY_TYPES = frozenset({
    "Note", "MarkdownNote", "PrimitiveNode", "Reroute",
    # popular extension nodes that are frontend-only as well
    "Reroute (rgthree)", "Note (rgthree)", "Label (rgthree)", "Bookmark (rgthree)",
    "Fast Groups Bypasser (rgthree)", "Fast Groups Muter (rgthree)", "Fast Bypasser (rgthree)",
    "Fast Muter (rgthree)", "Fast Actions Button (rgthree)", "Image Comparer (rgthree)",
})
# Input types the frontend draws as widgets (everything else is a socket: MODEL, IMAGE, DEGRADATION, ...).
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "MARKDOWN", "COLOR", "FILEUPLOAD",
                          "IMAGEUPLOAD", "TEXTAREA", "MULTISELECT", "TREESELECT", "SELECTBUTTON", "WEBCAM",
                          "LOAD_3D", "LOAD_3D_ANIMATION"})
CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize", "increment-wrap"})
SEED_NAMES = ("seed", "noise_seed")
UPLOAD_OPTIONS = ("image_upload", "video_upload", "animated_image_upload")

MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
SUBGRAPH_INPUT_NODE, SUBGRAPH_OUTPUT_NODE = "-10", "-20"


class WorkflowError(ValueError):
    """A workflow that cannot be converted or overridden; the message says which node and why."""


# ----------------------------------------------------------------------------------------------------------------
# format detection

def is_api_format(data: Any) -> bool:
    """True for an API-format prompt: ``{node_id: {"class_type": ..., "inputs": {...}}}``."""
    return (isinstance(data, dict) and bool(data)
            and all(isinstance(v, dict) and "class_type" in v for v in data.values()))


def is_ui_format(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list)


# ----------------------------------------------------------------------------------------------------------------
# node definitions (/object_info entries)

def _options(spec) -> dict:
    return spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}


def input_type(spec) -> str:
    """The type of an input spec; old-style combos (``[[options...], {...}]``) are reported as ``COMBO``."""
    if not isinstance(spec, (list, tuple)) or not spec:
        return "*"
    t = spec[0]
    return "COMBO" if isinstance(t, (list, tuple)) else str(t)


def combo_options(spec) -> list | None:
    if not isinstance(spec, (list, tuple)) or not spec:
        return None
    if isinstance(spec[0], (list, tuple)):
        return list(spec[0])
    if spec[0] == "COMBO":
        return list(_options(spec).get("options", []))
    return None


def is_widget_input(spec, include_force_input: bool = False) -> bool:
    """Whether the frontend draws this input as a widget (and stores a value for it in ``widgets_values``)."""
    if _options(spec).get("forceInput") and not include_force_input:
        return False
    return input_type(spec) in WIDGET_TYPES


def defined_inputs(definition: dict) -> list[tuple[str, Any, str]]:
    """``[(name, spec, "required" | "optional")]`` in the frontend's order (required first, then optional)."""
    inputs = definition.get("input") or {}
    out = []
    for section in ("required", "optional"):
        for name, spec in (inputs.get(section) or {}).items():
            out.append((name, spec, section))
    return out


@dataclass(frozen=True)
class _Slot:
    name: str  # the input the value belongs to ("" for helper widgets)
    kind: str  # "value" (sent to the server) or "helper" (stored in widgets_values, not sent)
    spec: Any = None
    helper: str = ""  # what kind of helper: control, filter, refresh, toggle, upload


def widget_layout(definition: dict, include_force_input: bool = False) -> list[_Slot]:
    """The widgets (and hidden helper widgets) the frontend creates for a node, in ``widgets_values`` order."""
    slots: list[_Slot] = []
    upload_after_required = None
    entries = defined_inputs(definition)
    for i, (name, spec, section) in enumerate(entries):
        if is_widget_input(spec, include_force_input):
            opts = _options(spec)
            kind = input_type(spec)
            slots.append(_Slot(name, "value", spec))
            if kind == "INT" and opts.get("control_after_generate", name in SEED_NAMES):
                slots.append(_Slot("", "helper", helper="control"))
            elif kind == "COMBO" and not opts.get("multi_select"):
                remote = opts.get("remote")
                if isinstance(remote, dict):
                    slots.append(_Slot("", "helper", helper="toggle"))  # "Auto-refresh after generation"
                    if remote.get("refresh_button"):
                        slots.append(_Slot("", "helper", helper="refresh"))
                if opts.get("control_after_generate"):
                    slots.append(_Slot("", "helper", helper="control"))
                    slots.append(_Slot("", "helper", helper="filter"))
            if section == "required" and kind == "COMBO" and any(opts.get(k) for k in UPLOAD_OPTIONS):
                upload_after_required = upload_after_required or "upload"
            if section == "required" and name == "audio" and opts.get("audio_upload"):
                upload_after_required = "audio_upload"
        last_required = section == "required" and (i + 1 == len(entries) or entries[i + 1][2] != "required")
        if last_required and upload_after_required:
            if upload_after_required == "audio_upload":
                slots.append(_Slot("", "helper", helper="audio_ui"))
            slots.append(_Slot("", "helper", helper="upload"))
    return slots


def _looks_like_helper(slot: _Slot, value) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if slot.helper == "control":
        return isinstance(value, str) and value in CONTROL_VALUES
    if slot.helper == "refresh":
        return value == "refresh"
    if slot.helper in ("upload", "audio_ui"):
        return isinstance(value, str) and value in ("image", "")
    return slot.helper == "filter" and isinstance(value, str)


def default_value(spec):
    """The value the frontend gives a fresh widget for this spec."""
    opts = _options(spec)
    if "default" in opts:
        return opts["default"]
    kind = input_type(spec)
    if kind == "COMBO":
        options = combo_options(spec) or []
        return options[0] if options else None
    if kind == "STRING":
        return ""
    if kind == "BOOLEAN":
        return False
    if kind in ("INT", "FLOAT"):
        return opts.get("min", 0) if opts.get("min", 0) > 0 else 0
    return None


def assign_widget_values(definition: dict, values, linked: set[str] = frozenset()) -> dict[str, Any]:
    """Name a node's ``widgets_values`` after its definition: ``{input_name: value}`` for the widget inputs.

    ``values`` is the list the frontend saved (or a ``{name: value}`` dict, which a few nodes save). Missing values
    take the definition's default, as a freshly created widget would.
    """
    widget_specs = [(n, s) for n, s, _ in defined_inputs(definition) if is_widget_input(s)]
    if isinstance(values, dict):
        named = {name: values[name] if name in values else default_value(spec) for name, spec in widget_specs}
        return {k: v for k, v in named.items() if v is not None}
    values = list(values or [])
    layout = widget_layout(definition)
    candidates = [layout, widget_layout(definition, include_force_input=True)]
    if linked:  # some exports leave out the values of widgets that were converted to linked inputs
        kept, skipping = [], False
        for slot in layout:
            if slot.kind == "value":
                skipping = slot.name in linked
            if not skipping:
                kept.append(slot)
        candidates.append(kept)
    chosen = next((c for c in candidates if len(c) == len(values)), None)
    out: dict[str, Any] = {}
    if chosen is not None:
        for slot, value in zip(chosen, values, strict=True):
            if slot.kind == "value" and is_widget_input(slot.spec):
                out[slot.name] = value
    else:  # the node changed since the workflow was saved: skip helper values where the values look like them
        i = 0
        for slot in layout:
            if i >= len(values):
                break
            if slot.kind == "helper":
                if _looks_like_helper(slot, values[i]):
                    i += 1
                continue
            if (i + 1 < len(values) and isinstance(values[i], str) and values[i] in CONTROL_VALUES
                    and values[i] not in (combo_options(slot.spec) or []) and input_type(slot.spec) != "STRING"):
                i += 1  # a control_after_generate value the current definition no longer has
            out[slot.name] = values[i]
            i += 1
    for name, spec in widget_specs:
        if out.get(name) is None:
            out[name] = default_value(spec)
    return {k: v for k, v in out.items() if v is not None}


# ----------------------------------------------------------------------------------------------------------------
# dynamic prompts ({a|b} choices and comments in STRING widgets marked dynamicPrompts, as the frontend does)

_COMMENTS = re.compile(r"/\*[\s\S]*?\*/|//.*")


def process_dynamic_prompt(text: str, rng: random.Random | None = None) -> str:
    """Strip ``//`` and ``/* */`` comments and resolve ``{a|b|c}`` choices (nested allowed, ``\\{`` escapes)."""
    rng = rng or random.Random()
    text = _COMMENTS.sub("", text)

    def expand(s: str) -> str:
        out, i = [], 0
        while i < len(s):
            c = s[i]
            if c == "\\" and i + 1 < len(s):
                out.append(s[i:i + 2])
                i += 2
            elif c == "{":
                depth, j, parts, cur = 0, i + 1, [], []
                while j < len(s):
                    ch = s[j]
                    if ch == "\\" and j + 1 < len(s):
                        cur.append(s[j:j + 2])
                        j += 2
                        continue
                    if ch == "{":
                        depth += 1
                    elif ch == "}":
                        if depth == 0:
                            break
                        depth -= 1
                    elif ch == "|" and depth == 0:
                        parts.append("".join(cur))
                        cur = []
                        j += 1
                        continue
                    cur.append(ch)
                    j += 1
                parts.append("".join(cur))
                out.append(expand(rng.choice(parts)))
                i = j + 1
            else:
                out.append(c)
                i += 1
        return "".join(out)

    return re.sub(r"\\([{}|])", r"\1", expand(text))


# ----------------------------------------------------------------------------------------------------------------
# graph model

@dataclass
class _Link:
    id: str
    origin_id: str
    origin_slot: int
    target_id: str
    target_slot: int
    type: Any = None


@dataclass
class _Graph:
    nodes: dict[str, dict]
    links: dict[str, _Link]
    name: str = ""


@dataclass
class _Inst:
    """One node as it executes: top-level nodes and, flattened, the nodes inside subgraph instances."""

    exec_id: str
    node: dict
    graph: _Graph
    path: tuple[str, ...]
    parent: _Inst | None = None  # the subgraph node instance this node lives in
    dropped: bool = False  # muted, or inside a muted/bypassed subgraph instance
    inner: _Graph | None = None  # for a subgraph instance: its definition's graph

    @property
    def node_id(self) -> str:
        return str(self.node.get("id"))

    @property
    def type(self) -> str:
        return str(self.node.get("type", ""))

    @property
    def mode(self) -> int:
        try:
            return int(self.node.get("mode") or 0)
        except (TypeError, ValueError):
            return 0

    @property
    def inputs(self) -> list[dict]:
        return [i for i in (self.node.get("inputs") or []) if isinstance(i, dict)]

    @property
    def outputs(self) -> list[dict]:
        return [o for o in (self.node.get("outputs") or []) if isinstance(o, dict)]

    def describe(self) -> str:
        title = self.node.get("title")
        return f"node {self.exec_id} ({self.type}{f', titled {title!r}' if title and title != self.type else ''})"


def _parse_links(raw) -> dict[str, _Link]:
    links = {}
    for item in raw or []:
        if isinstance(item, (list, tuple)) and len(item) >= 5:
            link = _Link(str(item[0]), str(item[1]), int(item[2]), str(item[3]), int(item[4]),
                         item[5] if len(item) > 5 else None)
        elif isinstance(item, dict) and "id" in item:
            link = _Link(str(item["id"]), str(item.get("origin_id")), int(item.get("origin_slot") or 0),
                         str(item.get("target_id")), int(item.get("target_slot") or 0), item.get("type"))
        else:
            continue
        links[link.id] = link
    return links


def _make_graph(data: dict, name: str = "") -> _Graph:
    nodes = {}
    for node in data.get("nodes") or []:
        if isinstance(node, dict) and "id" in node:
            nodes[str(node["id"])] = node
    return _Graph(nodes, _parse_links(data.get("links")), name)


def _types_compatible(a, b) -> bool:
    """LiteGraph's rule: wildcards match anything; otherwise any shared member of comma-separated type lists."""
    if not a or not b or a == "*" or b == "*":
        return True
    if a == b:
        return True
    sa = {t.strip().lower() for t in str(a).split(",")}
    sb = {t.strip().lower() for t in str(b).split(",")}
    return bool(sa & sb)


class _Converter:
    def __init__(self, workflow: dict, object_info: dict, dynamic_prompts: bool, rng: random.Random | None):
        self.object_info = object_info
        self.dynamic_prompts = dynamic_prompts
        self.rng = rng or random.Random()
        self.subgraphs: dict[str, dict] = {}
        for sg in (workflow.get("definitions") or {}).get("subgraphs") or []:
            if isinstance(sg, dict) and "id" in sg:
                self.subgraphs[str(sg["id"])] = sg
        self.instances: dict[str, _Inst] = {}
        self.group_nodes = set(((workflow.get("extra") or {}).get("groupNodes") or {}).keys())
        self._add_graph(_make_graph(workflow), (), None, False, ())

    # -- structure -------------------------------------------------------------------------------------------
    def _add_graph(self, graph: _Graph, path, parent, dropped, stack) -> None:
        for node_id, node in graph.nodes.items():
            inst = _Inst(":".join((*path, node_id)), node, graph, path, parent)
            inst.dropped = dropped or inst.mode == MODE_NEVER
            self.instances[inst.exec_id] = inst
            sg = self.subgraphs.get(inst.type)
            if sg is not None:
                if inst.type in stack:
                    raise WorkflowError(f"{inst.describe()}: subgraph {sg.get('name')!r} contains itself")
                inst.inner = _make_graph(sg, str(sg.get("name") or inst.type))
                self._add_graph(inst.inner, (*path, node_id), inst, inst.dropped or inst.mode == MODE_BYPASS,
                                (*stack, inst.type))

    def is_subgraph(self, inst: _Inst) -> bool:
        return inst.type in self.subgraphs

    def is_virtual(self, inst: _Inst) -> bool:
        return (inst.type in FRONTEND_ONLY_TYPES and inst.type not in self.object_info) or self.is_subgraph(inst)

    def _inst(self, graph_path: tuple[str, ...], node_id: str, context: _Inst) -> _Inst:
        inst = self.instances.get(":".join((*graph_path, node_id)))
        if inst is None:
            raise WorkflowError(f"{context.describe()} is linked to node {node_id}, which is not in the workflow")
        return inst

    # -- link resolution (what a consumer's input really reads) ------------------------------------------------
    def resolve_input(self, inst: _Inst, slot: int, want_type=None, depth: int = 0):
        """``("link", exec_id, slot)``, ``("value", v)`` or ``None`` (unconnected: the widget value stands)."""
        if depth > 200:
            raise WorkflowError(f"{inst.describe()}: circular links")
        inputs = inst.inputs
        if slot < 0 or slot >= len(inputs):
            return None
        inp = inputs[slot]
        link_id = inp.get("link")
        if link_id is None:
            return None
        link = inst.graph.links.get(str(link_id))
        if link is None:
            return None  # a dangling link id: the frontend shows such an input as unconnected
        want_type = want_type or inp.get("type")
        if link.origin_id == SUBGRAPH_INPUT_NODE and inst.parent is not None:
            outer = inst.parent
            outer_inputs = outer.inputs
            if link.origin_slot >= len(outer_inputs):
                return None
            if outer_inputs[link.origin_slot].get("link") is None:
                return self._promoted_widget_value(outer, link.origin_slot)
            return self.resolve_input(outer, link.origin_slot, want_type, depth + 1)
        origin = self._inst(inst.path, link.origin_id, inst)
        return self.resolve_output(origin, link.origin_slot, want_type, depth + 1)

    def resolve_output(self, inst: _Inst, slot: int, want_type, depth: int = 0):
        if inst.mode == MODE_BYPASS:
            index = self._bypass_input(inst, slot, want_type)
            return None if index is None else self.resolve_input(inst, index, None, depth + 1)
        if self.is_subgraph(inst):
            if inst.dropped:  # muted subgraph: like a muted node, consumers lose the input
                return ("link", inst.exec_id, slot)
            link = next((lk for lk in inst.inner.links.values()
                         if lk.target_id == SUBGRAPH_OUTPUT_NODE and lk.target_slot == slot), None)
            if link is None:
                return None
            if link.origin_id == SUBGRAPH_INPUT_NODE:  # an input wired straight to an output
                return self.resolve_input(inst, link.origin_slot, want_type, depth + 1)
            inner_inst = self._inst((*inst.path, inst.node_id), link.origin_id, inst)
            return self.resolve_output(inner_inst, link.origin_slot, want_type, depth + 1)
        if inst.type == "PrimitiveNode" and inst.type not in self.object_info:
            values = inst.node.get("widgets_values")
            if isinstance(values, list) and values:
                return ("value", values[0])
            return None
        if self.is_virtual(inst):  # Reroute and the like: pass through their input
            if slot < len(inst.inputs):
                return self.resolve_input(inst, slot, want_type, depth + 1)
            return None
        return ("link", inst.exec_id, slot)

    def _bypass_input(self, inst: _Inst, slot: int, want_type) -> int | None:
        """Which input of a bypassed node feeds its output ``slot`` (same slot if the types fit, else by type)."""
        inputs = inst.inputs
        outputs = inst.outputs
        out_type = outputs[slot].get("type") if slot < len(outputs) else want_type
        if not inputs:
            return None
        if want_type in (None, "", "*"):
            return slot if slot < len(inputs) else 0
        if slot < len(inputs):
            t = inputs[slot].get("type")
            if _types_compatible(t, out_type) and _types_compatible(t, want_type):
                return slot
        for i, inp in enumerate(inputs):
            if inp.get("type") == want_type:
                return i
        for i, inp in enumerate(inputs):
            t = inp.get("type")
            if _types_compatible(t, out_type) and _types_compatible(t, want_type):
                return i
        return None

    def _promoted_widget_value(self, sg_inst: _Inst, slot: int):
        """The value of a widget promoted onto a subgraph node (its unconnected widget input ``slot``)."""
        inputs = sg_inst.inputs
        if not inputs[slot].get("widget"):
            return None
        values = sg_inst.node.get("widgets_values")
        name = inputs[slot]["widget"].get("name") or inputs[slot].get("name")
        if isinstance(values, dict):
            return ("value", values[name]) if name in values else None
        widget_inputs = [i for i in inputs if i.get("widget")]
        index = next((k for k, i in enumerate(widget_inputs) if i is inputs[slot]), None)
        if isinstance(values, list) and index is not None and index < len(values):
            return ("value", values[index])
        return None

    # -- output ------------------------------------------------------------------------------------------------
    def missing_types(self) -> list[_Inst]:
        return [inst for inst in self.instances.values()
                if not inst.dropped and inst.mode != MODE_BYPASS and not self.is_virtual(inst)
                and inst.type not in self.object_info]

    def convert(self) -> dict:
        missing = self.missing_types()
        if missing:
            raise WorkflowError(_missing_message(missing, self.group_nodes))
        prompt: dict[str, dict] = {}
        for inst in self.instances.values():
            if inst.dropped or inst.mode == MODE_BYPASS or self.is_virtual(inst):
                continue
            prompt[inst.exec_id] = self._node_inputs(inst)
        for entry in prompt.values():  # links to nodes that are not sent (muted) are dropped, as the UI does
            for name, value in list(entry["inputs"].items()):
                if _is_link(value) and value[0] not in prompt:
                    del entry["inputs"][name]
        return prompt

    def _node_inputs(self, inst: _Inst) -> dict:
        definition = self.object_info[inst.type]
        specs = {name: spec for name, spec, _ in defined_inputs(definition)}
        linked = {str((i.get("widget") or {}).get("name") or i.get("name")) for i in inst.inputs
                  if i.get("link") is not None and i.get("widget")}
        try:
            values = assign_widget_values(definition, inst.node.get("widgets_values"), linked)
        except Exception as e:  # a malformed node must name itself
            raise WorkflowError(f"{inst.describe()}: cannot read its widget values ({e})") from e
        inputs: dict[str, Any] = {}
        for name, value in values.items():
            inputs[name] = value
        for slot, inp in enumerate(inst.inputs):
            name = str(inp.get("name"))
            widget_name = (inp.get("widget") or {}).get("name")
            if widget_name and widget_name in specs:
                name = widget_name
            resolved = self.resolve_input(inst, slot)
            if resolved is None:
                continue
            if resolved[0] == "value":
                inputs[name] = resolved[1]
            else:
                inputs[name] = [resolved[1], int(resolved[2])]
        for name, value in list(inputs.items()):
            spec = specs.get(name)
            if (self.dynamic_prompts and isinstance(value, str) and spec is not None
                    and input_type(spec) == "STRING" and _options(spec).get("dynamicPrompts")):
                inputs[name] = process_dynamic_prompt(value, self.rng)
            elif isinstance(value, list) and not _is_link(value):
                inputs[name] = {"__value__": value}
        title = inst.node.get("title") or definition.get("display_name") or inst.type
        return {"inputs": inputs, "class_type": inst.type, "_meta": {"title": title}}


def _is_link(value) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def _pack_hint(inst: _Inst, group_nodes) -> str:
    props = inst.node.get("properties") or {}
    if inst.type.startswith(("workflow>", "workflow/")) or inst.type.split(">")[-1] in group_nodes:
        return "it is a legacy group node: open the workflow in ComfyUI and convert it to a subgraph or ungroup it"
    if inst.type.startswith("SILO"):
        return "it comes from comfyui-silo: is this pack installed in the server's custom_nodes?"
    for key in ("cnr_id", "aux_id"):
        if props.get(key) and props[key] != "comfy-core":
            return f"install the custom node pack {props[key]!r}"
    if props.get("cnr_id") == "comfy-core":
        return "a core node this ComfyUI version does not have or failed to import (update ComfyUI; check its log)"
    return "is the custom node pack that provides it installed?"


def _missing_message(missing: list[_Inst], group_nodes) -> str:
    parts = [f"{inst.describe()}: unknown node type {inst.type!r} ({_pack_hint(inst, group_nodes)})"
             for inst in missing]
    return "the server does not know these node types: " + "; ".join(parts)


def ui_to_api(workflow: dict, object_info: dict, *, dynamic_prompts: bool = True,
              rng: random.Random | None = None) -> dict:
    """Convert a UI-format workflow (what the ComfyUI frontend saves) to an API-format prompt.

    ``object_info`` is the server's ``/object_info`` (all nodes). Muted nodes are dropped, bypassed nodes pass
    their inputs through, reroutes are followed, primitive nodes feed their value to the widgets they drive, and
    subgraphs are flattened into ``"outer:inner"`` node ids, as the frontend's "Queue" does. STRING widgets
    marked ``dynamicPrompts`` get comments stripped and ``{a|b}`` choices resolved (with ``rng``).

    Raises :class:`WorkflowError` (a ``ValueError``) naming the nodes whose types the server does not know.
    """
    if is_api_format(workflow):
        return json.loads(json.dumps(workflow))
    if not is_ui_format(workflow):
        raise WorkflowError("not a ComfyUI workflow: expected the UI format (a 'nodes' list) or the API format "
                            "({node_id: {'class_type': ..., 'inputs': ...}})")
    return _Converter(workflow, object_info, dynamic_prompts, rng).convert()


# ----------------------------------------------------------------------------------------------------------------
# overrides (--image NODE=file, --set NODE.input=value)

def _node_list(api: dict) -> str:
    return ", ".join(f"{nid} ({entry.get('class_type')})" for nid, entry in api.items())


def resolve_node(api: dict, ref: str) -> str:
    """A node by id, or by its exact title or class type when that names exactly one node."""
    ref = str(ref).strip()
    if ref in api:
        return ref
    matches = [nid for nid, e in api.items()
               if (e.get("_meta") or {}).get("title") == ref or e.get("class_type") == ref]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise WorkflowError(f"{ref!r} names several nodes ({', '.join(matches)}); use a node id")
    raise WorkflowError(f"no node {ref!r} in the workflow; nodes: {_node_list(api)}")


def parse_value(text: str, spec=None):
    """A ``--set`` value: JSON when it parses (``10``, ``0.5``, ``true``, ``"x"``, ``[..]``), else the text.

    For STRING inputs (per ``spec``) the text is kept as is, so ``--set 6.text=42`` sets the string ``"42"``.
    """
    if spec is not None and input_type(spec) == "STRING":
        return text
    if spec is not None and input_type(spec) == "COMBO" and text in (combo_options(spec) or []):
        return text
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text


def apply_overrides(api: dict, images: dict | None = None, sets: dict | None = None,
                    object_info: dict | None = None) -> dict:
    """Set LoadImage files (``images={node: filename}``) and any inputs (``sets={"NODE.input": value}``).

    Values in ``sets`` that are strings are parsed with :func:`parse_value`. Unknown nodes or inputs raise
    :class:`WorkflowError` listing the valid ones. Changes ``api`` in place and returns it.
    """
    for ref, filename in (images or {}).items():
        nid = resolve_node(api, ref)
        entry = api[nid]
        inputs = entry.setdefault("inputs", {})
        if "image" not in inputs or _is_link(inputs["image"]):
            loaders = [f"{k} ({e.get('class_type')})" for k, e in api.items()
                       if "image" in (e.get("inputs") or {}) and not _is_link(e["inputs"]["image"])]
            raise WorkflowError(f"node {nid} ({entry.get('class_type')}) has no image file input; "
                                f"image loader nodes: {', '.join(loaders) or 'none'}")
        inputs["image"] = filename
    for key, value in (sets or {}).items():
        if "." not in key:
            raise WorkflowError(f"--set {key!r}: expected NODE.input=VALUE")
        ref, name = key.rsplit(".", 1)
        nid = resolve_node(api, ref)
        entry = api[nid]
        inputs = entry.setdefault("inputs", {})
        specs = {}
        if object_info and entry.get("class_type") in object_info:
            specs = {n: s for n, s, _ in defined_inputs(object_info[entry["class_type"]])}
        valid = list(dict.fromkeys([*inputs, *specs]))
        if name not in valid:
            raise WorkflowError(f"node {nid} ({entry.get('class_type')}) has no input {name!r}; "
                                f"inputs: {', '.join(valid) or 'none'}")
        inputs[name] = parse_value(value, specs.get(name)) if isinstance(value, str) else value
    return api


def parse_assignments(items: list[str] | None, kind: str) -> dict[str, str]:
    """``["12=photo.png"]`` -> ``{"12": "photo.png"}`` (kind ``image``); ``["5.steps=10"]`` -> ``{"5.steps": "10"}``."""
    usage = "NODE=FILE" if kind == "image" else "NODE.input=VALUE"
    out: dict[str, str] = {}
    for item in items or []:
        left, sep, right = item.partition("=")
        left = left.strip()
        if not sep or not left or (kind == "set" and "." not in left.strip(".")):
            raise WorkflowError(f"--{kind} {item!r}: expected {usage}")
        out[left] = right
    return out


def _outputs_and_ancestors(api: dict, object_info: dict) -> list[str]:
    """The nodes the server would validate: output nodes and everything they depend on (in the API prompt)."""
    todo = [nid for nid, e in api.items() if (object_info.get(e.get("class_type")) or {}).get("output_node")]
    seen: list[str] = []
    while todo:
        nid = todo.pop()
        if nid in seen or nid not in api:
            continue
        seen.append(nid)
        for value in (api[nid].get("inputs") or {}).values():
            if _is_link(value):
                todo.append(str(value[0]))
    return seen


def check_prompt(api: dict, object_info: dict, uploads: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """What the server would refuse in an API prompt, found without the server (so nothing is uploaded or queued
    for a prompt that cannot run): unknown node types, missing required inputs, links to missing nodes or outputs,
    combo values that are not among the options (``uploads``: file names that will exist once uploaded) and numbers
    outside their range. Only the nodes the server validates are checked (outputs and what they need). Returns one
    readable line per problem; the server's own validation still runs when the prompt is queued."""
    problems = []
    unknown = sorted({f"{nid} ({e.get('class_type')})" for nid, e in api.items()
                      if e.get("class_type") not in object_info})
    if unknown:
        problems.append(f"unknown node type(s): node {', node '.join(unknown)}")
    for nid in _outputs_and_ancestors(api, object_info):
        entry = api[nid]
        definition = object_info.get(entry.get("class_type"))
        if definition is None:
            continue
        label = f"node {nid} ({entry.get('class_type')})"
        inputs = entry.get("inputs") or {}
        for name, spec, section in defined_inputs(definition):
            if name not in inputs:
                if section == "required":
                    problems.append(f"{label}: required input {name!r} is missing")
                continue
            value = inputs[name]
            if _is_link(value):
                src = api.get(str(value[0]))
                outs = (object_info.get((src or {}).get("class_type")) or {}).get("output") or []
                if src is None:
                    problems.append(f"{label}: input {name!r} is linked to node {value[0]}, which is not in the prompt")
                elif src.get("class_type") in object_info and not 0 <= int(value[1]) < len(outs):
                    problems.append(f"{label}: input {name!r} is linked to output {value[1]} of node {value[0]} "
                                    f"({src.get('class_type')}), which has {len(outs)} outputs")
                continue
            opts = _options(spec)
            if any(opts.get(k) for k in UPLOAD_OPTIONS):
                continue  # file inputs (Load Image): the node checks its file itself, subfolders included
            options = combo_options(spec)
            if options and isinstance(value, str) and value not in options and value not in uploads:
                shown = ", ".join(map(str, options[:8])) + (", ..." if len(options) > 8 else "")
                problems.append(f"{label}: {name} {value!r} is not one of the choices ({shown})")
                continue
            if input_type(spec) in ("INT", "FLOAT") and isinstance(value, (int, float)) and not isinstance(value, bool):
                lo, hi = opts.get("min"), opts.get("max")
                if (lo is not None and value < lo) or (hi is not None and value > hi):
                    problems.append(f"{label}: {name} = {value} is outside [{lo}, {hi}]")
    return problems
