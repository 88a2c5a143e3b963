"""Single-step update rules shared by SILO and the baseline samplers (pure torch).

``euler_step`` and ``ddpm_step`` work in ComfyUI's *sigma space* for eps-prediction models: the sampler state is
``x = z0 + sigma * eps`` (variance-exploding form).  The variance-preserving latent of DDPM is
``z_t = x / sqrt(1 + sigma**2)`` with ``alpha_bar = 1 / (1 + sigma**2)``.  ``flow_ddpm_step`` is the same DDPM
posterior step for flow-matching models' state ``x = (1 - sigma) z0 + sigma * eps``; ``euler_step`` serves both
(see :mod:`.parameterization`).

The two VP updates re-implement ComfyUI's ``sample_euler`` (without churn) and ``sample_ddpm`` per-step
arithmetic in the same operation order, so that a loop built from them reproduces those samplers
bit-exactly (same seed, same noise draws, same floating-point rounding); ``sample_euler`` is also what
ComfyUI runs for flow models.

Every update has the uniform call signature ``update(x, denoised, sigma, sigma_next, noise_sampler)``
(``euler_step`` ignores the noise sampler), so samplers can pick one by name via :func:`get_update`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "UPDATES",
    "ddpm_step",
    "euler_step",
    "flow_ddpm_step",
    "get_update",
    "make_noise_sampler",
]

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _as_sigma(sigma, like: torch.Tensor) -> torch.Tensor:
    """Return ``sigma`` as a tensor (tensors pass through untouched to keep ComfyUI's arithmetic exact)."""
    if isinstance(sigma, torch.Tensor):
        return sigma
    return torch.as_tensor(sigma, dtype=like.dtype, device=like.device)


def make_noise_sampler(x: torch.Tensor, seed: int | None = None) -> NoiseSampler:
    """Noise source identical to ComfyUI's ``default_noise_sampler(x, seed)``.

    One ``torch.Generator`` on ``x.device`` seeded with ``seed`` (or the global RNG when ``seed`` is
    None); every call draws a fresh standard-normal tensor of ``x``'s size, dtype, layout and device.
    """
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(seed)
    else:
        generator = None
    size, dtype, layout, device = x.size(), x.dtype, x.layout, x.device

    def noise_sampler(sigma, sigma_next):
        return torch.randn(size, dtype=dtype, layout=layout, device=device, generator=generator)

    return noise_sampler


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma, sigma_next, noise_sampler=None) -> torch.Tensor:
    """Deterministic Euler step of the probability-flow ODE ``dx/dsigma = (x - denoised) / sigma``.

    For eps-prediction models in sigma space this is exactly deterministic DDIM (eta = 0).
    Same arithmetic as ComfyUI's ``sample_euler`` with ``s_churn = 0``; ``noise_sampler`` is ignored.
    """
    sigma = _as_sigma(sigma, x)
    sigma_next = _as_sigma(sigma_next, x)
    d = (x - denoised) / sigma[(...,) + (None,) * (x.ndim - sigma.ndim)]
    dt = sigma_next - sigma
    return x + d * dt


