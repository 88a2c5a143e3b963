"""Server tier: every shipped workflow (workflows/*.json) converts with the host's /object_info, runs headlessly at
64x64 against the random checkpoint of its model family, and is what scripts/build_workflows.py builds from the
current node schemas.

The SD1.x workflows run against the small SD1.5 checkpoint; ``silo_sdxl_*`` against the tiny SDXL one and
``silo_flux_*`` against the tiny Flux one (tools/random_checkpoint.py). The Flux graphs load as Flux users load it
(UNETLoader, DualCLIPLoader clip_l + t5xxl type flux, VAELoader ae): UNETLoader gets the tiny checkpoint itself (the
host's loader takes a diffusion model out of a checkpoint file), VAELoader a file of its VAE weights cut out of it,
and the DualCLIPLoader is the one node swapped: T5-XXL (4.7 B parameters) cannot run on a 2-core test machine, so
it becomes CLIPLoader(clip_l, type sd3), the CLIP-L-only text encoder the tiny Flux model is built for (as in
test_families_server.py); everything downstream of it (FluxGuidance, the samplers) is the shipped graph."""

from __future__ import annotations

import importlib.util
import json
import urllib.request
from pathlib import Path

import pytest
import torch

from comfyui_silo.tools.workflow import FRONTEND_ONLY_TYPES, assign_widget_values, ui_to_api

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
SMALL_BOX = {"box_top": 16, "box_left": 16, "box_height": 24, "box_width": 24}  # a box inside the 64x64 test photo
SD15 = {"name": "SD15", "latent_channels": 4, "scale_factor": 0.18215, "shift_factor": 0.0, "downscale": 8}
# the host's latent formats (comfy/latent_formats.py) of the other families' workflows (silo_<family>_*)
LATENT_FORMATS = {
    "sdxl": {"name": "SDXL", "latent_channels": 4, "scale_factor": 0.13025, "shift_factor": 0.0, "downscale": 8},
    "flux": {"name": "Flux", "latent_channels": 16, "scale_factor": 0.3611, "shift_factor": 0.1159, "downscale": 8},
}
FLUX_VAE = "flux_tiny_random_ae.safetensors"


def _family(stem: str) -> str | None:
    """The model family a shipped workflow is for (``silo_sdxl_...`` -> ``sdxl``); None for SD1.x."""
    return next((f for f in LATENT_FORMATS if stem.startswith(f"silo_{f}_")), None)


