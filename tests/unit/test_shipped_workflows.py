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
            "silo_degrade_restore_compare", "silo_uncertainty"}
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
