"""ReSample (hard data consistency + stochastic resampling) on analytic toy worlds + API behaviour.

Toy world for the accuracy test: ToyGaussianWorld's Gaussian prior on a [2, 4, 4] latent, a fixed well-conditioned
*linear* decoder ``D z = W z`` (random orthogonal times singular values 0.8..1.25) and a pixel-space 2x horizontal
average pool ``A`` (16 of 32 dims measured, singular values 1/sqrt(2)), sigma_w = 0.05.  The posterior of the latent
given ``y = A D z + n`` is Gaussian and computed in closed form with ``K = A W``.

Measured when the file was written (B = 512, vp_sigmas(50), consistency every 5 steps from step 16, final
consistency on), over world seeds 0-2 x measurement seeds 1-2: mean error / unguided mean error 0.13-0.23 with SGD
(lr 1, the node's largest, ~110-125 iterations per consistency step), 0.23-0.43 with Adam (lr 0.05, ~130
iterations), 0.14-0.23 with the pixel-space variant; final residual / noise floor 0.017-0.019 (hard consistency fits the measurement noise too,
so the residual ends *below* the floor); unguided residual / floor 17-23.  ReSample is not an exact posterior
sampler: a Euclidean projection onto ``{A D z = y}`` leaves the unmeasured directions to the prior, so the mean
keeps a bias; the thresholds below leave a margin over the worst case seen.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from support.toy import ToyDenoiser, ToyGaussianWorld, flow_sigmas, karras_sigmas, vp_sigmas

from comfyui_silo.samplers.resample import (
    ReSampleSettings,
    consistency_schedule,
    hard_consistency,
    resample_variance,
    resample_weight,
    sample_resample,
    stochastic_resample,
)
from comfyui_silo.samplers.steps import euler_step

pytestmark = pytest.mark.unit

F64 = torch.float64


class LinearWorld:
    """ToyGaussianWorld latent + linear decoder ``W`` + linear pixel operator ``P``: all closed form."""

    def __init__(self, seed: int = 0, meas_seed: int = 1, sigma_w: float = 0.05):
        self.world = ToyGaussianWorld(seed=seed, operator="downsample", sigma_w=sigma_w)
        w = self.world
        c, h, wd = w.shape
        g = torch.Generator().manual_seed(100 + seed)
        q, _ = torch.linalg.qr(torch.randn(w.dim, w.dim, generator=g, dtype=F64))
        self.W = q * torch.linspace(0.8, 1.25, w.dim, dtype=F64)
        self.W_inv = torch.linalg.inv(self.W)
        pool = torch.zeros(wd // 2, wd, dtype=F64)
        for r in range(wd // 2):
            pool[r, 2 * r] = pool[r, 2 * r + 1] = 0.5
        self.P = torch.kron(torch.eye(c * h, dtype=F64), pool)  # 2x horizontal average pool, [16, 32]
        self.out_shape = (c, h, wd // 2)
        self.m = self.P.shape[0]
        self.K = self.P @ self.W
        gm = torch.Generator().manual_seed(meas_seed)
        self.z_star = w.sample_prior(1, gm)
        clean = self.degrade(self.decode(self.z_star))
        self.y = clean + sigma_w * torch.randn(clean.shape, generator=gm, dtype=F64)

    def decode(self, z):
        return (z.reshape(z.shape[0], -1) @ self.W.T.to(z)).reshape(z.shape)

    def encode(self, img):
        return (img.reshape(img.shape[0], -1) @ self.W_inv.T.to(img)).reshape(img.shape)

    def degrade(self, img):
        return (img.reshape(img.shape[0], -1) @ self.P.T.to(img)).reshape(img.shape[0], *self.out_shape)

    def posterior_mean(self) -> torch.Tensor:
        w, k = self.world, self.K
        gain = w.cov @ k.T @ torch.linalg.inv(k @ w.cov @ k.T + w.sigma_w**2 * torch.eye(self.m, dtype=F64))
        return (w.mu + (self.y.reshape(1, -1) - w.mu @ k.T) @ gain.T).reshape(w.shape)

    def noise_floor(self) -> float:
        return self.world.sigma_w * math.sqrt(self.m)

    def residual(self, z) -> torch.Tensor:
        return (self.y - self.degrade(self.decode(z))).flatten(1).norm(dim=1)


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Tiny float64 tensors: one intra-op thread avoids 100x slow-downs when the other core is busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lw():
    return LinearWorld(seed=0, meas_seed=1)


def _x0(shape, sigmas, n, seed=5):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * sigmas[0]


def _run(lw, sigmas, x, **kw):
    return sample_resample(
        lw.world.denoiser(kw.get("parameterization", "vp")),
        x,
        sigmas,
        {"seed": 3},
        disable=True,
        measurement=lw.y,
        degradation=lw.degrade,
        decoder=lw.decode,
        **kw,
    )


# ----------------------------------------------------------------------------- (1) resampling formula
def alpha_bar(sigma):
    """VP signal fraction of the vp state's level (written out here, independently of the core)."""
    return 1.0 / (1.0 + sigma * sigma)


