"""ReSample (Song, Kwon, Zhang, Hu, Qu & Shen, ICLR 2024, arXiv 2307.08123) as pure torch; never imports ComfyUI.

"Solving Inverse Problems with Latent Diffusion Models via Hard Data Consistency", on the guided loop
(:mod:`.core`) with a post-step.  ``degradation`` (``A``) acts on *decoded images* ``decoder(z)`` (``D``), so the
measurement ``y`` is in pixel/measurement space.  Step ``i`` (``sigma_i -> sigma_{i+1}``)::

    z0_hat = model(x, sigma_i)
    x'     = DDIM(x, z0_hat)                          [- dps_eta * abar_i * grad ||y - A(D(z0_hat))||  (optional)]
    if i is a consistency step:
        z0_y = argmin_z ||y - A(D(z))||^2, started at z0_hat     ("hard data consistency", :mod:`.consistency`)
        x    ~ N(mu, s^2)  around z0_y and x'                     ("stochastic resampling")

DDIM is the Euler step (:func:`~.steps.euler_step`) in both parameterizations (for flow models Euler on the straight
path *is* deterministic DDIM).  ``optimization``: ``"latent"``, ``"pixel"`` or ``"auto"`` (the reference code: pixel
before ``pixel_until``, default the first two thirds of sampling, latent afterwards, when an encoder is given).

*Stochastic resampling* (paper, Sec. 3.2): with ``abar`` the VP signal fraction at the resampling level, ``z'_t``
the unconditional VP sample there and ``v`` a variance,

    z_t ~ N( (v sqrt(abar) z0_y + (1 - abar) z'_t) / (v + 1 - abar),  v (1 - abar) / (v + 1 - abar) I )

In the variance-exploding state (``x_ve = z0 + r eps``, ``abar = 1 / (1 + r^2)``) this is exactly
``x_ve ~ N(x'_ve + w (z0_y - x'_ve), w r^2 I)``, ``w = v' / (v' + r^2)``, ``v' = v (1 + r^2)``.  The vp state *is*
the VE state; the flow state is ``x = a x_ve`` with ``a = 1 - sigma`` and ``a r = sigma``, hence for both

    x ~ N( x' + w (a z0_y - x'),  w sigma^2 I )        (vp: a = 1;  flow: a = 1 - sigma)

with ``w`` computed from the VE levels (see :func:`stochastic_resample`).  The variance follows the paper's schedule
``v = gamma (1 - abar_{t-1}) / abar_t * (1 - abar_t / abar_{t-1})`` (``variance="paper"``) or the reference code's
``v = gamma (1 - abar_{t-1}) / (1 - abar_t) * (1 - abar_t / abar_{t-1})`` (``"reference"``), ``t`` the level the step
starts from (``sigma_prev = sigma_i``), ``t-1`` the level resampled to (``sigma = sigma_{i+1}``).  In VE levels
``w = gamma (s^2 - r^2) / (gamma (s^2 - r^2) + 1)`` ("paper") or ``/ (gamma (s^2 - r^2) + s^2)`` ("reference");
their limits at the flow models' ``s = inf`` (``sigma = 1``) are 1 and ``gamma / (gamma + 1)``.  ``gamma = 0``
keeps ``x'``; ``gamma = inf`` re-noises ``z0_y`` to the level (the paper's "stochastic encoding").

Defaults and where they come from (reference code ``ldm/models/diffusion/ddim.py`` of soominkwon/resample):
consistency every 10 steps, none in the first third of sampling nor at the last step; latent optimisation AdamW
lr 5e-3, at most 500 iterations; pixel optimisation AdamW lr 1e-2, at most 2000 iterations; stop when
``MSE < 1e-3**2``; ``gamma = 40``; a final latent optimisation of the sample after the last step.
Deliberate differences: plain Adam instead of AdamW (whose weight decay slowly shrinks the latent); no plateau
test; no "time travel"; the optimisation starts from the model's own ``z0_hat``; the reference code's always-on
DPS step (``0.5 * abar_t`` times the gradient of ``||y - A(D(z0_hat))||`` w.r.t. ``z_t``) is ``dps_eta`` here
(default 0) with the same ``abar_t`` factor, in VP units like every eta of the pack.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from ..config.fields import setting
from .consistency import OPTIMIZERS, hard_consistency
from .core import (
    Guidance,
    GuidanceSettings,
    MeasurementLoss,
    Progress,
    Solver,
    StepState,
    early_stop_field,
    eta_mode_field,
    guided_sample,
    normal_tensor,
    partial_of,
    require_callables,
    split_options,
)
from .parameterization import Parameterization, get_parameterization

__all__ = ["OPTIMIZATION_MODES", "VARIANCE_SCHEDULES", "ReSampleSettings", "ReSampleSolver", "consistency_schedule",
           "resample_variance", "resample_weight", "sample_resample", "stochastic_resample"]

VARIANCE_SCHEDULES = ("paper", "reference")
OPTIMIZATION_MODES = ("auto", "latent", "pixel")


@dataclasses.dataclass(frozen=True)
class ReSampleSettings(GuidanceSettings):
    """ReSample's settings, declared once (node widgets in this order, CLI, validation)."""

    OWNER = "ReSample"

    consistency_every: int = setting(10, min=0, max=1000,
                                     tooltip="Hard data consistency every this many steps in the later part of "
                                             "sampling (0 = off, plain DDIM).")
    latent_steps: int = setting(500, min=1, max=100000,
                                tooltip="At most this many optimiser iterations per latent-space consistency step "
                                        "(each one a decoder forward+backward).")
    lr: float = setting(5e-3, min=1e-6, max=1.0, step=1e-4, tooltip="Learning rate of that optimiser.")
    optimization: str = setting("auto", choices=OPTIMIZATION_MODES,
                                tooltip="How consistency is enforced. auto (the authors' code): pixel-space "
                                        "optimisation in the middle third of sampling, latent-space in the last "
                                        "third. latent: optimise the latent through the decoder every time (the "
                                        "slowest). pixel: optimise the decoded image, then encode it back (cheapest "
                                        "per iteration).")
    pixel_steps: int = setting(2000, min=1, max=100000,
                               tooltip="At most this many optimiser iterations per pixel-space consistency step (the "
                                       "authors' code: 2000, learning rate 1e-2; cheap: no decoder backward).")
    tolerance: float = setting(1e-3, min=0.0, max=1.0, step=1e-4,
                               tooltip="Stop optimising once the measurement error falls below this.")
    gamma: float = setting(40.0, min=0.0, max=1000.0, step=0.5, allow_inf=True,
                           tooltip="ReSample's γ: variance of the stochastic resampling (the paper: 40).")
    variance: str = setting("paper", choices=VARIANCE_SCHEDULES,
                            tooltip="Resampling variance: 'paper' σ² = γ(1−ᾱ_{t−1})/ᾱ_t·(1−ᾱ_t/ᾱ_{t−1}); 'reference' "
                                    "= γ × the DDPM posterior variance, as the authors' public code computes it.")
    dps_eta: float = setting(0.0, min=0.0, widget_max=100.0, step=0.05,
                             tooltip="DPS guidance every step, through the UNet and the decoder (the authors' code: "
                                     "0.5); with eta_mode auto, the most the automatic step may use. 0 = plain DDIM "
                                     "between consistency steps: this pack's default, much cheaper.")
    early_stop: int | None = early_stop_field()
    consistency_start: int | None = setting(None, kind="int", min=0, widget=False,
                                            tooltip="First step eligible for consistency (default: a third in).")
    consistency_stop: int | None = setting(None, kind="int", min=0, widget=False,
                                           tooltip="Consistency only at steps before this one (default: all).")
    pixel_until: int | None = setting(None, kind="int", min=0, widget=False,
                                      tooltip="'auto': pixel optimisation at steps before this (default: two thirds).")
    pixel_lr: float = setting(1e-2, min=1e-6, max=1.0, widget=False,
                              tooltip="Learning rate of pixel-space optimisation (the authors' code: 1e-2).")
    optimizer: str = setting("adam", choices=OPTIMIZERS, widget=False,
                             tooltip="Optimiser of the consistency problem.")
    final_consistency: bool = setting(True, widget=False,
                                      tooltip="Optimise the final sample once more, as the authors' code does.")
    eta_mode: str = eta_mode_field("fixed: dps_eta is the DPS step size. auto: the DPS steps are set every step "
                                   "from the photo's noise floor; dps_eta is the most they may use (0 = off).")

    def unet_gradient(self) -> bool:
        """Only the optional DPS steps back-propagate through the UNet."""
        return self.dps_eta > 0

    def needs_encoder(self) -> bool:
        """Pixel-space optimisation encodes the optimised image back (``auto`` and ``pixel``)."""
        return True