def ddpm_step(x: torch.Tensor, denoised: torch.Tensor, sigma, sigma_next, noise_sampler: NoiseSampler) -> torch.Tensor:
    """Ancestral DDPM posterior step ``x_sigma -> x_sigma_next`` (ComfyUI's ``sample_ddpm`` step).

    Moves to VP space (``z = x / sqrt(1 + sigma**2)``), takes the DDPM ancestral step with
    ``alpha = alpha_bar / alpha_bar_next``::

        mu = sqrt(1 / alpha) * (z - (1 - alpha) * eps / sqrt(1 - alpha_bar))
        z_next = mu + sqrt((1 - alpha) * (1 - alpha_bar_next) / (1 - alpha_bar)) * noise   (sigma_next > 0)

    with ``eps = (x - denoised) / sigma``, and maps back with ``x_next = z_next * sqrt(1 + sigma_next**2)``
    (skipped at ``sigma_next == 0`` where the factor is 1).  Noise is drawn with
    ``noise_sampler(sigma, sigma_next)`` only when ``sigma_next > 0``.
    """
    sigma = _as_sigma(sigma, x)
    sigma_next = _as_sigma(sigma_next, x)
    z = x / torch.sqrt(1.0 + sigma**2.0)
    eps = (x - denoised) / sigma
    ac = 1 / ((sigma * sigma) + 1)
    ac_next = 1 / ((sigma_next * sigma_next) + 1)
    alpha = ac / ac_next
    mu = (1.0 / alpha).sqrt() * (z - (1 - alpha) * eps / (1 - ac).sqrt())
    if sigma_next > 0:
        mu += ((1 - alpha) * (1.0 - ac_next) / (1.0 - ac)).sqrt() * noise_sampler(sigma, sigma_next)
    if sigma_next != 0:
        mu *= torch.sqrt(1.0 + sigma_next**2.0)
    return mu


def flow_ddpm_step(x: torch.Tensor, denoised: torch.Tensor, sigma, sigma_next, noise_sampler: NoiseSampler
                   ) -> torch.Tensor:
    """DDPM ancestral posterior step for the flow state ``x = (1 - sigma) z0 + sigma * eps``.

    The flow state at ``sigma`` is the variance-exploding state ``x / (1 - sigma) = z0 + s eps`` at
    ``s = sigma / (1 - sigma)`` (scaled by ``a = 1 - sigma``), and DDPM's posterior ``q(x_next | x, z0)`` is the same
    Gaussian whatever the scaling.  In the VE state it is ``N(z0 + r^2 (x_ve - z0), s_next^2 (1 - r^2))`` with
    ``r = s_next / s`` (what :func:`ddpm_step` computes through VP space); scaled back by ``a_next = 1 - sigma_next``::

        r      = (1 - sigma) sigma_next / ((1 - sigma_next) sigma)
        x_next = (1 - sigma_next)(1 - r^2) z0_hat + (1 - sigma) sigma_next^2 / ((1 - sigma_next) sigma^2) x
                 + sigma_next sqrt(1 - r^2) noise

    written so that it stays finite at the flow models' first level ``sigma = 1`` (``r = 0``: a fresh draw from the
    forward marginal around ``z0_hat``) and lands on ``z0_hat`` at ``sigma_next = 0`` (no noise drawn then).
    ComfyUI has no such sampler for flow models (its ``ddpm`` assumes the VP state); this is the pack's own.
    """
    sigma = _as_sigma(sigma, x)
    sigma_next = _as_sigma(sigma_next, x)
    r = (1.0 - sigma) * sigma_next / ((1.0 - sigma_next) * sigma)
    keep = 1.0 - r * r
    out = ((1.0 - sigma_next) * keep) * denoised + ((1.0 - sigma) * sigma_next**2 / ((1.0 - sigma_next) * sigma**2)) * x
    if sigma_next > 0:
        out = out + (sigma_next * keep.clamp(min=0).sqrt()) * noise_sampler(sigma, sigma_next)
    return out


#: Update rules by name; all share ``update(x, denoised, sigma, sigma_next, noise_sampler)``.
UPDATES: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": ddpm_step,
    "euler": euler_step,
}

#: Updates that draw noise (need a noise sampler).
STOCHASTIC_UPDATES = frozenset({"ddpm"})


def get_update(name: str) -> Callable[..., torch.Tensor]:
    """Look up an update rule by name, raising a ValueError naming the allowed values."""
    try:
        return UPDATES[name]
    except (KeyError, TypeError):
        allowed = ", ".join(repr(k) for k in UPDATES)
        raise ValueError(f"update={name!r} is not a known update rule; allowed values: {allowed}") from None
