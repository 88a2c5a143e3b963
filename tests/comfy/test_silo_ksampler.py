"""In-process tier: SILO KSampler with the random SD1.5 checkpoint."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfy

SD15 = {"name": "SD15", "latent_channels": 4, "scale_factor": 0.18215, "shift_factor": 0.0, "downscale": 8}


def _operator(tmp_path, latent_format):
    from comfyui_silo.operators.io import load_operator, save_operator
    from comfyui_silo.operators.network import LatentOperator

    path = tmp_path / f"op_{latent_format['name']}.safetensors"
    save_operator(path, LatentOperator(width=16), degradation={"type": "gaussian_blur", "kernel_size": 9,
                                                                 "sigma": 2.0}, latent_format=latent_format)
    return load_operator(path)


def _run(comfy_host, model, cond, latent, meas, op, **kw):
    args = dict(model=model, seed=0, steps=4, cfg=1.0, scheduler="normal", positive=cond, negative=cond,
                latent_image=latent, denoise=1.0, measurement=meas, operator=op, eta=0.5, update="ddpm",
                gradient="unet", grad_clamp=1.0, early_stop=-1)
    args.update(kw)
    return comfy_host.run_node("SILOKSampler", **args)


def test_silo_ksampler_pulls_towards_the_measurement_in_both_modes(comfy_host, sd15_small, tmp_path):
    model, clip, vae = sd15_small
    (cond,) = comfy_host.run_node("CLIPTextEncode", text="a high quality photo", clip=clip)
    (deg,) = comfy_host.run_node("SILODegradation", type="gaussian_blur", blur_kernel_size=9, blur_sigma=2.0,
                                 sr_factor=4, box_top=0, box_left=0, box_height=8, box_width=8, random_box_size=16,
                                 random_box_seed=0, jpeg_quality=10)
    photo = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    (meas,) = comfy_host.run_node("SILOEncodeMeasurement", image=photo, vae=vae, degradation=deg, noise_sigma=0.01)
    (latent,) = comfy_host.run_node("EmptyLatentImage", width=64, height=64, batch_size=1)
    op = _operator(tmp_path, SD15)
    unet = model.model.diffusion_model
    n_params = len(list(unet.parameters()))
    w = (meas.latent * 0.18215).clamp(-4, 4)

    def residual(samples):
        with torch.no_grad():
            return float((w - op(samples.float(), sigma_y=0.01)).norm())

    (plain, _), = [_run(comfy_host, model, cond, latent, meas, op, eta=0.0)]
    res_plain = residual(plain["samples"])
    for mode in ("unet", "x0"):
        out, trace = _run(comfy_host, model, cond, latent, meas, op, eta=2.0, gradient=mode)
        assert len(trace) == 4 and trace[-1]["loss"][0] < trace[0]["loss"][0]
        assert residual(out["samples"]) < 0.8 * res_plain, mode
    assert len(list(unet.parameters())) == n_params
    assert not any(p.is_inference() for p in unet.parameters())  # made differentiable in place, not copied


def test_operator_for_another_latent_format_is_refused(comfy_host, sd15_small, tmp_path):
    model, clip, vae = sd15_small
    sdxl = dict(SD15, name="SDXL", scale_factor=0.13025)
    op = _operator(tmp_path, sdxl)
    with pytest.raises(ValueError, match="operator.*another latent space.*scale"):
        _run(comfy_host, model, None, {"samples": torch.zeros(1, 4, 8, 8)}, None, op)


def test_encode_measurement_explains_bad_sizes(comfy_host, sd15_small):
    _model, _clip, vae = sd15_small
    (deg,) = comfy_host.run_node("SILODegradation", type="gaussian_blur", blur_kernel_size=9, blur_sigma=2.0,
                                 sr_factor=4, box_top=0, box_left=0, box_height=8, box_width=8, random_box_size=16,
                                 random_box_seed=0, jpeg_quality=10)
    with pytest.raises(ValueError, match="Encode Measurement.*'image'.*multiple of 8"):
        comfy_host.run_node("SILOEncodeMeasurement", image=torch.rand(1, 60, 64, 3), vae=vae, degradation=deg,
                            noise_sigma=0.01)
    with pytest.raises(ValueError, match="empty"):
        comfy_host.run_node("SILOEncodeMeasurement", image=torch.rand(0, 64, 64, 3), vae=vae, degradation=deg,
                            noise_sigma=0.01)
