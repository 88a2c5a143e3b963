"""UI-format workflow -> API-format prompt, with a hand-written /object_info (no host needed)."""

from __future__ import annotations

import copy
import json
import os
import random
from pathlib import Path

import pytest

from comfyui_silo.tools.workflow import (
    WorkflowError,
    apply_overrides,
    assign_widget_values,
    is_api_format,
    is_ui_format,
    parse_assignments,
    process_dynamic_prompt,
    ui_to_api,
    widget_layout,
)

pytestmark = pytest.mark.unit

SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m"]
SCHEDULERS = ["normal", "karras", "simple"]

# A small /object_info: old-style combos ([[...], {}]) and new-style ("COMBO", {"options": [...]}) both appear.
OBJECT_INFO = {
    "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}},
                               "output": ["MODEL", "CLIP", "VAE"], "display_name": "Load Checkpoint"},
    "CLIPTextEncode": {"input": {"required": {"text": ["STRING", {"multiline": True, "dynamicPrompts": True}],
                                              "clip": ["CLIP", {}]}},
                       "output": ["CONDITIONING"], "display_name": "CLIP Text Encode (Prompt)"},
    "EmptyLatentImage": {"input": {"required": {"width": ["INT", {"default": 512, "min": 16}],
                                                "height": ["INT", {"default": 512, "min": 16}],
                                                "batch_size": ["INT", {"default": 1, "min": 1}]}},
                         "output": ["LATENT"], "display_name": "Empty Latent Image"},
    "KSampler": {"input": {"required": {
        "model": ["MODEL", {}],
        "seed": ["INT", {"default": 0, "min": 0, "control_after_generate": True}],
        "steps": ["INT", {"default": 20, "min": 1}],
        "cfg": ["FLOAT", {"default": 8.0}],
        "sampler_name": ["COMBO", {"options": SAMPLERS}],
        "scheduler": [SCHEDULERS, {}],
        "positive": ["CONDITIONING", {}],
        "negative": ["CONDITIONING", {}],
        "latent_image": ["LATENT", {}],
        "denoise": ["FLOAT", {"default": 1.0}]}}, "output": ["LATENT"], "display_name": "KSampler"},
    "KSamplerAdvanced": {"input": {"required": {
        "model": ["MODEL"], "add_noise": [["enable", "disable"]], "noise_seed": ["INT", {"default": 0}],
        "steps": ["INT", {"default": 20}]}}, "output": ["LATENT"], "display_name": "KSampler (Advanced)"},
    "VAEDecode": {"input": {"required": {"samples": ["LATENT"], "vae": ["VAE"]}}, "output": ["IMAGE"],
                  "display_name": "VAE Decode"},
    "SaveImage": {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
                            "hidden": {"prompt": "PROMPT"}}, "output": [], "display_name": "Save Image"},
    "PreviewImage": {"input": {"required": {"images": ["IMAGE"]}}, "output": [], "display_name": "Preview Image"},
    "LoadImage": {"input": {"required": {"image": [["cat.png", "dog.png"], {"image_upload": True}]}},
                  "output": ["IMAGE", "MASK"], "display_name": "Load Image"},
    "LoadImageMask": {"input": {"required": {"image": [["cat.png"], {"image_upload": True}],
                                             "channel": [["alpha", "red", "green", "blue"]]},
                                "optional": {"invert": ["BOOLEAN", {"default": False}]}},
                      "output": ["MASK"], "display_name": "Load Image (as Mask)"},
    "ImageScaleBy": {"input": {"required": {"image": ["IMAGE"], "upscale_method": [["nearest-exact", "bilinear"]],
                                            "scale_by": ["FLOAT", {"default": 1.0}]}},
                     "output": ["IMAGE"], "display_name": "Upscale Image By"},
    # a pack node with a custom socket type and a seed whose control widget is declared explicitly
    "SILOApplyDegradation": {"input": {"required": {
        "degradation": ["DEGRADATION", {}], "image": ["IMAGE", {}],
        "noise_sigma": ["FLOAT", {"default": 0.01}],
        "seed": ["INT", {"default": 0, "control_after_generate": True}]},
        "optional": {"mask": ["MASK", {}]}}, "output": ["IMAGE", "IMAGE"], "display_name": "SILO Apply Degradation"},
    "SILODegradation": {"input": {"required": {
        "type": ["COMBO", {"options": ["gaussian_blur", "super_resolution"], "default": "gaussian_blur"}],
        "blur_sigma": ["FLOAT", {"default": 3.0}]}}, "output": ["DEGRADATION"], "display_name": "SILO Degradation"},
    "IntSource": {"input": {"required": {"value": ["INT", {"default": 0, "control_after_generate": False}]}},
                  "output": ["INT"], "display_name": "Int"},
    "TextJoin": {"input": {"required": {"a": ["STRING", {"forceInput": True}], "sep": ["STRING", {"default": ","}]}},
                 "output": ["STRING"], "display_name": "Join"},
    "RemoteCombo": {"input": {"required": {"file": ["COMBO", {"options": [], "remote": {"refresh_button": True}}],
                                           "strength": ["FLOAT", {"default": 1.0}]}},
                    "output": ["IMAGE"], "display_name": "Remote"},
}


