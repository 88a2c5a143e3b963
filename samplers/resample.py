"""ReSample (Song, Kwon, Zhang, Hu, Qu & Shen, ICLR 2024, arXiv 2307.08123) as pure torch; never imports ComfyUI.

"Solving Inverse Problems with Latent Diffusion Models via Hard Data Consistency".  ComfyUI ``KSAMPLER``
calling convention::

    sample_resample(model, x, sigmas, extra_args=None, callback=None, disable=None, *,
                    measurement, degradation, decoder, encoder=None, ...)

``model(x, sigma_vec, **extra_args)`` returns the denoised latent ``z0_hat``; ``x`` lives in ComfyUI's sigma
space ``x = z0 + sigma * eps``; ``degradation`` (``A``) acts on *decoded images* ``decoder(z)`` (``D``), so
the measurement ``y`` is in pixel/measurement space.

The algorithm
-------------
Base sampler: deterministic DDIM, i.e. Euler in sigma space (:func:`~comfyui_silo.samplers.steps.euler_step`).
Step ``i`` (``sigma_i -> sigma_{i+1}``)::

    z0_hat = model(x, sigma_i)
    x'     = DDIM(x, z0_hat)                          [- dps_eta * abar_i * grad ||y - A(D(z0_hat))||  (optional)]
    if i is a consistency step:
        z0_y = argmin_z ||y - A(D(z))||^2, started at z0_hat     ("hard data consistency")
        x    ~ N(mu, s^2)  around z0_y and x'                     ("stochastic resampling")
    else:
        x    = x'

*Hard data consistency* variants (``optimization=``):

* ``"latent"`` -- the paper's latent-space optimisation: ``z`` itself is optimised through the decoder.
* ``"pixel"``  -- the paper's pixel-space optimisation: ``D(z0_hat)`` is optimised against ``||y - A(img)||^2``
  and encoded back with ``E`` (needs ``encoder``); cheaper (no decoder backward) but only as good as ``E(D(.))``.
* ``"auto"`` (default) -- what the reference code does: pixel optimisation in the earlier consistency steps
  (``i < pixel_until``, default the first two thirds of sampling) and latent optimisation afterwards, when an
  encoder is given; latent optimisation everywhere otherwise.

Both run a plain Adam (or SGD) on the per-element mean squared residual, for at most ``latent_steps`` /
``pixel_steps`` iterations, and freeze a batch element as soon as its RMS residual
``sqrt(mean((y - A(.))^2))`` is below ``tolerance`` (the reference code's test ``MSE < eps**2``).

*Stochastic resampling* (paper, Sec. 3.2): with ``abar`` the VP signal fraction at the resampling level, ``z'_t``
the unconditional VP sample there and ``v = sigma_t^2`` a variance,

    z_t ~ N( (v sqrt(abar) z0_y + (1 - abar) z'_t) / (v + 1 - abar),  v (1 - abar) / (v + 1 - abar) I )

i.e. the product of the forward marginal ``N(sqrt(abar) z0_y, (1 - abar) I)`` and ``N(z'_t, v I)``.  In sigma
space (``x = z / sqrt(abar)``, ``abar = 1 / (1 + r^2)`` with ``r`` the resampling sigma) this is *exactly*

    x ~ N( x' + w (z0_y - x'),  w r^2 I ),    w = v' / (v' + r^2),   v' = v / abar = v (1 + r^2),

see :func:`stochastic_resample`.  The variance follows the paper's schedule
``v = gamma (1 - abar_{t-1}) / abar_t * (1 - abar_t / abar_{t-1})`` (``variance="paper"``, default) or the
reference code's ``v = gamma (1 - abar_{t-1}) / (1 - abar_t) * (1 - abar_t / abar_{t-1})``
(``variance="reference"``, the DDPM posterior variance times gamma), where, as in the reference code, ``t`` is the
level the step starts from (``sigma_prev = sigma_i``) and ``t-1`` the level resampled to (``sigma = sigma_{i+1}``).
In sigma space these reduce to ``w = gamma (s^2 - r^2) / (gamma (s^2 - r^2) + 1)`` ("paper") and
``w = gamma (s^2 - r^2) / (gamma (s^2 - r^2) + s^2)`` ("reference"), ``s = sigma_prev``.  ``gamma = 0`` keeps
``x'``; ``gamma = inf`` re-noises ``z0_y`` to level ``r`` (the paper's "stochastic encoding").

Defaults and where they come from (reference code ``ldm/models/diffusion/ddim.py`` of soominkwon/resample):
consistency every 10 steps (``index % 10 == 0``), none in the first third of sampling nor at the last step;
pixel optimisation in the middle third and latent optimisation in the last third; latent optimisation AdamW
lr 5e-3, at most 500 iterations; pixel optimisation AdamW lr 1e-2, at most 2000 iterations; stop when
``MSE < 1e-3**2``; ``gamma = 40`` ("change the 40 value for each task"); a final latent optimisation of the
sample after the last step (``final_consistency=True``).

Differences from the reference code (deliberate): plain Adam instead of AdamW (whose default weight decay 0.01
slowly shrinks the latent); no plateau test after 200 iterations; no "time travel" (the reference code takes 5
extra unconditional DDIM steps before optimising, and its Tweedie estimate scales eps by ``1 - abar`` instead of
``sqrt(1 - abar)``); here the optimisation starts from the model's own ``z0_hat``.  The reference code always adds
a DPS step with ``0.5 * abar_t`` times the gradient of the (plain, not squared) norm ``||y - A(D(z0_hat))||``
w.r.t. ``z_t``; here that is ``dps_eta`` (default 0, the reference code's value is 0.5) with the same ``abar_t``
factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .silo import _normal_tensor, _per_batch_l2, guided_estimate, plain_estimate
from .steps import euler_step, make_noise_sampler

try:  # progress bar like ComfyUI's samplers; optional
    from tqdm.auto import trange as _trange
except ImportError:  # pragma: no cover - tqdm ships with ComfyUI
    _trange = None

__all__ = [
    "OPTIMIZATION_MODES",
    "OPTIMIZERS",
    "RESAMPLE_OPTIONS",
    "VARIANCE_SCHEDULES",
    "consistency_schedule",
    "hard_consistency",
    "resample_variance",
    "resample_weight",
    "sample_resample",
    "stochastic_resample",
]

VARIANCE_SCHEDULES = ("paper", "reference")
OPTIMIZATION_MODES = ("auto", "latent", "pixel")
OPTIMIZERS = ("adam", "sgd")

#: Per-mode defaults of the hard-consistency optimiser (reference code values).
_MODE_DEFAULTS = {"latent": {"steps": 500, "lr": 5e-3}, "pixel": {"steps": 2000, "lr": 1e-2}}

#: Keyword options of :func:`sample_resample` (usable as KSAMPLER ``extra_options``): defaults and docs.
RESAMPLE_OPTIONS: dict[str, dict[str, Any]] = {
    "measurement": {"default": None, "doc": "Measurement y, shaped like degradation(decoder(z)) (required)."},
    "degradation": {"default": None, "doc": "Differentiable A(image, **degradation_kwargs) -> measurement (required)."},
    "decoder": {"default": None, "doc": "Differentiable D(latent) -> image (required)."},
    "encoder": {"default": None, "doc": "E(image) -> latent; enables pixel-space optimisation."},
    "consistency_every": {
        "default": 10,
        "doc": "Hard data consistency every this many steps (paper: 10). 0 = none at all (plain DDIM / DPS).",
    },
    "consistency_start": {"default": None, "doc": "First step index eligible for consistency. None = n_steps // 3."},
    "consistency_stop": {"default": None, "doc": "Consistency only at steps < this index. None = all remaining."},
    "optimization": {
        "default": "auto",
        "choices": OPTIMIZATION_MODES,
        "doc": "'latent' (optimise z through D), 'pixel' (optimise D(z), encode with E), "
        "'auto' (pixel before pixel_until then latent, when an encoder is given).",
    },
    "pixel_until": {
        "default": None,
        "doc": "'auto': pixel optimisation at steps < this. None = n_steps - n_steps // 3.",
    },
    "latent_steps": {"default": 500, "doc": "Max optimiser iterations of latent optimisation (reference: 500)."},
    "pixel_steps": {"default": 2000, "doc": "Max optimiser iterations of pixel optimisation (reference: 2000)."},
    "lr": {"default": 5e-3, "doc": "Learning rate of latent optimisation (reference: 5e-3)."},
    "pixel_lr": {"default": 1e-2, "doc": "Learning rate of pixel optimisation (reference: 1e-2)."},
    "tolerance": {
        "default": 1e-3,
        "doc": "Stop optimising an element once its RMS residual sqrt(mean((y - A(.))^2)) < tolerance (ref: 1e-3).",
    },
    "optimizer": {"default": "adam", "choices": OPTIMIZERS, "doc": "Optimiser of the consistency problem."},
    "gamma": {"default": 40.0, "doc": "Resampling variance scale gamma (paper/reference code: 40). inf = re-noise."},
    "variance": {
        "default": "paper",
        "choices": VARIANCE_SCHEDULES,
        "doc": "'paper': gamma (1-abar_{t-1})/abar_t (1-abar_t/abar_{t-1}); 'reference': /(1-abar_t) instead.",
    },
    "final_consistency": {
        "default": True,
        "doc": "Latent (or pixel) optimisation of the final sample, as the reference code does.",
    },
    "dps_eta": {
        "default": 0.0,
        "doc": "DPS step between/with consistency steps: dps_eta * abar_i * grad ||y - A(D(z0_hat))|| (ref: 0.5).",
    },
    "degradation_kwargs": {"default": None, "doc": "Extra keyword arguments for every degradation call."},
    "early_stop": {"default": None, "doc": "Step index k: return z0_hat of step k instead of finishing."},
    "trace": {
        "default": None,
        "doc": "List to append per-step diagnostics {step, sigma, loss, consistency, consistency_loss, ...}.",
    },
    "noise_sampler": {
        "default": None,
        "doc": "Optional noise source (sigma, sigma_next) -> noise for resampling; default seeded like ComfyUI.",
    },
}


# ---------------------------------------------------------------------------------------------- helpers
def _per_batch_mse(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``mean((w_b - h_b)^2)`` over all non-batch dims -> shape [B]."""
    diff = w.to(device=h.device, dtype=h.dtype) - h
    return diff.reshape(diff.shape[0], -1).pow(2).mean(dim=1)


