"""SILO sampler: latent-operator guided diffusion restoration (Raphaeli, Man & Elad, ICCV 2025).

Pure torch, ComfyUI ``KSAMPLER`` calling convention (never imports ComfyUI)::

    sample_silo(model, x, sigmas, extra_args=None, callback=None, disable=None, *, measurement, operator,
                settings=None, **setting_values)

``model(x, sigma_vec, **extra_args)`` returns the denoised estimate ``z0_hat`` (CFG already applied).

The paper's step, in VP space (``z_t = sqrt(abar) z0 + sqrt(1 - abar) eps``)::

    loss     = || w - H(z0_hat(z_t)) ||_2                  (plain L2 norm, not squared)
    z_{t-1}  = DDPM(z_t) - eta * clamp(grad_{z_t} loss, -1, 1)

is exactly the guided loop's step (:mod:`.core`) with the operator loss: the loop maps the gradient to VP units
and the VP displacement back to the state for either parameterization (:mod:`.parameterization`; for the
original ``x = z0 + sigma eps`` state the factors are ``sqrt(1 + sigma_i^2)`` and ``sqrt(1 + sigma_{i+1}^2)``).
``update="ddpm"`` is the paper's DDPM ancestral step, ``"euler"`` deterministic DDIM.

Gradient modes: ``"unet"`` (the paper / DPS) back-propagates through the denoiser and the operator to ``x``;
``"x0"`` (fast, low VRAM) runs the denoiser without a graph and back-propagates the operator only, to ``z0_hat``,
which stands in for ``x`` (``d z0_hat / d x = I`` with the network's Jacobian neglected).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .core import (
    Guidance,
    GuidanceSettings,
    MeasurementLoss,
    Needs,
    Progress,
    Solver,
    early_stop_field,
    eta_field,
    eta_mode_field,
    eta_schedule_field,
    grad_clamp_field,
    gradient_field,
    guided_sample,
    normal_tensor,
    require_callables,
    split_options,
    update_field,
)
from .parameterization import Parameterization

__all__ = ["SiloSettings", "SiloSolver", "sample_silo"]


@dataclasses.dataclass(frozen=True)
class SiloSettings(GuidanceSettings):
    """SILO's settings, declared once: the node widgets (in this order), the CLI and validation derive from them."""

    OWNER = "SILO"
    NEEDS = Needs(operator=True)

    eta: float = eta_field(0.5, 100.0, "Guidance strength η (paper: 0.5; 1.0 for inpainting; larger with fewer "
                                       "steps); with eta_mode auto, the most the automatic step may use. 0 = plain "
                                       "sampling.")
    update: str = update_field("ddpm: the paper's ancestral DDPM step. euler: deterministic DDIM/Euler step.")
    gradient: str = gradient_field("unet: back-propagate through the UNet (the paper). x0: gradient at the denoised "
                                   "estimate only — faster, much less VRAM.")
    grad_clamp: float | None = grad_clamp_field(1.0, "Element-wise gradient clamp (paper: 1.0); 0 = off.")
    early_stop: int | None = early_stop_field("-1: run to the end (perception-optimised). k: return the denoised "
                                              "estimate at step k (smoother, distortion-optimised).")
    eta_schedule: str = eta_schedule_field("constant (the paper), or sigma: η times the VP noise fraction "
                                           "sqrt(1 − ᾱ) relative to the first step's (decays to 0).")
    eta_mode: str = eta_mode_field()