def node(id, type, widgets=None, inputs=(), outputs=(), mode=0, **extra):
    """A UI-format node. ``inputs``/``outputs``: (name, type, link-or-links[, widget_name])."""
    n = {"id": id, "type": type, "mode": mode, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": 0,
         "properties": {}}
    n["inputs"] = []
    for spec in inputs:
        name, typ, link = spec[:3]
        entry = {"name": name, "type": typ, "link": link}
        if len(spec) > 3:
            entry["widget"] = {"name": spec[3]}
        n["inputs"].append(entry)
    n["outputs"] = [{"name": name, "type": typ, "links": links} for name, typ, links in outputs]
    if widgets is not None:
        n["widgets_values"] = widgets
    n.update(extra)
    return n


def workflow(nodes, links, **extra):
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": max([lk[0] for lk in links] or [0]),
            "nodes": nodes, "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4, **extra}


def txt2img(ksampler_widgets=(7, "randomize", 20, 8, "euler", "normal", 1), save=("out",)):
    nodes = [
        node(4, "CheckpointLoaderSimple", ["a.safetensors"], outputs=[
            ("MODEL", "MODEL", [1]), ("CLIP", "CLIP", [3, 5]), ("VAE", "VAE", [8])]),
        node(6, "CLIPTextEncode", ["a cat"], inputs=[("clip", "CLIP", 3)], outputs=[("CONDITIONING", "CONDITIONING", [4])]),
        node(7, "CLIPTextEncode", ["blurry"], inputs=[("clip", "CLIP", 5)],
             outputs=[("CONDITIONING", "CONDITIONING", [6])]),
        node(5, "EmptyLatentImage", [64, 64, 1], outputs=[("LATENT", "LATENT", [2])]),
        node(3, "KSampler", list(ksampler_widgets), inputs=[
            ("model", "MODEL", 1), ("positive", "CONDITIONING", 4), ("negative", "CONDITIONING", 6),
            ("latent_image", "LATENT", 2)], outputs=[("LATENT", "LATENT", [7])]),
        node(8, "VAEDecode", inputs=[("samples", "LATENT", 7), ("vae", "VAE", 8)], outputs=[("IMAGE", "IMAGE", [9])]),
        node(9, "SaveImage", list(save) if save is not None else None, inputs=[("images", "IMAGE", 9)]),
    ]
    links = [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"],
             [4, 6, 0, 3, 1, "CONDITIONING"], [5, 4, 1, 7, 0, "CLIP"], [6, 7, 0, 3, 2, "CONDITIONING"],
             [7, 3, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"], [9, 8, 0, 9, 0, "IMAGE"]]
    return workflow(nodes, links)


EXPECTED_TXT2IMG = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "3": {"class_type": "KSampler", "inputs": {
        "seed": 7, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal", "denoise": 1,
        "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "out"}},
}


def strip_meta(api: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


def convert(wf, **kw):
    return strip_meta(ui_to_api(wf, OBJECT_INFO, **kw))


# -- widget values ---------------------------------------------------------------------------------------------------

def test_basic_graph_converts_with_links_and_widget_values():
    api = ui_to_api(txt2img(), OBJECT_INFO)
    assert strip_meta(api) == EXPECTED_TXT2IMG
    assert api["4"]["_meta"]["title"] == "Load Checkpoint"
    assert is_api_format(api)
    json.dumps(api)  # serialisable as is


def test_control_after_generate_value_is_skipped_for_every_kind_of_control():
    # explicit option (KSampler.seed), legacy name rule (KSamplerAdvanced.noise_seed), and an old boolean value
    assert convert(txt2img((5, "fixed", 3, 2.5, "dpmpp_2m", "karras", 0.5)))["3"]["inputs"] == {
        **EXPECTED_TXT2IMG["3"]["inputs"], "seed": 5, "steps": 3, "cfg": 2.5, "sampler_name": "dpmpp_2m",
        "scheduler": "karras", "denoise": 0.5}
    assert convert(txt2img((5, True, 3, 2.5, "euler", "normal", 1)))["3"]["inputs"]["steps"] == 3
    wf = workflow([node(1, "KSamplerAdvanced", ["disable", 99, "increment", 12]),
                   node(2, "IntSource", [4])], [])
    api = convert(wf)
    assert api["1"]["inputs"] == {"add_noise": "disable", "noise_seed": 99, "steps": 12}
    assert api["2"]["inputs"] == {"value": 4}  # control_after_generate: False -> no hidden value


def test_widget_layout_matches_the_frontend_order():
    names = [s.name or s.helper for s in widget_layout(OBJECT_INFO["KSampler"])]
    assert names == ["seed", "control", "steps", "cfg", "sampler_name", "scheduler", "denoise"]
    # the image upload button sits after the required widgets, before optional ones
    names = [s.name or s.helper for s in widget_layout(OBJECT_INFO["LoadImageMask"])]
    assert names == ["image", "channel", "upload", "invert"]
    names = [s.name or s.helper for s in widget_layout(OBJECT_INFO["RemoteCombo"])]
    assert names == ["file", "toggle", "refresh", "strength"]


def test_upload_and_remote_helper_values_are_skipped():
    assert assign_widget_values(OBJECT_INFO["LoadImage"], ["cat.png", "image"]) == {"image": "cat.png"}
    assert assign_widget_values(OBJECT_INFO["LoadImageMask"], ["cat.png", "red", "image", True]) == {
        "image": "cat.png", "channel": "red", "invert": True}
    assert assign_widget_values(OBJECT_INFO["RemoteCombo"], ["x.png [output]", False, "refresh", 0.3]) == {
        "file": "x.png [output]", "strength": 0.3}


def test_missing_widget_values_take_the_defaults():
    api = convert(txt2img(save=None))
    assert api["9"]["inputs"]["filename_prefix"] == "ComfyUI"
    assert assign_widget_values(OBJECT_INFO["KSampler"], [3, "fixed"]) == {
        "seed": 3, "steps": 20, "cfg": 8.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}


def test_dict_widget_values_are_matched_by_name():
    assert assign_widget_values(OBJECT_INFO["ImageScaleBy"], {"scale_by": 2.0, "upscale_method": "bilinear",
                                                               "preview": "ignored"}) == {
        "upscale_method": "bilinear", "scale_by": 2.0}


def test_older_node_versions_with_a_dropped_control_value_still_line_up():
    # saved when seed still had a control widget, loaded after it lost it: the stray value is skipped
    info = {"input": {"required": {"seed": ["INT", {"control_after_generate": False}], "steps": ["INT", {}],
                                   "mode": [["a", "b"]]}}}
    assert assign_widget_values(info, [3, "randomize", 10, "b", "extra"]) == {"seed": 3, "steps": 10, "mode": "b"}


def test_force_input_inputs_are_sockets():
    wf = workflow([node(1, "TextJoin", [";"], inputs=[("a", "STRING", None)])], [])
    assert convert(wf)["1"]["inputs"] == {"sep": ";"}
    # an old save that still stored a value for the forceInput socket
    wf = workflow([node(1, "TextJoin", ["stale", ";"], inputs=[("a", "STRING", None)])], [])
    assert convert(wf)["1"]["inputs"] == {"sep": ";"}


# -- links: converted widgets, primitives, reroutes, bypass, mute ---------------------------------------------------------

def test_converted_widget_takes_the_link_and_primitive_node_gives_its_value():
    wf = txt2img((7, "randomize", 20, 8, "euler", "normal", 1))
    ks = next(n for n in wf["nodes"] if n["id"] == 3)
    ks["inputs"].append({"name": "seed", "type": "INT", "link": 20, "widget": {"name": "seed"}})
    ks["inputs"].append({"name": "steps", "type": "INT", "link": 21, "widget": {"name": "steps"}})
    ks["inputs"].append({"name": "cfg", "type": "FLOAT", "link": None, "widget": {"name": "cfg"}})  # unconnected
    wf["nodes"].append(node(20, "IntSource", [123], outputs=[("INT", "INT", [20])]))
    wf["nodes"].append(node(21, "PrimitiveNode", [4, "fixed"],
                            outputs=[("INT", "INT", [21])], title="steps"))
    wf["links"] += [[20, 20, 0, 3, 4, "INT"], [21, 21, 0, 3, 5, "INT"]]
    api = convert(wf)
    assert "21" not in api, "PrimitiveNode is frontend-only"
    assert api["3"]["inputs"]["seed"] == ["20", 0]
    assert api["3"]["inputs"]["steps"] == 4
    assert api["3"]["inputs"]["cfg"] == 8
    assert api["20"] == {"class_type": "IntSource", "inputs": {"value": 123}}


def test_reroutes_are_followed_to_the_real_source():
    wf = workflow([
        node(1, "LoadImage", ["cat.png", "image"], outputs=[("IMAGE", "IMAGE", [1]), ("MASK", "MASK", [])]),
        node(2, "Reroute", inputs=[("", "*", 1)], outputs=[("", "IMAGE", [2])]),
        node(3, "Reroute", inputs=[("", "*", 2)], outputs=[("", "IMAGE", [3])]),
        node(4, "PreviewImage", inputs=[("images", "IMAGE", 3)]),
    ], [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "*"], [3, 3, 0, 4, 0, "IMAGE"]])
    api = convert(wf)
    assert set(api) == {"1", "4"}
    assert api["4"]["inputs"] == {"images": ["1", 0]}
    assert api["1"]["inputs"] == {"image": "cat.png"}


def test_a_reroute_loop_is_an_error_not_a_crash():
    wf = workflow([
        node(1, "Reroute", inputs=[("", "*", 2)], outputs=[("", "IMAGE", [1, 3])]),
        node(2, "Reroute", inputs=[("", "*", 1)], outputs=[("", "IMAGE", [2])]),
        node(3, "PreviewImage", inputs=[("images", "IMAGE", 3)]),
    ], [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 1, 0, "IMAGE"], [3, 1, 0, 3, 0, "IMAGE"]])
    with pytest.raises(WorkflowError, match="circular"):
        ui_to_api(wf, OBJECT_INFO)


def test_bypassed_node_passes_its_input_of_the_same_type_through():
    wf = workflow([
        node(1, "LoadImage", ["cat.png", "image"], outputs=[("IMAGE", "IMAGE", [1]), ("MASK", "MASK", [])]),
        node(2, "SILODegradation", ["gaussian_blur", 3.0], outputs=[("DEGRADATION", "DEGRADATION", [2])]),
        # the IMAGE input is slot 1 and the output slot 1 is IMAGE too; output 0 must find the image by type
        node(3, "SILOApplyDegradation", [0.05, 1, "fixed"], mode=4,
             inputs=[("degradation", "DEGRADATION", 2), ("image", "IMAGE", 1)],
             outputs=[("degraded", "IMAGE", [3]), ("clean", "IMAGE", [])]),
        node(4, "ImageScaleBy", ["bilinear", 2.0], mode=4, inputs=[("image", "IMAGE", 3)],
             outputs=[("IMAGE", "IMAGE", [4])]),
        node(5, "SaveImage", ["x"], inputs=[("images", "IMAGE", 4)]),
    ], [[1, 1, 0, 3, 1, "IMAGE"], [2, 2, 0, 3, 0, "DEGRADATION"], [3, 3, 0, 4, 0, "IMAGE"],
        [4, 4, 0, 5, 0, "IMAGE"]])
    api = convert(wf)
    assert set(api) == {"1", "2", "5"}
    assert api["5"]["inputs"]["images"] == ["1", 0]


def test_bypassed_node_without_a_matching_input_leaves_the_consumer_unconnected():
    wf = workflow([
        node(1, "EmptyLatentImage", [64, 64, 1], mode=4, outputs=[("LATENT", "LATENT", [1])]),
        node(2, "VAEDecode", inputs=[("samples", "LATENT", 1), ("vae", "VAE", None)], outputs=[]),
    ], [[1, 1, 0, 2, 0, "LATENT"]])
    assert convert(wf) == {"2": {"class_type": "VAEDecode", "inputs": {}}}


def test_muted_nodes_are_dropped_with_the_links_to_them():
    wf = txt2img()
    for n in wf["nodes"]:
        if n["id"] == 7:
            n["mode"] = 2
    api = convert(wf)
    assert "7" not in api
    assert "negative" not in api["3"]["inputs"]
    assert api["3"]["inputs"]["positive"] == ["6", 0]


def test_notes_are_skipped():
    wf = txt2img()
    wf["nodes"] += [node(30, "Note", ["remember the milk"]), node(31, "MarkdownNote", ["# hi"])]
    assert convert(wf) == EXPECTED_TXT2IMG


def test_new_style_link_objects_are_read_too():
    wf = txt2img()
    wf["links"] = [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), lk, strict=True))
                   for lk in wf["links"]]
    assert convert(wf) == EXPECTED_TXT2IMG