def _vp_moments(z0, xu, sigma, sigma_prev, gamma, variance):
    """Paper's VP-space N(mu, s^2) written out independently, mapped to sigma space (x = z / sqrt(abar))."""
    ab, ab_t = alpha_bar(sigma), alpha_bar(sigma_prev)  # abar_{t-1} (resampled level), abar_t (step start)
    denom = ab_t if variance == "paper" else 1 - ab_t
    v = gamma * (1 - ab) / denom * (1 - ab_t / ab)
    z_u = xu * math.sqrt(ab)  # unconditional VP sample z'_t
    mu_vp = (v * math.sqrt(ab) * z0 + (1 - ab) * z_u) / (v + 1 - ab)
    var_vp = v * (1 - ab) / (v + 1 - ab)
    return v, mu_vp / math.sqrt(ab), var_vp / ab


@pytest.mark.parametrize("variance", ["paper", "reference"])
@pytest.mark.parametrize(("sigma", "sigma_prev", "gamma"), [(0.7, 0.9, 2.0), (3.0, 3.4, 0.5), (0.2, 0.25, 40.0)])
def test_stochastic_resample_matches_formula(variance, sigma, sigma_prev, gamma):
    g = torch.Generator().manual_seed(0)
    d, n = 6, 200_000
    z0 = torch.randn(1, d, generator=g, dtype=F64)
    xu = 2.0 * torch.randn(1, d, generator=g, dtype=F64) + 1.0
    noise = torch.randn(n, d, generator=g, dtype=F64)
    out = stochastic_resample(z0, xu.expand(n, d), sigma, sigma_prev, gamma, noise, variance=variance)
    v, mu, var = _vp_moments(z0, xu, sigma, sigma_prev, gamma, variance)
    assert resample_variance(sigma, sigma_prev, gamma, variance) == pytest.approx(v, rel=1e-10)
    w = resample_weight(sigma, sigma_prev, gamma, variance)
    assert 0.0 < w < 1.0
    # mean: 5 standard errors per coordinate; variance: 5 standard errors of a Gaussian sample variance
    se_mean = math.sqrt(var / n)
    assert (out.mean(0) - mu[0]).abs().max().item() < 5 * se_mean
    emp_var = out.var(0)
    assert (emp_var - var).abs().max().item() < 5 * var * math.sqrt(2.0 / (n - 1))
    # VP <-> sigma conversion matters: the VP formula applied to sigma-space tensors as they are (x' taken for
    # z'_t, result taken for x) has a visibly different mean and variance
    ab = alpha_bar(sigma)
    naive_mu = (v * math.sqrt(ab) * z0 + (1 - ab) * xu) / (v + 1 - ab)
    naive_var = v * (1 - ab) / (v + 1 - ab)
    assert (out.mean(0) - naive_mu[0]).abs().max().item() > 10 * se_mean
    assert (emp_var - naive_var).abs().min().item() > 10 * var * math.sqrt(2.0 / (n - 1))


