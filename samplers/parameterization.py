"""Noise parameterizations of the sampler state, and their map to the papers' VP units (pure torch).

ComfyUI hands a sampler the state ``x`` at noise level ``sigma`` in the model's own parameterization:

* ``"vp"`` (eps- and v-prediction models, ComfyUI's ``EPS`` / ``V_PREDICTION``): ``x = z0 + sigma * eps``;
* ``"flow"`` (flow-matching models: SD3.x, Flux, ... ComfyUI's ``CONST``): ``x = (1 - sigma) z0 + sigma * eps``.

Both are ``x = a(sigma) z0 + b(sigma) eps`` (``a = 1, b = sigma`` for vp; ``a = 1 - sigma, b = sigma`` for flow).
The papers (SILO, DPS, PSLD, ReSample) work in the variance-preserving latent
``z_t = sqrt(abar) z0 + sqrt(1 - abar) eps``.  The same noise-to-signal ratio ``b / a`` gives

    abar = a^2 / (a^2 + b^2),      z_t = x / k(sigma),      k(sigma) = sqrt(a^2 + b^2)

(vp: ``k = sqrt(1 + sigma^2)``; flow: ``k = sqrt((1 - sigma)^2 + sigma^2)``, which is 1 at both ends), and the
variance-exploding level ``sigma_ve = b / a`` (infinite at the flow model's ``sigma = 1``).  Everything the guided
loop needs from the parameterization is here:

* **VP units of the gradient**: ``grad_{z_t} loss = grad_x loss * k(sigma_i)``; a VP-space displacement ``d_z`` at
  the next level is ``d_x = d_z * k(sigma_{i+1})``.  So ``eta`` means the same thing for every model family: the
  papers' step size on the VP latent, ``z_{t-1} = DDPM(z_t) - eta * clamp(grad_{z_t} loss)``.
* **x0 gradient mode**: ComfyUI's denoised estimate is ``x - sigma * out`` for eps (``out = eps``) and for flow
  models (``out = v``); with the network's Jacobian neglected ``d z0_hat / d x = I`` for both (the Jacobian factor
  is 1), so ``grad_{z0_hat}`` stands in for ``grad_x`` and goes through the same ``k(sigma_i)``.  (Neglecting an
  eps-network's Jacobian in the flow state would give ``1 / (1 - sigma)``, infinite at ``sigma = 1``; the flow
  models' own output is v, so the v-network's Jacobian is the one neglected.)
* **eta 'sigma' schedule**: the VP noise fraction ``sqrt(1 - abar) = b / k`` (:meth:`noise_fraction`).
* **update rules**: ``"euler"`` is the same arithmetic for both (ComfyUI's ``sample_euler``; for flow it is exactly
  deterministic DDIM on the straight path), ``"ddpm"`` is the DDPM ancestral posterior step written in each state
  (:mod:`.steps`).
"""

from __future__ import annotations

import math

from .steps import STOCHASTIC_UPDATES, euler_step, flow_ddpm_step, get_update

__all__ = ["PARAMETERIZATIONS", "Flow", "Parameterization", "VP", "get_parameterization"]


class Parameterization:
    """``x = a(sigma) z0 + b(sigma) eps``; subclasses give ``a`` and the update rules."""

    name = ""

    def signal(self, sigma: float) -> float:
        """``a(sigma)``: the weight of ``z0`` in the state."""
        raise NotImplementedError

    def vp_scale(self, sigma: float) -> float:
        """``k(sigma) = sqrt(a^2 + b^2)``, with ``x = z_t * k`` (``z_t`` the VP latent at the same ``abar``)."""
        raise NotImplementedError

    def alpha_bar(self, sigma: float) -> float:
        """VP signal fraction ``abar = a^2 / (a^2 + b^2)`` at this level."""
        a = self.signal(sigma)
        return a * a / (a * a + float(sigma) ** 2)

    def noise_fraction(self, sigma: float) -> float:
        """``sqrt(1 - abar) = b / k``: the VP noise fraction (drives the eta 'sigma' schedule)."""
        k = self.vp_scale(sigma)
        return float(sigma) / k if k > 0 else 0.0

    def ve_sigma(self, sigma: float) -> float:
        """``b / a``: the variance-exploding level (``x / a = z0 + sigma_ve eps``); inf where ``a = 0``."""
        a = self.signal(sigma)
        return float(sigma) / a if a > 0 else math.inf

    def update(self, name: str):
        """The update rule ``update(x, denoised, sigma, sigma_next, noise_sampler)`` of this name."""
        return get_update(name)

    @staticmethod
    def stochastic(name: str) -> bool:
        return name in STOCHASTIC_UPDATES


class VP(Parameterization):
    """``x = z0 + sigma * eps`` (ComfyUI ``EPS`` / ``V_PREDICTION``): the pack's original math, unchanged."""

    name = "vp"

    def signal(self, sigma: float) -> float:
        return 1.0

    def vp_scale(self, sigma: float) -> float:
        s = float(sigma)
        return math.sqrt(1.0 + s * s)  # same arithmetic as before the parameterization existed (bit-exact)

    def alpha_bar(self, sigma: float) -> float:
        s = float(sigma)
        return 1.0 / (1.0 + s * s)


class Flow(Parameterization):
    """``x = (1 - sigma) z0 + sigma * eps`` (ComfyUI ``CONST``: rectified-flow / flow-matching models)."""

    name = "flow"
    _UPDATES = {"euler": euler_step, "ddpm": flow_ddpm_step}

    def signal(self, sigma: float) -> float:
        return 1.0 - float(sigma)

    def vp_scale(self, sigma: float) -> float:
        s = float(sigma)
        return math.sqrt((1.0 - s) ** 2 + s * s)

    def update(self, name: str):
        get_update(name)  # the error message for an unknown name
        return self._UPDATES[name]


PARAMETERIZATIONS: dict[str, Parameterization] = {"vp": VP(), "flow": Flow()}


def get_parameterization(name) -> Parameterization:
    """The :class:`Parameterization` called ``name`` (``"vp"`` or ``"flow"``); an instance passes through."""
    if isinstance(name, Parameterization):
        return name
    try:
        return PARAMETERIZATIONS[name]
    except (KeyError, TypeError):
        allowed = ", ".join(repr(k) for k in PARAMETERIZATIONS)
        raise ValueError(f"parameterization={name!r} is not known; allowed values: {allowed}") from None

