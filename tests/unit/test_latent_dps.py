"""Latent-DPS / PSLD baseline on the analytic toy world.

Toy setup: ToyGaussianWorld's latent ``z0 ~ N(mu, Sigma)`` on [2,4,4] (32 dims), a fixed well-conditioned
linear "decoder" ``D`` (64x32, singular values 0.8-1.5) to a [1,8,8] "image", ``E = pinv(D)`` (so
``E o D = I``), and a linear pixel-space degradation ``A``; ``y = A(D z* + n)`` with ``sigma_y = 0.05``.
Then ``y = (A D) z0 + noise`` and the posterior of ``z0`` is the Gaussian of ToyGaussianWorld with
``M = A D`` (computed here from the matrices).

* ``A`` = orthonormal 2x2 downsample (``2 * avg_pool``, rows orthonormal, measurement [1,4,4]: 16 < 32
  dims) given as a plain callable with an explicit ``adjoint``;
* ``A`` = ``BoxInpaint(1, 1, 6, 6)`` from operators.degradations (28 observed pixels < 32 dims; noise only
  on observed pixels), whose default ``A_adjoint`` is used for PSLD's gluing term.

How eta was chosen (200 'vp' steps, B=128, world seeds 0-3): for the downsample, eta 0.3 gives
guided/unguided mean-error ratios 0.14-0.15 (ddpm+unet), 0.04-0.08 (ddpm+x0), 0.20-0.23 (euler+unet) with
final residual 0.8-1.0 x the noise floor sigma_y*sqrt(m) (the exact posterior's RMS residual is 0.99-1.02 x
floor); eta 0.5 overshoots to ~1.5 x floor.  (With the plain 2x2 *average* pool, ||A D|| is 4x smaller and
DPS over-fits the noise, residual 0.25-0.5 x floor.)  PSLD on the box, gluing=1, eta=0.2: ratios
0.05-0.22 (ddpm+unet) and 0.02-0.11 (ddpm+x0), residual 0.67-0.99 x floor.  Because the gluing term is
squared (paper's Algorithm; the reference code uses the plain norm) and unclamped, eta*gluing >~ 1 diverges
on this toy (eta 0.3 with gluing 5 blows up): gluing is *not* scale-free like the DPS term.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from support.toy import PixelToyWorld as Toy
from support.toy import ToyDenoiser, flow_sigmas, karras_sigmas, vp_sigmas

from comfyui_silo.operators.degradations import JPEG
from comfyui_silo.samplers.latent_dps import LatentDPSSettings, psld_gluing_loss, sample_latent_dps
from comfyui_silo.samplers.silo import sample_silo
from comfyui_silo.samplers.steps import get_update, make_noise_sampler

pytestmark = pytest.mark.unit

DT = torch.float64
SIGMA_Y = 0.05
B = 128


@pytest.fixture(scope="module")
def toy():
    return Toy(0)


def _x0(sig, n=B, seed=5):
    return torch.randn(n, 2, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=DT) * sig[0]


def _dps(toy, sig, x, y, op, **kw):
    kw.setdefault("decoder", toy.dec)
    model = toy.world.denoiser(kw.get("parameterization", "vp"))
    return sample_latent_dps(model, x, sig, {"seed": 3}, disable=True, measurement=y, degradation=op, **kw)


def _residual(toy, op, y, out):
    return (y - op(toy.dec(out))).flatten(1).norm(dim=1)


# ----------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("update", ["ddpm", "euler"])
@pytest.mark.parametrize("gluing", [0.0, 1.0])
def test_eta0_is_the_plain_sampler_bit_exactly(toy, update, gluing):
    sig = vp_sigmas(25)
    x = _x0(sig, n=8)
    y = toy.measure(toy.box)
    tr = []
    out = _dps(toy, sig, x, y, toy.box, encoder=toy.enc, eta=0.0, gluing=gluing, update=update, trace=tr)
    # hand-rolled plain sampler: the step rule + ComfyUI's seeded noise, nothing else
    step, ns = get_update(update), make_noise_sampler(x, seed=3)
    ref, s_in = x, x.new_ones([x.shape[0]])
    for i in range(len(sig) - 1):
        ref = step(ref, toy.world.exact_denoiser(ref, sig[i] * s_in), sig[i], sig[i + 1], ns)
    assert torch.equal(out, ref)
    assert len(tr) == 25 and all(t["grad_norm"] == [] and t["eta"] == 0.0 for t in tr)
    assert "extra_loss" not in tr[0]  # gluing is PSLD's gamma: with eta = 0 nothing guides, the gluing term neither


def test_gluing0_is_silo_with_operator_a_of_d(toy):
    """Latent-DPS == SILO with H = A o D and the pixel measurement (bit-exact), also for broadcast y."""
    sig = karras_sigmas(20)
    x = _x0(sig, n=4)
    y = toy.measure(toy.down)
    for gradient in ("unet", "x0"):
        out = _dps(toy, sig, x, y, toy.down, eta=0.3, gradient=gradient)
        ref = sample_silo(
            toy.world.exact_denoiser,
            x,
            sig,
            {"seed": 3},
            disable=True,
            measurement=y,
            operator=lambda z: toy.down(toy.dec(z)),
            eta=0.3,
            gradient=gradient,
            grad_clamp=None,
        )
        assert torch.equal(out, ref)
    yb = y.expand(4, *y.shape[1:]).clone()
    torch.testing.assert_close(_dps(toy, sig, x, yb, toy.down, eta=0.3, gradient="x0"), out, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("gluing", "norm"), [(0.0, "squared"), (0.7, "squared"), (0.7, "plain")])
def test_single_step_matches_analytic_gradient(toy, gluing, norm):
    """One Euler step, gradient='x0', no clamp: x_next = euler - eta*s(sigma)*s(sigma_next)*grad_z0 loss."""
    sig = torch.tensor([2.0, 0.5], dtype=DT)
    x = _x0(sig, n=3, seed=9)
    y = toy.measure(toy.down)
    eta = 0.4
    out = _dps(
        toy,
        sig,
        x,
        y,
        toy.down,
        encoder=toy.enc,
        adjoint=toy.down_adj,
        eta=eta,
        gluing=eta * gluing,  # PSLD's gamma: the gluing term's weight in the loss whose gradient eta multiplies
        gluing_norm=norm,
        update="euler",
        gradient="x0",
    )
    den = toy.world.exact_denoiser(x, sig[0] * x.new_ones(3))
    plain = get_update("euler")(x, den, sig[0], sig[1], None)
    m = toy.matrix(toy.down)  # A D, [16, 32]
    z = den.reshape(3, 32)
    r = z @ m.T - y.reshape(1, 16)  # A D z - y
    g = r @ m / r.norm(dim=1, keepdim=True)  # grad of ||y - A D z||
    ea = toy.Em @ _a_matrix(toy.down).T  # E A^T: [32, 16]
    u = r @ ea.T  # E A^T (A D z - y) = z - E(A^T y + (I - A^T A) D z) since E D = I
    if norm == "squared":
        g = g + gluing * 2.0 * u @ (ea @ m)  # grad of ||E A^T (A D z - y)||^2
    else:
        g = g + gluing * (u / u.norm(dim=1, keepdim=True)) @ (ea @ m)  # grad of ||E A^T (A D z - y)||
    scale = math.sqrt(1 + 2.0**2) * math.sqrt(1 + 0.5**2)
    torch.testing.assert_close(out, plain - eta * scale * g.reshape(x.shape), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------- toward posterior
@pytest.mark.parametrize(
    ("update", "gradient", "eta"), [("ddpm", "unet", 0.3), ("ddpm", "x0", 0.3), ("euler", "unet", 0.3)]
)
def test_latent_dps_mean_approaches_posterior(toy, update, gradient, eta):
    sig = vp_sigmas(200)
    x = _x0(sig)
    y = toy.measure(toy.down)
    pm = toy.posterior_mean(toy.down, y)
    ref = _dps(toy, sig, x, y, toy.down, eta=0.0, update=update)
    out = _dps(toy, sig, x, y, toy.down, eta=eta, update=update, gradient=gradient)
    err0 = (ref.mean(0) - pm).norm().item()
    err = (out.mean(0) - pm).norm().item()
    assert err0 > 3.0  # informative measurement: the prior mean is far from the posterior mean
    assert err <= 0.3 * err0, (err, err0)  # measured (seed 0): 0.14 / 0.04 / 0.20
    floor = toy.noise_floor(toy.down)
    res = _residual(toy, toy.down, y, out).mean().item()
    res0 = _residual(toy, toy.down, y, ref).mean().item()
    assert res0 > 10 * floor
    assert 0.5 * floor <= res <= 1.5 * floor, (res, floor)  # measured: 0.81 / 0.81 / 0.92


@pytest.mark.parametrize("gradient", ["unet", "x0"])
def test_psld_mean_approaches_posterior(toy, gradient):
    sig = vp_sigmas(200)
    x = _x0(sig)
    y = toy.measure(toy.box)
    pm = toy.posterior_mean(toy.box, y)
    ref = _dps(toy, sig, x, y, toy.box, eta=0.0)
    tr = []
    out = _dps(toy, sig, x, y, toy.box, encoder=toy.enc, eta=0.2, gluing=0.2, gradient=gradient, trace=tr)
    err0 = (ref.mean(0) - pm).norm().item()
    err = (out.mean(0) - pm).norm().item()
    assert err0 > 3.0
    assert err <= 0.3 * err0, (err, err0)  # measured (seed 0): 0.05 (unet) / 0.02 (x0)
    floor = toy.noise_floor(toy.box)
    res = _residual(toy, toy.box, y, out).mean().item()
    assert _residual(toy, toy.box, y, ref).mean().item() > 10 * floor
    assert 0.5 * floor <= res <= 1.5 * floor, (res, floor)  # measured: 0.80 / 0.67
    # the gluing term is in the loss and shrinks as the sample becomes measurement-consistent
    assert all(len(t["extra_loss"]) == B for t in tr)
    first, last = sum(tr[0]["extra_loss"]) / B, sum(tr[-1]["extra_loss"]) / B
    assert last < 0.01 * first, (first, last)
    dps = _dps(toy, sig, x, y, toy.box, encoder=toy.enc, eta=0.2, gluing=0.0, gradient=gradient)
    assert not torch.allclose(out, dps)


# ------------------------------------------------------------------------------------- flow parameterization
@pytest.mark.parametrize("gradient", ["unet", "x0"])
@pytest.mark.parametrize("update", ["ddpm", "euler"])
def test_flow_latent_dps_mean_approaches_posterior(toy, update, gradient):
    """Flow state (exact flow denoiser, SD3-style schedule from sigma = 1): the VP test's eta 0.3 works as it is."""
    sig = flow_sigmas(200)
    x = _x0(sig)
    y = toy.measure(toy.down)
    pm = toy.posterior_mean(toy.down, y)
    kw = dict(update=update, parameterization="flow")
    ref = _dps(toy, sig, x, y, toy.down, eta=0.0, **kw)
    out = _dps(toy, sig, x, y, toy.down, eta=0.3, gradient=gradient, **kw)
    err0 = (ref.mean(0) - pm).norm().item()
    err = (out.mean(0) - pm).norm().item()
    assert err0 > 3.0
    assert err <= 0.3 * err0, (err, err0)  # measured (seed 0): ddpm 0.15 / 0.07, euler 0.22 / 0.06
    floor = toy.noise_floor(toy.down)
    res = _residual(toy, toy.down, y, out).mean().item()
    assert _residual(toy, toy.down, y, ref).mean().item() > 10 * floor
    assert 0.5 * floor <= res <= 1.5 * floor, (res, floor)  # measured: 0.88-0.93


