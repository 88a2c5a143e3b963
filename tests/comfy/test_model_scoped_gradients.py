"""In-process tier: guidance takes gradients through the user's UNet and VAE without changing what they compute.

The nodes make the host's inference-mode weights ordinary tensors in place (``nodes/host.py``, module doc): no copy of
the model, nothing restored afterwards. These tests prove that harmless: plain sampling and decoding on the same MODEL
and VAE give bit-identical results before and after guided runs, the parameter count and the live tensor bytes are
unchanged, and the MODEL's options and patches are untouched.
"""

from __future__ import annotations

import pytest
import torch
from support.memory import live_tensors

pytestmark = pytest.mark.comfy

DEG = dict(type="gaussian_blur", blur_kernel_size=9, blur_sigma=2.0, sr_factor=4, box_top=0, box_left=0,
           box_height=8, box_width=8, random_box_size=16, random_box_seed=0, jpeg_quality=10)
SD15 = {"name": "SD15", "latent_channels": 4, "scale_factor": 0.18215, "shift_factor": 0.0, "downscale": 8}


@pytest.fixture(scope="module")
def fresh(comfy_host, small_checkpoint):
    """A MODEL/CLIP/VAE loaded for this module only, so its weights are still the host's inference tensors."""
    model, clip, vae = comfy_host.run_node("CheckpointLoaderSimple", ckpt_name=small_checkpoint.name)[:3]
    (cond,) = comfy_host.run_node("CLIPTextEncode", text="a photo", clip=clip)
    return model, vae, cond


def _operator(comfy_host):
    from comfyui_silo.operators.io import save_operator
    from comfyui_silo.operators.network import LatentOperator

    name = "test_scoped_op.safetensors"
    path = comfy_host.base / "models" / "latent_operators" / name
    if not path.exists():
        save_operator(path, LatentOperator(width=16), degradation={"type": "gaussian_blur", "kernel_size": 9,
                                                                     "sigma": 2.0}, latent_format=SD15)
    return comfy_host.run_node("SILOLatentOperatorLoader", operator_name=name)[0]


def _plain(comfy_host, model, vae, cond):
    """What a plain workflow does with the MODEL and the VAE: KSampler (ancestral, so the noise path counts too)
    and VAE Decode."""
    (empty,) = comfy_host.run_node("EmptyLatentImage", width=64, height=64, batch_size=1)
    (out,) = comfy_host.run_node("KSampler", model=model, seed=5, steps=3, cfg=2.0, sampler_name="euler_ancestral",
                                 scheduler="normal", positive=cond, negative=cond, latent_image=empty, denoise=1.0)
    (img,) = comfy_host.run_node("VAEDecode", samples=out, vae=vae)
    return out["samples"].clone(), img.clone()


def test_guided_runs_leave_plain_sampling_bit_identical(comfy_host, fresh):
    model, vae, cond = fresh
    unet, fsm = model.model.diffusion_model, vae.first_stage_model
    assert all(p.is_inference() for p in unet.parameters()), "precondition: the host's inference weights"
    n_unet, n_vae = len(list(unet.parameters())), len(list(fsm.parameters()))
    options_before = repr(model.model_options)
    patches_before = (len(model.patches), len(vae.patcher.patches))
    ref_latent, ref_image = _plain(comfy_host, model, vae, cond)
    again_latent, _ = _plain(comfy_host, model, vae, cond)
    assert torch.equal(ref_latent, again_latent), "plain KSampler is deterministic here"
    del again_latent
    before_bytes, before_graph = live_tensors()

    (deg,) = comfy_host.run_node("SILODegradation", **DEG)
    photo = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    meas, latent = comfy_host.run_node("SILOEncodeMeasurement", image=photo, vae=vae, degradation=deg,
                                       noise_sigma=0.01)
    op = _operator(comfy_host)
    common = dict(model=model, seed=0, steps=2, cfg=1.0, scheduler="normal", positive=cond, negative=cond,
                  latent_image=latent, denoise=1.0, measurement=meas, early_stop=-1)
    silo = comfy_host.run_node("SILOKSampler", operator=op, eta=1.0, update="ddpm", gradient="unet", grad_clamp=1.0,
                               **common)
    dps = comfy_host.run_node("SILOLatentDPSKSampler", vae=vae, eta=1.0, gluing=0.0, gluing_norm="squared",
                              update="ddpm", gradient="unet", grad_clamp=0.0, **common)
    assert torch.isfinite(silo[0]["samples"]).all() and torch.isfinite(dps[0]["samples"]).all()
    # the guided runs did take their gradients through the user's own UNet and VAE decoder ...
    assert not any(p.is_inference() for p in unet.parameters())
    assert not any(p.is_inference() for p in fsm.parameters())
    assert model.model.diffusion_model is unet and vae.first_stage_model is fsm
    del silo, dps, meas, latent, op, deg

    # ... and plain sampling and decoding on the same MODEL and VAE still compute exactly what they did
    latent_after, image_after = _plain(comfy_host, model, vae, cond)
    assert torch.equal(latent_after, ref_latent), "KSampler on the same MODEL changed after a guided run"
    assert torch.equal(image_after, ref_image), "VAE Decode with the same VAE changed after a guided run"
    del latent_after, image_after
    assert (len(list(unet.parameters())), len(list(fsm.parameters()))) == (n_unet, n_vae), "no second copy"
    assert all(not p.requires_grad for p in unet.parameters()), "no weight was left requiring grad"
    assert repr(model.model_options) == options_before and (len(model.patches), len(vae.patcher.patches)) == \
        patches_before, "the MODEL's options and patches are untouched"
    after_bytes, after_graph = live_tensors()
    # relative to before: a deliberate failing backward in an earlier test module may still hold its graph
    assert after_graph == before_graph, f"no autograd graph survives ({before_graph} before, {after_graph} after)"
    # the operator file's module and the cached measurement are gone; a second UNet would be megabytes
    assert after_bytes - before_bytes < 256 * 1024, f"{after_bytes - before_bytes} bytes more held after the runs"


def test_sampler_node_refuses_a_guider_on_another_checkpoint(comfy_host, fresh, sd15_small):
    """SILO Sampler makes the UNet of the MODEL it is given differentiable; a guider sampling another checkpoint
    would fail deep inside autograd, so it is refused by name."""
    model, vae, cond = fresh
    other = sd15_small[0]
    assert other.model is not model.model
    (deg,) = comfy_host.run_node("SILODegradation", **DEG)
    meas, latent = comfy_host.run_node("SILOEncodeMeasurement", image=torch.rand(1, 64, 64, 3), vae=vae,
                                       degradation=deg, noise_sigma=0.01)
    (sampler,) = comfy_host.run_node("SILOSampler", model=other, measurement=meas, operator=_operator(comfy_host),
                                     eta=1.0, update="ddpm", gradient="unet", grad_clamp=1.0, early_stop=-1)
    (noise,) = comfy_host.run_node("RandomNoise", noise_seed=0)
    (sigmas,) = comfy_host.run_node("BasicScheduler", model=model, scheduler="normal", steps=2, denoise=1.0)
    (guider,) = comfy_host.run_node("BasicGuider", model=model, conditioning=cond)
    with pytest.raises(ValueError, match=r"SILO Sampler: input 'model': the guider samples another checkpoint"):
        comfy_host.run_node("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                            latent_image=latent)
