"""The pack's own rules: a core that never imports the host, Registry-ready packaging, CI in sync with README."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CORE_DIRS = ["operators", "samplers", "config"]
HOST_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes", "server",
                "execution", "latent_preview", "node_helpers"}


def _imported_top_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("core", CORE_DIRS)
def test_core_sources_never_import_the_host(core):
    files = sorted((ROOT / core).rglob("*.py"))
    assert files, f"{core}/ has no Python files"
    offenders = {str(f.relative_to(ROOT)): sorted(_imported_top_modules(f) & HOST_MODULES) for f in files}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"the pure-torch core imports ComfyUI: {offenders}"


def test_core_imports_in_a_process_where_the_host_cannot_be_imported():
    code = r"""
import importlib, pkgutil, sys
BLOCK = set(sys.argv[1].split(","))
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCK:
            raise ImportError('blocked host module ' + name)
sys.meta_path.insert(0, Blocker())
import comfyui_silo
for pkg in ('comfyui_silo.operators', 'comfyui_silo.samplers'):
    mod = importlib.import_module(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + '.'):
        importlib.import_module(info.name)
print('ok', len([m for m in sys.modules if m.startswith('comfyui_silo.')]))
"""
    proc = subprocess.run([sys.executable, "-c", code, ",".join(sorted(HOST_MODULES))], capture_output=True, text=True, cwd="/", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")


def test_pyproject_is_registry_ready():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["name"] == "comfyui-silo"
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), "version must be semver"
    assert project["license"] == {"file": "LICENSE"} and (ROOT / "LICENSE").is_file()
    assert "GNU GENERAL PUBLIC LICENSE" in (ROOT / "LICENSE").read_text()[:200]
    deps = [re.split(r"[<>=!~; ]", d)[0].lower() for d in project["dependencies"]]
    assert not {"torch", "torchvision", "torchaudio", "torchsde"} & set(deps), "never list torch: the host provides it"
    assert {"kornia", "einops", "safetensors"} <= set(deps)
    assert "Repository" in project["urls"]
    assert {"PublisherId", "DisplayName", "Icon"} <= set(meta["tool"]["comfy"])
    assert "test" in project["optional-dependencies"]
    reqs = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip()]
    assert sorted(reqs) == sorted(project["dependencies"]), "requirements.txt must list the same dependencies"
    from comfyui_silo import __version__
    from comfyui_silo.config.version import __version__ as declared

    assert __version__ is declared, "the package re-exports config/version.py's version"
    assert declared == project["version"], "pyproject.toml's version must equal config/version.py's"
    # the version is written in one place only: no other module assigns __version__
    writers = [str(f.relative_to(ROOT)) for f in ROOT.rglob("*.py")  # the pack's files, not .venv*/.cache
               if not any(part.startswith(".") for part in f.relative_to(ROOT).parts)
               and re.search(r"^__version__\s*=", f.read_text(), re.M)]
    assert writers == ["config/version.py"], writers


def _relative_imports(path: Path, package_root: Path) -> set[str]:
    """Modules of this pack that ``path`` imports (as dotted paths relative to the pack), at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = path.relative_to(package_root).with_suffix("").parts
    pkg = here[:-1] if here[-1] != "__init__" else here[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
            mod = (*base, *(node.module.split(".") if node.module else ()))
            names = [(*mod, a.name) for a in node.names]
            for cand in [mod, *names]:
                if (package_root.joinpath(*cand).with_suffix(".py")).is_file():
                    found.add(".".join(cand))
                elif (package_root.joinpath(*cand) / "__init__.py").is_file():
                    found.add(".".join((*cand, "__init__")))
    return found


@pytest.mark.parametrize("layer", [("operators", "samplers", "config")])
def test_core_modules_import_in_one_direction(layer):
    """No import circles inside the core (operators/, samplers/, config/), direct or through other modules, and the
    core never imports a module above it (nodes/, tools/, the package __init__)."""
    files = [f for d in layer for f in sorted((ROOT / d).glob("*.py"))]
    graph = {".".join(f.relative_to(ROOT).with_suffix("").parts): _relative_imports(f, ROOT) for f in files}
    for mod, deps in graph.items():
        upward = sorted(d for d in deps if d.split(".")[0] not in layer)
        assert not upward, f"{mod} imports {upward}, above the core"
    edges = {m: {d for d in deps if d in graph and not d.endswith("__init__")} for m, deps in graph.items()}

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == start:
                    return [*path, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [c for m in edges if (c := cycle_from(m))]
    assert not cycles, f"import circle: {' -> '.join(cycles[0])}"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    cmd = re.search(r"^TEST_CMD='([^']+)'", ci, re.M)
    assert cmd, ".ci/run must define TEST_CMD='...'"
    readme = (ROOT / "README.md").read_text()
    assert cmd.group(1) in readme, f"README.md must show the test command {cmd.group(1)!r}"
    assert "exit 5" in ci or '"$rc" -eq 5' in ci, ".ci/run must treat pytest's 'no tests' (exit 5) as a failure"


def _node_ids_in_source() -> set[str]:
    """Node ids as the source declares them: ``NODE_ID, ... = "X", ...`` and one KSampler/SAMPLER pair per
    ``register(SolverNodes("X", ...))``."""
    ids = set()
    for f in (ROOT / "nodes").rglob("*.py"):
        text = f.read_text()
        ids |= set(re.findall(r'^    NODE_ID\b[^=]*= "([A-Za-z0-9_]+)"', text, re.M))
        for prefix in re.findall(r'register\(SolverNodes\("([A-Za-z0-9_]+)"', text):
            ids |= {f"{prefix}KSampler", f"{prefix}Sampler"}
    return ids


def test_node_list_json_names_every_node_for_comfyui_manager():
    listed = json.loads((ROOT / "node_list.json").read_text())
    assert isinstance(listed, dict) and listed
    assert set(listed) == _node_ids_in_source()
    assert all(isinstance(v, str) and v for v in listed.values())


def test_gitignore_keeps_generated_files_out():
    text = (ROOT / ".gitignore").read_text()
    for pattern in (".venv", "__pycache__", ".cache", "*.safetensors"):
        assert pattern in text