# ------------------------------------------------------------------------------------------- resampling maths
def _check_variance(variance: str) -> None:
    if variance not in VARIANCE_SCHEDULES:
        allowed = ", ".join(map(repr, VARIANCE_SCHEDULES))
        raise ValueError(f"variance={variance!r} is not known; allowed values: {allowed}")


def resample_weight(sigma, sigma_prev, gamma: float, variance: str = "paper") -> float:
    """Weight ``w`` of ``z0_y`` in the resampling mean, from *variance-exploding* levels (see module docstring).

    ``sigma``: level resampled to (``r``, paper's ``t-1``); ``sigma_prev``: the larger level the step started
    from (``s``, paper's ``t``; may be inf).  ``"paper"``: ``gamma (s^2-r^2) / (gamma (s^2-r^2) + 1)``;
    ``"reference"``: ``gamma (s^2-r^2) / (gamma (s^2-r^2) + s^2)``.  ``gamma = inf`` gives 1, ``gamma = 0`` gives 0.
    """
    _check_variance(variance)
    r, s, gamma = float(sigma), float(sigma_prev), float(gamma)
    if math.isnan(gamma) or gamma < 0:
        raise ValueError(f"gamma must be a number >= 0 (inf allowed), got {gamma!r}")
    if not (0 < r < s and math.isfinite(r)):
        raise ValueError(f"resampling needs 0 < sigma < sigma_prev, got sigma={r}, sigma_prev={s}")
    if math.isinf(gamma) or (math.isinf(s) and variance == "paper" and gamma > 0):
        return 1.0
    if math.isinf(s):
        return gamma / (gamma + 1.0) if variance == "reference" else 0.0
    a = gamma * (s * s - r * r)
    return a / (a + (1.0 if variance == "paper" else s * s))