def test_stochastic_resample_limits_and_errors():
    g = torch.Generator().manual_seed(1)
    z0, xu, nz = (torch.randn(4, 3, generator=g, dtype=F64) for _ in range(3))
    # gamma = 0: keep the unconditional sample; gamma = inf: re-noise z0_y to level sigma (stochastic encoding)
    assert torch.equal(stochastic_resample(z0, xu, 0.5, 0.6, 0.0, nz), xu)
    torch.testing.assert_close(stochastic_resample(z0, xu, 0.5, 0.6, math.inf, nz), z0 + 0.5 * nz, rtol=0, atol=1e-15)
    assert resample_variance(0.5, 0.6, math.inf) == math.inf
    # sigma-space closed forms of the two schedules
    r, s, gam = 0.5, 0.6, 3.0
    a = gam * (s * s - r * r)
    assert resample_weight(r, s, gam, "paper") == pytest.approx(a / (a + 1))
    assert resample_weight(r, s, gam, "reference") == pytest.approx(a / (a + s * s))
    with pytest.raises(ValueError, match="0 < sigma < sigma_prev"):
        stochastic_resample(z0, xu, 0.6, 0.6, 1.0, nz)
    with pytest.raises(ValueError, match="0 < sigma < sigma_prev"):
        stochastic_resample(z0, xu, 0.0, 0.6, 1.0, nz)
    with pytest.raises(ValueError, match="gamma"):
        stochastic_resample(z0, xu, 0.5, 0.6, -1.0, nz)
    with pytest.raises(ValueError, match=r"variance='vp'.*'paper', 'reference'"):
        resample_weight(0.5, 0.6, 1.0, "vp")


# -------------------------------------------------------------------------- (2) reduction to plain DDIM
def _plain_euler(model, x, sigmas):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x = euler_step(x, model(x, sigmas[i] * s_in), sigmas[i], sigmas[i + 1])
    return x


@pytest.mark.parametrize("sigmas", [vp_sigmas(30), karras_sigmas(12)], ids=["vp", "karras"])
def test_disabled_is_plain_ddim_bit_exact(lw, sigmas):
    x = _x0(lw.world.shape, sigmas, 8)
    ref = _plain_euler(lw.world.exact_denoiser, x, sigmas)

    def no_noise(s, sn):
        raise AssertionError("no noise may be drawn when consistency is disabled")

    tr = []
    out = _run(lw, sigmas, x, consistency_every=0, dps_eta=0.0, trace=tr, noise_sampler=no_noise)
    assert torch.equal(out, ref)
    assert len(tr) == len(sigmas) - 1 and not any(t["consistency"] for t in tr)
    out2 = _run(lw, sigmas, x, consistency_every=0, callback=lambda d: None)
    assert torch.equal(out2, ref)
    # the consistency window can also exclude every step; the final consistency then still runs by default
    out3 = _run(lw, sigmas, x, consistency_start=len(sigmas), final_consistency=False, noise_sampler=no_noise)
    assert torch.equal(out3, ref)