class SiloSolver(Solver):
    """SILO's loss ``|| w - H(z0_hat, **operator_kwargs) ||`` (+ an optional ``extra_loss(z0_hat) -> [B]``)."""

    name = "SILO"
    key = "silo"

    def __init__(self, measurement: torch.Tensor, operator: Callable[..., torch.Tensor],
                 operator_kwargs: dict | None = None, extra_loss: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if measurement is None or not isinstance(measurement, torch.Tensor):
            raise ValueError("SILO needs measurement= (a tensor shaped like the operator output)")
        require_callables("SILO", operator=(operator, "H(z0_hat, **operator_kwargs)", False),
                          extra_loss=(extra_loss, "z0_hat -> [B] tensor", True))
        with torch.inference_mode(False):  # detached, out of inference mode so that autograd may save them
            kwargs = {k: normal_tensor(v) for k, v in (operator_kwargs or {}).items()}
        self._loss = MeasurementLoss("SILO", measurement, lambda z: operator(z, **kwargs),
                                     "operator output shape {shape} (operator applied to the denoised latent)")
        self._extra = extra_loss
        self.has_extra = extra_loss is not None

    def loss(self, z0: torch.Tensor) -> torch.Tensor:
        return self._loss(z0)

    def extra(self, z0: torch.Tensor) -> torch.Tensor | None:
        return self._extra(z0)


def sample_silo(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None, callback=None,
                disable=None, *, measurement: torch.Tensor, operator: Callable[..., torch.Tensor],
                settings: SiloSettings | None = None, operator_kwargs: dict | None = None, trace: list | None = None,
                noise_sampler=None, extra_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
                progress: Progress | None = None, parameterization: Parameterization | str = "vp",
                noise_floor=None, partial_measurement: bool | None = None, **options) -> torch.Tensor:
    """SILO guided sampling (KSAMPLER function; see the module docstring and :mod:`.core` for the step).

    Args:
        model, x, sigmas, extra_args, callback, disable: ComfyUI's KSAMPLER arguments (``x`` already scaled for
            ``sigmas[0]``, ``sigmas`` decreasing to 0, ``extra_args["seed"]`` seeds the DDPM noise like ComfyUI;
            the callback also gets ``silo_loss`` and ``silo_eta``).
        measurement: ``w`` in operator-output space (batch 1 broadcasts over the batch).
        operator: differentiable ``H(z0_hat, **operator_kwargs)``.
        settings: a :class:`SiloSettings`; ``**options`` are its fields by name (widget values: ``grad_clamp=0``
            and ``early_stop=-1`` mean off, as do None), laid over it.  ``eta_schedule`` may also be a callable
            ``(i, sigma) -> factor`` multiplying eta at step ``i``.  ``eta = 0`` reproduces the plain ``update``
            sampler bit-exactly with no gradient work.
        operator_kwargs: keyword arguments for every operator call (e.g. mask, sigma_y).
        trace: list receiving one dict per step ``{"step", "sigma", "eta", "loss": [B], "grad_norm": [B]}``
            (``grad_norm``: L2 norm of the unclamped VP-unit gradient, empty when unguided; ``"extra_loss"`` too
            with an ``extra_loss``).
        noise_sampler: optional ``(sigma, sigma_next) -> noise``; default ComfyUI's seeded sampler.
        extra_loss: optional differentiable ``z0_hat -> [B]`` added to the loss before the gradient.
        progress: optional ``progress(phase, done, total)`` called after every step.
        parameterization: the model's noise parameterization (``"vp"``, ``"flow"`` or a
            :class:`~.parameterization.Parameterization`; the node glue reads it from the model).
        noise_floor: the loss expected at the true image, ``E || w - H(E(x)) ||`` (one value or one per batch
            element; the node glue estimates it at Encode Measurement and adds the operator's held-out error).
            Needed by ``eta_mode="auto"`` (η is then set every step, at most ``eta``); with it, the trace also
            records the floor.
        partial_measurement: whether the photo was measured only in part (super-resolution, inpainting; the
            node glue reads it from the degradation): ``eta_mode="auto"`` then comes down from the first step's
            residual instead of following the floor (default: not partial).

    Returns:
        The final sample (or ``z0_hat`` at ``early_stop``).
    """
    settings, schedule = split_options(SiloSettings, settings, options)
    solver = SiloSolver(measurement, operator, operator_kwargs, extra_loss)
    return guided_sample(model, x, sigmas, extra_args, callback, disable, solver=solver,
                         guidance=Guidance.of(settings, parameterization, schedule, noise_floor=noise_floor,
                                              partial_measurement=partial_measurement), trace=trace,
                         noise_sampler=noise_sampler, progress=progress)
