"""Restoration metrics and pixel-wise uncertainty (operators/metrics.py) against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from comfyui_silo.operators import add_noise, build_degradation
from comfyui_silo.operators.metrics import (
    heatmap,
    measurement_consistency,
    pixel_uncertainty,
    psnr,
    ssim,
)

pytestmark = pytest.mark.unit


def _photo(seed=0, size=48):
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, size // 6, size // 6, generator=g, dtype=torch.float64)
    return torch.nn.functional.interpolate(small, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def test_psnr_matches_its_definition_and_orders_noise_levels():
    x = _photo()
    y = (x + 0.05).clamp(0, 1)
    mse = float(((x - y) ** 2).mean())
    assert float(psnr(y, x)) == pytest.approx(10 * math.log10(1 / mse), rel=1e-12)
    assert float(psnr(x, x)) == math.inf
    g = torch.Generator().manual_seed(1)
    low, high = (x + s * torch.randn(x.shape, generator=g, dtype=x.dtype) for s in (0.01, 0.1))
    assert float(psnr(low, x)) > float(psnr(high, x)) + 15


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    x = _photo(0)
    g = torch.Generator().manual_seed(2)
    y = (x + 0.08 * torch.randn(x.shape, generator=g, dtype=x.dtype)).clamp(0, 1)
    ref = structural_similarity(x[0].permute(1, 2, 0).numpy(), y[0].permute(1, 2, 0).numpy(), channel_axis=2,
                                gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    assert float(ssim(y, x)) == pytest.approx(ref, abs=1e-6)
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-9)


def test_metric_inputs_are_checked():
    x = _photo()
    with pytest.raises(ValueError, match="48x48.*reference is 24x24"):
        psnr(x, x[..., :24, :24])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :8, :8], x[..., :8, :8])


@pytest.mark.parametrize("spec", [{"type": "gaussian_blur", "kernel_size": 9, "sigma": 2.0},
                                  {"type": "super_resolution", "factor": 4}])
def test_consistency_of_the_truth_is_the_noise_floor(spec):
    deg = build_degradation(spec)
    x = _photo(3).float()
    sigma = 0.02
    y = add_noise(deg(x), sigma, seed=0)
    truth = measurement_consistency(x, y, deg, noise_sigma=sigma)
    assert float(truth["norm"]) == pytest.approx(truth["noise_floor"], rel=0.1)
    assert float(truth["rmse"]) == pytest.approx(sigma, rel=0.1)
    wrong = measurement_consistency(_photo(4).float(), y, deg, noise_sigma=sigma)
    assert float(wrong["norm"]) > 3 * truth["noise_floor"]
    with pytest.raises(ValueError, match="size the measurement was made for"):
        measurement_consistency(x[..., :24, :24], y, deg)


def test_pixel_uncertainty_is_the_per_pixel_spread():
    g = torch.Generator().manual_seed(5)
    base = _photo(5).float()
    spread = torch.zeros(1, 1, 48, 48)
    spread[..., 10:20, 30:40] = 0.2  # only this region varies between "seeds"
    samples = base + spread * torch.randn(400, 3, 48, 48, generator=g)
    out = pixel_uncertainty(samples)
    assert torch.allclose(out["mean"], base, atol=0.05)
    inside = out["std_gray"][..., 10:20, 30:40]
    assert float(inside.mean()) == pytest.approx(0.2, rel=0.05)
    assert float(out["std_gray"][..., :10, :].max()) == 0.0
    assert out["heatmap"].shape == (1, 3, 48, 48) and float(out["heatmap"][..., :10, :].max()) == 0.0
    assert float(out["heatmap"][..., 10:20, 30:40].mean()) > 0.5
    np.testing.assert_allclose(out["std"].numpy(), samples.double().std(0, keepdim=True).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        pixel_uncertainty(samples[:1])


def test_heatmap_is_monotone_from_black_to_white():
    v = torch.linspace(0, 1, 50).view(1, 1, 1, 50)
    h = heatmap(v)
    assert h.shape == (1, 3, 1, 50) and torch.all(h.sum(1).diff(dim=-1) >= 0)
    assert float(h[..., 0].sum()) == 0 and float(h[..., -1].min()) == 1.0


def test_the_trace_chart_draws_the_noise_floor_and_the_auto_target():
    from comfyui_silo.operators.charts import _reference_lines, trace_chart

    trace = [{"step": i, "loss": [2.0 - 0.1 * i], "floor": [0.5], "target": [float("inf") if i == 0 else 1.0 - 0.1 * i]}
             for i in range(5)]
    lines = _reference_lines(trace)
    assert lines["noise floor"] == [(float(i), 0.5) for i in range(5)]
    assert lines["auto η target"][0] == (1.0, pytest.approx(0.9))  # the infinite target (pure noise) is left out
    assert trace_chart(trace).size == (640, 400)
    assert _reference_lines([{"step": 0, "loss": [1.0]}]) == {}  # fixed η without a floor: no extra line
