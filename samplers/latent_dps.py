"""Latent-DPS and PSLD baselines (Rout et al., arXiv 2307.00619) as pure torch; never imports ComfyUI.

Both guide a latent diffusion sampler with the *pixel-space* degradation, back-propagating through the VAE
decoder ``D`` (and, for PSLD, the encoder ``E``).  Per step, with ``z0_hat = model(x_t)``, the guided loop
(:mod:`.core`) takes the gradient of::

    loss_b = || y - A(D(z0_hat)) ||_2                                      (DPS: plain norm, not squared)
           + (gluing / eta) * || z0_hat - E(A^T y + (I - A^T A) D(z0_hat)) ||_2^2   (PSLD's "gluing" term)

and subtracts ``eta`` times it (in VP units, optionally clamped) from the base DDPM/Euler update.  Latent-DPS is
``gluing = 0``: literally SILO with the operator ``H = A o D`` and the pixel measurement ``y``.

What ``gluing`` means: PSLD's ``gamma``.  The reference code's error is ``omega * ||y - A(D(z0))|| + gamma * glue``
with ``z_{t-1} = DDIM(z_t) - grad error`` and no clamp; here ``eta`` is ``omega`` and the gluing term enters the
loss with weight ``gluing / eta``, so the step is ``eta * grad ||y - A(D(z0))|| + gluing * grad glue`` (without a
clamp; with one, the clamp acts on the sum).  ``eta = 0`` is the plain sampler: no guidance, no gluing.  (This is
the meaning the node's ``gluing`` widget always had; the trace's ``"extra_loss"`` is the term as it enters the
loss, ``(gluing / eta) * glue``.)  The paper's Algorithm squares the gluing norm, the reference code does not:
``gluing_norm="squared"`` (default, the paper) or ``"plain"`` (the code; its gradient has unit size whatever the
residual, which behaves better with large weights).

The gluing term needs a linear ``A`` with an adjoint: ``A^T y + (I - A^T A) D(z0_hat)`` replaces the measured part
of the decoded image by the measurement; when ``D(z0_hat)`` already satisfies ``A D(z0_hat) = y`` the filled
image is ``D(z0_hat)`` itself and the term is zero wherever ``E o D = I``.  It acts on ``z0_hat`` only, so it is
the same for every noise parameterization.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ..config.fields import SettingError, setting
from . import core
from .parameterization import Parameterization

__all__ = ["GLUING_NORMS", "LatentDPSSettings", "LatentDPSSolver", "psld_gluing_loss", "sample_latent_dps"]

GLUING_NORMS = ("squared", "plain")


@dataclasses.dataclass(frozen=True)
class LatentDPSSettings(core.GuidanceSettings):
    """Latent-DPS / PSLD settings, declared once (node widgets in this order, CLI, validation)."""

    OWNER = "Latent-DPS"

    eta: float = core.eta_field(1.0, 100.0, "Measurement-guidance step size (PSLD's ω); with eta_mode auto, the "
                                               "most the automatic step may use. 0 = plain sampling.")
    gluing: float = setting(0.0, min=0.0, max=10.0, step=0.01,
                            tooltip="PSLD's gluing weight γ on ‖ẑ₀ − E(Aᵀy + (I − AᵀA)D(ẑ₀))‖²; 0 = Latent-DPS. PSLD "
                                    "used 0.1 with η 1. Linear degradations only (not JPEG).")
    gluing_norm: str = setting("squared", choices=GLUING_NORMS,
                               tooltip="Gluing term as in PSLD's paper (squared norm) or its public code (plain norm: "
                                       "the pull has the same size whatever the mismatch, steadier with large γ).")
    update: str = core.update_field()
    gradient: str = core.gradient_field("unet: back-propagate through the UNet and the decoder (the papers). x0: only "
                                   "through the decoder, at the denoised estimate.")
    grad_clamp: float | None = core.grad_clamp_field(None, "Element-wise gradient clamp; 0 = off (the papers do not "
                                                      "clamp).")
    early_stop: int | None = core.early_stop_field()
    eta_schedule: str = core.eta_schedule_field()
    eta_mode: str = core.eta_mode_field()

    @property
    def gluing_weight(self) -> float:
        """Weight of the gluing term in the loss whose gradient eta multiplies: ``gluing / eta`` (0 when eta = 0)."""
        return self.gluing / self.eta if self.eta > 0 else 0.0

    def needs_encoder(self) -> bool:
        """PSLD's gluing term encodes the filled image back to a latent."""
        return self.gluing > 0

    def check_degradation(self, degradation) -> None:
        if self.gluing > 0 and getattr(degradation, "is_linear", True) is False:
            name = getattr(degradation, "name", type(degradation).__name__)
            raise SettingError("gluing", f"PSLD's gluing term needs a linear degradation; {name} is not. Set "
                                         "gluing to 0 (Latent-DPS) for this one.")


