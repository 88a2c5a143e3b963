"""PhysicsOperator: identity at init, the exact degradation inside, any size, masks, files (format version 2), and
the training path (decoder taught by a pixel loss, encoder by the latent loss)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from comfyui_silo.operators.degradations import build_degradation
from comfyui_silo.operators.io import load_operator, read_operator_metadata, save_operator
from comfyui_silo.operators.network import LatentOperator, PhysicsOperator

pytestmark = pytest.mark.unit

BLUR = {"type": "gaussian_blur", "kernel_size": 9, "sigma": 1.5}
SD15 = {"name": "SD15", "latent_channels": 4, "scale_factor": 0.18215, "shift_factor": 0.0, "downscale": 8}
SPECS = [BLUR, {"type": "super_resolution", "factor": 4}, {"type": "jpeg", "quality": 10},
         {"type": "box_inpaint", "top": 8, "left": 16, "height": 24, "width": 16}, {"type": "mask_inpaint"},
         {"type": "random_box_inpaint", "size": 16, "margin": 2}]


def _perturbed(op: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in op.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return op.eval()


def _mask(h: int, w: int) -> torch.Tensor:
    m = torch.zeros(1, 1, h, w)
    m[..., h // 4: h // 2, w // 3: 2 * w // 3] = 1
    return m


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["type"])
def test_fresh_operator_is_the_identity_and_any_size_works(spec):
    op = PhysicsOperator(latent_channels=4, degradation=spec, width=16, num_blocks=1, decoder_width=16)
    z = torch.randn(2, 4, 5, 7)
    mask = _mask(40, 56) if op.use_mask else None
    assert torch.equal(op(z, 0.01, mask=mask), z)
    trained = _perturbed(op)
    for hw in ((5, 7), (1, 1), (8, 12)):
        z = torch.randn(2, 4, *hw)
        m = _mask(hw[0] * 8, hw[1] * 8) if op.use_mask else None
        out = trained(z, torch.tensor([0.0, 0.05]), mask=m)
        assert out.shape == z.shape and torch.isfinite(out).all()


def test_the_degradation_inside_is_the_exact_one():
    """The operator's physics is A itself, lifted to full size (bicubic ×N down, then back up for SR)."""
    for spec in (BLUR, {"type": "super_resolution", "factor": 4}, {"type": "jpeg", "quality": 10}):
        op = PhysicsOperator(latent_channels=4, degradation=spec, width=8, num_blocks=1, decoder_width=8)
        x = torch.rand(2, 3, 32, 48)
        deg = build_degradation(spec)
        want = F.pixel_unshuffle(deg.lift(deg(x), size=(32, 48)) - 0.5, 8)
        assert torch.allclose(op.degrade(x, None), want, atol=1e-6), spec["type"]
    op = PhysicsOperator(latent_channels=4, degradation={"type": "mask_inpaint"}, width=8, num_blocks=1,
                         decoder_width=8)
    x, m = torch.rand(1, 3, 32, 48), _mask(32, 48)
    assert torch.allclose(op.degrade(x, m), F.pixel_unshuffle(x * (1 - m) - 0.5, 8))


def test_masks_at_pixel_and_latent_resolution_agree_on_aligned_boxes_and_are_required():
    op = _perturbed(PhysicsOperator(latent_channels=4, degradation=SPECS[3], width=16, num_blocks=1,
                                    decoder_width=16))
    z = torch.randn(1, 4, 6, 6)
    pixel = torch.zeros(1, 1, 48, 48)
    pixel[..., 8:32, 16:32] = 1
    latent = pixel[..., ::8, ::8]
    assert torch.allclose(op(z, 0.0, mask=pixel), op(z, 0.0, mask=latent), atol=1e-6)
    assert not torch.allclose(op(z, 0.0, mask=pixel), op(z, 0.0, mask=torch.zeros(48, 48)))
    with pytest.raises(ValueError, match="needs `mask`"):
        op(z, 0.0)


def test_config_is_json_rebuilds_on_meta_and_holds_weights_only():
    op = PhysicsOperator(latent_channels=16, degradation=BLUR, downscale=8, width=16, num_blocks=2)
    cfg = json.loads(json.dumps(op.config))
    assert cfg["degradation"] == build_degradation(BLUR).spec and cfg["downscale"] == 8
    with torch.device("meta"):
        again = PhysicsOperator(**cfg)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in op.state_dict().items()}
    assert all("kernel" not in k for k in op.state_dict()), "the degradation is rebuilt from the spec, not stored"
    with pytest.raises(ValueError, match="degradation spec"):
        PhysicsOperator(latent_channels=4)
    with pytest.raises(ValueError, match="downscale"):
        PhysicsOperator(latent_channels=4, degradation=BLUR, downscale=0)


def test_file_round_trip_is_format_version_2_and_old_files_stay_version_1(tmp_path):
    op = _perturbed(PhysicsOperator(latent_channels=4, degradation=BLUR, width=16, num_blocks=1, decoder_width=16))
    path = save_operator(tmp_path / "blur.safetensors", op, degradation=BLUR, latent_format=SD15, training={})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format_version"] == "2"
    info = read_operator_metadata(path)
    assert info["architecture"]["class"] == "PhysicsOperator" and info["format_version"] == 2
    loaded = load_operator(path)
    z = torch.randn(1, 4, 6, 5)
    assert torch.equal(loaded.module(z, 0.01), op(z, 0.01))
    old = save_operator(tmp_path / "old.safetensors", LatentOperator(width=8), degradation=BLUR, latent_format=SD15)
    with safe_open(str(old), framework="pt") as f:
        assert f.metadata()["format_version"] == "1", "a LatentOperator file stays readable by older packs"
    assert load_operator(old).architecture["class"] == "LatentOperator"


def test_fit_outputs_train_both_parts():
    """One optimiser step on the training outputs moves both the decoder (pixel loss) and the encoder (latent
    loss), and reduces the pixel error of the decoder's estimate over a few steps."""
    torch.manual_seed(0)
    op = PhysicsOperator(latent_channels=4, degradation=BLUR, width=16, num_blocks=1, decoder_width=16).train()
    enc = torch.nn.Conv2d(3, 4, 8, stride=8).requires_grad_(False)
    x = torch.rand(4, 3, 32, 32)
    z = enc(x)
    deg = build_degradation(BLUR)
    target = enc(deg(x))
    opt = torch.optim.Adam(op.parameters(), lr=3e-3)
    errors = []
    for step in range(30):
        pred, estimate = op.fit_outputs(z, 0.0, None, x, generator=torch.Generator().manual_seed(step))
        loss = (pred - target).abs().mean() + 10 * (estimate - x).abs().mean()
        errors.append(float((estimate - x).abs().mean()))
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert op.dec_out.weight.grad.abs().sum() > 0 and op.out_conv.weight.grad.abs().sum() > 0
        opt.step()
    assert errors[-1] < 0.7 * errors[0], errors