# ------------------------------------------------------------------------------- (3) toy-world accuracy
@pytest.mark.parametrize(
    ("kw", "max_ratio"),
    [
        ({"optimizer": "sgd", "lr": 1.0}, 0.35),
        ({"optimizer": "adam", "lr": 0.05}, 0.6),
        ({"optimizer": "sgd", "lr": 1.0, "pixel_lr": 1.0, "optimization": "auto", "encoder": "yes"}, 0.35),
    ],
    ids=["latent-sgd", "latent-adam", "pixel+latent-sgd"],
)
def test_mean_approaches_posterior_and_residual_hits_floor(lw, kw, max_ratio):
    kw = dict(kw)
    if kw.get("encoder"):
        kw["encoder"] = lw.encode
    sig = vp_sigmas(50)
    b = 512
    x = _x0(lw.world.shape, sig, b)
    pm = lw.posterior_mean()
    tr0, tr = [], []
    ref = _run(lw, sig, x, consistency_every=0, trace=tr0)
    out = _run(lw, sig, x, consistency_every=5, trace=tr, **kw)
    err0 = (ref.mean(0) - pm).norm().item()
    err = (out.mean(0) - pm).norm().item()
    mc = math.sqrt(torch.trace(lw.world.cov).item() / b)  # scale of the Monte Carlo error of a mean
    assert err0 > 3.0 and err0 > 10 * mc  # informative measurement: prior mean far from the posterior mean
    assert err <= max_ratio * err0, (err, err0)
    floor = lw.noise_floor()
    assert lw.residual(ref).mean().item() > 10 * floor
    assert lw.residual(out).mean().item() <= floor
    cons = [t for t in tr if t["consistency"]]
    assert [t["step"] for t in cons] == list(range(16, 50, 5))
    if "encoder" in kw:
        assert [t["mode"] for t in cons] == ["pixel"] * 4 + ["latent"] * 3  # pixel before step 50 - 50 // 3 = 34
    assert all(max(t["consistency_loss"]) < 1e-3 for t in cons)
    assert max(tr[-1]["final"]["rms"]) < 1e-3
    # the model's own z0_hat ||y - A(D(z0_hat))|| drops well below the unguided one (not to the floor: re-noising
    # and denoising with the prior-only model undoes part of the consistency; the final optimisation finishes it)
    assert tr[0]["loss"] == tr0[0]["loss"]
    assert sum(tr[-1]["loss"]) < 0.3 * sum(tr0[-1]["loss"])


def test_dps_only_guides(lw):
    """dps_eta > 0 without hard consistency pulls the sample towards the measurement."""
    sig = vp_sigmas(40)
    x = _x0(lw.world.shape, sig, 64)
    ref = _run(lw, sig, x, consistency_every=0)
    out = _run(lw, sig, x, consistency_every=0, dps_eta=0.5)
    assert lw.residual(out).mean().item() < 0.5 * lw.residual(ref).mean().item()


# --------------------------------------------------------------------------------- flow parameterization
def _flow_abar(sigma):
    """VP signal fraction of the flow state x = (1 - sigma) z0 + sigma eps, written out independently."""
    return (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma**2)


@pytest.mark.parametrize("variance", ["paper", "reference"])
@pytest.mark.parametrize(("sigma", "sigma_prev"), [(0.5, 0.6), (0.2, 0.3), (0.7, 1.0)])
def test_flow_stochastic_resample_is_the_vp_formula_in_the_flow_state(variance, sigma, sigma_prev):
    """The paper's VP-space N(mu, s^2) at the flow levels' abar, mapped to the flow state x = z_t * k (k^2 = a^2 +
    sigma^2): mean and variance match the samples, also from the flow models' first level sigma_prev = 1."""
    g = torch.Generator().manual_seed(3)
    d, n, gamma = 5, 200_000, 2.0
    z0 = torch.randn(1, d, generator=g, dtype=F64)
    xu = 0.7 * torch.randn(1, d, generator=g, dtype=F64) + 0.3
    noise = torch.randn(n, d, generator=g, dtype=F64)
    out = stochastic_resample(z0, xu.expand(n, d), sigma, sigma_prev, gamma, noise, variance, "flow")
    ab, ab_t = _flow_abar(sigma), _flow_abar(sigma_prev)
    v = gamma * (1 - ab) / (ab_t if variance == "paper" else 1 - ab_t) * (1 - ab_t / ab) if ab_t > 0 else math.inf
    k = math.sqrt((1 - sigma) ** 2 + sigma**2)
    z_u = xu / k
    if math.isinf(v):  # the limit v -> inf: re-noise z0_y
        mu_vp, var_vp = math.sqrt(ab) * z0, 1 - ab
    else:
        mu_vp = (v * math.sqrt(ab) * z0 + (1 - ab) * z_u) / (v + 1 - ab)
        var_vp = v * (1 - ab) / (v + 1 - ab)
    if variance == "reference" and ab_t == 0:  # reference schedule's finite limit: v = gamma (1 - abar)
        v = gamma * (1 - ab)
        mu_vp = (v * math.sqrt(ab) * z0 + (1 - ab) * z_u) / (v + 1 - ab)
        var_vp = v * (1 - ab) / (v + 1 - ab)
    assert resample_variance(sigma, sigma_prev, gamma, variance, "flow") == pytest.approx(v, rel=1e-10)
    mu, var = mu_vp * k, var_vp * k * k
    se = math.sqrt(var / n)
    assert (out.mean(0) - mu[0]).abs().max().item() < 5 * se
    assert (out.var(0) - var).abs().max().item() < 5 * var * math.sqrt(2.0 / (n - 1))