# ------------------------------------------------------------------------------------------------ gluing term
def _resolve_adjoint(degradation, adjoint) -> Callable[[torch.Tensor, tuple], torch.Tensor] | None:
    """``adj(y, image_shape)``: the user's ``adjoint(y)`` or ``degradation.A_adjoint(y, image_shape)``."""
    if adjoint is not None:
        return lambda y, shape: adjoint(y)
    a_adj = getattr(degradation, "A_adjoint", None)
    if callable(a_adj):
        return lambda y, shape: a_adj(y, shape)
    return None


def _linear_map(degradation) -> Callable[[torch.Tensor], torch.Tensor]:
    """The linear map whose adjoint is ``A_adjoint`` (``Degradation.linear``: no SR clamp), else ``degradation``."""
    lin = getattr(degradation, "linear", None)
    if callable(lin) and getattr(degradation, "is_linear", False):
        return lin
    return degradation


def _gluing(z0_hat, image, aty, linear, adj, encoder, norm: str = "squared") -> torch.Tensor:
    """Unweighted ``|| z0_hat - E(A^T y + image - A^T A image) ||_2`` per batch element -> ``[B]``, squared
    (``norm="squared"``, the paper) or not (``"plain"``, the reference code)."""
    filled = aty.to(device=image.device, dtype=image.dtype) + (image - adj(linear(image), tuple(image.shape)))
    enc = encoder(filled)
    if not isinstance(enc, torch.Tensor) or tuple(enc.shape) != tuple(z0_hat.shape):
        got = tuple(enc.shape) if isinstance(enc, torch.Tensor) else type(enc).__name__
        raise ValueError(
            f"PSLD encoder: E(image) must return a latent shaped like z0_hat {tuple(z0_hat.shape)}, got {got}"
        )
    diff = (z0_hat - enc.to(device=z0_hat.device, dtype=z0_hat.dtype)).reshape(z0_hat.shape[0], -1)
    if norm == "plain":
        return torch.linalg.vector_norm(diff, ord=2, dim=1)
    return diff.pow(2).sum(dim=1)


def _adjoint_of_measurement(y: torch.Tensor, image: torch.Tensor, adj) -> torch.Tensor:
    aty = adj(y, (y.shape[0], *image.shape[1:]))
    if not isinstance(aty, torch.Tensor) or not core.batch_compatible(tuple(aty.shape), tuple(image.shape)):
        got = tuple(aty.shape) if isinstance(aty, torch.Tensor) else type(aty).__name__
        raise ValueError(
            f"PSLD adjoint: A^T(measurement) must be shaped like the decoded image {tuple(image.shape)} "
            f"(or with batch 1), got {got}"
        )
    return aty.detach()


