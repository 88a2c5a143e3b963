"""Latent-DPS and PSLD baselines (Rout et al., arXiv 2307.00619) as pure torch; never imports ComfyUI.

Both guide a latent diffusion sampler with the *pixel-space* degradation, back-propagating through
the VAE decoder ``D`` (and, for PSLD, the encoder ``E``).  Per step, with ``z0_hat = model(x_t)``::

    loss_b = || y - A(D(z0_hat)) ||_2                                   (DPS: plain norm, not squared)
           + gluing * || z0_hat - E(A^T y + (I - A^T A) D(z0_hat)) ||_2^2   (PSLD's "gluing" term)

and then exactly SILO's step (:func:`~comfyui_silo.samplers.silo.sample_silo`): the gradient of
``sum_b loss_b`` w.r.t. ``x_t`` (through the denoiser, ``gradient="unet"``) or at ``z0_hat``
(``gradient="x0"``) is mapped to VP space, optionally clamped, and ``eta`` times it is subtracted from the
base DDPM/Euler update.  Latent-DPS is ``gluing = 0``: that is literally SILO with the operator
``H = A o D`` and the pixel measurement ``y`` — so this module reuses :func:`sample_silo` instead of
duplicating its loop, and passes the gluing term through its ``extra_loss`` hook.

Relation to the PSLD reference code: there ``error = omega * ||y - A(D(z0))|| + gamma * glue`` and
``z_{t-1} = DDIM(z_t) - grad error`` with no clamp, so ``eta`` is PSLD's ``omega`` and PSLD's ``gamma``
corresponds to ``eta * gluing`` here.  The paper's Algorithm squares the gluing norm, the reference code
does not: ``gluing_norm="squared"`` (default, the paper) or ``"plain"`` (the code; its gradient has unit
size whatever the residual, which behaves better with large weights).

The gluing term needs a linear ``A`` with an adjoint: ``A^T y + (I - A^T A) D(z0_hat)`` replaces the
measured part of the decoded image by the measurement; when ``D(z0_hat)`` already satisfies
``A D(z0_hat) = y`` the filled image is ``D(z0_hat)`` itself and the term is zero wherever ``E o D = I``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .silo import SILO_OPTIONS, _normal_tensor, sample_silo

__all__ = ["GLUING_NORMS", "LATENT_DPS_OPTIONS", "psld_gluing_loss", "sample_latent_dps"]

_PASSED_THROUGH = ("update", "gradient", "eta_schedule", "early_stop", "trace", "noise_sampler")

#: Keyword options of :func:`sample_latent_dps` (usable as KSAMPLER ``extra_options``): defaults and docs.
LATENT_DPS_OPTIONS: dict[str, dict[str, Any]] = {
    "measurement": {"default": None, "doc": "Pixel-space measurement y, shaped like degradation(image) (required)."},
    "degradation": {
        "default": None,
        "doc": "Differentiable callable A(image) -> measurement-shaped tensor (required).",
    },
    "decoder": {"default": None, "doc": "Differentiable callable D(latent) -> image (required)."},
    "encoder": {"default": None, "doc": "Differentiable callable E(image) -> latent (needed when gluing > 0)."},
    "adjoint": {
        "default": None,
        "doc": "Callable A^T(measurement) -> image for the gluing term; default degradation.A_adjoint.",
    },
    "eta": {"default": 1.0, "doc": "Guidance step size (PSLD's omega, VP space). 0 = plain sampler, no gradients."},
    "gluing": {
        "default": 0.0,
        "doc": "Weight of PSLD's gluing term (PSLD's gamma / omega); 0 = Latent-DPS. Needs a linear degradation.",
    },
    "gluing_norm": {
        "default": "squared",
        "doc": "'squared' ||.||^2 gluing term (the paper's Algorithm) or 'plain' ||.|| (the reference code).",
    },
    **{k: dict(SILO_OPTIONS[k]) for k in _PASSED_THROUGH},
    "grad_clamp": {"default": None, "doc": "Element-wise clamp of the VP-space gradient. None = no clamp (DPS/PSLD)."},
}


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


def _batch_ok(shape: tuple, ref: tuple) -> bool:
    """``shape == ref``, or ``shape`` is ``ref`` with batch 1 (broadcast over the batch)."""
    return shape == ref or (len(shape) == len(ref) >= 1 and shape[0] == 1 and shape[1:] == ref[1:])


GLUING_NORMS = ("squared", "plain")


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
    if not isinstance(aty, torch.Tensor) or not _batch_ok(tuple(aty.shape), tuple(image.shape)):
        got = tuple(aty.shape) if isinstance(aty, torch.Tensor) else type(aty).__name__
        raise ValueError(
            f"PSLD adjoint: A^T(measurement) must be shaped like the decoded image {tuple(image.shape)} "
            f"(or with batch 1), got {got}"
        )
    return aty.detach()


def psld_gluing_loss(
    z0_hat: torch.Tensor,
    *,
    measurement: torch.Tensor,
    degradation,
    decoder: Callable[[torch.Tensor], torch.Tensor],
    encoder: Callable[[torch.Tensor], torch.Tensor],
    adjoint: Callable[[torch.Tensor], torch.Tensor] | None = None,
    norm: str = "squared",
) -> torch.Tensor:
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


def sample_latent_dps(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback=None,
    disable=None,
    *,
    measurement: torch.Tensor,
    degradation: Callable[[torch.Tensor], torch.Tensor],
    decoder: Callable[[torch.Tensor], torch.Tensor],
    encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    adjoint: Callable[[torch.Tensor], torch.Tensor] | None = None,
    eta: float = 1.0,
    gluing: float = 0.0,
    gluing_norm: str = "squared",
    update: str = "ddpm",
    gradient: str = "unet",
    grad_clamp: float | None = None,
    eta_schedule="constant",
    early_stop: int | None = None,
    trace: list | None = None,
    noise_sampler=None,
) -> torch.Tensor:
    """Latent-DPS (``gluing = 0``) or PSLD (``gluing > 0``) guided sampling; KSAMPLER convention.

    Equivalent to :func:`sample_silo` with ``operator = degradation o decoder`` and the pixel-space
    measurement, plus (for PSLD) ``gluing * ||z0_hat - E(A^T y + (I - A^T A) D(z0_hat))||^2`` added to the
    per-batch loss (see the module docstring).  The decoded image is computed once per step and shared
    by both terms.

    Args:
        model, x, sigmas, extra_args, callback, disable: as for :func:`sample_silo` (the callback gets
            ``silo_loss`` = the measurement term ``||y - A(D(z0_hat))||``).
        measurement: pixel-space ``y`` shaped like ``degradation(decoder(z0_hat))`` (e.g. small for
            super-resolution); batch 1 broadcasts over the batch.
        degradation: differentiable ``A(image)``.  For the gluing term it must be linear
            (``is_linear`` not False) and have an adjoint (``adjoint=`` or ``degradation.A_adjoint``);
            the projection uses ``degradation.linear`` when present.
        decoder: differentiable ``D(latent) -> image`` (latent in the sampler's space).
        encoder: differentiable ``E(image) -> latent``; required when ``gluing > 0``.
        adjoint: ``A^T(y) -> image`` (called with the measurement-shaped tensor only); default
            ``degradation.A_adjoint(y, image_shape)``.
        eta: guidance step size (PSLD's omega); 0 reproduces the plain sampler bit-exactly.
        gluing: gluing weight (PSLD's gamma = ``eta * gluing``); 0 = Latent-DPS.
        gluing_norm: ``"squared"`` (the paper's Algorithm) or ``"plain"`` (the reference code's norm).
        update, gradient, grad_clamp, eta_schedule, early_stop, noise_sampler: as for :func:`sample_silo`
            (``grad_clamp`` defaults to None here: DPS and PSLD do not clamp).
        trace: list receiving one dict per step as for :func:`sample_silo`; with ``gluing > 0`` each also
            has ``"extra_loss"`` = the weighted gluing term per batch element.

    Returns:
        The final latent (or ``z0_hat`` at ``early_stop``).
    """
    if not isinstance(measurement, torch.Tensor) or measurement.dim() < 1:
        raise ValueError(
            "Latent-DPS needs measurement= (a pixel-space tensor shaped like degradation(decoder(latent))), "
            f"got {type(measurement).__name__ if not isinstance(measurement, torch.Tensor) else 'a 0-d tensor'}"
        )
    if degradation is None or not callable(degradation):
        raise ValueError("Latent-DPS needs degradation= (a differentiable callable A(image) -> measurement)")
    if decoder is None or not callable(decoder):
        raise ValueError("Latent-DPS needs decoder= (a differentiable callable D(latent) -> image)")
    if encoder is not None and not callable(encoder):
        raise ValueError(f"encoder must be None or a callable E(image) -> latent, got {type(encoder).__name__}")
    if adjoint is not None and not callable(adjoint):
        raise ValueError(f"adjoint must be None or a callable A^T(measurement) -> image, got {type(adjoint).__name__}")
    try:
        gluing = float(gluing)
    except (TypeError, ValueError):
        raise ValueError(f"gluing must be a finite number >= 0, got {gluing!r}") from None
    if not math.isfinite(gluing) or gluing < 0:
        raise ValueError(f"gluing must be a finite number >= 0, got {gluing}")
    if gluing_norm not in GLUING_NORMS:
        raise ValueError(f"gluing_norm must be one of {GLUING_NORMS}, got {gluing_norm!r}")

    adj = linear = None
    if gluing > 0:
        if encoder is None:
            raise ValueError("PSLD (gluing > 0) needs encoder= (a differentiable callable E(image) -> latent)")
        if getattr(degradation, "is_linear", True) is False:
            name = getattr(degradation, "name", type(degradation).__name__)
            raise ValueError(
                f"PSLD (gluing > 0) needs a linear degradation, but {name!r} is not linear; "
                "use gluing=0 (Latent-DPS) for non-linear degradations"
            )
        adj = _resolve_adjoint(degradation, adjoint)
        if adj is None:
            raise ValueError(
                "PSLD (gluing > 0) needs the adjoint A^T: pass adjoint= or a degradation with an A_adjoint method"
            )
        linear = _linear_map(degradation)

    # One decode per step, shared by the measurement term (operator) and the gluing term (extra_loss):
    # the operator remembers the image it decoded for the z0_hat object it was given.
    state: dict[str, Any] = {"checked": False, "z": None, "image": None, "aty": None}
    m_shape = tuple(measurement.shape)

    def operator(z: torch.Tensor) -> torch.Tensor:
        image = decoder(z)
        if not state["checked"] and not isinstance(image, torch.Tensor):
            raise ValueError(f"Latent-DPS decoder must return an image tensor, got {type(image).__name__}")
        out = degradation(image)
        if not state["checked"]:
            o_shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
            if o_shape is None or not _batch_ok(m_shape, o_shape):
                raise ValueError(
                    f"Latent-DPS measurement shape {m_shape} does not match degradation(decoder(z0_hat)) shape "
                    f"{o_shape} (decoded image {tuple(image.shape)}); the measurement must have the degradation's "
                    f"output shape (batch {o_shape[0] if o_shape else '?'} or 1)"
                )
            state["checked"] = True
        if gluing > 0:
            state["z"], state["image"] = z, image
        return out

    def gluing_loss(z: torch.Tensor) -> torch.Tensor:
        image = state["image"] if state["z"] is z else decoder(z)
        state["z"] = state["image"] = None
        with torch.inference_mode(False):
            if not torch.is_grad_enabled():  # report-only call (unguided step): plain tensors, no graph
                z, image = _normal_tensor(z), _normal_tensor(image)
            if state["aty"] is None:
                state["aty"] = _adjoint_of_measurement(_normal_tensor(measurement), image, adj)
            return gluing * _gluing(z, image, state["aty"], linear, adj, encoder, gluing_norm)

    return sample_silo(
        model,
        x,
        sigmas,
        extra_args,
        callback,
        disable,
        measurement=measurement,
        operator=operator,
        eta=eta,
        update=update,
        gradient=gradient,
        grad_clamp=grad_clamp,
        eta_schedule=eta_schedule,
        early_stop=early_stop,
        trace=trace,
        noise_sampler=noise_sampler,
        extra_loss=gluing_loss if gluing > 0 else None,
    )
