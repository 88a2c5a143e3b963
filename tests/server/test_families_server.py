"""Server tier: one SILO restoration per model family (SDXL, SD2.x v-prediction, SD3, Flux) queued on a real
``python main.py --cpu`` server, as a user of that family would build it (Flux: CLIPLoader + FluxGuidance at CFG 1).

The random checkpoints come from tools/random_checkpoint.py (the ``family_models`` fixture links them into the
server's models folders); 64x64 images and 2 steps keep each run short.
"""

from __future__ import annotations

import pytest
from support.host import FAMILY_VARIANTS
from support.make_checkpoint import FAMILIES

pytestmark = pytest.mark.server

# the host's latent formats (comfy/latent_formats.py): channels, scale factor, shift factor
LATENT_FORMATS = {"SD15": (4, 0.18215, 0.0), "SDXL": (4, 0.13025, 0.0), "SD3": (16, 1.5305, 0.0609),
                  "Flux": (16, 0.3611, 0.1159)}
ETA = {"sdxl": 5.0, "sd21v": 5.0, "sd3": 20.0, "flux": 20.0}  # as tests/comfy/test_families.py


def _operator_file(base, variant: str) -> str:
    from comfyui_silo.operators.io import save_operator
    from comfyui_silo.operators.network import LatentOperator

    name = FAMILIES[variant]["latent_format"]
    channels, scale, shift = LATENT_FORMATS[name]
    fname = f"server_family_op_{name}.safetensors"
    path = base / "models" / "latent_operators" / fname
    if not path.exists():
        save_operator(path, LatentOperator(latent_channels=channels, width=8),
                      degradation={"type": "gaussian_blur", "kernel_size": 9, "sigma": 2.0},
                      latent_format={"name": name, "latent_channels": channels, "scale_factor": scale,
                                     "shift_factor": shift, "downscale": 8})
    return fname


def _prompt(variant: str, files: dict, operator: str) -> dict:
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": files[variant]}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 8421504}},
        "3": {"class_type": "SILODegradation", "inputs": {
            "type": "gaussian_blur", "blur_kernel_size": 9, "blur_sigma": 2.0, "sr_factor": 4, "box_top": 0,
            "box_left": 0, "box_height": 8, "box_width": 8, "random_box_size": 16, "random_box_seed": 0,
            "jpeg_quality": 10}},
        "4": {"class_type": "SILOApplyDegradation", "inputs": {
            "image": ["2", 0], "degradation": ["3", 0], "noise_sigma": 0.05, "seed": 1}},
        "5": {"class_type": "SILOEncodeMeasurement", "inputs": {
            "image": ["4", 0], "vae": ["1", 2], "degradation": ["3", 0], "noise_sigma": 0.05}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a high quality photo", "clip": ["1", 1]}},
        "7": {"class_type": "SILOLatentOperatorLoader", "inputs": {"operator_name": operator}},
        "8": {"class_type": "SILOKSampler", "inputs": {
            "model": ["1", 0], "seed": 0, "steps": 2, "cfg": 1.0, "scheduler": "normal", "positive": ["6", 0],
            "negative": ["6", 0], "latent_image": ["5", 1], "denoise": 1.0, "measurement": ["5", 0],
            "operator": ["7", 0], "eta": ETA[variant], "update": "ddpm", "gradient": "unet", "grad_clamp": 1.0,
            "early_stop": -1}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": f"silo_family_{variant}"}},
    }
    if variant == "flux":  # no text encoder in the file: CLIP-L as the SD3 text encoder; distilled guidance at CFG 1
        prompt["11"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": files["clip_l"], "type": "sd3"}}
        prompt["6"]["inputs"]["clip"] = ["11", 0]
        prompt["12"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["6", 0], "guidance": 3.5}}
        prompt["8"]["inputs"]["positive"] = prompt["8"]["inputs"]["negative"] = ["12", 0]
    return prompt


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_silo_restores_with_every_family_on_a_real_server(comfy_server, family_models, variant):
    operator = _operator_file(comfy_server.base, variant)
    entry = comfy_server.run_prompt(_prompt(variant, family_models, operator), timeout=900)
    images = entry["outputs"]["10"]["images"]
    assert len(images) == 1
    saved = comfy_server.base / "output" / images[0].get("subfolder", "") / images[0]["filename"]
    assert saved.is_file() and saved.stat().st_size > 0
    assert comfy_server.proc.poll() is None
