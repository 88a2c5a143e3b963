"""The measurement model ``y = noise(A(x))`` as one object, and the interface samplers may rely on.

As in deepinv's physics objects (``forward = sensor(noise(A(x)))``, linear ones with ``A_adjoint``), the noise
model travels with the measurement instead of being a loose float next to it:

* :class:`DegradationLike` — the ``typing.Protocol`` of a degradation ``A``: what callers (the samplers, the nodes,
  training) may read. Every :class:`~.degradations.Degradation` satisfies it; so can any object that has these
  members (a test double, a user's own operator). Callers branch on its properties (``same_size``,
  ``is_inpainting``, ``is_linear``, ``needs_mask``), never on ``spec["type"]`` strings.
* :class:`GaussianNoise` — the noise model ``n ~ N(0, sigma² I)`` on the [0, 1] image scale.
* :class:`Measurement` — a measured photo ``y`` together with its degradation and noise model, the full-size image
  a VAE encodes (``lifted``) and the missing-pixel mask. :meth:`Measurement.from_photo` does what Encode
  Measurement needs before encoding (size checks, lifting, masking, finiteness), in pure torch;
  :meth:`Measurement.simulate` degrades a clean image (Apply Degradation, tests).

:data:`LATENT_CLAMP` is the one definition of the latent clamp used for measurement latents and training targets.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from ..config.fields import Settings, setting
from .degradations import DEFAULT_MEASUREMENT_NOISE, add_noise

__all__ = ["LATENT_CLAMP", "QUANTIZATION_SIGMA", "DegradationLike", "GaussianNoise", "Measurement", "MeasurementError", "NoiseSettings"]

#: Latents of measurements and training targets are clamped to [-LATENT_CLAMP, LATENT_CLAMP] (the paper's --clamp).
LATENT_CLAMP = 4.0


@runtime_checkable
class DegradationLike(Protocol):
    """A degradation operator ``A`` as callers use it (``isinstance`` checks that the members exist).

    Properties: ``type_name`` and ``spec`` (JSON dict, ``type`` first), ``name`` (for people), ``is_linear``
    (``A_adjoint`` exists), ``same_size`` (the measurement has the image's size; False for super-resolution),
    ``is_inpainting`` (``pixel_mask`` is not None), ``needs_mask`` (the caller supplied a mask; not in the spec).
    """

    type_name: str
    is_linear: bool
    same_size: bool
    is_inpainting: bool
    needs_mask: bool

    @property
    def spec(self) -> dict[str, Any]: ...

    @property
    def name(self) -> str: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def A(self, x: torch.Tensor) -> torch.Tensor: ...  # noqa: N802

    def A_adjoint(self, y: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor: ...  # noqa: N802

    def measurement_shape(self, x_shape: Sequence[int]) -> tuple[int, ...]: ...

    def restored_size(self, measured_size: Sequence[int]) -> tuple[int, int]: ...

    def lift(self, y: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor: ...

    def pixel_mask(self, x_shape: Sequence[int], device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor | None: ...

    def naive_latent(self, z: torch.Tensor, mask: torch.Tensor | None = None,
                     scale_factor: int = 8) -> torch.Tensor: ...


@dataclass(frozen=True)
class NoiseSettings(Settings):
    """The measurement noise as a setting, declared once for every node and command that asks for it."""

    OWNER = "measurement"

    noise_sigma: float = setting(DEFAULT_MEASUREMENT_NOISE, min=0.0, max=1.0, step=0.001,
                                 tooltip="Std of the Gaussian measurement noise on the 0-1 image scale (paper: 0.01).")


#: The noise every 8-bit photo has at least: rounding to 1/255 steps, std (1/255)/sqrt(12) on the [0, 1] scale.
QUANTIZATION_SIGMA = 1.0 / 255.0 / math.sqrt(12.0)


@dataclass(frozen=True)
class GaussianNoise:
    """Additive white Gaussian noise with std ``sigma`` on the [0, 1] image scale (the paper: 0.01)."""

    sigma: float = DEFAULT_MEASUREMENT_NOISE

    def __post_init__(self) -> None:
        s = self.sigma
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
            raise ValueError(f"noise sigma must be a finite number >= 0, got {s!r}")
        object.__setattr__(self, "sigma", float(s))

    def __call__(self, y: torch.Tensor, *, seed: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return add_noise(y, self.sigma, seed=seed, generator=generator)


class MeasurementError(ValueError):
    """A measurement that cannot be used: ``field`` is ``"image"`` or ``"degradation"`` (what to fix), ``problem``
    and ``fix`` are sentences a front end can place in its own message, ``reason`` says which check failed
    (``"shape"``, ``"not_finite"``, ``"size"``, ``"mask_batch"``, ``"mask"``) so a front end can give its own advice."""

    def __init__(self, field: str, problem: str, fix: str = "", reason: str = ""):
        super().__init__(f"{problem} {fix}".strip())
        self.field, self.problem, self.fix, self.reason = field, problem, fix, reason


def _restored_size(photo: torch.Tensor, degradation: DegradationLike, multiple: int) -> tuple[int, int]:
    h, w = degradation.restored_size(photo.shape[-2:])
    if h % multiple or w % multiple:
        fix = (f"Crop or pad the photo to a multiple of {multiple} pixels." if degradation.same_size else
               f"Resize or crop the photo so that its size times the factor is a multiple of {multiple}.")
        raise MeasurementError("image", f"the restored size {w}x{h} is not a multiple of {multiple} (the VAE's "
                                        "downscale factor).", fix, "size")
    return h, w


def _photo_mask(photo: torch.Tensor, degradation: DegradationLike, size: tuple[int, int]) -> torch.Tensor | None:
    b = photo.shape[0]
    drawn = getattr(degradation, "mask", None)
    if isinstance(drawn, torch.Tensor) and drawn.ndim >= 3 and drawn.shape[0] not in (1, b):
        images = "a single photo" if b == 1 else f"a batch of {b} photos"
        fix = "Use one mask." if b == 1 else f"Use one mask, or one per photo ({b})."
        raise MeasurementError("degradation", f"the mask has a batch of {drawn.shape[0]} but the image is {images}.",
                               fix, "mask_batch")
    try:
        return degradation.pixel_mask((b, 3, *size))
    except ValueError as e:
        fix = ("Draw the mask on this photo (the same size), one mask or one per image." if degradation.needs_mask
               else "Make the box fit inside the photo.")
        raise MeasurementError("degradation", f"{e}.", fix, "mask") from None


@dataclass(frozen=True, eq=False)
class Measurement:
    """A measured photo with its physics: ``y = noise(A(x))``, and (once encoded) its latent.

    ``y``: ``[B, 3, h, w]`` in its natural size (small for super-resolution; for inpainting ``y = x·(1 − m)``, only
    the pixels outside the mask are measured). ``lifted``: ``[B, 3, H, W]`` in [0, 1], ``y`` brought to the image
    size (what a VAE encodes). ``pixel_mask``: ``[B or 1, 1, H, W]``, 1 = missing, for inpainting types.
    ``latent``: the VAE's latent of ``lifted`` (raw, before a model's ``process_in``; None until :meth:`encoded`)
    and ``downscale`` the VAE's pixels per latent cell. Every solver consumes this one object: SILO its latent
    through an operator, the pixel-space baselines ``y`` through the VAE decoder.
    """

    y: torch.Tensor
    lifted: torch.Tensor
    degradation: DegradationLike
    noise: GaussianNoise
    pixel_mask: torch.Tensor | None = None
    latent: torch.Tensor | None = None
    downscale: int = 8
    latent_jitter: torch.Tensor | None = None  # the VAE's latent of the photo under fresh noise (noise_floor)

    @property
    def noise_sigma(self) -> float:
        return self.noise.sigma

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the restored image."""
        return int(self.lifted.shape[-2]), int(self.lifted.shape[-1])

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """``y − A(x)`` for an image ``x`` of :attr:`image_size`."""
        return self.y - self.degradation(x)

    def encoded(self, latent: torch.Tensor, downscale: int, jitter: torch.Tensor | None = None) -> Measurement:
        """This measurement with the latent of :attr:`lifted` (``encode(lifted)``), the encoder's factor and,
        optionally, the latent of :meth:`renoised` (``encode(renoised())``, for the latent noise floor)."""
        return dataclasses.replace(self, latent=latent, downscale=int(downscale), latent_jitter=jitter)

    @property
    def floor_sigma(self) -> float:
        """The pixel noise the floor assumes: the declared noise, at least 8-bit rounding's."""
        return max(self.noise.sigma, QUANTIZATION_SIGMA)

    def renoised(self, seed: int = 0) -> torch.Tensor:
        """:attr:`lifted` with fresh noise of :attr:`floor_sigma` added to ``y`` (where measured) before lifting:
        encoding it next to :attr:`lifted` shows how far that much noise moves the latent."""
        y = GaussianNoise(self.floor_sigma)(self.y, seed=seed)
        lifted = self.degradation.lift(y, size=self.image_size)
        if self.pixel_mask is not None:
            lifted = lifted * (1.0 - self.pixel_mask.to(device=lifted.device, dtype=lifted.dtype))
        return lifted

    def pixel_floor(self) -> torch.Tensor:
        """``[B]``: the expected ``|| y - A(x) ||`` at the true image, ``floor_sigma * sqrt(measured values)`` (the
        pixel-space solvers' noise floor; masked pixels are not measured)."""
        count = float(self.y[0].numel())
        if self.pixel_mask is not None:
            kept = (1.0 - self.pixel_mask.float()).flatten(1).sum(1) * self.y.shape[1]
            return (self.floor_sigma * kept.sqrt()).expand(self.y.shape[0]).double().cpu()
        return torch.full((self.y.shape[0],), self.floor_sigma * math.sqrt(count), dtype=torch.float64)

    @classmethod
    def from_photo(cls, photo: torch.Tensor, degradation: DegradationLike, noise_sigma: float,
                   multiple: int = 8) -> Measurement:
        """The measurement of a degraded photo ``[B, 3, h, w]`` (values 0–1), checked before any encoding.

        The restored size (``degradation.restored_size``) must be a multiple of ``multiple`` (the VAE's factor).
        Raises :class:`MeasurementError` naming ``"image"`` (non-finite values, size) or ``"degradation"`` (a box or
        mask that does not fit the photo).
        """
        noise = GaussianNoise(noise_sigma)
        if not isinstance(photo, torch.Tensor) or photo.dim() != 4:
            raise MeasurementError("image", f"expected a [B, 3, H, W] image tensor, got "
                                            f"{tuple(getattr(photo, 'shape', ())) or type(photo).__name__}.",
                                   reason="shape")
        bad = int((~torch.isfinite(photo)).sum())
        if bad:
            raise MeasurementError("image", f"the photo has {bad} NaN or infinite value(s).",
                                   "Fix the node that made it (a photo is 0-1 everywhere).", "not_finite")
        size = _restored_size(photo, degradation, multiple)
        mask = _photo_mask(photo, degradation, size)
        y, lifted = photo, degradation.lift(photo, size=size)
        if mask is not None:
            # only the pixels outside the mask are measured, y = A(x) = x·(1−m): what the photo still shows under
            # the mask (a photo with its holes painted in the mask editor) is not part of the measurement
            keep = 1.0 - mask.to(device=photo.device, dtype=photo.dtype)
            y, lifted = photo * keep, lifted * keep
        return cls(y=y, lifted=lifted, degradation=degradation, noise=noise, pixel_mask=mask)

    @classmethod
    def simulate(cls, x: torch.Tensor, degradation: DegradationLike, noise_sigma: float,
                 seed: int | None = None) -> Measurement:
        """Degrade a clean image ``x`` ``[B, 3, H, W]``: ``y = clamp(A(x) + n, 0, 1)`` (a photo is stored in 0–1)."""
        noise = GaussianNoise(noise_sigma)
        y = noise(degradation(x), seed=seed).clamp(0, 1)
        lifted = degradation.lift(y, size=tuple(x.shape[-2:])).clamp(0, 1)
        return cls(y=y, lifted=lifted, degradation=degradation, noise=noise,
                   pixel_mask=degradation.pixel_mask(x.shape, device=x.device))
