"""Operator fidelity: relative errors, decoded fidelity next to the autoencoder's floor, the gap closed, verdicts."""

from __future__ import annotations

import pytest
import torch

from comfyui_silo.operators.degradations import build_degradation
from comfyui_silo.operators.fidelity import (
    HeldoutSet,
    decoded_fidelity,
    latent_errors,
    relative_error,
    verdict,
)

pytestmark = pytest.mark.unit


def _block(op: float, ident: float, naive: float, key: str = "rel_l2") -> dict:
    return {"operator": {key: op}, "identity": {key: ident}, "naive_latent": {key: naive}}


def test_relative_error_per_image():
    t = torch.ones(2, 4, 3, 3)
    p = t.clone()
    p[1] *= 1.5
    assert relative_error(p, t).tolist() == pytest.approx([0.0, 0.5])


def test_verdict_levels_and_no_flattering_rounding():
    assert verdict(_block(0.2, 0.9, 0.8))["level"] == "good"
    assert verdict(_block(0.6, 0.9, 0.8))["level"] == "usable"
    barely = verdict(_block(0.0999, 0.1, 0.2))
    # 0.1 % better than the best trivial baseline: weak, warned, and said as 99.9 %, never "100 %"
    assert barely["level"] == "weak" and barely["text"].startswith("WARNING") and "99.9%" in barely["text"]
    worse = verdict(_block(0.0424, 0.0423, 0.0401, key="l1"), metric="l1")
    assert worse["level"] == "weak" and "degradation-on-latent" in worse["text"] and "latent L1" in worse["text"]
    decoded = {"gap_closed": 0.85}
    assert verdict(_block(0.3, 0.9, 0.8), decoded)["level"] == "good"
    assert verdict(_block(0.3, 0.9, 0.8), {"gap_closed": 0.6})["level"] == "usable"
    low = verdict(_block(0.3, 0.9, 0.8), {"gap_closed": 0.2})
    assert low["level"] == "weak" and "20%" in low["text"]
    assert verdict(_block(0.95, 0.9, 0.8), decoded)["level"] == "weak", "losing to a baseline beats any gap figure"


def test_decoded_fidelity_against_a_known_autoencoder():
    """With an exactly invertible 'autoencoder' (pixel unshuffle), the floor is perfect, identity is the
    degradation's own error, and an operator that is the exact latent degradation closes the whole gap."""
    deg = build_degradation({"type": "gaussian_blur", "kernel_size": 9, "sigma": 2.0})
    x = torch.rand(3, 3, 32, 32)
    encode = lambda im: torch.nn.functional.pixel_unshuffle(im, 4)  # noqa: E731
    decode = lambda z: torch.nn.functional.pixel_shuffle(z, 4)  # noqa: E731
    measured = deg(x)
    held = HeldoutSet(x=x, z=encode(x), target=encode(measured), sigma=torch.zeros(3), mask=None, degradation=deg,
                      measured=measured)
    exact = lambda z, sigma_y=None, mask=None: encode(deg(decode(z)))  # noqa: E731
    latent, pred = latent_errors(exact, held, downscale=4)
    assert latent["operator"]["rel_l2"] < 1e-5 < latent["identity"]["rel_l2"]
    dec = decoded_fidelity(decode, held, pred)
    assert dec["operator"]["psnr"] > 90 and dec["floor"]["psnr"] > 90
    assert dec["identity"]["psnr"] < 40 and dec["gap_closed"] == pytest.approx(1.0, abs=1e-3)
    half = decoded_fidelity(decode, held, (pred + held.z) / 2)
    assert 0 < half["gap_closed"] < 1 and half["operator"]["ssim"] < dec["operator"]["ssim"]