@pytest.mark.parametrize("gradient", ["unet", "x0"])
def test_flow_psld_mean_approaches_posterior(toy, gradient):
    sig = flow_sigmas(200)
    x = _x0(sig)
    y = toy.measure(toy.box)
    pm = toy.posterior_mean(toy.box, y)
    ref = _dps(toy, sig, x, y, toy.box, eta=0.0, parameterization="flow")
    tr = []
    out = _dps(toy, sig, x, y, toy.box, encoder=toy.enc, eta=0.2, gluing=0.2, gradient=gradient, trace=tr,
               parameterization="flow")
    err0 = (ref.mean(0) - pm).norm().item()
    assert (out.mean(0) - pm).norm().item() <= 0.3 * err0  # measured (seed 0): 0.06 (unet) / 0.13 (x0)
    floor = toy.noise_floor(toy.box)
    assert 0.5 * floor <= _residual(toy, toy.box, y, out).mean().item() <= 1.5 * floor  # measured: 0.88 / 1.06
    assert sum(tr[-1]["extra_loss"]) < 0.01 * sum(tr[0]["extra_loss"])


# ------------------------------------------------------------------------------------- gluing term
@pytest.mark.parametrize("kind", ["down", "box"])
def test_gluing_loss_values(toy, kind):
    op = toy.down if kind == "down" else toy.box
    adj = toy.down_adj if kind == "down" else None  # box: degradation.A_adjoint
    torch.testing.assert_close(toy.Em @ toy.Dm, torch.eye(32, dtype=DT))
    z = toy.world.sample_prior(3, torch.Generator().manual_seed(11)).requires_grad_(True)
    kw = dict(degradation=op, decoder=toy.dec, encoder=toy.enc, adjoint=adj)
    # consistent measurement (A D z = y exactly) and E o D = I -> zero
    y_ok = op(toy.dec(z)).detach()
    loss0 = psld_gluing_loss(z, measurement=y_ok, **kw)
    assert loss0.shape == (3,) and loss0.abs().max().item() < 1e-20
    # inconsistent measurement -> ||E A^T (A D z - y)||^2 (E D = I)
    y = toy.measure(op)
    loss = psld_gluing_loss(z, measurement=y, **kw)
    r = z.detach().reshape(3, 32) @ toy.matrix(op).T - y.reshape(1, -1)
    u = r @ (toy.Em @ _a_matrix(op).T).T
    torch.testing.assert_close(loss, u.pow(2).sum(1), rtol=1e-10, atol=1e-14)
    assert loss.min().item() > 1e-3
    plain = psld_gluing_loss(z, measurement=y, norm="plain", **kw)
    torch.testing.assert_close(plain, u.norm(dim=1), rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="norm must be one of"):
        psld_gluing_loss(z, measurement=y, norm="l1", **kw)
    (g,) = torch.autograd.grad(loss.sum(), z)
    assert g.abs().sum().item() > 0
    # an encoder that is not D's inverse: the term measures E o D, even for a consistent measurement
    loss_e = psld_gluing_loss(z, measurement=y_ok, **{**kw, "encoder": lambda im: 0.9 * toy.enc(im)})
    torch.testing.assert_close(loss_e, (0.1 * z.detach()).flatten(1).pow(2).sum(1), rtol=1e-10, atol=1e-14)


