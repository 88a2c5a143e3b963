"""The node glue's layout (issue 12, item 3), read from the source: imports run one way
(common ← host ← measurement ← silo / baselines), no circles, no private names across modules, and the host's
run-time API (``comfy.*``, ``latent_preview``) is touched only by the host modules. Needs no host."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfy

NODES = Path(__file__).resolve().parents[2] / "nodes"
#: modules allowed to import ``comfy.*`` at run time: the host glue, and the model-family glue it uses
HOST_MODULES = {"host", "families"}
#: who may import whom among the sampling modules (the one-way chain)
ALLOWED = {
    "common": set(),
    "host": {"common", "families"},
    "measurement": {"common", "host"},
    "silo": {"common", "host", "measurement", "widgets"},
    "baselines": {"common", "host", "measurement", "widgets"},
}


def _imports(path: Path):
    """(sibling modules imported, names imported from siblings, host modules imported) of one file."""
    siblings, names, host = set(), [], set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            mod = node.module or ""
            siblings.add(mod.split(".")[0])
            names += [(mod, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            host.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            host.update(a.name.split(".")[0] for a in node.names)
    return siblings, names, host


def _graph():
    return {p.stem: _imports(p) for p in NODES.glob("*.py") if p.stem != "__init__"}


def test_imports_run_one_way_without_circles():
    graph = _graph()
    for mod, allowed in ALLOWED.items():
        siblings = graph[mod][0]
        assert siblings <= allowed, f"nodes/{mod}.py imports {sorted(siblings - allowed)}: against the one-way chain"

    def visit(mod, path):
        for dep in graph.get(mod, ((),))[0]:
            assert dep not in path, f"import circle: {' -> '.join([*path, dep])}"
            visit(dep, [*path, dep])

    for mod in graph:
        visit(mod, [mod])


def test_no_private_names_cross_modules():
    for mod, (_siblings, names, _host) in _graph().items():
        private = [f"{src}.{name}" for src, name in names if name.startswith("_")]
        assert not private, f"nodes/{mod}.py imports private names {private}"


def test_only_the_host_modules_touch_comfy_at_run_time():
    for mod in ("common", "widgets", "measurement", "silo", "baselines", "metrics", "operator_nodes", "degradation",
                "plots"):
        host = _graph()[mod][2] & {"comfy", "latent_preview", "folder_paths", "nodes", "comfy_extras"}
        assert not host, f"nodes/{mod}.py imports {sorted(host)}: that belongs in nodes/host.py"