def _check_shapes(measurement: torch.Tensor, h: torch.Tensor) -> None:
    m, o = tuple(measurement.shape), tuple(h.shape)
    if m == o or (len(m) == len(o) >= 1 and m[0] == 1 and m[1:] == o[1:]):
        return
    raise ValueError(
        f"ReSample measurement shape {m} does not match the degradation output shape {o} "
        f"(degradation applied to the decoded latent); the measurement must have that shape (batch {o[0]} or 1)"
    )


def _as_float(name: str, value, *, minimum: float = 0.0, allow_equal: bool = True, allow_inf: bool = False) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    bad = math.isnan(f) or (math.isinf(f) and not allow_inf) or f < minimum or (not allow_equal and f == minimum)
    if bad:
        rel = ">=" if allow_equal else ">"
        fin = "" if allow_inf else "finite "
        raise ValueError(f"{name} must be a {fin}number {rel} {minimum}, got {value!r}")
    return f


def _as_int(name: str, value, *, minimum: int = 0, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if allow_none else ''}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def _choice(name: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not known; allowed values: {', '.join(map(repr, allowed))}")
    return value


# ------------------------------------------------------------------------------------ resampling maths
def resample_weight(sigma, sigma_prev, gamma: float, variance: str = "paper") -> float:
    """Weight ``w = v' / (v' + sigma^2)`` of ``z0_y`` in the sigma-space resampling mean (see module docstring).

    ``sigma``: level resampled to (``r``, paper's ``t-1``); ``sigma_prev``: the larger level the step started
    from (``s``, paper's ``t``).  ``"paper"``: ``gamma (s^2-r^2) / (gamma (s^2-r^2) + 1)``; ``"reference"``:
    ``gamma (s^2-r^2) / (gamma (s^2-r^2) + s^2)``.  ``gamma = inf`` gives 1, ``gamma = 0`` gives 0.
    """
    _choice("variance", variance, VARIANCE_SCHEDULES)
    r, s = float(sigma), float(sigma_prev)
    gamma = _as_float("gamma", gamma, allow_inf=True)
    if not (r > 0 and s > r and math.isfinite(s)):
        raise ValueError(f"resampling needs 0 < sigma < sigma_prev (finite), got sigma={r}, sigma_prev={s}")
    if math.isinf(gamma):
        return 1.0
    a = gamma * (s * s - r * r)
    return a / (a + (1.0 if variance == "paper" else s * s))


def resample_variance(sigma, sigma_prev, gamma: float, variance: str = "paper") -> float:
    """The paper's VP-space resampling variance ``sigma_t^2`` (``v``) for a step ``sigma_prev -> sigma``.

    ``"paper"``: ``gamma (1 - abar_{t-1}) / abar_t * (1 - abar_t / abar_{t-1})``; ``"reference"`` (reference
    code): ``gamma (1 - abar_{t-1}) / (1 - abar_t) * (1 - abar_t / abar_{t-1})``, with ``abar_t`` at
    ``sigma_prev`` and ``abar_{t-1}`` at ``sigma`` (``abar = 1 / (1 + sigma^2)``).  Computed from the exact
    sigma-space forms ``v = gamma r^2 (s^2 - r^2) / (1 + r^2)`` ("paper"), divided by ``s^2`` ("reference").
    """
    w = resample_weight(sigma, sigma_prev, gamma, variance)  # validates
    r, s = float(sigma), float(sigma_prev)
    if w == 1.0 and math.isinf(float(gamma)):
        return math.inf
    v_sigma = float(gamma) * r * r * (s * s - r * r) / (1.0 if variance == "paper" else s * s)
    return v_sigma / (1.0 + r * r)


def stochastic_resample(
    z0_y: torch.Tensor,
    x_uncond: torch.Tensor,
    sigma,
    sigma_prev,
    gamma: float,
    noise: torch.Tensor,
    variance: str = "paper",
) -> torch.Tensor:
    """ReSample's stochastic resampling, in ComfyUI's sigma space.

    Draws ``x ~ N(x_uncond + w (z0_y - x_uncond), w sigma^2 I)`` with ``w`` from :func:`resample_weight`: the
    sigma-space image (``x = z_t * sqrt(1 + sigma^2)``) of the paper's VP-space
    ``N((v sqrt(abar) z0_y + (1-abar) z'_t) / (v + 1 - abar), v (1-abar) / (v + 1 - abar) I)`` with
    ``z'_t = x_uncond / sqrt(1 + sigma^2)``, ``abar = 1 / (1 + sigma^2)`` and ``v`` from :func:`resample_variance`.

    Args:
        z0_y: measurement-consistent clean latent (hard-consistency output).
        x_uncond: the unconditional sample at level ``sigma`` (sigma space), e.g. the DDIM step's output.
        sigma: level resampled to (``> 0``); ``sigma_prev``: the larger level the step started from.
        gamma: variance scale (``>= 0``, ``inf`` allowed).
        noise: standard normal noise shaped like ``x_uncond``.
        variance: ``"paper"`` or ``"reference"`` variance schedule.

    Returns:
        The resampled ``x`` at level ``sigma`` (sigma space).
    """
    w = resample_weight(sigma, sigma_prev, gamma, variance)
    r = float(sigma)
    z0_y = z0_y.to(device=x_uncond.device, dtype=x_uncond.dtype)
    return x_uncond + w * (z0_y - x_uncond) + (r * math.sqrt(w)) * noise.to(x_uncond)


def consistency_schedule(
    sigmas: torch.Tensor, every: int = 10, start: int | None = None, stop: int | None = None
) -> list[int]:
    """Step indices ``i`` (of ``sigma_i -> sigma_{i+1}``) that get hard data consistency.

    ``i`` with ``start <= i < stop``, ``(i - start) % every == 0`` and ``sigma_{i+1} > 0`` (resampling to level 0
    is the identity, the final sample is handled by ``final_consistency``).  ``every = 0`` gives none; ``start``
    defaults to ``n_steps // 3`` (the reference code skips the first third), ``stop`` to ``n_steps``.
    """
    n = len(sigmas) - 1
    every = _as_int("consistency_every", every)
    start = _as_int("consistency_start", start, allow_none=True)
    stop = _as_int("consistency_stop", stop, allow_none=True)
    if every == 0 or n < 1:
        return []
    start = n // 3 if start is None else start
    stop = n if stop is None else min(stop, n)
    return [i for i in range(start, stop, every) if float(sigmas[i + 1]) > 0]


# ---------------------------------------------------------------------------------- hard consistency
def _optimise(param0, residual_fn, steps: int, lr: float, tolerance: float, optimizer: str):
    """Minimise the per-element MSE ``residual_fn(p) -> [B]`` from ``param0``; freeze elements with RMS < tol.

    Plain Adam (beta 0.9/0.999, eps 1e-8) or SGD written out, so that converged batch elements stay exactly
    where they are.  Returns ``(param, iterations [B] long)``.
    """
    p = param0.clone().requires_grad_(True)
    b = p.shape[0]
    view = (b,) + (1,) * (p.ndim - 1)
    active = torch.ones(b, dtype=torch.bool, device=p.device)
    iters = torch.zeros(b, dtype=torch.long, device=p.device)
    m = torch.zeros_like(p) if optimizer == "adam" else None
    v = torch.zeros_like(p) if optimizer == "adam" else None
    b1, b2, eps = 0.9, 0.999, 1e-8
    for k in range(1, steps + 1):
        mse = residual_fn(p)
        with torch.no_grad():
            active &= ~(mse.detach().sqrt() < tolerance)
        if not bool(active.any()):
            break
        (g,) = torch.autograd.grad((mse * active.to(mse.dtype)).sum(), p)
        with torch.no_grad():
            if optimizer == "adam":
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                step = (m / (1 - b1**k)) / ((v / (1 - b2**k)).sqrt() + eps)
            else:
                step = g
            p.sub_(lr * step * active.reshape(view).to(p.dtype))
            iters += active.long()
    return p.detach(), iters


def hard_consistency(
    z0: torch.Tensor,
    measurement: torch.Tensor,
    degradation: Callable[..., torch.Tensor],
    decoder: Callable[[torch.Tensor], torch.Tensor],
    *,
    encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    mode: str = "latent",
    steps: int | None = None,
    lr: float | None = None,
    tolerance: float = 1e-3,
    optimizer: str = "adam",
    degradation_kwargs: dict | None = None,
) -> tuple[torch.Tensor, dict[str, list]]:
    """Solve ReSample's hard data-consistency problem ``argmin ||y - A(D(z))||^2`` started at ``z0``.

    ``mode="latent"``: optimise ``z`` through the decoder (defaults: 500 iterations, lr 5e-3).
    ``mode="pixel"``: optimise the image ``D(z0)`` against ``||y - A(img)||^2`` and return ``E(img)``
    (needs ``encoder``; defaults: 2000 iterations, lr 1e-2).  The loss is the per-element mean squared
    residual; an element stops once its RMS residual is below ``tolerance``.  Works inside ComfyUI's
    inference mode; no parameter of the decoder/encoder gets ``.grad``.

    Returns:
        ``(z, info)`` with ``info = {"rms": [B] RMS residual of A(D(z)) at the returned z,
        "iterations": [B] optimiser iterations taken}``.
    """
    mode = _choice("optimization", mode, ("latent", "pixel"))
    optimizer = _choice("optimizer", optimizer, OPTIMIZERS)
    steps = _MODE_DEFAULTS[mode]["steps"] if steps is None else _as_int(f"{mode}_steps", steps)
    lr = _MODE_DEFAULTS[mode]["lr"] if lr is None else _as_float("lr", lr, allow_equal=False)
    tolerance = _as_float("tolerance", tolerance)
    if mode == "pixel" and (encoder is None or not callable(encoder)):
        raise ValueError("optimization='pixel' needs encoder= (a callable E(image) -> latent)")
    kw = dict(degradation_kwargs or {})
    out_dtype, out_device = z0.dtype, z0.device
    with torch.inference_mode(False), torch.enable_grad():
        y = _normal_tensor(measurement)
        kw = {k: _normal_tensor(v) for k, v in kw.items()}
        z_start = _normal_tensor(z0)
        checked = []

        def residual(image):
            h = degradation(image, **kw)
            if not checked:
                _check_shapes(y, h)
                checked.append(True)
            return _per_batch_mse(y, h)

        if mode == "latent":
            z, iters = _optimise(z_start, lambda z: residual(decoder(z)), steps, lr, tolerance, optimizer)
        else:
            with torch.no_grad():
                img0 = _normal_tensor(decoder(z_start))
            img, iters = _optimise(img0, residual, steps, lr, tolerance, optimizer)
            with torch.no_grad():
                z = _normal_tensor(encoder(img))
        with torch.no_grad():
            rms = residual(decoder(z)).sqrt()
    info = {"rms": rms.float().cpu().tolist(), "iterations": iters.cpu().tolist()}
    return z.to(device=out_device, dtype=out_dtype), info


# ------------------------------------------------------------------------------------------- sampler
def sample_resample(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback=None,
    disable=None,
    *,
    measurement: torch.Tensor,
    degradation: Callable[..., torch.Tensor],
    decoder: Callable[[torch.Tensor], torch.Tensor],
    encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    consistency_every: int = 10,
    consistency_start: int | None = None,
    consistency_stop: int | None = None,
    optimization: str = "auto",
    pixel_until: int | None = None,
    latent_steps: int = 500,
    pixel_steps: int = 2000,
    lr: float = 5e-3,
    pixel_lr: float = 1e-2,
    tolerance: float = 1e-3,
    optimizer: str = "adam",
    gamma: float = 40.0,
    variance: str = "paper",
    final_consistency: bool = True,
    dps_eta: float = 0.0,
    degradation_kwargs: dict | None = None,
    early_stop: int | None = None,
    trace: list | None = None,
    noise_sampler=None,
) -> torch.Tensor:
    """ReSample: DDIM (Euler in sigma space) + hard data consistency + stochastic resampling.

    See the module docstring for the algorithm, the variants and where the defaults come from.

    Args:
        model: ``model(x, sigma_vec, **extra_args) -> z0_hat``.
        x: initial noisy latent, already scaled for ``sigmas[0]``.
        sigmas: decreasing 1-D tensor ending in 0.
        extra_args: passed to the model; ``extra_args["seed"]`` seeds the resampling noise like ComfyUI.
        callback: called each step with ``{'x','i','sigma','sigma_hat','denoised','resample_loss',
            'resample_consistency'}``.
        disable: disables the tqdm progress bar.
        measurement: ``y`` shaped like ``degradation(decoder(z))`` (batch 1 broadcasts over the batch).
        degradation: ``A(image, **degradation_kwargs)``, differentiable.
        decoder: ``D(latent) -> image``, differentiable (latent optimisation and DPS back-propagate through it).
        encoder: ``E(image) -> latent``; needed for pixel optimisation.
        consistency_every: hard consistency every this many steps; ``0`` disables it entirely (also the final
            one): with ``dps_eta = 0`` the sampler is then plain Euler/DDIM, bit-exactly.
        consistency_start, consistency_stop: step-index window ``[start, stop)``; defaults ``n_steps // 3`` and
            ``n_steps`` (see :func:`consistency_schedule`).
        optimization: ``"latent"``, ``"pixel"`` or ``"auto"`` (see the module docstring).
        pixel_until: with ``"auto"`` and an encoder, pixel optimisation at steps ``< pixel_until`` (default
            ``n_steps - n_steps // 3``), latent optimisation from there on.
        latent_steps, lr: iterations cap and learning rate of latent optimisation.
        pixel_steps, pixel_lr: iterations cap and learning rate of pixel optimisation.
        tolerance: per-element RMS residual at which the optimisation of that element stops.
        optimizer: ``"adam"`` or ``"sgd"``.
        gamma: resampling variance scale (``inf``: re-noise ``z0_y``; ``0``: keep the DDIM sample).
        variance: ``"paper"`` or ``"reference"`` resampling variance schedule.
        final_consistency: optimise the final sample once more (as the reference code does); only when
            consistency is enabled (``consistency_every > 0``).
        dps_eta: DPS step between the DDIM update and resampling, ``dps_eta * abar(sigma_i)`` times the VP-space
            gradient of ``sum_b ||y_b - A(D(z0_hat_b))||`` w.r.t. ``x`` through the model (0 = no gradients).
        degradation_kwargs: keyword arguments for every degradation call.
        early_stop: step index ``k``: return ``z0_hat`` of step ``k`` (no final consistency).
        trace: list to which one dict per step is appended: ``{"step", "sigma", "loss": [B] ||y - A(D(z0_hat))||,
            "consistency": bool, "mode": "latent"/"pixel"/None, "consistency_loss": [B] RMS residual after the
            optimisation (empty if none), "iterations": [B]}``; the last entry also gets ``"final": {"rms",
            "iterations"}`` when the final consistency ran.
        noise_sampler: optional ``(sigma, sigma_next) -> noise`` for resampling; default ComfyUI's seeded one.

    Returns:
        The final latent (or ``z0_hat`` at ``early_stop``).
    """
    extra_args = {} if extra_args is None else extra_args
    if measurement is None or not isinstance(measurement, torch.Tensor):
        raise ValueError("ReSample needs measurement= (a tensor shaped like degradation(decoder(latent)))")
    if degradation is None or not callable(degradation):
        raise ValueError("ReSample needs degradation= (a callable A(image, **degradation_kwargs))")
    if decoder is None or not callable(decoder):
        raise ValueError("ReSample needs decoder= (a differentiable callable D(latent) -> image)")
    if encoder is not None and not callable(encoder):
        raise ValueError(f"encoder must be a callable E(image) -> latent or None, got {type(encoder).__name__}")
    optimization = _choice("optimization", optimization, OPTIMIZATION_MODES)
    if optimization == "pixel" and encoder is None:
        raise ValueError("optimization='pixel' needs encoder= (a callable E(image) -> latent)")
    optimizer = _choice("optimizer", optimizer, OPTIMIZERS)
    variance = _choice("variance", variance, VARIANCE_SCHEDULES)
    latent_steps = _as_int("latent_steps", latent_steps)
    pixel_steps = _as_int("pixel_steps", pixel_steps)
    pixel_until = _as_int("pixel_until", pixel_until, allow_none=True)
    lr = _as_float("lr", lr, allow_equal=False)
    pixel_lr = _as_float("pixel_lr", pixel_lr, allow_equal=False)
    tolerance = _as_float("tolerance", tolerance)
    gamma = _as_float("gamma", gamma, allow_inf=True)
    dps_eta = _as_float("dps_eta", dps_eta)
    n_steps = len(sigmas) - 1
    if early_stop is not None:
        if isinstance(early_stop, bool) or not isinstance(early_stop, int):
            raise ValueError(f"early_stop must be an int step index or None, got {early_stop!r}")
        if not 0 <= early_stop < n_steps:
            raise ValueError(f"early_stop={early_stop} is out of range for {n_steps} steps (0..{n_steps - 1})")
    schedule = set(consistency_schedule(sigmas, consistency_every, consistency_start, consistency_stop))
    if n_steps < 1:
        return x
    enabled = consistency_every > 0
    if pixel_until is None:
        pixel_until = n_steps - n_steps // 3

    def mode_at(i: int | None) -> str:
        if optimization == "auto":
            return "pixel" if encoder is not None and i is not None and i < pixel_until else "latent"
        return optimization

    with torch.inference_mode(False):
        y = _normal_tensor(measurement)
        deg_kwargs = {k: _normal_tensor(v) for k, v in (degradation_kwargs or {}).items()}

    def consistency(z0, mode):
        return hard_consistency(
            z0,
            y,
            degradation,
            decoder,
            encoder=encoder,
            mode=mode,
            steps=latent_steps if mode == "latent" else pixel_steps,
            lr=lr if mode == "latent" else pixel_lr,
            tolerance=tolerance,
            optimizer=optimizer,
            degradation_kwargs=deg_kwargs,
        )

    if noise_sampler is None and schedule:
        noise_sampler = make_noise_sampler(x, seed=extra_args.get("seed", None))
    s_in = x.new_ones([x.shape[0]])
    checked: list[bool] = []

    def measure(z0: torch.Tensor) -> torch.Tensor:
        h = degradation(decoder(z0), **deg_kwargs)
        if not checked:
            _check_shapes(y, h)
            checked.append(True)
        return _per_batch_l2(y, h)
    entry: dict | None = None

    steps = _trange(n_steps, disable=disable) if _trange is not None else range(n_steps)
    for i in steps:
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_f, sigma_next_f = float(sigma), float(sigma_next)
        guided = dps_eta > 0 and early_stop != i
        cons = i in schedule and early_stop != i
        report = trace is not None or callback is not None
        g_z = None

        if guided:
            denoised, loss, _extra, g_z = guided_estimate(model, x, sigma, s_in, extra_args, measure)
        else:
            denoised, loss = plain_estimate(model, x, sigma, s_in, extra_args, measure,
                                            need_loss=report or not checked)

        entry = None
        if trace is not None:
            entry = {
                "step": i,
                "sigma": sigma_f,
                "loss": loss.float().cpu().tolist(),
                "consistency": cons,
                "mode": mode_at(i) if cons else None,
                "consistency_loss": [],
                "iterations": [],
            }
            trace.append(entry)
        if callback is not None:
            callback(
                {
                    "x": x,
                    "i": i,
                    "sigma": sigma,
                    "sigma_hat": sigma,
                    "denoised": denoised,
                    "resample_loss": loss,
                    "resample_consistency": cons,
                }
            )
        if early_stop == i:
            return denoised

        with torch.no_grad():
            x_next = euler_step(x, denoised, sigma, sigma_next)
            if g_z is not None:
                step_size = dps_eta * (1.0 / (1.0 + sigma_f * sigma_f))  # dps_eta * abar(sigma_i)
                x_next = x_next - (step_size * math.sqrt(1.0 + sigma_next_f * sigma_next_f)) * g_z
        if cons:
            z0_y, info = consistency(denoised, mode_at(i))
            if entry is not None:
                entry["consistency_loss"] = info["rms"]
                entry["iterations"] = info["iterations"]
            with torch.no_grad():
                noise = noise_sampler(sigma, sigma_next)
                x_next = stochastic_resample(z0_y, x_next, sigma_next_f, sigma_f, gamma, noise, variance)
        x = x_next

    if enabled and final_consistency:
        z, info = consistency(x, mode_at(None))
        if entry is not None:
            entry["final"] = info
        x = z.to(device=x.device, dtype=x.dtype)
    return x
