"""SILO sampler on the analytic toy Gaussian world + API behaviour.

How eta was chosen for the toy world (prior N(mu, Sigma) on [2,4,4], 3x3 blur + channel mix, sigma_w=0.05,
SD-like 'vp' schedule): eta was swept over {0.01 ... 8} for 50/100/200 steps.  With the paper's
*non-squared* L2 loss the gradient has unit scale whatever the residual, so with a constant eta the
last guided step overshoots by about eta * ||M M^T r_hat|| ~ 0.56 eta: the final residual is ~0.56 eta
once guidance has converged.  We therefore take the largest eta whose residual stays near the noise
floor sigma_w*sqrt(m) = 0.283 (eta ~0.4-0.6) and enough steps (200) for the mean to converge.  Ratios
(guided mean error / unguided mean error) over 6 world/measurement seeds: ddpm+unet eta=0.6:
0.17-0.28, ddpm+x0 eta=0.4: 0.07-0.11, euler+unet eta=0.5: 0.11-0.23; residual/floor 0.75-1.2.
(euler + x0 is not tested for accuracy: without ancestral noise the x0 shortcut's oversized
high-noise steps are never forgotten and the sample mean stays biased.)

Flow parameterization (x = (1 - sigma) z0 + sigma eps, exact flow denoiser, SD3-style shifted schedule from
sigma = 1, 200 steps): eta is in the same VP units, and the same values work: ratios on world seeds 0-3 for
ddpm+unet eta=0.6: 0.24-0.38, ddpm+x0 0.6: 0.21-0.33, euler+unet 0.5: 0.2-0.3, euler+x0 0.4: 0.19-0.23;
residual/floor 0.86-1.24 (seed 0 is tested, as above).  Here euler + x0 does converge (the flow schedule spends
fewer steps at very high noise, where the x0 shortcut is worst).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from support.toy import ToyDenoiser, ToyGaussianWorld, flow_sigmas, karras_sigmas, vp_sigmas

from comfyui_silo.samplers.silo import SiloSettings, sample_silo

pytestmark = pytest.mark.unit

B = 256


@pytest.fixture(scope="module")
def setup():
    world = ToyGaussianWorld(seed=0, operator="blur", sigma_w=0.05)
    g = torch.Generator().manual_seed(1)
    z_star = world.sample_prior(1, g)
    w = world.measure(z_star, g)
    return world, w


def _x0(world, sigmas, n=B, seed=5):
    return torch.randn(n, *world.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * sigmas[0]


def _run(world, w, sigmas, x, **kw):
    model = kw.pop("model", None) or world.denoiser(kw.get("parameterization", "vp"))
    return sample_silo(model, x, sigmas, {"seed": 3}, disable=True, measurement=w, operator=world.operator, **kw)


def _residual(world, w, out):
    return (w - world.operator(out)).flatten(1).norm(dim=1)


# ------------------------------------------------------------------------------------------ toy world
def test_unguided_matches_prior(setup):
    world, w = setup
    sig = vp_sigmas(100)
    out = _run(world, w, sig, _x0(world, sig), eta=0.0, update="ddpm")
    mc = math.sqrt(world.eigvals.sum().item() / B)  # std of the mean estimate's norm
    assert (out.mean(0).flatten() - world.mu).norm().item() < 2.5 * mc
    emp_var = out.flatten(1).var(0).sum().item()
    assert emp_var == pytest.approx(torch.trace(world.cov).item(), rel=0.15)


@pytest.mark.parametrize(
    ("update", "gradient", "eta"),
    [("ddpm", "unet", 0.6), ("ddpm", "x0", 0.4), ("euler", "unet", 0.5)],
)
def test_guided_mean_approaches_posterior(setup, update, gradient, eta):
    world, w = setup
    sig = vp_sigmas(200)
    x = _x0(world, sig)
    pm = world.posterior_mean(w)[0]
    ref = _run(world, w, sig, x, eta=0.0, update=update)
    out = _run(world, w, sig, x, eta=eta, update=update, gradient=gradient)
    err0 = (ref.mean(0) - pm).norm().item()
    err = (out.mean(0) - pm).norm().item()
    assert err0 > 3.0  # the measurement is informative: prior mean far from the posterior mean
    assert err <= 0.3 * err0, (err, err0)
    floor = world.noise_floor()
    res = _residual(world, w, out).mean().item()
    res0 = _residual(world, w, ref).mean().item()
    assert res0 > 5 * floor
    assert 0.5 * floor <= res <= 1.5 * floor, (res, floor)


def test_sigma_schedule_and_callable(setup):
    world, w = setup
    sig = vp_sigmas(60)
    x = _x0(world, sig, n=16)
    tr = []
    _run(world, w, sig, x, eta=2.0, eta_schedule="sigma", trace=tr)
    etas = [t["eta"] for t in tr]
    assert etas[0] == pytest.approx(2.0)
    assert all(a >= b for a, b in zip(etas, etas[1:], strict=False))
    assert etas[-1] < 0.05 * etas[0]
    # callable: factor multiplying eta; zero factor -> plain sampler at that step
    tr2 = []
    out_c = _run(world, w, sig, x, eta=2.0, eta_schedule=lambda i, s: 0.0, trace=tr2)
    assert all(t["eta"] == 0.0 and t["grad_norm"] == [] for t in tr2)
    assert torch.equal(out_c, _run(world, w, sig, x, eta=0.0))
    with pytest.raises(ValueError, match=r"'eta_schedule' must be one of 'constant', 'sigma'"):
        _run(world, w, sig, x, eta=1.0, eta_schedule="cosine")


# ------------------------------------------------------------------------------------- flow parameterization
@pytest.mark.parametrize("update", ["ddpm", "euler"])
def test_unguided_flow_matches_prior(setup, update):
    world, w = setup
    sig = flow_sigmas(100)
    out = _run(world, w, sig, _x0(world, sig), eta=0.0, update=update, parameterization="flow")
    mc = math.sqrt(world.eigvals.sum().item() / B)
    assert (out.mean(0).flatten() - world.mu).norm().item() < 2.5 * mc
    assert out.flatten(1).var(0).sum().item() == pytest.approx(torch.trace(world.cov).item(), rel=0.15)
    if update == "ddpm":  # the VP ancestral step on the flow state samples something else (measured: 3x the variance)
        wrong = _run(world, w, sig, _x0(world, sig), eta=0.0, update=update, model=world.flow_denoiser)
        assert (wrong.mean(0).flatten() - world.mu).norm().item() > 5 * mc


@pytest.mark.parametrize(
    ("update", "gradient", "eta"),
    [("ddpm", "unet", 0.6), ("ddpm", "x0", 0.6), ("euler", "unet", 0.5), ("euler", "x0", 0.4)],
)
def test_flow_guided_mean_approaches_posterior(setup, update, gradient, eta):
    world, w = setup
    sig = flow_sigmas(200)
    x = _x0(world, sig)
    pm = world.posterior_mean(w)[0]
    kw = dict(update=update, parameterization="flow")
    ref = _run(world, w, sig, x, eta=0.0, **kw)
    out = _run(world, w, sig, x, eta=eta, gradient=gradient, **kw)
    err0 = (ref.mean(0) - pm).norm().item()
    err = (out.mean(0) - pm).norm().item()
    assert err0 > 3.0
    assert err <= 0.3 * err0, (err, err0)  # measured (seed 0): 0.24 / 0.21 / 0.2 / 0.19
    floor = world.noise_floor()
    res = _residual(world, w, out).mean().item()
    assert _residual(world, w, ref).mean().item() > 5 * floor
    assert 0.5 * floor <= res <= 1.5 * floor, (res, floor)  # measured: 1.18 / 1.14 / 0.9 / 0.86


def test_flow_sigma_schedule_starts_at_eta(setup):
    world, w = setup
    sig = flow_sigmas(40)
    tr = []
    _run(world, w, sig, _x0(world, sig, n=4), eta=2.0, eta_schedule="sigma", trace=tr, parameterization="flow")
    etas = [t["eta"] for t in tr]
    assert etas[0] == pytest.approx(2.0)  # sigma = 1: the VP noise fraction is 1
    assert all(a >= b for a, b in zip(etas, etas[1:], strict=False)) and etas[-1] < 0.05 * etas[0]


# ----------------------------------------------------------------------- early stop, trace, callback
def test_early_stop_returns_denoised_at_k(setup):
    world, w = setup
    sig = vp_sigmas(30)
    x = _x0(world, sig, n=8)
    seen = {}
    k = 12
    out = sample_silo(
        world.exact_denoiser,
        x,
        sig,
        {"seed": 3},
        callback=lambda d: seen.__setitem__(d["i"], d),
        disable=True,
        measurement=w,
        operator=world.operator,
        eta=0.5,
        early_stop=k,
    )
    assert sorted(seen) == list(range(k + 1))
    assert torch.equal(out, seen[k]["denoised"])
    full = {}
    sample_silo(
        world.exact_denoiser,
        x,
        sig,
        {"seed": 3},
        callback=lambda d: full.__setitem__(d["i"], d),
        disable=True,
        measurement=w,
        operator=world.operator,
        eta=0.5,
    )
    torch.testing.assert_close(out, full[k]["denoised"], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="early_stop"):
        _run(world, w, sig, x, early_stop=30)


def test_trace_and_callback(setup):
    world, w = setup
    sig = vp_sigmas(100)
    x = _x0(world, sig, n=8)
    tr, losses = [], []

    def cb(d):
        assert {"x", "i", "sigma", "sigma_hat", "denoised", "silo_loss"} <= set(d)
        assert d["silo_loss"].shape == (8,)
        losses.append(d["silo_loss"])

    sample_silo(
        world.exact_denoiser,
        x,
        sig,
        {"seed": 3},
        callback=cb,
        disable=True,
        measurement=w,
        operator=world.operator,
        eta=1.0,
        trace=tr,
    )
    assert len(tr) == 100 == len(losses)
    assert [t["step"] for t in tr] == list(range(100))
    assert tr[0]["sigma"] == pytest.approx(float(sig[0]))
    assert all(len(t["loss"]) == 8 and len(t["grad_norm"]) == 8 for t in tr)
    first, last = sum(tr[0]["loss"]) / 8, sum(tr[-1]["loss"]) / 8
    assert last < 0.4 * first
    torch.testing.assert_close(
        torch.tensor(tr[-1]["loss"], dtype=torch.float64), losses[-1].double(), rtol=1e-6, atol=0
    )


# --------------------------------------------------------------------------- autograd / inference mode
@pytest.mark.parametrize("gradient", ["unet", "x0"])
def test_inference_mode_and_no_param_grad(setup, gradient):
    world, w = setup
    model = ToyDenoiser(world)
    sig = karras_sigmas(15)
    x = _x0(world, sig, n=4)
    mask = torch.ones(1, *world.out_shape, dtype=torch.float64)

    def masked_op(z, mask):
        return world.operator(z) * mask

    kw = dict(
        disable=True, measurement=w, operator=masked_op, operator_kwargs={"mask": mask}, eta=0.5, gradient=gradient
    )
    ref = sample_silo(model, x, sig, {"seed": 1}, **kw)
    assert not ref.requires_grad
    with torch.inference_mode():
        xi, si, wi, mi = x.clone(), sig.clone(), w.clone(), mask.clone()
        assert xi.is_inference()
        out = sample_silo(model, xi, si, {"seed": 1}, **{**kw, "measurement": wi, "operator_kwargs": {"mask": mi}})
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert model.scale.grad is None
    assert model.calls == 2 * 15


def test_eta0_does_no_gradient_work(setup):
    world, w = setup
    sig = karras_sigmas(8)
    x = _x0(world, sig, n=2)
    seen = []

    def op(z):
        seen.append(z.requires_grad or torch.is_grad_enabled())
        return world.operator(z)

    sample_silo(
        world.exact_denoiser,
        x,
        sig,
        {"seed": 0},
        callback=lambda d: None,
        disable=True,
        measurement=w,
        operator=op,
        eta=0,
    )
    assert seen and not any(seen)


def test_grad_clamp_none_and_broadcast(setup):
    world, w = setup
    sig = karras_sigmas(20)
    x = _x0(world, sig, n=4)
    a = _run(world, w, sig, x, eta=0.3, grad_clamp=None)
    b = _run(world, w.expand(4, *w.shape[1:]).clone(), sig, x, eta=0.3, grad_clamp=None)
    torch.testing.assert_close(a, b)
    c = _run(world, w, sig, x, eta=0.3, grad_clamp=1e-3)
    assert not torch.allclose(a, c)
    # the node's meaning: grad_clamp 0 is off, like None
    assert torch.equal(_run(world, w, sig, x, eta=0.3, grad_clamp=0.0), a)


def test_partial_like_ksampler(setup):
    world, w = setup
    fn = functools.partial(sample_silo, measurement=w, operator=world.operator, eta=0.2, update="euler")
    sig = karras_sigmas(6)
    x = _x0(world, sig, n=2)
    out = fn(world.exact_denoiser, x, sig, extra_args={"seed": 0}, callback=None, disable=True)
    assert out.shape == x.shape
    # a settings object gives the same run as the keyword options, which lay over it
    settings = SiloSettings(eta=0.2, update="euler")
    out_s = sample_silo(world.exact_denoiser, x, sig, {"seed": 0}, disable=True, measurement=w,
                        operator=world.operator, settings=settings)
    assert torch.equal(out_s, out)
    out_o = sample_silo(world.exact_denoiser, x, sig, {"seed": 0}, disable=True, measurement=w,
                        operator=world.operator, settings=SiloSettings(eta=5.0), eta=0.2, update="euler")
    assert torch.equal(out_o, out)


def test_settings_declare_the_node_widgets():
    """Names, order, defaults, ranges of the SILO node's widgets; widget 'off' values map to None."""
    specs = [s for s in SiloSettings.specs() if s.widget]
    assert [s.name for s in specs] == ["eta", "update", "gradient", "grad_clamp", "early_stop", "eta_mode"]
    by = {s.name: s for s in specs}
    assert (by["eta"].default, by["eta"].min, by["eta"].widget_high, by["eta"].step) == (0.5, 0.0, 100.0, 0.05)
    assert by["eta"].max is None  # no cap in the Python API (issue 21)
    assert by["update"].choices == ("ddpm", "euler") and by["gradient"].choices == ("unet", "x0")
    assert by["grad_clamp"].widget_default == 1.0 and by["early_stop"].widget_default == -1
    assert SiloSettings.from_values(grad_clamp=0.0, early_stop=-1).grad_clamp is None
    assert SiloSettings(grad_clamp=0.0, early_stop=-1) == SiloSettings(grad_clamp=None, early_stop=None)
    assert SiloSettings(early_stop=3).widget_values()["grad_clamp"] == 1.0