# -- unknown node types ---------------------------------------------------------------------------------------------

def test_unknown_node_type_names_the_node_and_the_pack():
    wf = txt2img()
    wf["nodes"].append(node(40, "FancyUpscaler", [2], properties={"cnr_id": "comfyui-fancy", "ver": "1.0"}))
    wf["nodes"].append(node(41, "SILOSampler", [1]))
    with pytest.raises(ValueError) as err:
        ui_to_api(wf, OBJECT_INFO)
    message = str(err.value)
    assert isinstance(err.value, WorkflowError)
    assert "node 40" in message and "FancyUpscaler" in message and "comfyui-fancy" in message
    assert "node 41" in message and "SILOSampler" in message and "comfyui-silo" in message


def test_unknown_but_muted_or_frontend_only_nodes_do_not_matter():
    wf = txt2img()
    wf["nodes"].append(node(40, "FancyUpscaler", [2], mode=2))
    wf["nodes"].append(node(41, "Fast Groups Bypasser (rgthree)", []))
    assert convert(wf) == EXPECTED_TXT2IMG


def test_not_a_workflow_is_refused():
    with pytest.raises(WorkflowError, match="not a ComfyUI workflow"):
        ui_to_api({"hello": 1}, OBJECT_INFO)


# -- subgraphs --------------------------------------------------------------------------------------------------------