def resample_variance(sigma, sigma_prev, gamma: float, variance: str = "paper", parameterization="vp") -> float:
    """The paper's VP-space resampling variance ``v`` for a step ``sigma_prev -> sigma`` (levels of the given
    parameterization).

    ``"paper"``: ``gamma (1 - abar_{t-1}) / abar_t * (1 - abar_t / abar_{t-1})``; ``"reference"``:
    ``gamma (1 - abar_{t-1}) / (1 - abar_t) * (1 - abar_t / abar_{t-1})``, ``abar_t`` at ``sigma_prev`` and
    ``abar_{t-1}`` at ``sigma``; computed from the VE levels as ``gamma r^2 (s^2 - r^2) / (1 + r^2)`` ("paper"),
    divided by ``s^2`` ("reference").
    """
    param = get_parameterization(parameterization)
    r, s = param.ve_sigma(sigma), param.ve_sigma(sigma_prev)
    resample_weight(r, s, gamma, variance)  # validates
    if math.isinf(float(gamma)) or math.isinf(s):
        return math.inf if variance == "paper" or math.isinf(float(gamma)) else float(gamma) * r * r / (1.0 + r * r)
    v_sigma = float(gamma) * r * r * (s * s - r * r) / (1.0 if variance == "paper" else s * s)
    return v_sigma / (1.0 + r * r)


def stochastic_resample(z0_y: torch.Tensor, x_uncond: torch.Tensor, sigma, sigma_prev, gamma: float,
                        noise: torch.Tensor, variance: str = "paper", parameterization="vp") -> torch.Tensor:
    """ReSample's stochastic resampling in the sampler state: ``x ~ N(x' + w (a z0_y - x'), w sigma^2 I)``.

    ``w`` from :func:`resample_weight` at the VE levels of ``sigma`` (resampled to, ``> 0``) and ``sigma_prev``
    (the step's start), ``a`` the parameterization's signal weight at ``sigma`` (1 for vp): the state-space image
    of the paper's VP-space ``N((v sqrt(abar) z0_y + (1-abar) z'_t) / (v + 1 - abar), v (1-abar) / (v + 1 - abar))``
    with ``z'_t = x' / k(sigma)`` and ``v`` from :func:`resample_variance`.  ``noise``: standard normal, shaped
    like ``x_uncond``.
    """
    param = get_parameterization(parameterization)
    w = resample_weight(param.ve_sigma(sigma), param.ve_sigma(sigma_prev), gamma, variance)
    r, a = float(sigma), param.signal(sigma)
    z0_y = z0_y.to(device=x_uncond.device, dtype=x_uncond.dtype)
    target = z0_y if a == 1.0 else a * z0_y
    return x_uncond + w * (target - x_uncond) + (r * math.sqrt(w)) * noise.to(x_uncond)


