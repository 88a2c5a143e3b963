"""Step functions, parameterizations and eta=0 SILO vs. independent re-implementations of ComfyUI's euler / ddpm
loops (vp), and of ComfyUI's euler loop on a flow model (flow)."""

from __future__ import annotations

import math

import pytest
import torch
from support.toy import ToyGaussianWorld, flow_sigmas, karras_sigmas, vp_sigmas

from comfyui_silo.samplers.parameterization import get_parameterization
from comfyui_silo.samplers.silo import sample_silo
from comfyui_silo.samplers.steps import (
    UPDATES,
    ddpm_step,
    euler_step,
    flow_ddpm_step,
    get_update,
    make_noise_sampler,
)

pytestmark = pytest.mark.unit


# --------------------------------------------------------------------------------------------------
# Reference loops: ComfyUI's KSAMPLER algorithms written out independently, same arithmetic order.
# --------------------------------------------------------------------------------------------------
def _ref_noise(x, seed):
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    return lambda s, sn: torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=gen)


def ref_sample_euler(model, x, sigmas, extra_args, callback=None):
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        s = sigmas[i]
        den = model(x, s * ones, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": s, "sigma_hat": s, "denoised": den})
        deriv = (x - den) / s[(...,) + (None,) * x.ndim]
        x = x + deriv * (sigmas[i + 1] - s)
    return x


def ref_sample_ddpm(model, x, sigmas, extra_args, callback=None):
    noise = _ref_noise(x, extra_args["seed"])
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        s, sn = sigmas[i], sigmas[i + 1]
        den = model(x, s * ones, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": s, "sigma_hat": s, "denoised": den})
        z = x / torch.sqrt(1.0 + s**2.0)
        eps = (x - den) / s
        a_cum = 1 / ((s * s) + 1)
        a_cum_prev = 1 / ((sn * sn) + 1)
        a = a_cum / a_cum_prev
        out = (1.0 / a).sqrt() * (z - (1 - a) * eps / (1 - a_cum).sqrt())
        if sn > 0:
            out += ((1 - a) * (1.0 - a_cum_prev) / (1.0 - a_cum)).sqrt() * noise(s, sn)
        x = out
        if sn != 0:
            x *= torch.sqrt(1.0 + sn**2.0)
    return x


REFS = {"euler": ref_sample_euler, "ddpm": ref_sample_ddpm}


@pytest.fixture(scope="module")
def world():
    return ToyGaussianWorld(seed=3)


def _model32(world):
    """float32 model in ComfyUI style: float64 toy denoiser, output cast back to the input dtype."""

    def model(x, sigma, **kwargs):
        assert "seed" in kwargs
        return world.exact_denoiser(x, sigma)

    return model


@pytest.mark.parametrize("update", ["euler", "ddpm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eta0_bit_exact_vs_comfy_loop(world, update, dtype):
    sigmas = karras_sigmas(12, 0.03, 14.6, dtype=torch.float32).to(dtype)
    x = torch.randn(3, *world.shape, generator=torch.Generator().manual_seed(11), dtype=dtype) * sigmas[0]
    meas = world.operator(torch.zeros(1, *world.shape, dtype=torch.float64))
    model = _model32(world)
    extra = {"seed": 1234, "denoise_mask": None}
    ref_den, our_den = [], []
    ref = REFS[update](model, x, sigmas, extra, callback=lambda d: ref_den.append(d["denoised"]))
    ours = sample_silo(
        model,
        x,
        sigmas,
        extra,
        callback=lambda d: our_den.append(d["denoised"]),
        disable=True,
        measurement=meas,
        operator=world.operator,
        eta=0.0,
        update=update,
    )
    assert ours.dtype == dtype
    assert torch.equal(ours, ref)
    assert len(ref_den) == len(our_den) == 12
    assert all(torch.equal(a, b) for a, b in zip(ref_den, our_den, strict=True))


def test_eta0_vp_schedule_ddpm_bit_exact(world):
    sigmas = vp_sigmas(25).float()
    x = torch.randn(2, *world.shape, generator=torch.Generator().manual_seed(2)) * sigmas[0]
    meas = torch.zeros(2, *world.out_shape, dtype=torch.float64)
    model = _model32(world)
    ref = ref_sample_ddpm(model, x, sigmas, {"seed": 7})
    ours = sample_silo(model, x, sigmas, {"seed": 7}, disable=True, measurement=meas, operator=world.operator, eta=0)
    assert torch.equal(ours, ref)


def test_ddpm_seed_determinism(world):
    sigmas = karras_sigmas(10, dtype=torch.float32)
    x = torch.randn(2, *world.shape, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    meas = torch.zeros(1, *world.out_shape)
    kw = dict(disable=True, measurement=meas, operator=world.operator, eta=0.0, update="ddpm")
    model = _model32(world)
    a = sample_silo(model, x, sigmas, {"seed": 5}, **kw)
    b = sample_silo(model, x, sigmas, {"seed": 5}, **kw)
    c = sample_silo(model, x, sigmas, {"seed": 6}, **kw)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # euler is deterministic: the seed does not matter
    e1 = sample_silo(model, x, sigmas, {"seed": 5}, **{**kw, "update": "euler"})
    e2 = sample_silo(model, x, sigmas, {"seed": 6}, **{**kw, "update": "euler"})
    assert torch.equal(e1, e2)


def test_make_noise_sampler_matches_generator():
    x = torch.empty(2, 3, 4, dtype=torch.float64)
    ns = make_noise_sampler(x, seed=42)
    gen = torch.Generator().manual_seed(42)
    for _ in range(3):
        assert torch.equal(ns(1.0, 0.5), torch.randn(x.size(), dtype=x.dtype, generator=gen))


def test_step_math():
    s = torch.tensor(2.0, dtype=torch.float64)
    vp = get_parameterization("vp")
    assert vp.alpha_bar(s) == pytest.approx(0.2) and vp.alpha_bar(0.0) == 1.0
    assert vp.vp_scale(s) == pytest.approx(5**0.5) and vp.vp_scale(0.0) == 1.0
    x = torch.randn(2, 5, dtype=torch.float64)
    den = torch.randn(2, 5, dtype=torch.float64)
    # Euler to sigma_next = 0 lands on the denoised estimate; DDPM to 0 too (no noise drawn)
    torch.testing.assert_close(euler_step(x, den, s, torch.tensor(0.0, dtype=torch.float64)), den)
    boom = lambda a, b: (_ for _ in ()).throw(AssertionError("noise drawn at the final step"))  # noqa: E731
    torch.testing.assert_close(ddpm_step(x, den, s, torch.tensor(0.0, dtype=torch.float64), boom), den)
    # Python floats are accepted
    torch.testing.assert_close(euler_step(x, den, 2.0, 1.0), x + (x - den) / 2.0 * (1.0 - 2.0))
    # DDPM mean with zero noise = DDIM-like interpolation in VP space (check against the closed form)
    zero = lambda a, b: torch.zeros_like(x)  # noqa: E731
    sn = torch.tensor(1.0, dtype=torch.float64)
    got = ddpm_step(x, den, s, sn, zero)
    ab, abn = 1 / 5, 1 / 2
    a = ab / abn
    eps = (x - den) / 2.0
    z = x * ab**0.5
    expect = (z - (1 - a) / (1 - ab) ** 0.5 * eps) / a**0.5 / abn**0.5
    torch.testing.assert_close(got, expect)


def test_get_update():
    assert set(UPDATES) == {"ddpm", "euler"}
    assert get_update("euler") is euler_step
    assert get_update("ddpm") is ddpm_step
    with pytest.raises(ValueError, match=r"update='heun'.*'ddpm', 'euler'"):
        get_update("heun")


# --------------------------------------------------------------------------------------------------
# flow parameterization: x = (1 - sigma) z0 + sigma eps
# --------------------------------------------------------------------------------------------------
def test_flow_parameterization_maps_to_vp_units():
    flow = get_parameterization("flow")
    for sig in (0.1, 0.5, 0.9):
        a, b = 1 - sig, sig
        k = math.sqrt(a * a + b * b)
        assert flow.vp_scale(sig) == pytest.approx(k)
        assert flow.alpha_bar(sig) == pytest.approx(a * a / (a * a + b * b))
        # the VP-equivalent level: same noise-to-signal ratio b / a, so the same abar
        assert flow.alpha_bar(sig) == pytest.approx(get_parameterization("vp").alpha_bar(flow.ve_sigma(sig)))
        assert flow.noise_fraction(sig) == pytest.approx(math.sqrt(1 - flow.alpha_bar(sig)))
    assert flow.vp_scale(1.0) == 1.0 and flow.vp_scale(0.0) == 1.0 and flow.alpha_bar(1.0) == 0.0
    assert flow.ve_sigma(1.0) == math.inf and flow.noise_fraction(1.0) == 1.0
    assert flow.update("euler") is euler_step and flow.update("ddpm") is flow_ddpm_step
    with pytest.raises(ValueError, match=r"parameterization='edm'.*'vp', 'flow'"):
        get_parameterization("edm")
    with pytest.raises(ValueError, match=r"update='heun'"):
        flow.update("heun")


@pytest.mark.parametrize(("sigma", "sigma_next"), [(0.9, 0.6), (0.5, 0.2), (0.3, 0.05)])
def test_flow_ddpm_is_the_ve_posterior_step_in_the_flow_state(sigma, sigma_next):
    """flow x at sigma = (1 - sigma) * (VE state at s = sigma / (1 - sigma)): the flow step is the VP/VE DDPM step
    (ComfyUI's arithmetic, :func:`ddpm_step`) on x / (1 - sigma), scaled by 1 - sigma_next; same noise."""
    g = torch.Generator().manual_seed(0)
    x, den = torch.randn(3, 7, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 7, generator=g, dtype=torch.float64)
    ns = lambda a, b: noise  # noqa: E731
    s, sn = sigma / (1 - sigma), sigma_next / (1 - sigma_next)
    ref = (1 - sigma_next) * ddpm_step(x / (1 - sigma), den, torch.tensor(s, dtype=torch.float64),
                                       torch.tensor(sn, dtype=torch.float64), ns)
    got = flow_ddpm_step(x, den, torch.tensor(sigma, dtype=torch.float64), torch.tensor(sigma_next, dtype=torch.float64),
                         ns)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_flow_ddpm_at_the_ends():
    g = torch.Generator().manual_seed(1)
    x, den = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)
    one, zero = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    boom = lambda a, b: (_ for _ in ()).throw(AssertionError("noise drawn at the final step"))  # noqa: E731
    assert torch.equal(flow_ddpm_step(x, den, torch.tensor(0.3, dtype=torch.float64), zero, boom), den)
    # from pure noise (sigma = 1) the step forgets x: a fresh draw around z0_hat at the next level
    nz = torch.randn(2, 5, generator=g, dtype=torch.float64)
    out = flow_ddpm_step(x, den, one, torch.tensor(0.4, dtype=torch.float64), lambda a, b: nz)
    torch.testing.assert_close(out, 0.6 * den + 0.4 * nz, rtol=0, atol=1e-15)
    assert torch.isfinite(out).all()


def test_eta0_flow_euler_bit_exact_vs_comfy_loop(world):
    """ComfyUI runs sample_euler unchanged for flow models: the same arithmetic, bit for bit."""
    sigmas = flow_sigmas(12, dtype=torch.float32)
    x = torch.randn(3, *world.shape, generator=torch.Generator().manual_seed(11)) * sigmas[0]
    meas = world.operator(torch.zeros(1, *world.shape, dtype=torch.float64))
    ref_den, our_den = [], []
    ref = ref_sample_euler(world.flow_denoiser, x, sigmas, {"seed": 1}, callback=lambda d: ref_den.append(d["denoised"]))
    ours = sample_silo(world.flow_denoiser, x, sigmas, {"seed": 1}, callback=lambda d: our_den.append(d["denoised"]),
                       disable=True, measurement=meas, operator=world.operator, eta=0.0, update="euler",
                       parameterization="flow")
    assert torch.equal(ours, ref)
    assert all(torch.equal(a, b) for a, b in zip(ref_den, our_den, strict=True))