SUBGRAPH_ID = "6a2f1f4e-0000-4000-8000-000000000001"


def subgraph_workflow(mode=0):
    """LoadImage -> [subgraph: ImageScaleBy(scale promoted to a widget) -> output] -> SaveImage."""
    definition = {
        "id": SUBGRAPH_ID, "name": "Scale", "version": 1,
        "inputNode": {"id": -10, "bounding": [0, 0, 1, 1]}, "outputNode": {"id": -20, "bounding": [0, 0, 1, 1]},
        "inputs": [{"id": "i0", "name": "image", "type": "IMAGE", "linkIds": [101]},
                   {"id": "i1", "name": "scale_by", "type": "FLOAT", "linkIds": [102]}],
        "outputs": [{"id": "o0", "name": "IMAGE", "type": "IMAGE", "linkIds": [103]}],
        "widgets": [],
        "nodes": [node(7, "ImageScaleBy", ["bilinear", 1.0],
                       inputs=[("image", "IMAGE", 101), ("scale_by", "FLOAT", 102, "scale_by")],
                       outputs=[("IMAGE", "IMAGE", [103])])],
        "links": [{"id": 101, "origin_id": -10, "origin_slot": 0, "target_id": 7, "target_slot": 0, "type": "IMAGE"},
                  {"id": 102, "origin_id": -10, "origin_slot": 1, "target_id": 7, "target_slot": 1, "type": "FLOAT"},
                  {"id": 103, "origin_id": 7, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "IMAGE"}],
    }
    nodes = [
        node(1, "LoadImage", ["dog.png", "image"], outputs=[("IMAGE", "IMAGE", [1]), ("MASK", "MASK", [])]),
        node(2, SUBGRAPH_ID, [0.5], mode=mode,
             inputs=[("image", "IMAGE", 1), ("scale_by", "FLOAT", None, "scale_by")],
             outputs=[("IMAGE", "IMAGE", [2])]),
        node(3, "SaveImage", ["sg"], inputs=[("images", "IMAGE", 2)]),
    ]
    return workflow(nodes, [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"]],
                    definitions={"subgraphs": [definition]})


def test_subgraphs_are_flattened_with_outer_inner_ids_and_promoted_widgets():
    api = convert(subgraph_workflow())
    assert api == {
        "1": {"class_type": "LoadImage", "inputs": {"image": "dog.png"}},
        "2:7": {"class_type": "ImageScaleBy", "inputs": {"upscale_method": "bilinear", "scale_by": 0.5,
                                                         "image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": "sg", "images": ["2:7", 0]}},
    }


def test_bypassed_subgraph_passes_through_and_muted_subgraph_is_dropped():
    api = convert(subgraph_workflow(mode=4))
    assert set(api) == {"1", "3"} and api["3"]["inputs"]["images"] == ["1", 0]
    api = convert(subgraph_workflow(mode=2))
    assert set(api) == {"1", "3"} and "images" not in api["3"]["inputs"]


# -- dynamic prompts ----------------------------------------------------------------------------------------------

def test_dynamic_prompts_strip_comments_and_resolve_choices():
    assert process_dynamic_prompt("a {red|red} cat // hidden\n/* gone */on a mat") == "a red cat \non a mat"
    out = {process_dynamic_prompt("{a|b|{c|d}}", random.Random(i)) for i in range(50)}
    assert out == {"a", "b", "c", "d"}
    assert process_dynamic_prompt(r"keep \{literal\} braces") == "keep {literal} braces"
    wf = txt2img()
    wf["nodes"][1]["widgets_values"] = ["a {cat|cat} // note"]
    assert convert(wf)["6"]["inputs"]["text"] == "a cat "
    assert convert(wf, dynamic_prompts=False)["6"]["inputs"]["text"] == "a {cat|cat} // note"


# -- API format and overrides -------------------------------------------------------------------------------------

def test_api_format_is_detected_and_passed_through():
    assert is_api_format(EXPECTED_TXT2IMG) and not is_ui_format(EXPECTED_TXT2IMG)
    assert is_ui_format(txt2img()) and not is_api_format(txt2img())
    copy_ = ui_to_api(EXPECTED_TXT2IMG, OBJECT_INFO)
    assert copy_ == EXPECTED_TXT2IMG and copy_ is not EXPECTED_TXT2IMG


def test_overrides_set_images_and_inputs():
    api = copy.deepcopy(EXPECTED_TXT2IMG)
    api["10"] = {"class_type": "LoadImage", "inputs": {"image": "cat.png"}}
    apply_overrides(api, {"10": "photo.png"}, {"3.steps": "10", "3.cfg": "2.5", "6.text": "42", "KSampler.seed": "9",
                                               "9.filename_prefix": "run/x", "3.sampler_name": "dpmpp_2m"},
                    object_info=OBJECT_INFO)
    assert api["10"]["inputs"]["image"] == "photo.png"
    ks = api["3"]["inputs"]
    assert (ks["steps"], ks["cfg"], ks["seed"], ks["sampler_name"]) == (10, 2.5, 9, "dpmpp_2m")
    assert api["6"]["inputs"]["text"] == "42", "STRING inputs keep the text as is"
    assert api["9"]["inputs"]["filename_prefix"] == "run/x"
    # without object_info values are JSON when they parse, else text
    apply_overrides(api, sets={"3.denoise": "0.5", "3.scheduler": "karras", "3.positive": '["7", 0]'})
    assert (ks["denoise"], ks["scheduler"], ks["positive"]) == (0.5, "karras", ["7", 0])


def test_override_errors_list_the_valid_choices():
    api = copy.deepcopy(EXPECTED_TXT2IMG)
    with pytest.raises(WorkflowError, match=r"no node '99'.*3 \(KSampler\)"):
        apply_overrides(api, sets={"99.steps": "1"})
    with pytest.raises(WorkflowError, match=r"no input 'stepz'.*seed, steps, cfg"):
        apply_overrides(api, sets={"3.stepz": "1"})
    with pytest.raises(WorkflowError, match=r"has no image file input; image loader nodes: none"):
        apply_overrides(api, images={"3": "a.png"})
    with pytest.raises(WorkflowError, match="several nodes"):
        apply_overrides(api, sets={"CLIPTextEncode.text": "x"})
    # an input the node does not carry yet but its definition has is accepted with object_info
    del api["3"]["inputs"]["denoise"]
    apply_overrides(api, sets={"3.denoise": "0.3"}, object_info=OBJECT_INFO)
    assert api["3"]["inputs"]["denoise"] == 0.3


def test_parse_assignments():
    assert parse_assignments(["12=photo.png", "x = a=b.png"], "image") == {"12": "photo.png", "x": " a=b.png"}
    assert parse_assignments(["5.text=a=b"], "set") == {"5.text": "a=b"}
    for bad in ["5steps=1", "=1", "5.steps"]:
        with pytest.raises(WorkflowError, match="NODE.input=VALUE"):
            parse_assignments([bad], "set")
    with pytest.raises(WorkflowError, match="NODE=FILE"):
        parse_assignments(["photo.png"], "image")


# -- real files -----------------------------------------------------------------------------------------------------

def test_the_default_template_of_comfyui_workflow_templates_converts_exactly():
    templates = pytest.importorskip("comfyui_workflow_templates")
    path = Path(templates.__file__).parent / "templates" / "default.json"
    if not path.is_file():
        pytest.skip(f"{path} not found in this comfyui_workflow_templates version")
    wf = json.loads(path.read_text())
    info = dict(OBJECT_INFO)
    info["CheckpointLoaderSimple"] = {"input": {"required": {"ckpt_name": [[], {}]}}, "output": []}
    api = strip_meta(ui_to_api(wf, info))
    by_type = {v["class_type"]: v["inputs"] for v in api.values()}
    assert set(by_type) == {"CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode",
                            "SaveImage"}
    ks = by_type["KSampler"]
    assert isinstance(ks["seed"], int) and isinstance(ks["steps"], int) and ks["steps"] >= 1
    assert ks["sampler_name"] in SAMPLERS and ks["scheduler"] in SCHEDULERS
    assert all(isinstance(ks[k], list) for k in ("model", "positive", "negative", "latent_image"))
    assert by_type["SaveImage"]["filename_prefix"]  # absent from the file: the default is used


def test_an_api_format_file_shipped_with_the_host_passes_through():
    host = Path(os.environ.get("COMFYUI_PATH") or "~/ComfyUI").expanduser()
    path = host / "tests" / "inference" / "graphs" / "default_graph_sdxl1_0.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    data = json.loads(path.read_text())
    assert is_api_format(data) and ui_to_api(data, {}) == data