def consistency_schedule(sigmas: torch.Tensor, every: int = 10, start: int | None = None,
                         stop: int | None = None) -> list[int]:
    """Step indices ``i`` (of ``sigma_i -> sigma_{i+1}``) that get hard data consistency.

    ``i`` with ``start <= i < stop``, ``(i - start) % every == 0`` and ``sigma_{i+1} > 0`` (resampling to level 0
    is the identity, the final sample is handled by ``final_consistency``).  ``every = 0`` gives none; ``start``
    defaults to ``n_steps // 3`` (the reference code skips the first third), ``stop`` to ``n_steps``.
    """
    n = len(sigmas) - 1
    if every == 0 or n < 1:
        return []
    start = n // 3 if start is None else start
    stop = n if stop is None else min(stop, n)
    return [i for i in range(start, stop, every) if float(sigmas[i + 1]) > 0]


# ------------------------------------------------------------------------------------------------- solver
class ReSampleSolver(Solver):
    """Loss ``||y - A(D(z0_hat))||`` (trace, optional DPS step); post-step: hard consistency + resampling."""

    name = "ReSample"
    key = "resample"

    def __init__(self, measurement, degradation, decoder, encoder, sigmas, settings: ReSampleSettings,
                 degradation_kwargs: dict | None = None):
        if measurement is None or not isinstance(measurement, torch.Tensor):
            raise ValueError("ReSample needs measurement= (a tensor shaped like degradation(decoder(latent)))")
        require_callables("ReSample", degradation=(degradation, "A(image, **degradation_kwargs)", False),
                          decoder=(decoder, "D(latent) -> image, differentiable", False),
                          encoder=(encoder, "E(image) -> latent", True))
        if settings.optimization == "pixel" and encoder is None:
            raise ValueError("optimization='pixel' needs encoder= (a callable E(image) -> latent)")
        with torch.inference_mode(False):
            self.kwargs = {k: normal_tensor(v) for k, v in (degradation_kwargs or {}).items()}
        self.settings, self.degradation, self.decoder, self.encoder = settings, degradation, decoder, encoder
        self._loss = MeasurementLoss("ReSample", measurement, lambda z: degradation(decoder(z), **self.kwargs),
                                     "degradation output shape {shape} (degradation applied to the decoded latent)")
        n = len(sigmas) - 1
        schedule = consistency_schedule(sigmas, settings.consistency_every, settings.consistency_start,
                                        settings.consistency_stop)
        self.schedule = set(schedule) - {settings.early_stop}
        self.needs_noise = bool(self.schedule)
        self.pixel_until = n - n // 3 if settings.pixel_until is None else settings.pixel_until

    def mode_at(self, i: int | None) -> str:
        s = self.settings
        if s.optimization == "auto":
            return "pixel" if self.encoder is not None and i is not None and i < self.pixel_until else "latent"
        return s.optimization

    def consistency(self, z0, mode: str, progress: Progress | None, phase: str):
        s, latent = self.settings, mode == "latent"
        return hard_consistency(z0, self._loss.y, self.degradation, self.decoder, encoder=self.encoder, mode=mode,
                                steps=s.latent_steps if latent else s.pixel_steps, lr=s.lr if latent else s.pixel_lr,
                                tolerance=s.tolerance, optimizer=s.optimizer, degradation_kwargs=self.kwargs,
                                progress=progress, phase=phase)

    def loss(self, z0: torch.Tensor) -> torch.Tensor:
        return self._loss(z0)

    def partial_measurement(self) -> bool | None:
        return partial_of(self.degradation)

    def report(self, i: int) -> dict:
        cons = i in self.schedule
        return {"consistency": cons, "mode": self.mode_at(i) if cons else None, "consistency_loss": [],
                "iterations": []}

    def post_step(self, state: StepState, x_next: torch.Tensor) -> torch.Tensor:
        if state.i not in self.schedule:
            return x_next
        z0_y, info = self.consistency(state.denoised, self.mode_at(state.i), state.progress, "consistency")
        if state.entry is not None:
            state.entry["consistency_loss"], state.entry["iterations"] = info["rms"], info["iterations"]
        s = self.settings
        with torch.no_grad():
            noise = state.noise_sampler(state.sigma, state.sigma_next)
            return stochastic_resample(z0_y, x_next, float(state.sigma_next), float(state.sigma), s.gamma, noise,
                                       s.variance, state.param)

    def finish(self, x: torch.Tensor, entry: dict | None, progress: Progress | None) -> torch.Tensor:
        if self.settings.consistency_every == 0 or not self.settings.final_consistency:
            return x
        z, info = self.consistency(x, self.mode_at(None), progress, "final consistency")
        if entry is not None:
            entry["final"] = info
        return z.to(device=x.device, dtype=x.dtype)