def test_flow_disabled_is_plain_euler_bit_exact(lw):
    sig = flow_sigmas(20)
    x = _x0(lw.world.shape, sig, 4)
    ref = _plain_euler(lw.world.flow_denoiser, x, sig)
    assert torch.equal(_run(lw, sig, x, consistency_every=0, parameterization="flow"), ref)


@pytest.mark.parametrize("kw", [{"optimizer": "sgd", "lr": 1.0},
                                {"optimizer": "sgd", "lr": 1.0, "pixel_lr": 1.0, "encoder": "yes"}],
                         ids=["latent-sgd", "pixel+latent-sgd"])
def test_flow_mean_approaches_posterior_and_residual_hits_floor(lw, kw):
    kw = dict(kw, parameterization="flow")
    if kw.get("encoder"):
        kw["encoder"] = lw.encode
    sig = flow_sigmas(50)
    x = _x0(lw.world.shape, sig, 512)
    pm = lw.posterior_mean()
    tr0, tr = [], []
    ref = _run(lw, sig, x, consistency_every=0, trace=tr0, parameterization="flow")
    out = _run(lw, sig, x, consistency_every=5, trace=tr, **kw)
    err0 = (ref.mean(0) - pm).norm().item()
    assert err0 > 3.0
    assert (out.mean(0) - pm).norm().item() <= 0.35 * err0  # measured (world seeds 0, 1): 0.15-0.17
    floor = lw.noise_floor()
    assert lw.residual(ref).mean().item() > 10 * floor
    assert lw.residual(out).mean().item() <= floor  # measured: 0.019 x floor
    assert sum(tr[-1]["loss"]) < 0.3 * sum(tr0[-1]["loss"])
    # DPS steps alone pull towards the measurement too (dps_eta in the same VP units)
    dps = _run(lw, sig, x[:64], consistency_every=0, dps_eta=0.5, parameterization="flow")
    assert lw.residual(dps).mean().item() < 0.5 * lw.residual(ref[:64]).mean().item()


# ------------------------------------------------------------------------------ (4) hard consistency
@pytest.mark.parametrize(
    ("mode", "optimizer", "lr"),
    [("latent", "adam", 0.05), ("latent", "sgd", 10.0), ("pixel", "adam", 0.05), ("pixel", "sgd", 10.0)],
)
def test_hard_consistency_reaches_tolerance(lw, mode, optimizer, lr):
    z0 = lw.world.sample_prior(6, torch.Generator().manual_seed(7))
    assert lw.residual(z0).min().item() > 1.0
    tol = 1e-4
    z, info = hard_consistency(
        z0, lw.y, lw.degrade, lw.decode, encoder=lw.encode, mode=mode, steps=2000, lr=lr, tolerance=tol,
        optimizer=optimizer,
    )  # fmt: skip
    rms = lw.residual(z) / math.sqrt(lw.m)
    assert rms.max().item() < tol
    torch.testing.assert_close(torch.tensor(info["rms"], dtype=F64), rms, rtol=1e-6, atol=0)
    assert all(0 < k < 2000 for k in info["iterations"])  # stopped early, each element on its own
    assert z.dtype == z0.dtype and z.shape == z0.shape and not z.requires_grad