# ------------------------------------------------------------------------------------------------ errors
def test_clear_errors(setup):
    world, w = setup
    sig = karras_sigmas(4)
    x = _x0(world, sig, n=2)
    with pytest.raises(ValueError, match=r"'update' must be one of 'ddpm', 'euler', got 'heun'"):
        _run(world, w, sig, x, update="heun")
    with pytest.raises(ValueError, match=r"'gradient' must be one of 'unet', 'x0', got 'vae'"):
        _run(world, w, sig, x, gradient="vae")
    bad = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    for eta in (0.0, 0.5):
        with pytest.raises(ValueError, match=r"measurement shape \(1, 2, 2, 2\).*operator output shape \(2, 2, 4, 4\)"):
            _run(world, bad, sig, x, eta=eta)
    with pytest.raises(ValueError, match=r"measurement shape \(3, 2, 4, 4\)"):
        _run(world, torch.zeros(3, 2, 4, 4, dtype=torch.float64), sig, x)
    with pytest.raises(ValueError, match="'eta' must be at least 0"):
        _run(world, w, sig, x, eta=-1.0)
    with pytest.raises(ValueError, match="'grad_clamp' must be at most 100"):
        _run(world, w, sig, x, grad_clamp=1000.0)
    with pytest.raises(ValueError, match="SILO has no setting 'etta'"):
        _run(world, w, sig, x, etta=1.0)
    with pytest.raises(ValueError, match="parameterization='edm' is not known; allowed values: 'vp', 'flow'"):
        _run(world, w, sig, x, parameterization="edm", model=world.denoiser("vp"))
