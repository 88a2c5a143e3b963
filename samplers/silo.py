"""SILO sampler: latent-operator guided diffusion restoration (Raphaeli, Man & Elad, ICCV 2025).

Pure torch, ComfyUI ``KSAMPLER`` calling convention (never imports ComfyUI)::

    sample_silo(model, x, sigmas, extra_args=None, callback=None, disable=None, *, measurement, operator, ...)

``model(x, sigma_vec, **extra_args)`` returns the denoised estimate ``z0_hat`` (CFG already applied);
``x`` is in ComfyUI's sigma space ``x = z0 + sigma * eps`` and arrives scaled for ``sigmas[0]``.

Paper step and its translation to sigma space
---------------------------------------------
The paper works in VP space (``z_t = sqrt(alpha_bar) z0 + sqrt(1 - alpha_bar) eps``) and does, per step::

    loss     = || w - H(z0_hat(z_t)) ||_2                  (plain L2 norm, not squared)
    z_{t-1}  = DDPM(z_t) - eta * clamp(grad_{z_t} loss, -1, 1)

ComfyUI's sampler state is ``x = z_t / sqrt(alpha_bar) = z_t * sqrt(1 + sigma**2)``.  Hence

* ``grad_{z_t} loss = grad_x loss * dx/dz_t = grad_x loss * sqrt(1 + sigma_i**2)``;
* a VP-space displacement ``delta_z`` at the next level is ``delta_x = delta_z * sqrt(1 + sigma_{i+1}**2)``.

So the exact sigma-space step is::

    g_z    = grad_x loss * sqrt(1 + sigma_i**2)
    x_next = update(x, z0_hat, sigma_i, sigma_{i+1}) - eta_i * clamp(g_z, -c, c) * sqrt(1 + sigma_{i+1}**2)

with ``c = grad_clamp`` (1 in the paper; None disables clamping).  At the last step ``sigma_{i+1} = 0``
and the factor is 1.  ``update="ddpm"`` is the paper's DDPM ancestral step (ComfyUI's ``ddpm``);
``update="euler"`` is deterministic DDIM (ComfyUI's ``euler``).

Gradient modes
--------------
* ``gradient="unet"`` (the paper / DPS): back-propagate through the denoiser and the operator to ``x``.
* ``gradient="x0"`` (fast, low VRAM): the denoiser runs without a graph; only the operator is
  back-propagated, to ``z0_hat``.  Since ``z0_hat = x - sigma * eps_hat(x)``, ``d z0_hat / d x = I`` when
  the eps-network's Jacobian is neglected, so ``grad_{z0_hat}`` stands in for ``grad_x`` and is scaled
  to VP space by the same ``sqrt(1 + sigma_i**2)``.

Only ``torch.autograd.grad`` w.r.t. the input is used: model parameters never get ``.grad`` and the
graph is freed after every step.  Guidance runs under ``torch.inference_mode(False)`` +
``torch.enable_grad()`` so it works inside ComfyUI's inference mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .steps import STOCHASTIC_UPDATES, get_update, make_noise_sampler

try:  # progress bar like ComfyUI's samplers; optional
    from tqdm.auto import trange as _trange
except ImportError:  # pragma: no cover - tqdm ships with ComfyUI
    _trange = None

__all__ = ["ETA_SCHEDULES", "GRADIENT_MODES", "SILO_OPTIONS", "sample_silo"]

GRADIENT_MODES = ("unet", "x0")
ETA_SCHEDULES = ("constant", "sigma")

#: Keyword options of :func:`sample_silo` (usable as KSAMPLER ``extra_options``): defaults and docs.
SILO_OPTIONS: dict[str, dict[str, Any]] = {
    "measurement": {"default": None, "doc": "Degraded measurement w in operator-output space (required)."},
    "operator": {"default": None, "doc": "Callable H(z0_hat, **operator_kwargs) -> tensor shaped like w (required)."},
    "eta": {"default": 0.5, "doc": "Guidance step size (paper's eta, VP space). 0 = plain sampler, no gradients."},
    "update": {
        "default": "ddpm",
        "choices": ("ddpm", "euler"),
        "doc": "Base step: DDPM ancestral (paper) or Euler/DDIM.",
    },
    "gradient": {
        "default": "unet",
        "choices": GRADIENT_MODES,
        "doc": "'unet': backprop through the denoiser (paper); 'x0': operator-only gradient (fast, low VRAM).",
    },
    "grad_clamp": {"default": 1.0, "doc": "Element-wise clamp of the VP-space gradient (paper: 1). None = no clamp."},
    "eta_schedule": {
        "default": "constant",
        "choices": ETA_SCHEDULES,
        "doc": "'constant' (paper); 'sigma': eta * sqrt(1-alpha_bar_i)/sqrt(1-alpha_bar_0), decays to 0; "
        "or a callable (i, sigma) -> factor multiplying eta.",
    },
    "operator_kwargs": {
        "default": None,
        "doc": "Extra keyword arguments for every operator call (e.g. mask, sigma_y).",
    },
    "early_stop": {
        "default": None,
        "doc": "Step index k: return z0_hat of step k instead of finishing. None = run all.",
    },
    "trace": {"default": None, "doc": "List to append per-step diagnostics {step, sigma, loss, grad_norm, eta}."},
    "noise_sampler": {
        "default": None,
        "doc": "Optional noise source (sigma, sigma_next) -> noise; default seeded like ComfyUI.",
    },
    "extra_loss": {
        "default": None,
        "doc": "Optional callable z0_hat -> [B] loss added to the measurement loss before the gradient "
        "(e.g. PSLD's gluing term); recorded in the trace as 'extra_loss'. None = SILO as in the paper.",
    },
}


def _vp_noise_fraction(sigma: float) -> float:
    """``sqrt(1 - alpha_bar) = sigma / sqrt(1 + sigma**2)``."""
    return sigma / math.sqrt(1.0 + sigma * sigma)


def _make_eta_fn(eta: float, eta_schedule, sigma0: float) -> Callable[[int, float], float]:
    if callable(eta_schedule):
        return lambda i, s: eta * float(eta_schedule(i, s))
    if eta_schedule == "constant":
        return lambda i, s: eta
    if eta_schedule == "sigma":
        ref = _vp_noise_fraction(sigma0)
        if ref <= 0:
            return lambda i, s: 0.0
        return lambda i, s: eta * _vp_noise_fraction(s) / ref
    allowed = ", ".join(repr(k) for k in ETA_SCHEDULES)
    raise ValueError(
        f"eta_schedule={eta_schedule!r} is not known; allowed values: {allowed}, or a callable (i, sigma) -> float"
    )


def _normal_tensor(t):
    """Detach and, for inference tensors, clone into a normal tensor (call under inference_mode(False))."""
    if isinstance(t, torch.Tensor):
        t = t.detach()
        if t.is_inference():
            t = t.clone()
    return t


def _per_batch_l2(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``|| w_b - h_b ||_2`` over all non-batch dims -> shape [B]."""
    diff = w.to(device=h.device, dtype=h.dtype) - h
    return torch.linalg.vector_norm(diff.reshape(diff.shape[0], -1), ord=2, dim=1)


