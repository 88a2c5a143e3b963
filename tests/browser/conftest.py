"""Browser tier: the real ComfyUI frontend in headless Chromium (the system package, driven through the DevTools
protocol) against a real server with this pack. Skipped, with a banner at the end of the run, when no Chromium or no
``websocket-client`` is found (``.ci/run`` installs Chromium with apt when it can); host problems skip it like the
other host tiers.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
from cdp import Browser, find_chromium
from support import host as host_support

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "_out" / "browser"
SD15 = {"name": "SD15", "latent_channels": 4, "scale_factor": 0.18215, "shift_factor": 0.0, "downscale": 8}


def browser_problem() -> str | None:
    if importlib.util.find_spec("websocket") is None:
        return "the Python package websocket-client is not installed (pip install websocket-client)"
    if find_chromium() is None:
        return "no Chromium found (apt-get install chromium, or set SILO_CHROMIUM to a Chrome/Chromium binary)"
    return None


_BROWSER_PROBLEM = browser_problem()
_HOST_PROBLEM = host_support.host_problem()


def pytest_collection_modifyitems(config, items):
    ours = [i for i in items if i.get_closest_marker("browser")]
    if _HOST_PROBLEM is not None:
        skip = pytest.mark.skip(reason=f"HOST TEST SKIPPED: {_HOST_PROBLEM}")
    elif _BROWSER_PROBLEM is not None:
        skip = pytest.mark.skip(reason=f"BROWSER TEST SKIPPED: {_BROWSER_PROBLEM}")
    else:
        return
    for item in ours:
        item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "BROWSER TEST SKIPPED" in str(r.longrepr)]
    if skipped:
        tr = terminalreporter
        tr.write_sep("!", f"{len(skipped)} browser tests were SKIPPED", red=True, bold=True)
        tr.write_line(f"reason: {_BROWSER_PROBLEM}")
        tr.write_line("The frontend (results on the nodes, live layouts, a run from the browser) was not checked.")


def _png(path: Path, size=(64, 64)) -> None:
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(7)
    img = torch.nn.functional.interpolate(torch.rand(1, 3, size[1] // 4, size[0] // 4, generator=g), size=size[::-1],
                                          mode="bilinear", align_corners=False)[0]
    arr = (img.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(arr, "RGB").save(path)


@pytest.fixture(scope="session")
def browser_server(tmp_path_factory, small_checkpoint):
    """A server with the pack, the small random checkpoint, an untrained deblurring operator and a 64x64 photo."""
    from comfyui_silo.operators.io import save_operator
    from comfyui_silo.operators.network import LatentOperator

    base = host_support.make_base_directory(tmp_path_factory.mktemp("browser_base"), [small_checkpoint])
    save_operator(base / "models" / "latent_operators" / "gaussian_blur_sd15.safetensors", LatentOperator(width=8),
                  degradation={"type": "gaussian_blur", "kernel_size": 61, "sigma": 3.0}, latent_format=SD15)
    _png(base / "input" / "browser_photo.png")
    # a returning user: no first-run template dialog, no minimap over the graph
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}))
    server = host_support.ServerHost(base, tmp_path_factory.mktemp("browser_log") / "comfyui.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def page(browser_server):
    """The frontend, loaded in headless Chromium, with ``window.app`` ready."""
    browser = Browser(find_chromium(), width=1600, height=1000)
    try:
        browser.navigate(browser_server.url)
        browser.wait_for("!!(window.app && window.app.graph && window.app.extensionManager && "
                         "window.LiteGraph && Object.keys(LiteGraph.registered_node_types).length > 100)",
                         timeout=180, what="the ComfyUI frontend to start")
        # the frontend opens its default graph on start; let that finish before a test loads another one
        browser.wait_for("app.graph._nodes.length > 0", timeout=60, what="the default graph")
        time.sleep(1.0)
        yield browser
    finally:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "console.log").write_text("\n".join(browser.console), encoding="utf-8")
        browser.close()
