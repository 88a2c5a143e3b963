"""In-process tier: the differentiable VAE bridge that pixel-space baselines (Latent-DPS, PSLD, ReSample) use."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfy


def test_decode_matches_the_host_and_passes_gradients(comfy_host, sd15_small):
    from comfyui_silo.nodes.host import differentiable_vae

    model, _clip, vae = sd15_small
    lf = model.get_model_object("latent_format")
    n_params = len(list(vae.first_stage_model.parameters()))
    with torch.inference_mode():  # as a node runs
        raw = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
        host_img = vae.decode(raw)  # [B,H,W,C] in [0,1]
        decode, encode = differentiable_vae(vae, model)
        with torch.inference_mode(False), torch.enable_grad():
            z = lf.process_in(raw.clone()).requires_grad_(True)
            img = decode(z)
            y = torch.rand_like(img)
            (g,) = torch.autograd.grad(torch.linalg.vector_norm(img - y), z)
            x = torch.rand(1, 3, 64, 64, requires_grad=True)
            (gx,) = torch.autograd.grad(encode(x).square().sum(), x)
    assert torch.allclose(img.detach().clamp(0, 1).permute(0, 2, 3, 1), host_img.float(), atol=1e-4)
    assert g.shape == z.shape and torch.isfinite(g).all() and float(g.abs().sum()) > 0
    assert gx.shape == x.shape and float(gx.abs().sum()) > 0
    assert len(list(vae.first_stage_model.parameters())) == n_params
    assert not any(p.is_inference() for p in vae.first_stage_model.parameters())
    with torch.no_grad():
        z_enc = encode(torch.rand(1, 3, 64, 64))
    assert z_enc.shape == (1, 4, 8, 8)