def _a_matrix(op):
    """The pixel-space matrix of ``op`` ([m_out, 64])."""
    return op(torch.eye(64, dtype=DT).reshape(64, 1, 8, 8)).reshape(64, -1).T


def test_decoder_runs_once_per_step_and_trace(toy):
    """PSLD shares one decode per step between the two terms; the encoder runs once per guided step."""
    calls = {"dec": 0, "enc": 0}

    def dec(z):
        calls["dec"] += 1
        return toy.dec(z)

    def enc(im):
        calls["enc"] += 1
        return toy.enc(im)

    sig = karras_sigmas(12)
    x = _x0(sig, n=4)
    y = toy.measure(toy.box)
    tr, cb = [], []
    _dps(toy, sig, x, y, toy.box, decoder=dec, encoder=enc, eta=0.2, gluing=0.2, trace=tr, callback=cb.append)
    assert calls == {"dec": 12, "enc": 12}
    assert [t["step"] for t in tr] == list(range(12)) and all(len(t["extra_loss"]) == 4 for t in tr)
    assert all(c["latent_dps_loss"].shape == (4,) for c in cb)
    # unguided steps with only a callback: the gluing term (encoder) is not evaluated at all
    calls.update(dec=0, enc=0)
    _dps(toy, sig, x, y, toy.box, decoder=dec, encoder=enc, eta=0.0, gluing=1.0, callback=lambda d: None)
    assert calls == {"dec": 12, "enc": 0}


