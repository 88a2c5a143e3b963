"""Automatic η (``eta_mode="auto"``): the rule against every fixed η in the exact-posterior worlds, the divergence
guard, and what stays exactly as it was (fixed η, the default mode).

The rule (samplers/core.py, docs/automatic-eta.md): Polyak's step size towards a consistency target
``floor * sqrt(0.5^2 + s^2)`` (``s`` the VE noise level, ``floor`` the loss expected at the true image).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from support.toy import PixelToyWorld, ToyGaussianWorld, vp_sigmas

from benchmarks.auto_eta import FIXED_ETAS, SETTINGS, measure
from comfyui_silo.samplers import core
from comfyui_silo.samplers.latent_dps import LatentDPSSettings, sample_latent_dps
from comfyui_silo.samplers.resample import ReSampleSettings
from comfyui_silo.samplers.silo import SiloSettings, sample_silo

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def silo_rows():
    return {(p, n, s): measure("silo", p, n, s) for p, n, s in SETTINGS}


@pytest.mark.slow
@pytest.mark.parametrize(("param", "steps", "sigma_y"), SETTINGS)
def test_auto_is_within_15_percent_of_the_best_fixed_eta(silo_rows, param, steps, sigma_y):
    """SILO in the Gaussian worlds (vp and flow, 50/250/999 steps, σ_y 0.01/0.05): auto's posterior-mean error is
    within 15 % of the best of the ×2 sweep 0.125…64 (measured: 0.75–1.13; the table is in BENCHMARKS.md)."""
    row = silo_rows[(param, steps, sigma_y)]
    assert row.ratio <= 1.15, (row.auto, row.best_eta, row.fixed)
    assert math.isfinite(row.auto_residual) and row.auto_residual < 10  # auto never runs away


@pytest.mark.slow
def test_the_best_fixed_eta_moves_across_the_settings_auto_does_not_need_to_be_told(silo_rows):
    best = {key: row.best_eta for key, row in silo_rows.items()}
    assert len(set(best.values())) >= 4, best  # measured: 0.25 … 64
    assert max(best.values()) / min(best.values()) >= 64
    assert set(best.values()) <= set(FIXED_ETAS)


# ------------------------------------------------------------------------------------------------ the rule
def test_the_rule_is_polyaks_step_to_the_target_and_respects_the_ceiling():
    loss = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)
    g = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    target = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    eta = core.auto_eta(loss, g, target, ceiling=100.0)
    assert eta.tolist() == [1.0, 0.0, 0.0]  # (3-1)/2; at the target: none; no gradient: none
    assert core.auto_eta(loss, g, target, ceiling=0.25).tolist() == [0.25, 0.0, 0.0]
    floor = torch.tensor([2.0], dtype=torch.float64)
    vp = core.get_parameterization("vp")
    assert core.auto_target(floor, vp, 0.0).item() == pytest.approx(2.0 * core.AUTO_END)
    assert core.auto_target(floor, vp, 3.0).item() == pytest.approx(2.0 * math.hypot(core.AUTO_END, 3.0 * core.AUTO_SLOPE))
    assert math.isinf(core.auto_target(floor, core.get_parameterization("flow"), 1.0).item())


def _silo_toy(sigma_w=0.05, steps=50, batch=16):
    world = ToyGaussianWorld(seed=0, sigma_w=sigma_w)
    g = torch.Generator().manual_seed(1)
    w = world.measure(world.sample_prior(1, g), g)
    sig = vp_sigmas(steps)
    x = torch.randn(batch, 2, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * sig[0]
    return world, w, sig, x


def test_auto_records_floor_target_and_eta_path_and_ends_near_the_target():
    world, w, sig, x = _silo_toy()
    trace = []
    out = sample_silo(world, x, sig, {"seed": 3}, disable=True, measurement=w, operator=world.operator,
                      eta=1000.0, eta_mode="auto", noise_floor=world.noise_floor(), trace=trace)
    etas = [e["eta"] for e in trace]
    assert all(e["floor"] == [pytest.approx(world.noise_floor())] * x.shape[0] for e in trace)
    assert all(len(e["target"]) == x.shape[0] for e in trace)
    assert max(etas) > 1.0 and etas[-1] < max(etas)  # strong while far from the target, less near it
    res = (w - world.operator(out)).flatten(1).norm(dim=1).mean().item()
    assert res < 3 * world.noise_floor()  # unguided: > 5x (tests/unit/test_silo_sampler.py)


def test_auto_needs_a_floor_and_checks_it():
    world, w, sig, x = _silo_toy(steps=3, batch=2)
    kw = dict(disable=True, measurement=w, operator=world.operator, eta=1.0, eta_mode="auto")
    with pytest.raises(ValueError, match="eta_mode='auto' needs noise_floor="):
        sample_silo(world, x, sig, **kw)
    for bad in (float("nan"), -1.0, [1.0, 2.0, 3.0]):
        with pytest.raises(ValueError, match="noise_floor must be"):
            sample_silo(world, x, sig, noise_floor=bad, **kw)
    sample_silo(world, x, sig, noise_floor=[0.1, 0.2], **kw)  # one per batch element is fine


def test_fixed_eta_is_unchanged_by_the_floor_and_is_the_default_mode():
    world, w, sig, x = _silo_toy(steps=20, batch=4)
    kw = dict(disable=True, measurement=w, operator=world.operator, eta=0.7)
    a = sample_silo(world, x, sig, {"seed": 3}, **kw)
    b = sample_silo(world, x, sig, {"seed": 3}, noise_floor=world.noise_floor(), eta_mode="fixed", **kw)
    assert torch.equal(a, b)
    for cls in (SiloSettings, LatentDPSSettings, ReSampleSettings):
        spec = {s.name: s for s in cls.specs()}["eta_mode"]
        assert cls().eta_mode == "fixed" and spec.optional and spec.choices == ("fixed", "auto")
        assert [s.name for s in cls.specs() if s.widget][-1] == "eta_mode"  # after every saved widget


def test_eta_has_no_cap_in_the_python_api_but_a_sensible_widget_range():
    assert SiloSettings(eta=500.0).eta == 500.0 and LatentDPSSettings(eta=500.0).eta == 500.0
    assert ReSampleSettings(dps_eta=500.0).dps_eta == 500.0
    for cls, name in ((SiloSettings, "eta"), (LatentDPSSettings, "eta"), (ReSampleSettings, "dps_eta")):
        spec = {s.name: s for s in cls.specs()}[name]
        assert spec.max is None and spec.widget_high == 100.0
    with pytest.raises(ValueError, match="at least 0"):
        SiloSettings(eta=-1.0)


# ------------------------------------------------------------------------------------------------ divergence
def _blown_up_latent_dps(eta):
    toy = PixelToyWorld(0)
    y = toy.measure(toy.down)
    sig = vp_sigmas(50)
    x = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * sig[0]
    trace = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = sample_latent_dps(toy.world, x, sig, {"seed": 3}, disable=True, measurement=y, degradation=toy.down,
                                decoder=toy.dec, eta=eta, trace=trace)
    return toy, y, out, trace, [w for w in caught if issubclass(w.category, core.GuidanceDivergenceWarning)]


def test_a_latent_dps_run_pushed_to_blow_up_is_flagged_with_the_step_and_a_fix():
    toy, y, out, trace, caught = _blown_up_latent_dps(32.0)
    flagged = [e for e in trace if "diverged" in e]
    assert len(flagged) == 1 and len(caught) == 1
    report = flagged[0]["diverged"]
    assert report["loss"] > core.DivergenceWatch.FACTOR * report["best"] and report["step"] > report["best_step"]
    message = str(caught[0].message)
    assert f"step {report['step']}" in message and "eta_mode 'auto'" in message and "grad_clamp" in message
    # the same photo with auto: no flag, and it ends consistent
    toy2 = PixelToyWorld(0)
    sig = vp_sigmas(50)
    x = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * sig[0]
    trace2 = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", core.GuidanceDivergenceWarning)
        out2 = sample_latent_dps(toy2.world, x, sig, {"seed": 3}, disable=True, measurement=y, degradation=toy2.down,
                                 decoder=toy2.dec, eta=32.0, eta_mode="auto", noise_floor=toy2.noise_floor(toy2.down),
                                 trace=trace2)
    res = (y - toy2.down(toy2.dec(out2))).flatten(1).norm(dim=1).mean()
    res_fixed = (y - toy.down(toy.dec(out))).flatten(1).norm(dim=1).mean()
    assert res < 2 * toy2.noise_floor(toy2.down) < res_fixed


def test_a_well_behaved_run_is_not_flagged():
    _toy, _y, _out, trace, caught = _blown_up_latent_dps(1.0)
    assert not caught and not any("diverged" in e for e in trace)