def _check_shapes(measurement: torch.Tensor, h: torch.Tensor) -> None:
    m, o = tuple(measurement.shape), tuple(h.shape)
    if m == o:
        return
    if len(m) == len(o) and len(m) >= 1 and m[0] == 1 and m[1:] == o[1:]:
        return  # one measurement broadcast over the batch
    raise ValueError(
        f"SILO measurement shape {m} does not match the operator output shape {o} "
        f"(operator applied to the denoised latent); the measurement must have the operator's output shape "
        f"(batch {o[0]} or 1)"
    )


def _check_extra(extra, loss: torch.Tensor) -> torch.Tensor:
    if not isinstance(extra, torch.Tensor) or tuple(extra.shape) != tuple(loss.shape):
        got = tuple(extra.shape) if isinstance(extra, torch.Tensor) else type(extra).__name__
        raise ValueError(f"extra_loss must return a per-batch loss tensor of shape {tuple(loss.shape)}, got {got}")
    return extra.to(device=loss.device, dtype=loss.dtype)


def guided_estimate(model, x, sigma, s_in, extra_args, measure, *, gradient="unet", extra_loss=None):
    """One guided model evaluation, shared by the guided samplers.

    Returns ``(z0_hat, loss, extra, g_vp)``: the detached denoised estimate, the per-batch ``measure(z0_hat)``, the
    per-batch ``extra_loss(z0_hat)`` (None without one) and the gradient of their sum — w.r.t. ``x`` through the
    model (``gradient="unet"``) or at ``z0_hat`` (``"x0"``) — scaled to VP space by ``sqrt(1 + sigma**2)``.
    """
    sigma_f = float(sigma)
    extra = None
    if gradient == "x0":  # plain forward in the caller's mode (no graph, no copy of x)
        with torch.no_grad():
            denoised_ng = model(x, sigma * s_in, **extra_args)
    with torch.inference_mode(False), torch.enable_grad():
        if gradient == "unet":
            x_in = _normal_tensor(x).requires_grad_(True)
            denoised_g = model(x_in, _normal_tensor(sigma * s_in), **extra_args)
            target = x_in
        else:
            denoised_g = _normal_tensor(denoised_ng).requires_grad_(True)
            del denoised_ng
            target = denoised_g
        loss = measure(denoised_g)
        if extra_loss is None:
            (grad,) = torch.autograd.grad(loss.sum(), target)
        else:
            extra = _check_extra(extra_loss(denoised_g), loss)
            (grad,) = torch.autograd.grad((loss + extra).sum(), target)
            extra = extra.detach()
    denoised = denoised_g.detach()
    loss = loss.detach()
    del denoised_g, target
    with torch.no_grad():
        g_z = grad.to(x.dtype) * math.sqrt(1.0 + sigma_f * sigma_f)
    return denoised, loss, extra, g_z