def test_inference_mode_and_no_param_grad(toy):
    """Inside ComfyUI's inference mode (inference tensors, A_adjoint via autograd) the result is unchanged."""
    model = ToyDenoiser(toy.world)
    sig = karras_sigmas(10)
    x = _x0(sig, n=4)
    y = toy.measure(toy.box)
    kw = dict(
        disable=True,
        degradation=toy.box,
        decoder=toy.dec,
        encoder=toy.enc,
        eta=0.2,
        gluing=0.2,
        eta_schedule=lambda i, s: float(i % 2),  # unguided odd steps exercise the report-only gluing path
    )
    tr_ref = []
    ref = sample_latent_dps(model, x, sig, {"seed": 1}, measurement=y, trace=tr_ref, **kw)
    with torch.inference_mode():
        xi, si, yi = x.clone(), sig.clone(), y.clone()
        assert xi.is_inference() and yi.is_inference()
        tr = []
        out = sample_latent_dps(model, xi, si, {"seed": 1}, measurement=yi, trace=tr, **kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert [t["extra_loss"] for t in tr] == [t["extra_loss"] for t in tr_ref]
    assert not ref.requires_grad and model.scale.grad is None


def test_settings_declare_the_node_widgets_and_gamma():
    """Widget names/order/defaults as on the node; gluing is PSLD's gamma (loss weight gluing / eta)."""
    specs = [s for s in LatentDPSSettings.specs() if s.widget]
    assert [s.name for s in specs] == ["eta", "gluing", "gluing_norm", "update", "gradient", "grad_clamp",
                                       "early_stop", "eta_mode"]
    assert [s.widget_default for s in specs] == [1.0, 0.0, "squared", "ddpm", "unet", 0.0, -1, "fixed"]
    assert LatentDPSSettings(eta=4.0, gluing=0.2).gluing_weight == pytest.approx(0.05)
    assert LatentDPSSettings(eta=0.0, gluing=0.2).gluing_weight == 0.0
    assert LatentDPSSettings.from_values(grad_clamp=0.0).grad_clamp is None
    params = inspect.signature(sample_latent_dps).parameters
    assert "settings" in params and not set(params) & {s.name for s in specs}  # settings are declared once


# ------------------------------------------------------------------------------------------------ errors
def test_clear_errors(toy):
    sig = karras_sigmas(4)
    x = _x0(sig, n=2)
    y = toy.measure(toy.down)
    yb = toy.measure(toy.box)
    with pytest.raises(ValueError, match=r"PSLD \(gluing > 0\) needs a linear degradation.*'JPEG q=10' is not linear"):
        _dps(toy, sig, x, yb, JPEG(10), encoder=toy.enc, gluing=1.0)
    with pytest.raises(ValueError, match=r"'gluing_norm' must be one of 'squared', 'plain', got 'l2'"):
        _dps(toy, sig, x, yb, toy.box, encoder=toy.enc, gluing=1.0, gluing_norm="l2")
    with pytest.raises(ValueError, match=r"PSLD \(gluing > 0\) needs encoder="):
        _dps(toy, sig, x, yb, toy.box, gluing=1.0)
    with pytest.raises(ValueError, match=r"PSLD \(gluing > 0\) needs the adjoint"):
        _dps(toy, sig, x, y, toy.down, encoder=toy.enc, gluing=1.0)  # plain callable, no adjoint=
    for eta in (0.0, 0.5):
        with pytest.raises(ValueError, match=r"measurement shape \(1, 1, 8, 8\).*shape \(2, 1, 4, 4\)"):
            _dps(toy, sig, x, yb, toy.down, eta=eta)
    with pytest.raises(ValueError, match=r"measurement shape \(3, 1, 4, 4\)"):
        _dps(toy, sig, x, torch.zeros(3, 1, 4, 4, dtype=DT), toy.down)
    with pytest.raises(ValueError, match="'gluing' must be at least 0"):
        _dps(toy, sig, x, y, toy.down, gluing=-1.0)
    with pytest.raises(ValueError, match="'gluing' must be a number"):
        _dps(toy, sig, x, y, toy.down, gluing="lots")
    with pytest.raises(ValueError, match=r"encoder: E\(image\) must return a latent shaped like z0_hat \(2, 2, 4, 4\)"):
        _dps(toy, sig, x, yb, toy.box, encoder=lambda im: toy.enc(im)[:, :1], gluing=1.0)
    with pytest.raises(ValueError, match=r"adjoint: A\^T\(measurement\) must be shaped like the decoded image"):
        _dps(toy, sig, x, y, toy.down, encoder=toy.enc, adjoint=lambda v: v, gluing=1.0)
    with pytest.raises(ValueError, match="needs measurement="):
        _dps(toy, sig, x, None, toy.down)
    with pytest.raises(ValueError, match="needs decoder="):
        _dps(toy, sig, x, y, toy.down, decoder=None)
    with pytest.raises(ValueError, match=r"degradation must be a callable A\(image\)"):
        _dps(toy, sig, x, y, "blur")
    with pytest.raises(ValueError, match="encoder must be None or a callable"):
        _dps(toy, sig, x, y, toy.down, encoder=3)
    with pytest.raises(ValueError, match=r"'update' must be one of 'ddpm', 'euler', got 'heun'"):
        _dps(toy, sig, x, y, toy.down, update="heun")
    with pytest.raises(ValueError, match="'eta' must be at least 0"):
        _dps(toy, sig, x, y, toy.down, eta=-0.1)
