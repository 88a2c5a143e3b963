"""Finding, importing and starting the ComfyUI host headlessly: the test tiers and the benchmark harness use it.

The nodes never import it. The host is never copied into this repository: tests point at an
existing checkout through ``COMFYUI_PATH`` (default ``~/ComfyUI``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

from .host_process import comfyui_path, import_host
from .runner import PACK_FOLDER_NAME, ComfyRunner, RunnerError, free_port  # noqa: F401  (free_port: re-exported)

REPO_ROOT = Path(__file__).resolve().parents[1]


def host_problem() -> str | None:
    """None when a usable host checkout is found, else a sentence saying what is missing."""
    path = comfyui_path()
    if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
        return (f"no ComfyUI host at {path} (set COMFYUI_PATH to a ComfyUI checkout; "
                "see README 'Developers' for how to get one)")
    try:
        import torchvision  # noqa: F401  (the host imports it at start)
    except Exception as e:  # pragma: no cover - depends on the environment
        return f"ComfyUI host found at {path}, but torchvision does not import here ({e})"
    return None


def cache_dir() -> Path:
    d = Path(os.environ.get("SILO_TEST_CACHE") or (REPO_ROOT / ".cache" / "test-models"))
    d.mkdir(parents=True, exist_ok=True)
    return d


# random_checkpoint.py variant -> cached file name. Bump a name's version when its variant's architecture changes, so
# stale cached files are not reused.
CHECKPOINT_FILES = {
    "small": "sd15_small_random.safetensors",
    "full": "sd15_full_random.safetensors",
    "sdxl": "sdxl_small_random_v1.safetensors",
    "sd21v": "sd21v_small_random_v1.safetensors",
    "sd3": "sd3_small_random_v1.safetensors",
    "flux": "flux_tiny_random_v1.safetensors",
    "clip_l": "clip_l_random_v1.safetensors",
}
# the family checkpoints beyond SD1.5 (tests/comfy/test_families.py), and the host folder each file goes into
FAMILY_VARIANTS = ("sdxl", "sd21v", "sd3", "flux")
MODEL_FOLDERS = {"clip_l": "text_encoders"}


def ensure_checkpoint(variant: str = "small") -> Path:
    """Build (once, then cached) a random-weight checkpoint of ``variant`` (see random_checkpoint.py) in a
    subprocess."""
    out = cache_dir() / CHECKPOINT_FILES[variant]
    if out.is_file():
        return out
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "random_checkpoint.py"),
           "--variant", variant, "--out", str(out), "--comfyui", str(comfyui_path())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"building the random checkpoint failed:\n{proc.stdout}\n{proc.stderr}")
    return out


def link_model(base: Path, path: Path, folder: str = "checkpoints") -> str:
    """Link a generated model file into ``base/models/<folder>`` (the host lists new files at its next request);
    returns the name a loader node takes."""
    target_dir = base / "models" / folder
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / path.name
    if not target.exists():
        target.symlink_to(path)
    return path.name


def ensure_family_models(base: Path) -> dict[str, str]:
    """Build (cached) the family checkpoints and the CLIP-L text encoder and link them into ``base``; returns
    ``{variant: file name}`` for the loader nodes (CheckpointLoaderSimple; CLIPLoader for ``clip_l``)."""
    names = {}
    for variant in (*FAMILY_VARIANTS, "clip_l"):
        names[variant] = link_model(base, ensure_checkpoint(variant), MODEL_FOLDERS.get(variant, "checkpoints"))
    return names


def make_base_directory(base: Path, checkpoints: list[Path]) -> Path:
    """A throw-away ComfyUI base directory: our pack linked into custom_nodes, generated checkpoints linked in."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_FOLDER_NAME
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    ckpt_dir = base / "models" / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for ckpt in checkpoints:
        target = ckpt_dir / ckpt.name
        if not target.exists():
            target.symlink_to(ckpt)
    for sub in ("input", "output", "temp", "user", "models/latent_operators"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    return base


class InProcessHost:
    """The real ComfyUI imported into this process, custom nodes loaded the way the server loads them."""

    def __init__(self, base: Path, cpu: bool = True):
        """``cpu``: the test tiers run on the CPU; False keeps a GPU when there is one (the benchmarks)."""
        self.base = base
        import_host(comfyui_path(), cpu=cpu, base_directory=base)
        import comfy.cli_args

        comfy.cli_args.args.disable_all_custom_nodes = False
        import folder_paths

        if os.path.realpath(folder_paths.base_path) != os.path.realpath(base):
            raise RuntimeError("folder_paths was imported before the test host was configured; "
                               "only one in-process host per test session is possible")
        # main.py imports the host's `utils` package before `nodes` puts comfy/ first on sys.path; without that,
        # `utils` later resolves to comfy/utils.py and comfy_extras/nodes_images.py (Image Stitch, ...) fails
        with contextlib.suppress(ImportError):
            import utils.install_util  # noqa: F401
        import nodes

        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        self.nodes = nodes
        self.folder_paths = folder_paths
        import comfy.model_management

        self.mm = comfy.model_management

    def node_class(self, node_id: str):
        try:
            return self.nodes.NODE_CLASS_MAPPINGS[node_id]
        except KeyError:
            raise AssertionError(f"node {node_id!r} is not registered with the host") from None

    def run_node(self, node_id: str, **inputs):
        """Call a node as the executor does: under ``torch.inference_mode()``; returns the output tuple."""
        import torch

        cls = self.node_class(node_id)
        with torch.inference_mode():
            if hasattr(cls, "PREPARE_CLASS_CLONE"):  # V3 node
                clone = cls.PREPARE_CLASS_CLONE({})
                out = clone.EXECUTE_NORMALIZED(**inputs)
                self.last_ui = out.ui.as_dict() if hasattr(out.ui, "as_dict") else out.ui
                return tuple(out.args)
            obj = cls()
            out = getattr(obj, cls.FUNCTION)(**inputs)
            if isinstance(out, dict):
                self.last_ui = out.get("ui")
                return tuple(out.get("result", ()))
            return tuple(out)


class ServerHost(ComfyRunner):
    """A real ``python main.py --cpu`` server on a free loopback port, for the test tiers: the server plumbing
    (process group, port, log file, readiness, shutdown) is :class:`ComfyRunner`'s; this adds the tests' flavour of
    HTTP (failures are ``AssertionError``s) and starts at once. The base directory holds the pack already
    (:func:`make_base_directory`), so nothing is linked in and the pack's loading is not checked here."""

    def __init__(self, base: Path, log_path: Path, boot_timeout: float = 180.0):
        super().__init__(comfyui_path(), base_directory=base, cpu=True, pack_dir=None, log_path=log_path,
                         boot_timeout=boot_timeout, require_pack=False, extra_args=["--dont-print-server"],
                         progress=False)
        try:
            self.start()
        except RunnerError as e:  # with the log tail in the message, where pytest shows it
            raise RuntimeError(f"{e}:\n{e.details}") from None

    def get(self, path: str, timeout: float = 30):
        return self.get_json(path, timeout=timeout)

    def post(self, path: str, payload: dict, timeout: float = 30):
        try:
            return self.post_json(path, payload, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')}") from None

    def run_prompt(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue an API-format prompt and wait for its history entry; raises with the host's error if it fails."""
        pid = self.post("/prompt", {"prompt": prompt, "client_id": "comfyui-silo-tests"})["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{pid}")
            if pid in hist:
                entry = hist[pid]
                status = entry.get("status", {})
                if status.get("status_str") == "error" or not status.get("completed", True):
                    msgs = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    raise AssertionError(f"prompt failed: {json.dumps(msgs, indent=1)[:4000]}")
                return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running the prompt:\n{self.log_tail(60)}")
            time.sleep(0.5)
        raise TimeoutError(f"prompt {pid} did not finish in {timeout:.0f} s:\n{self.log_tail(60)}")


def copy_into_input(base: Path, src: Path) -> str:
    dst = base / "input" / src.name
    shutil.copyfile(src, dst)
    return dst.name