def plain_estimate(model, x, sigma, s_in, extra_args, measure, need_loss: bool):
    """An unguided model evaluation: ``(z0_hat, measure(z0_hat) or None)``, no graph."""
    with torch.no_grad():
        denoised = model(x, sigma * s_in, **extra_args)
        return denoised, (measure(denoised) if need_loss else None)


def sample_silo(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback=None,
    disable=None,
    *,
    measurement: torch.Tensor,
    operator: Callable[..., torch.Tensor],
    eta: float = 0.5,
    update: str = "ddpm",
    gradient: str = "unet",
    grad_clamp: float | None = 1.0,
    eta_schedule="constant",
    operator_kwargs: dict | None = None,
    early_stop: int | None = None,
    trace: list | None = None,
    noise_sampler=None,
    extra_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """SILO guided sampling (see the module docstring for the derivation of the step).

    Per step ``i``: ``z0_hat = model(x, sigma_i)``, ``loss_b = ||w_b - H(z0_hat)_b||_2``; the gradient of
    ``sum_b loss_b`` (w.r.t. ``x`` through the model for ``gradient="unet"``, w.r.t. ``z0_hat`` for
    ``"x0"``) is scaled to VP space by ``sqrt(1 + sigma_i**2)``, clamped to ``[-grad_clamp, grad_clamp]``,
    and ``eta_i * clamped * sqrt(1 + sigma_{i+1}**2)`` is subtracted from the base update.

    Args:
        model: ``model(x, sigma_vec, **extra_args) -> z0_hat``.
        x: initial noisy latent, already scaled for ``sigmas[0]``.
        sigmas: decreasing 1-D tensor ending in 0.
        extra_args: passed to the model; ``extra_args["seed"]`` seeds the DDPM noise exactly like ComfyUI.
        callback: called each step with ``{'x','i','sigma','sigma_hat','denoised','silo_loss','silo_eta'}``.
        disable: disables the tqdm progress bar.
        measurement: measurement ``w`` (operator output shape; batch 1 broadcasts over the batch).
        operator: ``H(z0_hat, **operator_kwargs)``; must be differentiable for guidance.
        eta: guidance step size (paper's eta); ``0`` skips all gradient work and reproduces the plain
            ``update`` sampler bit-exactly.
        update: ``"ddpm"`` (paper, ancestral) or ``"euler"`` (deterministic DDIM).
        gradient: ``"unet"`` (paper) or ``"x0"`` (operator-only, fast).
        grad_clamp: element-wise clamp of the VP-space gradient; None disables.
        eta_schedule: ``"constant"``, ``"sigma"`` (``eta * sqrt(1-abar_i)/sqrt(1-abar_0)``: eta at the first
            step, decaying to 0 with the noise level) or a callable ``(i, sigma) -> float`` returning a
            factor that multiplies ``eta`` at step ``i`` (``sigma`` as a Python float).
        operator_kwargs: keyword arguments for every operator call.
        early_stop: step index ``k``: return ``z0_hat`` computed at step ``k`` (the distortion-oriented
            output) instead of finishing; None runs to the end.
        trace: a list to which one dict per step is appended:
            ``{"step", "sigma", "eta", "loss": [B floats], "grad_norm": [B floats]}`` (``grad_norm`` is
            the L2 norm of the unclamped VP-space gradient; empty when no gradient was taken).
        noise_sampler: optional ``(sigma, sigma_next) -> noise``; default is ComfyUI's seeded sampler.
        extra_loss: optional ``extra_loss(z0_hat) -> [B]`` added to ``loss_b`` before the gradient is
            taken (differentiable; e.g. PSLD's gluing term).  Each trace entry then also has
            ``"extra_loss": [B floats]`` (computed without gradients on unguided steps); ``"loss"`` and the
            callback's ``silo_loss`` stay the measurement term.  None (default) changes nothing.

    Returns:
        The final sample (or ``z0_hat`` at ``early_stop``).
    """
    extra_args = {} if extra_args is None else extra_args
    operator_kwargs = {} if operator_kwargs is None else dict(operator_kwargs)
    step_fn = get_update(update)
    if gradient not in GRADIENT_MODES:
        allowed = ", ".join(repr(k) for k in GRADIENT_MODES)
        raise ValueError(f"gradient={gradient!r} is not a known gradient mode; allowed values: {allowed}")
    if measurement is None or not isinstance(measurement, torch.Tensor):
        raise ValueError("SILO needs measurement= (a tensor shaped like the operator output)")
    if operator is None or not callable(operator):
        raise ValueError("SILO needs operator= (a callable H(z0_hat, **operator_kwargs))")
    if extra_loss is not None and not callable(extra_loss):
        raise ValueError(f"extra_loss must be None or a callable z0_hat -> [B] tensor, got {type(extra_loss).__name__}")
    eta = float(eta)
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    if grad_clamp is not None:
        grad_clamp = float(grad_clamp)
        if not grad_clamp > 0:
            raise ValueError(f"grad_clamp must be > 0 or None, got {grad_clamp}")
    n_steps = len(sigmas) - 1
    if early_stop is not None:
        if isinstance(early_stop, bool) or not isinstance(early_stop, int):
            raise ValueError(f"early_stop must be an int step index or None, got {early_stop!r}")
        if not 0 <= early_stop < n_steps:
            raise ValueError(f"early_stop={early_stop} is out of range for {n_steps} steps (0..{n_steps - 1})")
    eta_fn = _make_eta_fn(eta, eta_schedule, float(sigmas[0]) if len(sigmas) else 0.0)
    if n_steps < 1:
        return x

    # Measurement and tensor operator kwargs: detached, and out of inference mode so that autograd may save them.
    with torch.inference_mode(False):
        w = _normal_tensor(measurement)
        op_kwargs = {k: _normal_tensor(v) for k, v in operator_kwargs.items()}

    if noise_sampler is None and update in STOCHASTIC_UPDATES:
        noise_sampler = make_noise_sampler(x, seed=extra_args.get("seed", None))
    s_in = x.new_ones([x.shape[0]])
    checked: list[bool] = []

    def measure(z0: torch.Tensor) -> torch.Tensor:
        h = operator(z0, **op_kwargs)
        if not checked:
            _check_shapes(w, h)
            checked.append(True)
        return _per_batch_l2(w, h)

    steps = _trange(n_steps, disable=disable) if _trange is not None else range(n_steps)
    for i in steps:
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_f, sigma_next_f = float(sigma), float(sigma_next)
        eta_i = 0.0 if eta == 0 else eta_fn(i, sigma_f)
        guided = eta_i != 0 and early_stop != i
        report = trace is not None or callback is not None
        g_z = None
        extra = None

        if guided:
            denoised, loss, extra, g_z = guided_estimate(model, x, sigma, s_in, extra_args, measure,
                                                         gradient=gradient, extra_loss=extra_loss)
        else:
            denoised, loss = plain_estimate(model, x, sigma, s_in, extra_args, measure,
                                            need_loss=report or not checked)
            if extra_loss is not None and trace is not None:
                with torch.no_grad():
                    extra = _check_extra(extra_loss(denoised), loss)

        if trace is not None:
            entry = {
                "step": i,
                "sigma": sigma_f,
                "eta": float(eta_i) if guided else 0.0,
                "loss": loss.float().cpu().tolist(),
                "grad_norm": []
                if g_z is None
                else torch.linalg.vector_norm(g_z.reshape(g_z.shape[0], -1), dim=1).float().cpu().tolist(),
            }
            if extra_loss is not None:
                entry["extra_loss"] = extra.float().cpu().tolist()
            trace.append(entry)
        if callback is not None:
            callback(
                {
                    "x": x,
                    "i": i,
                    "sigma": sigma,
                    "sigma_hat": sigma,
                    "denoised": denoised,
                    "silo_loss": loss,
                    "silo_eta": float(eta_i) if guided else 0.0,
                }
            )
        if early_stop == i:
            return denoised

        with torch.no_grad():
            x_next = step_fn(x, denoised, sigma, sigma_next, noise_sampler)
            if g_z is not None:
                if grad_clamp is not None:
                    g_z = g_z.clamp(-grad_clamp, grad_clamp)
                x_next = x_next - (eta_i * math.sqrt(1.0 + sigma_next_f * sigma_next_f)) * g_z
        x = x_next
    return x