def psld_gluing_loss(z0_hat: torch.Tensor, *, measurement: torch.Tensor, degradation,
                     decoder: Callable[[torch.Tensor], torch.Tensor], encoder: Callable[[torch.Tensor], torch.Tensor],
                     adjoint: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     norm: str = "squared") -> torch.Tensor:
    """PSLD's (unweighted) gluing term ``|| z0_hat - E(A^T y + (I - A^T A) D(z0_hat)) ||_2^2`` -> ``[B]``
    (``norm="plain"``: the norm itself, not squared, as the reference code computes it).

    ``A`` is ``degradation.linear`` when the degradation has one (the map ``A_adjoint`` is the adjoint
    of), else ``degradation`` itself; ``adjoint`` defaults to ``degradation.A_adjoint``.  Differentiable
    w.r.t. ``z0_hat``.  Zero when ``A D(z0_hat) = y`` and ``E(D(z0_hat)) = z0_hat``.
    """
    if getattr(degradation, "is_linear", True) is False:
        raise ValueError("psld_gluing_loss needs a linear degradation (degradation.is_linear is False)")
    adj = _resolve_adjoint(degradation, adjoint)
    if adj is None:
        raise ValueError("psld_gluing_loss needs adjoint= (A^T) or a degradation with an A_adjoint method")
    if norm not in GLUING_NORMS:
        raise ValueError(f"norm must be one of {GLUING_NORMS}, got {norm!r}")
    image = decoder(z0_hat)
    aty = _adjoint_of_measurement(measurement, image, adj)
    return _gluing(z0_hat, image, aty, _linear_map(degradation), adj, encoder, norm)


# ------------------------------------------------------------------------------------------------ solver

class LatentDPSSolver(core.Solver):
    """Loss ``||y - A(D(z0_hat))||`` (+ ``weight * glue`` for PSLD).  One decode per step is shared by both terms:
    the measurement term remembers the image it decoded for the ``z0_hat`` object it was given."""

    name = "Latent-DPS"
    key = "latent_dps"

    def __init__(self, measurement, degradation, decoder, encoder=None, adjoint=None,
                 settings: LatentDPSSettings | None = None):
        settings = settings if settings is not None else LatentDPSSettings()
        if not isinstance(measurement, torch.Tensor) or measurement.dim() < 1:
            got = type(measurement).__name__ if not isinstance(measurement, torch.Tensor) else "a 0-d tensor"
            raise ValueError("Latent-DPS needs measurement= (a pixel-space tensor shaped like "
                             f"degradation(decoder(latent))), got {got}")
        core.require_callables("Latent-DPS",
                               degradation=(degradation, "A(image) -> measurement, differentiable", False),
                               decoder=(decoder, "D(latent) -> image, differentiable", False),
                               encoder=(encoder, "E(image) -> latent", True),
                               adjoint=(adjoint, "A^T(measurement) -> image", True))
        self.decoder, self.degradation, self.encoder = decoder, degradation, encoder
        self.weight, self.norm = settings.gluing_weight, settings.gluing_norm
        self._loss = core.MeasurementLoss("Latent-DPS", measurement, degradation,
                                          "degradation(decoder(z0_hat)) shape {shape}")
        self._last = (None, None)  # (z0_hat, its decoded image) of the latest measurement-term call
        self._image_values = None  # values per decoded image (the first loss tells)
        self._aty = None
        self.has_extra = self.weight > 0
        if settings.gluing > 0:
            self._adj, self._linear = self._psld_parts(degradation, adjoint)

    def _psld_parts(self, degradation, adjoint):
        if self.encoder is None:
            raise ValueError("PSLD (gluing > 0) needs encoder= (a differentiable callable E(image) -> latent)")
        if getattr(degradation, "is_linear", True) is False:
            name = getattr(degradation, "name", type(degradation).__name__)
            raise ValueError(f"PSLD (gluing > 0) needs a linear degradation, but {name!r} is not linear; "
                             "use gluing=0 (Latent-DPS) for non-linear degradations")
        adj = _resolve_adjoint(degradation, adjoint)
        if adj is None:
            raise ValueError("PSLD (gluing > 0) needs the adjoint A^T: pass adjoint= or a degradation with an "
                             "A_adjoint method")
        return adj, _linear_map(degradation)

    def loss(self, z0: torch.Tensor) -> torch.Tensor:
        image = self.decoder(z0)
        if not self._loss.checked and not isinstance(image, torch.Tensor):
            raise ValueError(f"Latent-DPS decoder must return an image tensor, got {type(image).__name__}")
        if self.has_extra:
            self._last = (z0, image)
        if self._image_values is None:
            self._image_values = image[0].numel()
        return self._loss(image)

    def partial_measurement(self) -> bool | None:
        return core.partial_of(self.degradation, self._loss.y, self._image_values)

    def extra(self, z0: torch.Tensor) -> torch.Tensor:
        image = self._last[1] if self._last[0] is z0 else self.decoder(z0)
        self._last = (None, None)
        with torch.inference_mode(False):
            if not torch.is_grad_enabled():  # report-only call (unguided step): plain tensors, no graph
                z0, image = core.normal_tensor(z0), core.normal_tensor(image)
            if self._aty is None:
                self._aty = _adjoint_of_measurement(self._loss.y, image, self._adj)
            return self.weight * _gluing(z0, image, self._aty, self._linear, self._adj, self.encoder, self.norm)