def test_hard_consistency_default_adam_is_the_reference_setting(lw):
    """Reference settings (Adam lr 5e-3, <= 500 iterations, tol 1e-3) from a nearby start: converges early."""
    z_near = lw.z_star + 0.05 * torch.randn(4, *lw.world.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    ref = ReSampleSettings()  # the reference values are declared once, in ReSample's settings
    z, info = hard_consistency(z_near, lw.y, lw.degrade, lw.decode, steps=ref.latent_steps, lr=ref.lr,
                               tolerance=ref.tolerance, optimizer=ref.optimizer)
    assert max(info["rms"]) < 1e-3 and max(info["iterations"]) < 500


def test_inference_mode_and_no_param_grad(lw):
    model = ToyDenoiser(lw.world)
    dec_param = torch.nn.Parameter(torch.ones((), dtype=F64))

    def decoder(z):
        return lw.decode(z) * dec_param

    sig = karras_sigmas(12)
    x = _x0(lw.world.shape, sig, 4)
    kw = dict(
        disable=True, measurement=lw.y, degradation=lw.degrade, decoder=decoder, consistency_every=3,
        consistency_start=0, optimizer="sgd", lr=1.0, dps_eta=0.3,
    )  # fmt: skip
    ref = sample_resample(model, x, sig, {"seed": 1}, **kw)
    assert not ref.requires_grad
    with torch.inference_mode():
        xi, si, yi = x.clone(), sig.clone(), lw.y.clone()
        out = sample_resample(model, xi, si, {"seed": 1}, **{**kw, "measurement": yi})
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert model.scale.grad is None and dec_param.grad is None


# ------------------------------------------------------------------ schedule, trace, early stop, options
def test_consistency_schedule_defaults():
    sig = vp_sigmas(100)
    assert consistency_schedule(sig) == list(range(33, 100, 10))
    assert consistency_schedule(sig, every=0) == []
    assert consistency_schedule(sig, every=25, start=0, stop=60) == [0, 25, 50]
    sig31 = karras_sigmas(31)  # step 30 ends at sigma 0: never resampled
    assert consistency_schedule(sig31, every=10, start=0) == [0, 10, 20]


def test_trace_early_stop_and_partial(lw):
    sig = vp_sigmas(20)
    x = _x0(lw.world.shape, sig, 3)
    tr, seen = [], {}
    k = 9
    out = _run(
        lw, sig, x, consistency_every=2, consistency_start=0, optimizer="sgd", lr=1.0, trace=tr, early_stop=k,
        callback=lambda d: seen.__setitem__(d["i"], d),
    )  # fmt: skip
    assert torch.equal(out, seen[k]["denoised"])
    assert [t["step"] for t in tr] == list(range(k + 1))
    assert [t["consistency"] for t in tr] == [i % 2 == 0 and i != k for i in range(k + 1)]
    assert all(len(t["loss"]) == 3 and set(t) >= {"step", "sigma", "loss", "consistency"} for t in tr)
    assert tr[0]["sigma"] == pytest.approx(float(sig[0]))
    assert {"resample_loss", "resample_consistency", "denoised", "x", "i", "sigma"} <= set(seen[0])
    fn = functools.partial(
        sample_resample, measurement=lw.y, degradation=lw.degrade, decoder=lw.decode, optimizer="sgd", lr=1.0
    )
    res = fn(lw.world.exact_denoiser, x, sig, extra_args={"seed": 0}, callback=None, disable=True)
    assert res.shape == x.shape
    widgets = [s for s in ReSampleSettings.specs() if s.widget]
    assert [s.name for s in widgets] == ["consistency_every", "latent_steps", "lr", "optimization", "pixel_steps",
                                         "tolerance", "gamma", "variance", "dps_eta", "early_stop", "eta_mode"]
    assert [s.widget_default for s in widgets] == [10, 500, 5e-3, "auto", 2000, 1e-3, 40.0, "paper", 0.0, -1, "fixed"]
    # the same run from a settings object
    res_s = sample_resample(lw.world.exact_denoiser, x, sig, {"seed": 0}, disable=True, measurement=lw.y,
                            degradation=lw.degrade, decoder=lw.decode,
                            settings=ReSampleSettings(optimizer="sgd", lr=1.0))
    assert torch.equal(res_s, res)


def test_seeded_noise_is_reproducible(lw):
    sig = vp_sigmas(20)
    x = _x0(lw.world.shape, sig, 4)
    kw = dict(consistency_every=3, consistency_start=0, optimizer="sgd", lr=1.0, final_consistency=False)
    a, b = _run(lw, sig, x, **kw), _run(lw, sig, x, **kw)
    assert torch.equal(a, b)
    c = sample_resample(
        lw.world.exact_denoiser, x, sig, {"seed": 4}, disable=True, measurement=lw.y, degradation=lw.degrade,
        decoder=lw.decode, **kw,
    )  # fmt: skip
    assert not torch.allclose(a, c)


# ------------------------------------------------------------------------------------------ (5) errors
def test_clear_errors(lw):
    sig = karras_sigmas(4)
    x = _x0(lw.world.shape, sig, 2)
    base = dict(disable=True, measurement=lw.y, degradation=lw.degrade, decoder=lw.decode)
    m = lw.world.exact_denoiser

    def bad(match, **kw):
        with pytest.raises(ValueError, match=match):
            sample_resample(m, x, sig, None, **{**base, **kw})

    bad("measurement=", measurement=None)
    bad("degradation must be a callable", degradation="blur")
    bad("decoder=", decoder=None)
    bad("encoder must be None or a callable", encoder=3)
    bad(r"optimization='pixel' needs encoder=", optimization="pixel")
    bad(r"'optimization' must be one of 'auto', 'latent', 'pixel', got 'vae'", optimization="vae")
    bad(r"'optimizer' must be one of 'adam', 'sgd', got 'lbfgs'", optimizer="lbfgs")
    bad(r"'variance' must be one of 'paper', 'reference', got 'vp'", variance="vp")
    bad("gamma", gamma=-1.0)
    bad("gamma", gamma=float("nan"))
    bad("tolerance", tolerance=-1e-3)
    bad("'lr' must be at least", lr=0.0)
    bad("'lr' must be at most 1", lr=10.0)
    bad("pixel_lr", pixel_lr=-1.0)
    bad("dps_eta", dps_eta=-0.1)
    bad("'consistency_every' must be a whole number", consistency_every=2.5)
    bad("consistency_every", consistency_every=-1)
    bad("consistency_start", consistency_start=-1)
    bad("latent_steps", latent_steps=-5)
    bad("pixel_until", pixel_until="half")
    bad("early_stop", early_stop=4)
    bad(
        r"measurement shape \(1, 2, 2, 2\).*degradation output shape \(2, 2, 4, 2\)",
        measurement=torch.zeros(1, 2, 2, 2),
    )
    bad(
        r"measurement shape \(1, 2, 2, 2\)",
        measurement=torch.zeros(1, 2, 2, 2),
        consistency_every=0,
    )
    with pytest.raises(ValueError, match="optimization='pixel' needs encoder="):
        hard_consistency(x, lw.y, lw.degrade, lw.decode, mode="pixel", steps=10, lr=1e-2)
    with pytest.raises(ValueError, match="measurement shape"):
        hard_consistency(x, torch.zeros(3, 2, 4, 2, dtype=F64), lw.degrade, lw.decode, steps=10, lr=1e-2)
