"""The node glue's layout (issue 12, item 3), read from the source: imports run one way
(common ← host ← measurement ← solvers), no circles, no private names across modules, and the host's
run-time API (``comfy.*``, ``latent_preview``) is touched only by the host modules. Pure AST: needs no host."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

NODES = Path(__file__).resolve().parents[2] / "nodes"
#: modules allowed to import ``comfy.*`` at run time: the host glue, and the model-family glue it uses
HOST_MODULES = {"host", "families"}
#: who may import whom among the sampling modules (the one-way chain)
ALLOWED = {
    "common": set(),
    "host": {"common", "families"},
    "measurement": {"common", "host", "widgets"},
    "solvers": {"common", "families", "host", "measurement", "widgets"},
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
    modules = set(_graph()) - HOST_MODULES
    assert {"common", "widgets", "measurement", "solvers", "metrics", "operator_nodes", "degradation"} <= modules
    for mod in sorted(modules):
        host = _graph()[mod][2] & {"comfy", "latent_preview", "folder_paths", "nodes", "comfy_extras"}
        assert not host, f"nodes/{mod}.py imports {sorted(host)}: that belongs in nodes/host.py"


# ------------------------------------------------------------------------------------ the README's drawing
WINGS = ("config", "operators", "samplers", "nodes", "tools", "benchmarks", "scripts")
ROOT = NODES.parent


def _wing_of(module: list[str]) -> str | None:
    return module[0] if module and module[0] in WINGS else None


def _wing_graph() -> dict[str, set[str]]:
    """``{wing: wings it imports}`` read from the source (relative and ``comfyui_silo.`` imports)."""
    graph = {w: set() for w in (*WINGS, "__init__.py", "__main__.py")}
    files = [ROOT / "__init__.py", ROOT / "__main__.py", *(f for w in WINGS for f in (ROOT / w).rglob("*.py"))]
    for f in files:
        parts = f.relative_to(ROOT).parts
        src = parts[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                base = list(parts[:-1])[: len(parts) - node.level]
                targets = [base + (node.module.split(".") if node.module else [a.name]) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("comfyui_silo."):
                targets = [node.module.split(".")[1:]]
            graph[src] |= {w for t in targets if (w := _wing_of(t)) and w != src}
    return graph


def _readme_drawing() -> dict[str, set[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text[text.index("  wing          imports"):]
    lines = block[: block.index("```")].splitlines()
    col_imports, col_what = lines[0].index("imports"), lines[0].index("what it is")
    drawn, wing = {}, None
    for line in lines[1:]:
        wing = line[:col_imports].strip().rstrip("/") or wing
        cell = line[col_imports:col_what].replace("→", "").replace("(nothing)", "")
        drawn.setdefault(wing, set()).update(w.strip() for w in cell.split(",") if w.strip())
    return drawn


def test_the_readme_draws_the_real_import_graph():
    assert _readme_drawing() == _wing_graph()


def test_no_wing_imports_one_above_it():
    """Levels: config, then the two core wings side by side (operators and samplers never import each other),
    nodes, tools, then benchmarks and scripts, then the package entry point."""
    level = {"config": 0, "operators": 1, "samplers": 1, "nodes": 2, "tools": 3, "benchmarks": 4, "scripts": 4,
             "__init__.py": 5, "__main__.py": 5}
    upward = sorted((a, b) for a, deps in _wing_graph().items() for b in deps if level[b] >= level[a])
    assert not upward, f"imports against the layering: {upward}"
