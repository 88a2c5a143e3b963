"""LatentOperator: identity at init, any size, σ/mask conditioning, gradients, dtypes, a tiny learning check."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from comfyui_silo.operators.network import LatentOperator, count_parameters, mask_to_latent

pytestmark = pytest.mark.unit


def _perturbed(op: LatentOperator, scale: float = 0.05, seed: int = 0) -> LatentOperator:
    """Simulate a trained operator: add noise to every parameter (the zero-init head and FiLM layers included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in op.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return op


@pytest.fixture(scope="module")
def trained() -> LatentOperator:
    torch.manual_seed(0)
    return _perturbed(LatentOperator()).eval()


@pytest.fixture(scope="module")
def trained_mask() -> LatentOperator:
    torch.manual_seed(1)
    return _perturbed(LatentOperator(use_mask=True), seed=1).eval()


@pytest.mark.parametrize("sigma", [None, 0.0, 0.02, 0.1, torch.tensor([0.0, 0.05])])
def test_fresh_operator_is_exact_identity(sigma):
    torch.manual_seed(0)
    z = torch.randn(2, 4, 13, 21)
    assert torch.equal(LatentOperator()(z, sigma), z)
    mask = torch.zeros(1, 104, 168)
    mask[:, 20:60, 30:90] = 1
    assert torch.equal(LatentOperator(use_mask=True)(z, sigma, mask=mask), z)


@pytest.mark.parametrize("hw", [(8, 8), (13, 21), (64, 64), (40, 96), (1, 1), (3, 5)])
def test_any_latent_size(trained, trained_mask, hw):
    z = torch.randn(2, 4, *hw)
    with torch.no_grad():
        out = trained(z, 0.03)
        assert out.shape == z.shape and torch.isfinite(out).all()
        mask = torch.rand(hw[0] * 8, hw[1] * 8) > 0.5  # pixel-resolution [H, W] bool mask
        out_m = trained_mask(z, 0.03, mask=mask)
        assert out_m.shape == z.shape and torch.isfinite(out_m).all()


def test_parameter_count_in_range():
    n = count_parameters(LatentOperator())
    assert 500_000 <= n <= 3_000_000, n
    assert count_parameters(LatentOperator(use_mask=True)) < 5_000_000


def test_config_is_json_and_rebuilds():
    op = LatentOperator(latent_channels=16, width=32, channel_mults=(1, 2), mid_dilations=(3,), use_mask=True)
    cfg = json.loads(json.dumps(op.config))
    rebuilt = LatentOperator(**cfg)
    assert rebuilt.config == op.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in op.state_dict().items()}
    out = rebuilt(torch.randn(1, 16, 9, 7), 0.01, mask=torch.ones(9, 7))
    assert out.shape == (1, 16, 9, 7)


def test_batch_with_per_sample_sigma(trained):
    torch.manual_seed(2)
    z = torch.randn(3, 4, 16, 24)
    sig = torch.tensor([0.0, 0.03, 0.08])
    with torch.no_grad():
        batched = trained(z, sig)
        for i in range(3):
            single = trained(z[i : i + 1], float(sig[i]))
            torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-4, atol=1e-5)
        # one σ value (float, 0-d or 1-element tensor) broadcasts over the batch
        torch.testing.assert_close(trained(z, 0.03), trained(z, torch.tensor(0.03)))
        torch.testing.assert_close(trained(z, 0.03), trained(z, torch.tensor([0.03])))


def test_sigma_changes_output_after_training(trained):
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        a, b = trained(z, 0.0), trained(z, 0.05)
    assert (a - b).abs().max() > 1e-3


def test_mask_changes_output(trained_mask):
    z = torch.randn(2, 4, 16, 16)
    m0 = torch.zeros(2, 1, 16, 16)
    m1 = m0.clone()
    m1[:, :, 4:12, 4:12] = 1
    with torch.no_grad():
        assert (trained_mask(z, mask=m0) - trained_mask(z, mask=m1)).abs().max() > 1e-3


def test_mask_batch_broadcast_and_resolution(trained_mask):
    z = torch.randn(3, 4, 10, 12)
    pix = torch.zeros(1, 80, 96)
    pix[:, 8:40, 16:64] = 1
    lat = mask_to_latent(pix, (10, 12))
    with torch.no_grad():
        a = trained_mask(z, 0.01, mask=pix)  # batch-1 mask, pixel resolution, [B, H, W]
        b = trained_mask(z, 0.01, mask=lat.expand(3, -1, -1, -1))  # per-sample, latent resolution, [B, 1, h, w]
        c = trained_mask(z, 0.01, mask=pix[0])  # [H, W]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    with pytest.raises(ValueError, match="mask batch size"):
        trained_mask(z, mask=torch.zeros(2, 10, 12))