def sample_resample(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None, callback=None,
                    disable=None, *, measurement: torch.Tensor, degradation: Callable[..., torch.Tensor],
                    decoder: Callable[[torch.Tensor], torch.Tensor],
                    encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    settings: ReSampleSettings | None = None, degradation_kwargs: dict | None = None,
                    trace: list | None = None, noise_sampler=None, progress: Progress | None = None,
                    parameterization: Parameterization | str = "vp", noise_floor=None,
                    partial_measurement: bool | None = None, **options) -> torch.Tensor:
    """ReSample: DDIM + hard data consistency + stochastic resampling (KSAMPLER function; module docstring).

    Args:
        model, x, sigmas, extra_args, callback, disable: ComfyUI's KSAMPLER arguments (``extra_args["seed"]`` seeds
            the resampling noise like ComfyUI; the callback also gets ``resample_loss``, ``resample_consistency``).
        measurement: ``y`` shaped like ``degradation(decoder(z))`` (batch 1 broadcasts over the batch).
        degradation: ``A(image, **degradation_kwargs)``; decoder: differentiable ``D(latent) -> image``;
            encoder: ``E(image) -> latent`` (needed for pixel optimisation).
        settings: a :class:`ReSampleSettings`; ``**options`` are its fields by name laid over it
            (``consistency_every = 0`` disables consistency, also the final one: with ``dps_eta = 0`` the sampler
            is then plain Euler/DDIM, bit-exactly; ``early_stop`` -1/None is off).
        trace: list receiving one dict per step ``{"step", "sigma", "eta", "loss", "grad_norm", "consistency",
            "mode", "consistency_loss": [B] RMS residual after the optimisation, "iterations": [B]}``; the last
            entry also gets ``"final": {"rms", "iterations"}`` when the final consistency ran.
        noise_sampler: optional ``(sigma, sigma_next) -> noise`` for resampling; default ComfyUI's seeded one.
        progress: optional ``progress(phase, done, total)``: phase "step" after every step, "consistency" and
            "final consistency" after every optimiser iteration (raise from it to cancel).
        parameterization: the model's noise parameterization (as for :func:`~.silo.sample_silo`).
        noise_floor: ``sigma_y * sqrt(number of measured values)``, for ``eta_mode="auto"`` DPS steps (at most
            ``dps_eta * abar``).
        partial_measurement: as for :func:`~.latent_dps.sample_latent_dps` (default: the degradation's
            ``is_partial``).

    Returns:
        The final latent (or ``z0_hat`` at ``early_stop``).
    """
    settings, _ = split_options(ReSampleSettings, settings, options)
    solver = ReSampleSolver(measurement, degradation, decoder, encoder, sigmas, settings, degradation_kwargs)
    param = get_parameterization(parameterization)
    guidance = Guidance.of(settings, param, schedule=lambda i, s: param.alpha_bar(s),  # dps_eta * abar(sigma_i)
                           eta=settings.dps_eta, update="euler", gradient="unet", grad_clamp=None,
                           noise_floor=noise_floor, partial_measurement=partial_measurement)
    return guided_sample(model, x, sigmas, extra_args, callback, disable, solver=solver, guidance=guidance,
                         trace=trace, noise_sampler=noise_sampler, progress=progress)
