"""Step functions and eta=0 SILO vs. independent re-implementations of ComfyUI's euler / ddpm loops."""

from __future__ import annotations

import pytest
import torch
from support.toy import ToyGaussianWorld, karras_sigmas, vp_sigmas

from comfyui_silo.samplers.silo import sample_silo
from comfyui_silo.samplers.steps import (
    UPDATES,
    alpha_bar,
    ddpm_step,
    euler_step,
    get_update,
    make_noise_sampler,
    sigma_to_vp_scale,
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
    assert alpha_bar(s).item() == pytest.approx(0.2)
    assert alpha_bar(0.0) == 1.0
    assert sigma_to_vp_scale(s).item() == pytest.approx(5**0.5)
    assert sigma_to_vp_scale(0.0) == 1.0
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