def _spec(widgets: dict) -> dict:
    """The degradation spec a Degradation (SILO) node builds from its widgets (only the chosen type's widgets)."""
    fields = {"gaussian_blur": {"blur_kernel_size": "kernel_size", "blur_sigma": "sigma"},
              "super_resolution": {"sr_factor": "factor"},
              "box_inpaint": {"box_top": "top", "box_left": "left", "box_height": "height", "box_width": "width"},
              "random_box_inpaint": {"random_box_size": "size", "random_box_seed": "seed"},
              "jpeg": {"jpeg_quality": "quality"}}.get(widgets["type"], {})
    return {"type": widgets["type"], **{field: widgets[w] for w, field in fields.items()}}


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _builder_module():
    spec = importlib.util.spec_from_file_location("build_workflows", ROOT / "scripts" / "build_workflows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get("/object_info", timeout=120)


@pytest.fixture(scope="module")
def operator_files(comfy_server, object_info):
    """An untrained operator for every operator file a shipped workflow names, for the degradation it names."""
    from comfyui_silo.operators.io import save_operator
    from comfyui_silo.operators.network import LatentOperator

    folder = comfy_server.base / "models" / "latent_operators"
    made = {}
    for path in WORKFLOWS:
        wf = _load(path)
        loaders = [n for n in wf["nodes"] if n["type"] == "SILOLatentOperatorLoader"]
        degs = [n for n in wf["nodes"] if n["type"] == "SILODegradation"]
        for loader in loaders:
            name = assign_widget_values(object_info["SILOLatentOperatorLoader"], loader["widgets_values"])[
                "operator_name"]
            widgets = assign_widget_values(object_info["SILODegradation"], degs[0]["widgets_values"])
            if widgets["type"] == "box_inpaint":
                widgets.update(SMALL_BOX)  # the box _prepare puts into the 64x64 photo
            spec = _spec(widgets)
            latent_format = LATENT_FORMATS.get(_family(path.stem), SD15)
            if not (folder / name).exists():
                save_operator(folder / name, LatentOperator(latent_channels=latent_format["latent_channels"], width=8,
                                                            use_mask=spec["type"] == "mask_inpaint"),
                              degradation=spec, latent_format=latent_format)
            made[name] = spec
    return made


def _png(path: Path, size: tuple[int, int], hole: tuple[int, int, int, int] | None = None) -> str:
    from PIL import Image

    w, h = size
    g = torch.Generator().manual_seed(w * 1000 + h)
    img = torch.nn.functional.interpolate(torch.rand(1, 3, max(h // 4, 2), max(w // 4, 2), generator=g),
                                          size=(h, w), mode="bilinear", align_corners=False)[0]
    arr = (img.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    im = Image.fromarray(arr, "RGB")
    if hole is not None:  # transparent = painted in the mask editor = missing (LoadImage's MASK is 1 - alpha)
        im = im.convert("RGBA")
        alpha = Image.new("L", (w, h), 255)
        alpha.paste(0, hole)
        im.putalpha(alpha)
    im.save(path)
    return path.name


def test_workflows_are_what_the_builder_makes_from_the_current_nodes(object_info):
    built = _builder_module().build_all(object_info)
    assert set(built) == {p.stem for p in WORKFLOWS}
    for path in WORKFLOWS:
        assert built[path.stem] == _load(path), (f"{path.name} is stale: run `python scripts/build_workflows.py` "
                                                  "and commit the result")


def test_the_host_serves_the_workflows_as_templates_with_thumbnails(comfy_server):
    templates = comfy_server.get("/workflow_templates")
    ours = [names for pack, names in templates.items() if pack == "comfyui-silo"]
    assert ours and sorted(ours[0]) == sorted(p.stem for p in WORKFLOWS)
    url = f"{comfy_server.url}/api/workflow_templates/comfyui-silo/{WORKFLOWS[0].stem}.jpg"
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.read(3) == b"\xff\xd8\xff"


@pytest.fixture(scope="module")
def family_files(comfy_server, request) -> dict[str, str]:
    """The tiny family checkpoints (``family_models``) plus what the Flux loaders read: the checkpoint linked into
    models/diffusion_models for UNETLoader and its VAE weights (``vae.*``) as a file of their own in
    models/vae for VAELoader."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = dict(request.getfixturevalue("family_models"))
    base = comfy_server.base
    flux = base / "models" / "checkpoints" / files["flux"]
    unet = base / "models" / "diffusion_models" / files["flux"]
    unet.parent.mkdir(parents=True, exist_ok=True)
    if not unet.exists():
        unet.symlink_to(flux.resolve())
    vae = base / "models" / "vae" / FLUX_VAE
    vae.parent.mkdir(parents=True, exist_ok=True)
    if not vae.exists():
        prefix = "vae."  # the Flux checkpoint layout (comfy.supported_models.Flux.vae_key_prefix)
        with safe_open(str(flux), "pt") as f:
            weights = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        assert weights, f"{flux.name} holds no {prefix}* VAE weights"
        save_file(weights, str(vae))
    return files


def _swap_flux_text_encoder(api: dict, clip_l: str) -> None:
    """DualCLIPLoader(clip_l, t5xxl, flux) -> CLIPLoader(clip_l, sd3): same CLIP output, no T5-XXL (see the module
    docstring)."""
    for node in api.values():
        if node["class_type"] == "DualCLIPLoader":
            assert node["inputs"]["type"] == "flux"
            node["class_type"] = "CLIPLoader"
            node["inputs"] = {"clip_name": clip_l, "type": "sd3"}


def _prepare(api: dict, stem: str, base: Path, checkpoint: str, families: dict | None = None) -> dict:
    """Shrink a shipped workflow to 64x64 and a couple of steps; returns what its outputs should look like.
    ``families``: the :func:`family_files` names, for the ``silo_<family>_*`` workflows."""
    expect = {"size": (64, 64)}
    family = _family(stem)
    if family is not None:
        checkpoint = families[family]
    if family == "flux":
        _swap_flux_text_encoder(api, families["clip_l"])
    small = {"silo_super_resolution_x4": (16, 16), "silo_super_resolution_x8": (8, 8)}.get(stem, (64, 64))
    hole = (20, 24, 44, 40) if stem == "silo_mask_inpainting" else None
    image = _png(base / "input" / f"wf_{stem}.png", small, hole)
    for node in api.values():
        cls, inputs = node["class_type"], node["inputs"]
        if cls == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = checkpoint
        elif cls == "UNETLoader":
            inputs["unet_name"] = checkpoint
        elif cls == "VAELoader":
            inputs["vae_name"] = FLUX_VAE
        elif cls == "LoadImage":
            inputs["image"] = image
        elif cls in ("SILOKSampler", "SILOLatentDPSKSampler"):
            inputs["steps"] = 2
        elif cls == "SILOReSampleKSampler":
            inputs.update(steps=4, consistency_every=1, latent_steps=3, pixel_steps=3)
        elif cls == "KSampler":
            inputs["steps"] = 1
        elif cls == "BasicScheduler":
            inputs["steps"] = 2
        elif cls == "SILORestoreSeeds":
            inputs["seeds"] = 2
        elif cls in ("EmptyLatentImage", "EmptySD3LatentImage"):
            inputs.update(width=64, height=64, batch_size=1)
        elif cls == "SILODegradation" and inputs["type"] == "box_inpaint":
            inputs.update(SMALL_BOX)
        elif cls == "SILOTrainLatentOperator":
            inputs.update(steps=2, batch_size=2, crop_size=64)
    return expect


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_shipped_workflow_runs_headlessly(path, comfy_server, object_info, operator_files, small_checkpoint, request):
    from PIL import Image

    wf = _load(path)
    missing = {n["type"] for n in wf["nodes"]} - set(object_info) - FRONTEND_ONLY_TYPES
    assert not missing, f"{path.name} names node types the host does not have: {missing}"
    api = ui_to_api(wf, object_info)
    base = comfy_server.base
    family = _family(path.stem)
    families = request.getfixturevalue("family_files") if family else None
    expect = _prepare(api, path.stem, base, small_checkpoint.name, families)
    before = set((base / "models" / "latent_operators").glob("*.safetensors"))
    entry = comfy_server.run_prompt(api, timeout=600)
    outputs = entry["outputs"]
    saved = [img for node_id, out in outputs.items() for img in out.get("images", [])
             if api[node_id]["class_type"] == "SaveImage"]
    if path.stem.endswith("train_operator_from_generated_images"):
        from comfyui_silo.operators.io import load_operator

        new = set((base / "models" / "latent_operators").glob("*.safetensors")) - before
        assert len(new) == 1, "the training workflow writes one new operator file (never overwriting)"
        (new_file,) = new
        # the name the family's restoration workflow loads exists already (operator_files): _2, _3, ...
        assert new_file.name.startswith(f"gaussian_blur_{family or 'sd15'}_")
        op = load_operator(new_file)
        assert op.degradation["type"] == "gaussian_blur" and op.training["steps"] == 2
        # trained in the latent space of the model the workflow loaded (what that family's restoration accepts)
        assert op.latent_format["name"] == LATENT_FORMATS.get(family, SD15)["name"]
        assert op.latent_format["latent_channels"] == LATENT_FORMATS.get(family, SD15)["latent_channels"]
        train_id = next(i for i, n in api.items() if n["class_type"] == "SILOTrainLatentOperator")
        assert "held-out" in "".join(outputs[train_id]["text"])
        curve_ids = [i for i, n in api.items() if n["class_type"] == "PreviewImage"
                     and n["inputs"]["images"][0] == train_id]
        assert len(curve_ids) == 1 and outputs[curve_ids[0]]["images"], "the training curve is previewed"
        return
    assert saved, f"{path.name} saved no image"
    sizes = []
    for img in saved:
        with Image.open(base / "output" / img["subfolder"] / img["filename"]) as im:
            sizes.append(im.size)
    if path.stem == "silo_degrade_restore_compare":
        # original | degraded | SILO | Latent DPS | ReSample, and SILO alone
        assert sorted(sizes) == sorted([(64, 64), (64 * 5 + 4 * 8, 64)]), sizes
        metrics = [i for i, n in api.items() if n["class_type"] == "SILORestorationMetrics"]
        assert len(metrics) == 3 and all("PSNR" in "".join(outputs[i]["text"]) for i in metrics)
    elif path.stem == "silo_uncertainty":
        assert sizes == [(64, 64), (64, 64)], sizes  # the mean and the uncertainty map
        seeds_id = next(i for i, n in api.items() if n["class_type"] == "SILORestoreSeeds")
        assert "2 seeds" in "".join(outputs[seeds_id]["text"])
        metrics_id = next(i for i, n in api.items() if n["class_type"] == "SILORestorationMetrics")
        assert "noise floor" in "".join(outputs[metrics_id]["text"])
        return
    else:
        assert sizes == [expect["size"]], sizes
    ks_id = next(i for i, n in api.items() if n["class_type"] == "SILOKSampler")
    assert "consistency" in "".join(outputs[ks_id]["text"])


def test_readme_main_job_command_restores_a_photo(tmp_path_factory, small_checkpoint, operator_files, comfy_server,
                                                  tmp_path):
    """README's main job (`python -m comfyui_silo run workflows/silo_gaussian_deblur.json --image "Degraded
    photo=..." --set CheckpointLoaderSimple.ckpt_name=...`) on its own headless server, shrunk to 2 steps."""
    import os
    import shutil
    import subprocess
    import sys

    from PIL import Image
    from support import host as host_support

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "-m comfyui_silo run workflows/silo_gaussian_deblur.json" in readme
    assert '--image "Degraded photo=' in readme and "--set CheckpointLoaderSimple.ckpt_name=" in readme
    base = host_support.make_base_directory(tmp_path_factory.mktemp("main_job"), [small_checkpoint])
    shutil.copyfile(comfy_server.base / "models" / "latent_operators" / "gaussian_blur_sd15.safetensors",
                    base / "models" / "latent_operators" / "gaussian_blur_sd15.safetensors")
    photo = tmp_path / "blurry photo.png"
    _png(photo, (64, 48))
    out = tmp_path / "restored"
    proc = subprocess.run(
        [sys.executable, "-m", "comfyui_silo", "run", "workflows/silo_gaussian_deblur.json",
         "--comfyui", str(host_support.comfyui_path()), "--base-directory", str(base), "--cpu",
         "--image", f"Degraded photo={photo}", "--set", f"CheckpointLoaderSimple.ckpt_name={small_checkpoint.name}",
         "--set", "SILOKSampler.steps=2", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=str(ROOT), env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = [Path(line) for line in proc.stdout.splitlines() if line.endswith(".png") and "temp" not in line]
    assert saved, proc.stdout
    with Image.open(saved[0]) as im:
        assert im.size == (64, 48)
    # the run is followed node by node and step by step, with the nodes' own reports (on stderr)
    assert "(SILOKSampler)" in proc.stderr and "step 2/2" in proc.stderr, proc.stderr[-3000:]
    assert "consistency" in proc.stderr
    # the photo went to a subfolder of its own, removed when the run ended
    assert not [p for p in (base / "input").iterdir() if p.name.startswith("comfyui-silo-run-")]
