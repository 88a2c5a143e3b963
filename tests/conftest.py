"""Test tiers for comfyui-silo.

- ``unit``   pure torch, no host: always runs.
- ``comfy``  the real ComfyUI imported in-process (``COMFYUI_PATH``, default ``~/ComfyUI``).
- ``server`` a real ComfyUI server process on a loopback port.

Host tiers are skipped, loudly, when no host is found. Select tiers with ``-m unit`` / ``-m comfy`` /
``-m server`` (or combinations such as ``-m "unit or comfy"``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # makes `support` importable

from support import host as host_support  # noqa: E402

HOST_TIERS = ("comfy", "server")
_HOST_PROBLEM = host_support.host_problem()
#: The real-autoencoder tier (``realvae``) needs taef2's two weight files; never committed, pointed to by this.
TAEF2_ENV = "SILO_TAEF2_DIR"


def taef2_problem() -> str | None:
    folder = os.environ.get(TAEF2_ENV)
    if not folder:
        return (f"{TAEF2_ENV} is not set (point it at a folder holding taef2_encoder.pth and taef2_decoder.pth "
                "from github.com/madebyollin/taesd)")
    missing = [n for n in ("taef2_encoder.pth", "taef2_decoder.pth") if not (Path(folder) / n).is_file()]
    return f"{TAEF2_ENV}={folder} lacks {', '.join(missing)}" if missing else None


_TAEF2_PROBLEM = taef2_problem()


def pytest_collection_modifyitems(config, items):
    host_skip = pytest.mark.skip(reason=f"HOST TEST SKIPPED: {_HOST_PROBLEM}")
    taef2_skip = pytest.mark.skip(reason=f"REAL-VAE TEST SKIPPED: {_TAEF2_PROBLEM}")
    for item in items:
        if _HOST_PROBLEM is not None and any(item.get_closest_marker(t) for t in HOST_TIERS):
            item.add_marker(host_skip)
        if _TAEF2_PROBLEM is not None and item.get_closest_marker("realvae"):
            item.add_marker(taef2_skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tr = terminalreporter
    real = [r for r in tr.stats.get("skipped", []) if "REAL-VAE TEST SKIPPED" in str(r.longrepr)]
    if real:
        tr.write_sep("!", f"{len(real)} real-autoencoder (taef2) tests were SKIPPED", red=True, bold=True)
        tr.write_line(f"reason: {_TAEF2_PROBLEM}")
    skipped = [r for r in tr.stats.get("skipped", []) if "HOST TEST SKIPPED" in str(r.longrepr)]
    if _HOST_PROBLEM is not None:
        tr.write_sep("!", f"{len(skipped)} ComfyUI host tests were SKIPPED", red=True, bold=True)
        tr.write_line(f"reason: {_HOST_PROBLEM}")
        tr.write_line("Only the pure-torch unit tier ran. Point COMFYUI_PATH at a ComfyUI checkout to run the rest.")
    else:
        tr.write_sep("=", f"ComfyUI host used: {host_support.comfyui_path()}", green=True)


@pytest.fixture(scope="session")
def host_available():
    if _HOST_PROBLEM is not None:
        pytest.skip(f"HOST TEST SKIPPED: {_HOST_PROBLEM}")
    return host_support.comfyui_path()


@pytest.fixture(scope="session")
def small_checkpoint(host_available) -> Path:
    """Random-weight SD1.5 checkpoint with a small UNet (still detected as SD15); cached between runs."""
    return host_support.ensure_checkpoint("small")


@pytest.fixture(scope="session")
def host_base(tmp_path_factory, small_checkpoint) -> Path:
    base = tmp_path_factory.mktemp("comfy_base")
    return host_support.make_base_directory(base, [small_checkpoint])


@pytest.fixture(scope="session")
def comfy_host(host_base):
    """The real ComfyUI, imported once per session, with our pack loaded as the server loads it."""
    return host_support.InProcessHost(host_base)


@pytest.fixture(scope="session")
def comfy_server(host_base, tmp_path_factory):
    log = tmp_path_factory.mktemp("server_log") / "comfyui.log"
    server = host_support.ServerHost(host_base, log)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sd15_small(comfy_host, small_checkpoint):
    """(MODEL, CLIP, VAE) of the small random checkpoint, loaded through the host's CheckpointLoaderSimple."""
    model, clip, vae = comfy_host.run_node("CheckpointLoaderSimple", ckpt_name=small_checkpoint.name)[:3]
    return model, clip, vae


@pytest.fixture(scope="session")
def family_models(host_base) -> dict[str, str]:
    """Random checkpoints of the other model families (SDXL, SD2.x v-prediction, SD3, Flux; see
    tools/random_checkpoint.py) and a CLIP-L text encoder, built once (cached like the SD1.5 one) and linked into the
    test host's models folders: ``{variant: file name}`` for CheckpointLoaderSimple (CLIPLoader for ``clip_l``)."""
    return host_support.ensure_family_models(host_base)


def pytest_report_header(config):
    where = host_support.comfyui_path()
    state = "found" if _HOST_PROBLEM is None else f"NOT USABLE ({_HOST_PROBLEM})"
    return [f"comfyui-silo: ComfyUI host at {where}: {state}",
            f"comfyui-silo: test model cache {os.environ.get('SILO_TEST_CACHE') or '.cache/test-models'}"]
