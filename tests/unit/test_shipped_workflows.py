"""The shipped example workflows (workflows/*.json): well-formed UI files with thumbnails, notes and only core or
comfyui-silo nodes. Running them against a real host is the server tier's job (tests/server/test_workflows.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfyui_silo.tools.workflow import FRONTEND_ONLY_TYPES, is_ui_format

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
REQUIRED = {"silo_gaussian_deblur", "silo_super_resolution_x4", "silo_super_resolution_x8", "silo_box_inpainting",
            "silo_mask_inpainting", "silo_jpeg_restoration", "silo_train_operator_from_generated_images",
            "silo_degrade_restore_compare", "silo_uncertainty",
            # other model families (issue 13): SDXL (vp) and Flux (flow), each with its training workflow
            "silo_sdxl_gaussian_deblur", "silo_sdxl_train_operator_from_generated_images",
            "silo_flux_gaussian_deblur", "silo_flux_train_operator_from_generated_images"}
OUR_NODES = set(json.loads((ROOT / "node_list.json").read_text()))


def test_every_task_has_a_workflow():
    assert REQUIRED <= {p.stem for p in WORKFLOWS}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_a_well_formed_ui_file_with_a_thumbnail_and_notes(path):
    from PIL import Image

    wf = json.loads(path.read_text(encoding="utf-8"))
    assert is_ui_format(wf)
    thumb = path.with_suffix(".jpg")
    assert thumb.is_file(), f"{path.name} needs a same-name .jpg thumbnail"
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and 256 <= im.width <= 1024 and im.height >= 160
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] >= max(nodes)
    notes = [n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes and all(len(n["widgets_values"][0]) > 200 for n in notes), "a note tells the user what goes where"
    for n in wf["nodes"]:
        if n["type"] in FRONTEND_ONLY_TYPES:
            continue
        pack = n["properties"].get("cnr_id")
        assert pack in ("comfy-core", "comfyui-silo"), f"{n['type']} comes from {pack}"
        assert (pack == "comfyui-silo") == (n["type"] in OUR_NODES), n["type"]
    # links: each one is recorded at both ends, with the same type
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in (out["links"] or []) and inp["link"] == link_id
        assert out["type"] == typ and inp["type"] in (typ, "*")
    linked_inputs = {(n["id"], i) for n in wf["nodes"] for i, inp in enumerate(n.get("inputs", []))
                     if inp.get("link") is not None}
    assert linked_inputs == {(dst, slot) for _l, _s, _ss, dst, slot, _t in wf["links"]}
    used = {n["type"] for n in wf["nodes"]}
    assert used & {"SILOKSampler", "SILOSampler", "SILOTrainLatentOperator"}
    if used & {"SILOKSampler", "SILOSampler"}:
        assert {"SILOEncodeMeasurement", "SILOLatentOperatorLoader", "SILODegradation"} <= used


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_opens_with_no_node_covering_another_and_groups_whole(path):
    """Node rectangles as the frontend draws them (title bar included): none overlaps another (notes included);
    a node is fully inside a group (below its title band) or fully outside it; groups do not overlap."""
    from comfyui_silo.tools.workflow_build import layout_problems, saved_layout

    wf = json.loads(path.read_text(encoding="utf-8"))
    nodes, groups = saved_layout(wf)
    assert groups, "the workflow groups its nodes"
    assert layout_problems(nodes, groups) == []
    notes = [n for n in wf["nodes"] if n["type"] == "Note"]
    others = [n for n in wf["nodes"] if n["type"] != "Note"]
    assert all(note["pos"][1] < min(n["pos"][1] for n in others) for note in notes), "the note comes first (top)"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_node_is_at_least_as_large_as_the_frontend_draws_it(path):
    """Sizes follow the frontend's rule (tools/workflow_build.py: 20 px per socket row, 24 per widget, a results box
    for the nodes whose text the web extension shows), so no widget is squeezed when the template opens."""
    from comfyui_silo.operators.degradations import DEGRADATIONS
    from comfyui_silo.tools.workflow_build import (
        MIN_WIDTH,
        NODE_PAD,
        ROW_H,
        TEXT_BOX_H,
        TEXT_NODES,
        WIDGET_H,
        note_height,
    )

    # Degradation (SILO) shows `type` and that type's widgets only (web/js/silo_degradation.js)
    shown_for = {cls.type_name: 1 + sum(s.widget for s in cls.field_specs()) for cls in DEGRADATIONS}
    wf = json.loads(path.read_text(encoding="utf-8"))
    for n in wf["nodes"]:
        w, h = n["size"]
        if n["type"] == "Note":
            assert h >= note_height(n["widgets_values"][0], w), f"{path.stem}: the note needs a scroll bar"
            continue
        rows = max(len(n.get("inputs") or []), len(n.get("outputs") or []))
        widgets = (shown_for[n["widgets_values"][0]] if n["type"] == "SILODegradation"
                   else len(n.get("widgets_values") or []))
        need = NODE_PAD + ROW_H * rows + WIDGET_H * widgets
        need += TEXT_BOX_H if n["type"] in TEXT_NODES else 0
        assert w >= MIN_WIDTH and h >= need, f"{path.stem}: node {n['id']} ({n['type']}) is {w}x{h}, needs {need}"


def _source(wf: dict, node: dict, socket: str) -> dict:
    """The node feeding ``socket`` of ``node``."""
    link = next(i["link"] for i in node["inputs"] if i["name"] == socket)
    src = next(lk[1] for lk in wf["links"] if lk[0] == link)
    return next(n for n in wf["nodes"] if n["id"] == src)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_family_workflows_load_their_family_and_train_the_operator_the_restoration_loads(family):
    """The SDXL and Flux graphs load the model as users of that family do (Flux: diffusion model, CLIP-L + T5-XXL
    as type flux, the ae VAE, FluxGuidance on the prompt at CFG 1), restore with an operator of their own family,
    and their training workflow writes exactly that operator, from the same model and VAE loaders."""
    restore = json.loads((ROOT / "workflows" / f"silo_{family}_gaussian_deblur.json").read_text(encoding="utf-8"))
    train = json.loads((ROOT / "workflows" / f"silo_{family}_train_operator_from_generated_images.json")
                       .read_text(encoding="utf-8"))
    loader = next(n for n in restore["nodes"] if n["type"] == "SILOLatentOperatorLoader")
    assert loader["widgets_values"][0] == f"gaussian_blur_{family}.safetensors"
    trainer = next(n for n in train["nodes"] if n["type"] == "SILOTrainLatentOperator")
    assert f"gaussian_blur_{family}" in trainer["widgets_values"]
    for wf in (restore, train):
        deg = next(n for n in wf["nodes"] if n["type"] == "SILODegradation")
        assert deg["widgets_values"][:3] == ["gaussian_blur", 61, 3.0]
    sampler = next(n for n in restore["nodes"] if n["type"] == "SILOKSampler")
    if family == "sdxl":
        assert _source(restore, sampler, "model")["type"] == "CheckpointLoaderSimple"
        assert _source(restore, sampler, "model")["widgets_values"][0] == "sd_xl_base_1.0.safetensors"
        assert _source(train, trainer, "model")["type"] == "CheckpointLoaderSimple"
        return
    encode = next(n for n in restore["nodes"] if n["type"] == "SILOEncodeMeasurement")
    for wf, node, vae_user in ((restore, sampler, encode), (train, trainer, trainer)):
        assert _source(wf, node, "model")["type"] == "UNETLoader"
        assert _source(wf, vae_user, "vae")["widgets_values"] == ["ae.safetensors"]
    for socket in ("positive", "negative"):  # CFG 1: the negative takes the guided prompt too (never evaluated)
        guidance = _source(restore, sampler, socket)
        assert guidance["type"] == "FluxGuidance" and guidance["widgets_values"] == [3.5]
        clip = _source(restore, _source(restore, guidance, "conditioning"), "clip")
        assert clip["type"] == "DualCLIPLoader" and clip["widgets_values"][2] == "flux"
    assert 1.0 in sampler["widgets_values"] and "simple" in sampler["widgets_values"]
    for ks in (n for n in train["nodes"] if n["type"] == "KSampler"):
        assert _source(train, ks, "positive")["type"] == "FluxGuidance"
    assert any(n["type"] == "EmptySD3LatentImage" for n in train["nodes"]), "16-channel latents for Flux"


def test_the_layout_knows_the_nodes_the_web_extension_gives_a_results_box():
    import re

    from comfyui_silo.tools.workflow_build import TEXT_NODES

    js = (ROOT / "web" / "js" / "silo_text.js").read_text(encoding="utf-8")
    assert 'import { TEXT_NODES } from "./silo_nodes.js";' in js, "the extension uses the generated list"
    generated = (ROOT / "web" / "js" / "silo_nodes.js").read_text(encoding="utf-8")
    listed = re.search(r"export const TEXT_NODES = \[(.*?)\];", generated, re.S).group(1)
    assert sorted(re.findall(r'"(\w+)"', listed)) == sorted(TEXT_NODES)
    assert set(TEXT_NODES) <= OUR_NODES and "SILOKSampler" in TEXT_NODES


def test_layout_check_finds_overlaps_and_half_grouped_nodes():
    from comfyui_silo.tools.workflow_build import layout_problems

    nodes = {"a": (0, 0, 100, 100), "b": (90, 50, 100, 100), "c": (400, 0, 50, 50), "d": (600, 0, 50, 50)}
    groups = {"g": (380, -20, 100, 100), "h": (590, -50, 100, 120)}
    problems = layout_problems(nodes, groups)
    assert "a overlaps b" in problems
    assert any(p.startswith("c is partly outside group 'g'") for p in problems), "c covers g's title band"
    assert not any(p.startswith("d ") for p in problems)


def test_readme_links_the_browser_screenshot():
    from PIL import Image

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "](docs/browser_deblur.png)" in readme
    with Image.open(ROOT / "docs" / "browser_deblur.png") as im:
        assert im.format == "PNG" and im.width >= 1200, "zoomed in enough that the nodes' text is drawn"


@pytest.mark.parametrize("path", [p for p in WORKFLOWS if '"photo | restored"' in p.read_text(encoding="utf-8")],
                         ids=lambda p: p.stem)
def test_the_side_by_side_preview_keeps_the_restored_size(path):
    """Issue 19: ImageStitch scales image2 to image1, so the restoration must be image1 (a x8 photo is scaled up in
    the preview, never the restoration down to the photo's height); the photo is stitched to its left."""
    wf = json.loads(path.read_text(encoding="utf-8"))
    nodes = {n["id"]: n for n in wf["nodes"]}
    source = {(dst, slot): nodes[src] for _l, src, _ss, dst, slot, _t in wf["links"]}
    side = next(n for n in wf["nodes"] if n.get("title") == "photo | restored")
    names = [i["name"] for i in side["inputs"]]
    assert source[(side["id"], names.index("image1"))]["type"] == "VAEDecode"
    assert source[(side["id"], names.index("image2"))]["type"] == "LoadImage"
    assert side["widgets_values"][:2] == ["left", True]


def test_the_template_order_lists_every_workflow_once_training_first_and_is_current():
    """Issue 19, item 6: the template browser shows the training workflow (the one every note says to run first)
    first; web/js/silo_template_order.js is what scripts/build_workflows.py writes and names every shipped workflow
    once, and the extension sorts with it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_workflows", ROOT / "scripts" / "build_workflows.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    order = build.template_order()
    assert order[0] == "silo_train_operator_from_generated_images"
    assert sorted(order) == sorted(p.stem for p in WORKFLOWS) and len(set(order)) == len(order)
    assert order.index("silo_sdxl_train_operator_from_generated_images") < order.index("silo_sdxl_gaussian_deblur")
    assert (ROOT / "web" / "js" / "silo_template_order.js").read_text(encoding="utf-8") == build.template_order_js()
    js = (ROOT / "web" / "js" / "silo_templates.js").read_text(encoding="utf-8")
    assert 'import { TEMPLATE_ORDER } from "./silo_template_order.js";' in js


def test_the_degradation_node_is_laid_out_for_the_widgets_its_type_shows():
    """Issue 19, item 6: the web extension hides the other types' widgets, so a shipped Degradation (SILO) node is
    only as tall as the widgets of its own type (no empty block where eleven widgets used to be)."""
    from comfyui_silo.tools.workflow_build import min_node_size

    info = {"name": "SILODegradation", "output": ["DEGRADATION"], "input": {"required": {
        "type": [["gaussian_blur", "jpeg"], {}],
        "blur_sigma": ["FLOAT", {"default": 3.0, "silo_degradation_type": "gaussian_blur"}],
        "blur_kernel_size": ["INT", {"default": 61, "silo_degradation_type": "gaussian_blur"}],
        "jpeg_quality": ["INT", {"default": 10, "silo_degradation_type": "jpeg"}]}}}
    every = min_node_size(info)[1]
    assert min_node_size(info, {"type": "jpeg"})[1] == every - 2 * 24
    assert min_node_size(info, {"type": "gaussian_blur"})[1] == every - 24
    for path in WORKFLOWS:
        for n in json.loads(path.read_text(encoding="utf-8"))["nodes"]:
            if n["type"] == "SILODegradation":  # at most `type` + the four box_* widgets, never all eleven
                assert n["size"][1] <= 14 + 20 + 5 * 24, f"{path.name}: {n['size']}"