def test_use_mask_without_mask_is_helpful_error(trained_mask):
    with pytest.raises(ValueError, match=r"needs `mask`.*1 = missing"):
        trained_mask(torch.randn(1, 4, 8, 8), 0.01)


def test_mask_ignored_when_operator_has_no_mask_input(trained):
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(trained(z, 0.01, mask=torch.ones(1, 64, 64)), trained(z, 0.01))


def test_mask_to_latent_area_average():
    pix = torch.zeros(16, 16)
    pix[:8, :8] = 1
    pix[8:, 8:12] = 1  # half of the bottom-right 8×8 cell
    lat = mask_to_latent(pix, (2, 2))
    assert lat.shape == (1, 1, 2, 2)
    torch.testing.assert_close(lat[0, 0], torch.tensor([[1.0, 0.0], [0.0, 0.5]]))
    assert mask_to_latent(torch.ones(2, 1, 5, 7), (5, 7)).shape == (2, 1, 5, 7)
    assert mask_to_latent(torch.ones(3, 40, 56, dtype=torch.bool), (5, 7)).dtype == torch.float32
    with pytest.raises(ValueError):
        mask_to_latent(torch.ones(1, 3, 8, 8), (1, 1))


def test_gradients_reach_input_and_every_parameter():
    torch.manual_seed(3)
    op = LatentOperator(use_mask=True)
    with torch.no_grad():
        op.out_conv.weight.normal_(0, 0.05)
    z = torch.randn(2, 4, 12, 20, requires_grad=True)
    out = op(z, torch.tensor([0.01, 0.06]), mask=torch.rand(2, 96, 160))
    (out - 0.5 * z.detach()).square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    for name, p in op.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_receptive_field_covers_16_latent_pixels(trained):
    z = torch.randn(1, 4, 64, 64, requires_grad=True)
    trained(z, 0.02)[0, :, 32, 32].sum().backward()
    g = z.grad[0].abs().sum(0)
    assert g[32, 32 + 16] > 0 and g[32 - 16, 32] > 0 and g[32 + 20, 32 - 20] > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input(trained, dtype):
    z = torch.randn(2, 4, 13, 21)
    zh = z.to(dtype)
    assert torch.equal(LatentOperator()(zh, 0.02), zh)
    with torch.no_grad():
        out = trained(zh, 0.02)
        ref = trained(zh.float(), 0.02)
    assert out.dtype == dtype and out.shape == z.shape
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_bfloat16_module():
    op = _perturbed(LatentOperator()).to(torch.bfloat16)
    z = torch.randn(1, 4, 9, 11)
    out = op(z, 0.01)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_bad_inputs():
    op = LatentOperator()
    with pytest.raises(ValueError, match="4-channel"):
        op(torch.randn(1, 16, 8, 8))
    with pytest.raises(ValueError, match="non-negative"):
        op(torch.randn(1, 4, 8, 8), -0.1)
    with pytest.raises(ValueError, match="sigma_y has 3 values"):
        op(torch.randn(2, 4, 8, 8), torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError):
        op(torch.randn(4, 8, 8))
    with pytest.raises(ValueError, match="padding_mode"):
        LatentOperator(padding_mode="nope")


@pytest.fixture
def single_thread():
    """Tiny tensors gain nothing from threads, and a busy 2-core machine makes 2 OpenMP threads very slow."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_learns_a_latent_blur(single_thread):
    """A few hundred Adam steps must fit a fixed 3×3 blur on latents clearly better than the identity."""
    torch.manual_seed(0)
    op = LatentOperator(width=16, channel_mults=(1, 2), mid_dilations=(2,), cond_dim=32, sigma_embed_dim=16)
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    weight = kernel.expand(4, 1, 3, 3)

    def target(z):
        return F.conv2d(F.pad(z, (1, 1, 1, 1), mode="replicate"), weight, groups=4)

    z_val = torch.randn(16, 4, 16, 16)
    identity_loss = F.mse_loss(z_val, target(z_val)).item()
    opt = torch.optim.Adam(op.parameters(), lr=3e-3)
    for _ in range(200):
        z = torch.randn(4, 4, 16, 16)
        loss = F.mse_loss(op(z), target(z))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = F.mse_loss(op(z_val), target(z_val)).item()
    assert final < 0.1 * identity_loss, (final, identity_loss)