def sample_latent_dps(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None, callback=None,
                      disable=None, *, measurement: torch.Tensor, degradation: Callable[[torch.Tensor], torch.Tensor],
                      decoder: Callable[[torch.Tensor], torch.Tensor],
                      encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      adjoint: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      settings: LatentDPSSettings | None = None, trace: list | None = None, noise_sampler=None,
                      progress: core.Progress | None = None, parameterization: Parameterization | str = "vp",
                      noise_floor=None, partial_measurement: bool | None = None, **options) -> torch.Tensor:
    """Latent-DPS (``gluing = 0``) or PSLD (``gluing > 0``) guided sampling; KSAMPLER function.

    Args:
        model, x, sigmas, extra_args, callback, disable: as for :func:`~.silo.sample_silo` (the callback gets
            ``latent_dps_loss`` = the measurement term ``||y - A(D(z0_hat))||``).
        measurement: pixel-space ``y`` shaped like ``degradation(decoder(z0_hat))``; batch 1 broadcasts.
        degradation: differentiable ``A(image)``; for the gluing term it must be linear (``is_linear`` not False)
            and have an adjoint (``adjoint=`` or ``degradation.A_adjoint``; the projection uses
            ``degradation.linear`` when present).
        decoder: differentiable ``D(latent) -> image``; encoder: ``E(image) -> latent`` (required when gluing > 0).
        adjoint: ``A^T(y) -> image``; default ``degradation.A_adjoint(y, image_shape)``.
        settings: a :class:`LatentDPSSettings`; ``**options`` are its fields by name laid over it (``gluing`` is
            PSLD's gamma, see the module docstring; ``grad_clamp`` 0/None and ``early_stop`` -1/None are off;
            ``eta_schedule`` may be a callable ``(i, sigma) -> factor``).
        trace, noise_sampler, progress, parameterization, noise_floor, partial_measurement: as for
            :func:`~.silo.sample_silo` (the floor here is pixel noise: ``sigma_y * sqrt(number of measured values)``;
            partial by default when the degradation says so, ``is_partial``, or ``y`` has fewer values than the
            decoded image); with gluing each trace entry also has ``"extra_loss"`` = the gluing term as it enters the
            loss.

    Returns:
        The final latent (or ``z0_hat`` at ``early_stop``).
    """
    settings, schedule = core.split_options(LatentDPSSettings, settings, options)
    solver = LatentDPSSolver(measurement, degradation, decoder, encoder, adjoint, settings)
    return core.guided_sample(model, x, sigmas, extra_args, callback, disable, solver=solver,
                              guidance=core.Guidance.of(settings, parameterization, schedule,
                                                        noise_floor=noise_floor,
                                                        partial_measurement=partial_measurement), trace=trace,
                              noise_sampler=noise_sampler, progress=progress)
