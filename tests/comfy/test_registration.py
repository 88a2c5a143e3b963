"""In-process tier: the real host loads the pack the way the server does."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.comfy

ROOT = Path(__file__).resolve().parents[2]
CATEGORY = "image/restoration/SILO"


def _our_nodes(host):
    return {k: v for k, v in host.nodes.NODE_CLASS_MAPPINGS.items()
            if getattr(v, "RELATIVE_PYTHON_MODULE", "").endswith("comfyui-silo")}


def test_host_registers_exactly_the_nodes_listed_for_manager(comfy_host):
    ours = _our_nodes(comfy_host)
    listed = json.loads((ROOT / "node_list.json").read_text())
    assert set(ours) == set(listed), "node_list.json and the registered nodes differ"
    for node_id, name in listed.items():
        assert comfy_host.nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == name


def test_every_node_that_shows_text_is_an_output_node(comfy_host):
    """The host re-sends a cached node's result only for output nodes; a text node that is not one shows an empty
    box after a cached re-run (issue 19). Output nodes are exactly the nodes that show something."""
    from comfyui_silo.tools.workflow_build import TEXT_NODES

    ours = _our_nodes(comfy_host)
    for node_id in TEXT_NODES:
        assert ours[node_id].GET_NODE_INFO_V1()["output_node"] is True, node_id
        assert ours[node_id].OUTPUT_NODE is True, f"{node_id}: the executor reads OUTPUT_NODE"
    shows_nothing = {"SILODegradation", "SILOApplyDegradation", "SILOEncodeMeasurement", "SILOSampler",
                     "SILOLatentDPSSampler", "SILOReSampleSampler"}
    for node_id in shows_nothing:
        assert ours[node_id].GET_NODE_INFO_V1()["output_node"] is False, node_id
        assert not ours[node_id].OUTPUT_NODE, node_id


def test_every_node_and_input_is_documented(comfy_host):
    for node_id, cls in _our_nodes(comfy_host).items():
        info = cls.GET_NODE_INFO_V1()
        assert info["category"] == CATEGORY, node_id
        assert len(info["description"]) > 40, f"{node_id} needs a description"
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                opts = spec[1] if len(spec) > 1 else {}
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert all(info["output_tooltips"]), f"{node_id} outputs need tooltips"


def test_degradation_nodes_run_under_inference_mode(comfy_host):
    image = torch.rand(2, 64, 48, 3)
    (deg,) = comfy_host.run_node("SILODegradation", type="super_resolution", blur_kernel_size=61, blur_sigma=3.0,
                                 sr_factor=4, box_top=0, box_left=0, box_height=8, box_width=8, random_box_size=16,
                                 random_box_seed=0, jpeg_quality=10)
    meas, up = comfy_host.run_node("SILOApplyDegradation", image=image, degradation=deg, noise_sigma=0.01, seed=3)
    assert meas.shape == (2, 16, 12, 3) and up.shape == image.shape
    assert 0 <= float(meas.min()) and float(meas.max()) <= 1
    # the measurement is close to the image's low-pass content, not noise
    assert float((up - image).abs().mean()) < 0.35


def test_mask_inpaint_without_mask_is_a_clear_error(comfy_host):
    with pytest.raises(ValueError, match=r"Degradation \(SILO\).*'mask'.*Load Image"):
        comfy_host.run_node("SILODegradation", type="mask_inpaint", blur_kernel_size=61, blur_sigma=3.0, sr_factor=4,
                            box_top=0, box_left=0, box_height=8, box_width=8, random_box_size=16, random_box_seed=0,
                            jpeg_quality=10)


def test_every_node_has_a_docs_page_listing_its_inputs_and_outputs(comfy_host):
    """web/docs/<NodeId>.md is what ComfyUI's node-docs panel shows; it must cover the node as it is now."""
    docs = ROOT / "web" / "docs"
    ours = _our_nodes(comfy_host)
    assert {p.stem for p in docs.glob("*.md")} == set(ours), "a docs page per node, none for a node that is gone"
    for node_id, cls in ours.items():
        info = cls.GET_NODE_INFO_V1()
        text = (docs / f"{node_id}.md").read_text(encoding="utf-8")
        assert text.startswith(f"# {info['display_name']}\n"), node_id
        inputs, outputs = text.split("## Inputs", 1)[1].split("## Outputs", 1)
        names = [n for section in ("required", "optional") for n in info["input"].get(section, {})]
        for name in names:
            assert inputs.count(f"- **{name}**") == 1, f"{node_id}.md: input {name} is not listed once"
        for name in info["output_name"]:
            assert outputs.split("\n## ", 1)[0].count(f"- **{name}**") == 1, f"{node_id}.md: output {name}"
        listed = {line.split("**")[1] for line in inputs.splitlines() if line.startswith("- **")}
        assert listed <= set(names), f"{node_id}.md documents inputs the node does not have: {listed - set(names)}"
        for wf in re.findall(r"`([\w-]+\.json)`", text):
            assert node_id in (ROOT / "workflows" / wf).read_text(encoding="utf-8"), f"{node_id}.md cites {wf}"
