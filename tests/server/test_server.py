"""Server tier: a real `python main.py --cpu` process with the pack in its custom_nodes."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]


def test_object_info_lists_our_nodes_with_their_inputs(comfy_server):
    info = comfy_server.get("/object_info")
    listed = json.loads((ROOT / "node_list.json").read_text())
    for node_id, display in listed.items():
        assert node_id in info, f"{node_id} missing from /object_info"
        entry = info[node_id]
        assert entry["display_name"] == display
        assert entry["python_module"].startswith("custom_nodes.comfyui-silo")
        assert entry["category"] == "image/restoration/SILO"
    deg = info["SILODegradation"]["input"]
    kind = deg["required"]["type"]
    options = kind[1]["options"] if kind[0] == "COMBO" else kind[0]  # new and old combo serialisations
    assert options[:2] == ["gaussian_blur", "super_resolution"]
    assert "mask" in deg["optional"]
    # the web extension shows only the chosen type's widgets: each widget names its type (issue 19)
    owner = {name: spec[1].get("silo_degradation_type") for name, spec in deg["required"].items() if name != "type"}
    assert owner["blur_sigma"] == "gaussian_blur" and owner["sr_factor"] == "super_resolution"
    assert owner["jpeg_quality"] == "jpeg" and owner["random_box_seed"] == "random_box_inpaint"
    assert all(owner.values()), owner
    apply_inputs = info["SILOApplyDegradation"]["input"]["required"]
    assert apply_inputs["degradation"][0] == "DEGRADATION"
    assert apply_inputs["noise_sigma"][1]["default"] == pytest.approx(0.01)


def test_the_server_serves_the_node_docs_pages(comfy_server):
    """The node-docs panel fetches /extensions/<pack folder>/docs/<NodeId>.md from the pack's WEB_DIRECTORY."""
    listed = json.loads((ROOT / "node_list.json").read_text())
    for node_id in ("SILOKSampler", "SILOEncodeMeasurement", "SILOLatentOperatorLoader"):
        url = f"{comfy_server.url}/extensions/comfyui-silo/docs/{node_id}.md"
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.read().decode("utf-8").startswith(f"# {listed[node_id]}\n"), node_id


def test_queued_prompt_with_the_random_checkpoint_completes(comfy_server, small_checkpoint):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": small_checkpoint.name}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 8421504}},
        "3": {"class_type": "SILODegradation", "inputs": {
            "type": "gaussian_blur", "blur_kernel_size": 9, "blur_sigma": 2.0, "sr_factor": 4, "box_top": 0,
            "box_left": 0, "box_height": 8, "box_width": 8, "random_box_size": 16, "random_box_seed": 0,
            "jpeg_quality": 10}},
        "4": {"class_type": "SILOApplyDegradation", "inputs": {
            "image": ["2", 0], "degradation": ["3", 0], "noise_sigma": 0.05, "seed": 1}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 1], "vae": ["1", 2]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a high quality photo", "clip": ["1", 1]}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["6", 0], "negative": ["6", 0], "latent_image": ["5", 0], "denoise": 0.5}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "silo_server_test"}},
    }
    entry = comfy_server.run_prompt(prompt, timeout=600)
    images = entry["outputs"]["9"]["images"]
    assert len(images) == 1
    saved = comfy_server.base / "output" / images[0].get("subfolder", "") / images[0]["filename"]
    assert saved.is_file() and saved.stat().st_size > 0


def test_bad_input_is_reported_by_the_host_not_a_crash(comfy_server):
    prompt = {
        "1": {"class_type": "SILODegradation", "inputs": {
            "type": "mask_inpaint", "blur_kernel_size": 61, "blur_sigma": 3.0, "sr_factor": 4, "box_top": 0,
            "box_left": 0, "box_height": 8, "box_width": 8, "random_box_size": 16, "random_box_seed": 0,
            "jpeg_quality": 10}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "3": {"class_type": "SILOApplyDegradation", "inputs": {
            "image": ["2", 0], "degradation": ["1", 0], "noise_sigma": 0.0, "seed": 0}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    with pytest.raises(AssertionError, match="needs a mask"):
        comfy_server.run_prompt(prompt, timeout=120)
    assert comfy_server.proc.poll() is None, "the server must survive a bad input"
