"""In-process tier: Restoration Metrics and Pixel Uncertainty nodes under the host's inference mode."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.comfy


def _photo(seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, size // 8, size // 8, generator=g)
    img = torch.nn.functional.interpolate(small, size=(size, size), mode="bicubic", align_corners=False)
    return img.clamp(0, 1).permute(0, 2, 3, 1)  # ComfyUI IMAGE [B,H,W,C]


def _blur(comfy_host):
    (deg,) = comfy_host.run_node("SILODegradation", type="gaussian_blur", blur_kernel_size=9, blur_sigma=2.0,
                                 sr_factor=4, box_top=0, box_left=0, box_height=8, box_width=8, random_box_size=16,
                                 random_box_seed=0, jpeg_quality=10)
    return deg


def test_metrics_score_the_truth_above_the_degraded_photo(comfy_host, sd15_small):
    from comfyui_silo.operators.metrics import psnr

    _model, _clip, vae = sd15_small
    clean = _photo()
    deg = _blur(comfy_host)
    measured, _up = comfy_host.run_node("SILOApplyDegradation", image=clean, degradation=deg, noise_sigma=0.01,
                                        seed=0)
    meas, _latent = comfy_host.run_node("SILOEncodeMeasurement", image=measured, vae=vae, degradation=deg,
                                        noise_sigma=0.01)
    p_true, s_true, c_true, text = comfy_host.run_node("SILORestorationMetrics", image=clean, reference=clean,
                                                       measurement=meas)
    assert math.isinf(p_true) and s_true == pytest.approx(1.0) and c_true == pytest.approx(0.01, rel=0.2)
    assert "image 0: PSNR inf, SSIM 1.0000" in text and "noise floor" in comfy_host.last_ui["text"][0]
    p_bad, s_bad, c_bad, _ = comfy_host.run_node("SILORestorationMetrics", image=measured, reference=clean,
                                                 measurement=meas)
    expected = float(psnr(measured.permute(0, 3, 1, 2), clean.permute(0, 3, 1, 2)))
    assert p_bad == pytest.approx(expected) and s_bad < 0.99 and c_bad > 2 * c_true
    only_meas = comfy_host.run_node("SILORestorationMetrics", image=clean, measurement=meas)
    assert math.isnan(only_meas[0]) and only_meas[2] == pytest.approx(c_true)


def test_metrics_explain_bad_input(comfy_host):
    clean = _photo()
    with pytest.raises(ValueError, match="Restoration Metrics.*nothing to compare"):
        comfy_host.run_node("SILORestorationMetrics", image=clean)
    with pytest.raises(ValueError, match="'reference'.*32x32.*64x64"):
        comfy_host.run_node("SILORestorationMetrics", image=clean, reference=_photo(size=32))


def test_pixel_uncertainty_maps_where_samples_disagree(comfy_host):
    base = _photo(1)
    g = torch.Generator().manual_seed(0)
    noise = torch.zeros(16, 64, 64, 3)
    noise[:, 8:24, 40:56] = 0.1 * torch.randn(16, 16, 16, 3, generator=g)
    samples = (base + noise).clamp(0, 1)
    mean, heat, std, passed = comfy_host.run_node("SILOPixelUncertainty", samples=samples)
    assert mean.shape == (1, 64, 64, 3) and heat.shape == (1, 64, 64, 3) and std.shape == (1, 64, 64)
    assert torch.equal(passed, samples)
    assert float(std[0, 8:24, 40:56].mean()) > 0.05 and float(std[0, 30:, :30].max()) == 0.0
    assert float(heat[0, 8:24, 40:56].mean()) > float(heat[0, 30:, :30].mean())
    with pytest.raises(ValueError, match="'samples'.*at least 2"):
        comfy_host.run_node("SILOPixelUncertainty", samples=samples[:1])
