"""Pixel-space degradation operators A(x) for restoration tasks (SILO, arXiv 2501.11746).

Images are float tensors ``[B, 3, H, W]`` with values in ``[0, 1]``.  Every operator is a
:class:`Degradation` (a ``torch.nn.Module``) built from a small JSON-serialisable spec::

    op = build_degradation({"type": "gaussian_blur", "kernel_size": 61, "sigma": 3.0})
    y = add_noise(op(x), DEFAULT_MEASUREMENT_NOISE, seed=0)   # the measurement
    x0 = op.lift(y, size=x.shape[-2:])                         # full-size image for VAE encoding

A degradation type is declared in ONE place: its class, which names its spec ``type``, its properties
(``is_linear``, ``same_size``, ``is_inpainting``, ``needs_mask``) and its fields as a frozen
:class:`~comfyui_silo.config.Settings` dataclass (``Params``: type, range, default, tooltip of each field). The
spec parser (:func:`build_degradation`), the spec's parameters (:attr:`Degradation.spec`), the list of types
(:data:`DEGRADATION_TYPES`, :data:`INPAINT_TYPES`) and the Degradation node's widgets (``nodes/degradation.py``:
one widget per field, named ``widget_prefix + field``) all derive from the classes in :data:`DEGRADATIONS`.
Adding a type is adding one class to that tuple.

Supported spec types, with required fields (``required``) and defaults:

* ``gaussian_blur``: ``sigma`` (0.1..50, required), ``kernel_size`` (odd, 1..255; default
  ``2 * ceil(10 * sigma) + 1`` capped at 255, i.e. 61 for sigma 3).  Normalised separable Gaussian with the
  boundary handling of ``scipy.ndimage.gaussian_filter(mode="reflect")`` (half-sample symmetric).
* ``super_resolution``: ``factor`` (integer 2..16, required).  Antialiased bicubic downsampling
  (as PIL's bicubic resize), output clamped to ``[0, 1]``.
* ``box_inpaint``: ``top``, ``left``, ``height``, ``width`` (all required).  Missing pixels are 0.
* ``random_box_inpaint``: ``size`` (required), ``seed`` (default 0), ``margin`` (default 16).
  One ``size x size`` box per batch element, top-left drawn uniformly in
  ``[margin, dim - size - margin]`` from a ``torch.Generator`` seeded with ``seed``.
* ``mask_inpaint``: no fields.  The mask is given to :func:`build_degradation` by the caller
  (a ComfyUI MASK, 1 = missing) and is *not* part of the JSON spec.
* ``jpeg``: ``quality`` (integer 1..100, required).  Differentiable JPEG from kornia (not linear).
* ``identity``: no fields.

The declared ranges are those of the Degradation node's widgets, so a spec the core accepts is one the node can
show (a deliberate narrowing of the earlier open-ended spec ranges: e.g. sigma below 0.1 or a kernel over 255 px).

This module is pure torch (+ kornia); it never imports ComfyUI.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from ..config.fields import SettingError, Settings, SettingSpec, setting
from .text import bounded

__all__ = [
    "MaskShapeError",
    "mask_b1hw",
    "DEFAULT_MEASUREMENT_NOISE",
    "DEGRADATIONS",
    "DEGRADATION_TYPES",
    "INPAINT_TYPES",
    "STANDARD_DEGRADATIONS",
    "BoxInpaint",
    "Degradation",
    "GaussianBlur",
    "Identity",
    "JPEG",
    "MaskInpaint",
    "RandomBoxInpaint",
    "SpecFieldError",
    "SpecMismatch",
    "SuperResolution",
    "add_noise",
    "build_degradation",
    "degradation_class",
    "describe_spec",
    "gaussian_kernel1d",
    "normalise_spec",
    "spec_mismatch",
    "symmetric_pad",
]

#: Measurement noise standard deviation on the [0, 1] image scale used in the paper.
DEFAULT_MEASUREMENT_NOISE = 0.01

#: The paper's tasks, name -> normalised spec.
STANDARD_DEGRADATIONS: dict[str, dict[str, Any]] = {
    "gaussian_blur": {"type": "gaussian_blur", "kernel_size": 61, "sigma": 3.0},
    "super_resolution_x4": {"type": "super_resolution", "factor": 4},
    "super_resolution_x8": {"type": "super_resolution", "factor": 8},
    "box_inpaint_center": {"type": "box_inpaint", "top": 128, "left": 128, "height": 256, "width": 256},
    "random_box_inpaint": {"type": "random_box_inpaint", "size": 256, "seed": 0, "margin": 16},
    "jpeg_q10": {"type": "jpeg", "quality": 10},
}


class SpecFieldError(SettingError):
    """A degradation spec field is missing or invalid; ``field`` names it (for front ends that map fields to
    their own input names, e.g. the Degradation node's widgets)."""


def _check_image(x: torch.Tensor, what: str = "image") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected a 4-D {what} tensor [B, C, H, W], got {shape}")


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------


def gaussian_kernel1d(kernel_size: int, sigma: float, dtype: torch.dtype = torch.float64,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian ``exp(-t^2 / (2 sigma^2))`` on ``t = -r..r`` with ``r = kernel_size // 2``."""
    radius = kernel_size // 2
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    return k.to(dtype=dtype, device=device)


def _symmetric_index(n: int, pad_before: int, pad_after: int, device: torch.device) -> torch.Tensor:
    """Indices of a half-sample symmetric extension (``d c b a | a b c d | d c b a``), any pad size."""
    idx = torch.arange(-pad_before, n + pad_after, device=device)
    period = 2 * n
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - 1 - idx, idx)


def symmetric_pad(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Pad the last two dims symmetrically as ``scipy.ndimage`` mode ``"reflect"`` does.

    Unlike ``F.pad(mode="reflect")`` the edge sample is repeated, and the pad may exceed the size
    (the extension keeps reflecting, period ``2 * n``).
    """
    h, w = x.shape[-2:]
    if pad_h:
        x = x.index_select(-2, _symmetric_index(h, pad_h, pad_h, x.device))
    if pad_w:
        x = x.index_select(-1, _symmetric_index(w, pad_w, pad_w, x.device))
    return x


def _separable_blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate every channel with ``kernel`` along H then W, symmetric boundary (kernel is symmetric)."""
    c = x.shape[1]
    r = kernel.numel() // 2
    if r == 0:
        return x * kernel[0]
    k = kernel.to(dtype=x.dtype, device=x.device)
    kh = k.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    kw = k.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    x = F.conv2d(symmetric_pad(x, r, 0), kh, groups=c)
    x = F.conv2d(symmetric_pad(x, 0, r), kw, groups=c)
    return x


class MaskShapeError(TypeError, ValueError):
    """A mask that is not a tensor shaped [H, W], [B, H, W] or [B, 1, H, W]."""


def mask_b1hw(mask: torch.Tensor) -> torch.Tensor:
    """A mask (ComfyUI's MASK ``[H, W]`` or ``[B, H, W]``, or ``[B, 1, H, W]``; 1 = missing) as ``[B, 1, H, W]``,
    values unchanged: the one place the pack brings masks to one shape."""
    if not isinstance(mask, torch.Tensor):
        raise MaskShapeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() == 2:
        return mask[None, None]
    if mask.dim() == 3:
        return mask[:, None]
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise MaskShapeError(f"mask must have a single channel and shape [H, W], [B, H, W] or [B, 1, H, W] (1 = "
                             f"missing), got {tuple(mask.shape)}")
    return mask


def _normalise_mask(mask: torch.Tensor) -> torch.Tensor:
    """ComfyUI MASK ([H,W], [B,H,W] or [B,1,H,W], 1 = missing) -> binary float32 [B,1,H,W]."""
    mask = mask_b1hw(mask)
    if mask.numel() == 0:
        raise ValueError(f"mask is empty (shape {tuple(mask.shape)})")
    if not torch.isfinite(mask.detach().float()).all():
        raise ValueError("mask contains NaN or infinite values")
    return (mask.detach().float() >= 0.5).float()


def _broadcast_mask(mask: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
    b, h, w = int(x_shape[0]), int(x_shape[-2]), int(x_shape[-1])
    mh, mw = mask.shape[-2:]
    if (mh, mw) != (h, w):
        raise ValueError(f"the inpainting mask is {mh}x{mw} (HxW) but the image is {h}x{w}; resize the mask to the image")
    if mask.shape[0] != b:
        if mask.shape[0] != 1:
            use = "use a single mask" if b == 1 else f"use one mask, or {b} (one per image)"
            raise ValueError(f"the inpainting mask has batch size {mask.shape[0]} but the image batch is {b}; {use}")
        mask = mask.expand(b, -1, -1, -1)
    return mask


def _latent_mask(pixel_mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixel mask [B,1,H,W] -> latent mask [B,1,h,w]: area average, then > 0.5 (1 = missing)."""
    m = pixel_mask.float()
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=size, mode="area")
    return (m > 0.5).float()


# --------------------------------------------------------------------------------------------
# operators
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoParams(Settings):
    """The fields of a degradation type that has none (identity, mask_inpaint)."""


class Degradation(torch.nn.Module):
    """Base class of a degradation operator ``y = A(x)`` (before measurement noise).

    A subclass declares, once: ``type_name`` (the spec's ``type``), ``Params`` (a frozen
    :class:`~comfyui_silo.config.Settings` dataclass whose fields are the spec's fields, with range, default and
    tooltip), ``required`` (fields a JSON spec must give), ``widget_prefix`` (the Degradation node names the widget
    of field ``f`` ``widget_prefix + f``) and its properties. It implements :meth:`linear` (linear ones) or
    :meth:`forward`, :attr:`name` and, where they differ from the defaults, :meth:`lift`, :meth:`pixel_mask`,
    :meth:`restored_size` and :meth:`naive_latent`. The members callers may rely on are listed by
    :class:`~comfyui_silo.operators.physics.DegradationLike`.
    """

    type_name: ClassVar[str] = ""
    Params: ClassVar[type[Settings]] = NoParams
    required: ClassVar[tuple[str, ...]] = ()
    widget_prefix: ClassVar[str] = ""
    is_linear: ClassVar[bool] = True
    #: True when the measurement has the image's own size (everything but super-resolution).
    same_size: ClassVar[bool] = True
    #: True for the types whose measurement misses pixels (``pixel_mask`` is not None).
    is_inpainting: ClassVar[bool] = False
    #: True when the caller must give a mask (it is not part of the spec).
    needs_mask: ClassVar[bool] = False

    @property
    def is_partial(self) -> bool:
        """True when the measurement sees only part of the image: fewer values (super-resolution) or missing pixels
        (inpainting). The automatic eta follows another consistency target then (samplers/core.py)."""
        return not self.same_size or self.is_inpainting

    def __init__(self, **values: Any):
        super().__init__()
        try:
            self.params = self.Params(**values)
        except SettingError as e:
            raise SpecFieldError(e.field, str(e)) from None
        for key, value in self.params.as_dict().items():
            setattr(self, key, value)

    # -- declaration ------------------------------------------------------------------------
    @classmethod
    def field_specs(cls) -> list[SettingSpec]:
        """The declared spec fields (name, kind, range, default, tooltip), in declaration order."""
        return cls.Params.specs()

    @classmethod
    def owner(cls) -> str:
        return f"degradation '{cls.type_name}'"

    @classmethod
    def complete_spec(cls, fields: dict[str, Any]) -> dict[str, Any]:
        """Fill the optional fields a JSON spec left out whose default depends on other fields (override)."""
        return fields

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], mask: torch.Tensor | None = None) -> Degradation:
        """Build from a spec dict (``type`` already checked): unknown and missing fields are refused by name."""
        fields = {k: v for k, v in spec.items() if k != "type"}
        allowed = ["type", *(s.name for s in cls.field_specs())]
        extra = [str(k) for k in fields if k not in allowed]
        if extra:
            raise SpecFieldError(extra[0], (
                f"degradation spec for type '{cls.type_name}' has unknown field(s) "
                f"{', '.join(repr(bounded(k, 60)) for k in extra[:5])}; allowed fields are "
                f"{', '.join(repr(a) for a in allowed)}"))
        for name in cls.required:
            if name not in fields:
                raise SpecFieldError(name, f"degradation spec field '{name}' is required for type "
                                           f"'{cls.type_name}' but is missing")
        if cls.needs_mask:
            if mask is None:
                raise ValueError(f"degradation type '{cls.type_name}' needs a mask (1 = missing pixel); none was given")
            return cls(mask=mask, **fields)
        if mask is not None:
            raise ValueError(f"a mask was given but degradation type '{cls.type_name}' does not use one "
                             "(only 'mask_inpaint' does)")
        return cls(**cls.complete_spec(fields))

    # -- spec ---------------------------------------------------------------------------------
    @property
    def spec(self) -> dict[str, Any]:
        """Normalised, JSON-serialisable spec (all defaults filled in, ``type`` first)."""
        return {"type": self.type_name, **self.params.as_dict()}

    def to_json(self) -> str:
        return json.dumps(self.spec)

    @property
    def name(self) -> str:
        return self.type_name

    def extra_repr(self) -> str:
        return self.name

    # -- operator -----------------------------------------------------------------------------
    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """The linear map underlying :meth:`forward` (linear operators only).

        ``forward`` equals ``linear`` except that super-resolution also clamps to ``[0, 1]``.
        """
        raise ValueError(f"degradation '{self.type_name}' is not linear; it has no linear map")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x)
        return self.linear(x)

    def A(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802  (the usual name of the forward operator)
        """``A(x)``, the same as calling the module (deepinv's name)."""
        return self(x)

    def A_adjoint(self, y: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:  # noqa: N802
        """Exact adjoint ``A^T y`` of :meth:`linear`, as the vector-Jacobian product at 0.

        Differentiable w.r.t. ``y`` when ``y.requires_grad``.  Raises ``ValueError`` for
        non-linear operators (JPEG).
        """
        if not self.is_linear:
            raise ValueError(
                f"degradation '{self.type_name}' is not linear, so it has no adjoint; "
                "use autograd through forward() instead"
            )
        x_shape = tuple(int(s) for s in x_shape)
        with torch.enable_grad():
            x0 = torch.zeros(x_shape, dtype=y.dtype, device=y.device, requires_grad=True)
            out = self.linear(x0)
            if out.shape != y.shape:
                raise ValueError(
                    f"A_adjoint: y has shape {tuple(y.shape)} but A maps {x_shape} to {tuple(out.shape)}"
                )
            (g,) = torch.autograd.grad(out, x0, grad_outputs=y, create_graph=y.requires_grad)
        return g

    def measurement_shape(self, x_shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(int(s) for s in x_shape)

    def restored_size(self, measured_size: Sequence[int]) -> tuple[int, int]:
        """``(H, W)`` of the image a measurement of size ``measured_size`` (``(h, w)``) was made from."""
        return int(measured_size[-2]), int(measured_size[-1])

    def lift(self, y: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """Measurement -> full-size image in ``[0, 1]`` for VAE encoding (identity + clamp here)."""
        _check_image(y, "measurement")
        if size is not None and tuple(int(s) for s in size) != tuple(y.shape[-2:]):
            raise ValueError(
                f"lift: '{self.type_name}' keeps the image size, but the measurement is "
                f"{y.shape[-2]}x{y.shape[-1]} and size={tuple(size)} was asked for"
            )
        return y.clamp(0.0, 1.0)

    def pixel_mask(self, x_shape: Sequence[int], device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """``[B, 1, H, W]`` mask with 1 = missing pixel for inpainting types, ``None`` otherwise."""
        return None

    def naive_latent(self, z: torch.Tensor, mask: torch.Tensor | None = None, scale_factor: int = 8) -> torch.Tensor:
        """The same degradation applied to a latent ``z`` [B, C, h, w] as if it were an image.

        A trivial baseline for judging trained latent operators.  ``scale_factor`` is the VAE's
        spatial factor (H = h * scale_factor).  ``mask`` (inpainting types only, ignored by the
        others) overrides the operator's own pixel mask; it may be pixel- or latent-sized.
        """
        _check_image(z, "latent")
        return z


class Identity(Degradation):
    """``A(x) = x``."""

    type_name = "identity"

    @property
    def name(self) -> str:
        return "Identity"

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return x


#: Largest blur kernel (the node's widget range); a spec without ``kernel_size`` gets ``2 ceil(10 sigma) + 1``,
#: capped here (so sigma above 12.7 px is truncated at fewer than 10 sigma).
MAX_KERNEL_SIZE = 255


@dataclass(frozen=True)
class GaussianBlurParams(Settings):
    OWNER: ClassVar[str] = "degradation 'gaussian_blur'"
    kernel_size: int = setting(61, min=1, max=MAX_KERNEL_SIZE, step=2, tooltip="odd kernel size in pixels (paper: 61).")
    sigma: float = setting(3.0, min=0.1, max=50.0, step=0.1,
                           tooltip="standard deviation of the Gaussian in pixels (paper: 3.0).")

    def validate(self) -> None:
        if self.kernel_size % 2 == 0:
            raise SettingError("kernel_size", f"{self.OWNER} setting 'kernel_size' must be an odd integer, "
                                              f"got {self.kernel_size}")


class GaussianBlur(Degradation):
    """Normalised separable Gaussian blur, boundary as ``scipy.ndimage.gaussian_filter(mode="reflect")``.

    Equivalent to ``gaussian_filter(x, sigma, mode="reflect", truncate=(kernel_size // 2) / sigma)``
    on each channel.
    """

    type_name, Params, required, widget_prefix = "gaussian_blur", GaussianBlurParams, ("sigma",), "blur_"

    def __init__(self, kernel_size: int, sigma: float):
        super().__init__(kernel_size=kernel_size, sigma=sigma)

    @classmethod
    def complete_spec(cls, fields: dict[str, Any]) -> dict[str, Any]:
        if "kernel_size" in fields:
            return fields
        sigma_spec = next(s for s in cls.field_specs() if s.name == "sigma")
        try:
            sigma = sigma_spec.check(fields["sigma"], cls.owner())
        except SettingError as e:
            raise SpecFieldError(e.field, str(e)) from None
        return {**fields, "kernel_size": min(2 * math.ceil(10 * sigma) + 1, MAX_KERNEL_SIZE)}

    @property
    def name(self) -> str:
        return f"Gaussian blur σ={self.sigma} ({self.kernel_size}×{self.kernel_size})"

    def kernel1d(self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
        return gaussian_kernel1d(self.kernel_size, self.sigma, dtype=dtype, device=device)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return _separable_blur(x, self.kernel1d(dtype=x.dtype, device=x.device))

    def naive_latent(self, z: torch.Tensor, mask: torch.Tensor | None = None, scale_factor: int = 8) -> torch.Tensor:
        """Blur on the latent grid with ``sigma / scale_factor`` and radius ``ceil(radius / scale_factor)``."""
        _check_image(z, "latent")
        radius = math.ceil((self.kernel_size // 2) / scale_factor)
        kernel = gaussian_kernel1d(2 * radius + 1, self.sigma / scale_factor, dtype=z.dtype, device=z.device)
        return _separable_blur(z, kernel)


@dataclass(frozen=True)
class SuperResolutionParams(Settings):
    OWNER: ClassVar[str] = "degradation 'super_resolution'"
    factor: int = setting(4, min=2, max=16, tooltip="downscale factor (bicubic, antialiased; paper: 4 or 8).")


class SuperResolution(Degradation):
    """Antialiased bicubic downsampling by an integer ``factor`` (PIL-like, a = -0.5), clamped to [0, 1].

    :meth:`linear` is the unclamped map (its adjoint is :meth:`A_adjoint`).
    """

    type_name, Params, required, widget_prefix = "super_resolution", SuperResolutionParams, ("factor",), "sr_"
    same_size = False

    def __init__(self, factor: int):
        super().__init__(factor=factor)

    @property
    def name(self) -> str:
        return f"Super-resolution ×{self.factor}"

    def measurement_shape(self, x_shape: Sequence[int]) -> tuple[int, ...]:
        *lead, h, w = (int(s) for s in x_shape)
        f = self.factor
        if h % f or w % f:
            raise ValueError(
                f"super_resolution with factor {f} needs the image height and width to be divisible by {f}, "
                f"got {h}x{w} (HxW)"
            )
        return (*lead, h // f, w // f)

    def restored_size(self, measured_size: Sequence[int]) -> tuple[int, int]:
        return int(measured_size[-2]) * self.factor, int(measured_size[-1]) * self.factor

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x)
        size = self.measurement_shape(x.shape)[-2:]
        return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).clamp(0.0, 1.0)

    def lift(self, y: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """Bicubic upsampling (align_corners=False) to ``size`` (default: ``factor`` times), clamped."""
        _check_image(y, "measurement")
        if size is None:
            size = (y.shape[-2] * self.factor, y.shape[-1] * self.factor)
        size = (int(size[0]), int(size[1]))
        return F.interpolate(y, size=size, mode="bicubic", align_corners=False).clamp(0.0, 1.0)

    def naive_latent(self, z: torch.Tensor, mask: torch.Tensor | None = None, scale_factor: int = 8) -> torch.Tensor:
        """Antialiased bicubic down by ``factor`` (at least 1×1), then bicubic up to the latent size; no clamp."""
        _check_image(z, "latent")
        h, w = z.shape[-2:]
        small = (max(1, h // self.factor), max(1, w // self.factor))
        down = F.interpolate(z, size=small, mode="bicubic", antialias=True, align_corners=False)
        return F.interpolate(down, size=(h, w), mode="bicubic", align_corners=False)


class _InpaintBase(Degradation):
    """``A(x) = x * (1 - mask)``: missing pixels (mask 1) set to 0."""

    is_inpainting = True

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        _check_image(x)
        keep = 1.0 - self.pixel_mask(x.shape, device=x.device, dtype=x.dtype)
        return x * keep

    def naive_latent(self, z: torch.Tensor, mask: torch.Tensor | None = None, scale_factor: int = 8) -> torch.Tensor:
        """Zero the latent where the area-downsampled pixel mask is > 0.5."""
        _check_image(z, "latent")
        b, _, h, w = z.shape
        if mask is None:
            pm = self.pixel_mask((b, 1, h * scale_factor, w * scale_factor), device=z.device)
        else:
            pm = _normalise_mask(mask).to(z.device)
            if pm.shape[0] not in (1, b):
                raise ValueError(f"the mask has batch size {pm.shape[0]} but the latent batch is {b}")
        lm = _latent_mask(pm, (h, w)).to(z.dtype)
        return z * (1.0 - lm)


_BOX_MAX = 16384


@dataclass(frozen=True)
class BoxInpaintParams(Settings):
    OWNER: ClassVar[str] = "degradation 'box_inpaint'"
    top: int = setting(128, min=0, max=_BOX_MAX, step=8, tooltip="top edge of the missing box in pixels.")
    left: int = setting(128, min=0, max=_BOX_MAX, step=8, tooltip="left edge of the missing box in pixels.")
    height: int = setting(256, min=1, max=_BOX_MAX, step=8, tooltip="height of the missing box in pixels.")
    width: int = setting(256, min=1, max=_BOX_MAX, step=8, tooltip="width of the missing box in pixels.")


class BoxInpaint(_InpaintBase):
    """A fixed box ``[top, top + height) x [left, left + width)`` is missing (set to 0)."""

    type_name, Params, required, widget_prefix = "box_inpaint", BoxInpaintParams, ("top", "left", "height", "width"), "box_"

    def __init__(self, top: int, left: int, height: int, width: int):
        super().__init__(top=top, left=left, height=height, width=width)

    @property
    def name(self) -> str:
        return f"Box inpainting {self.height}×{self.width} at ({self.top}, {self.left})"

    def pixel_mask(self, x_shape: Sequence[int], device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        b, h, w = int(x_shape[0]), int(x_shape[-2]), int(x_shape[-1])
        if self.top + self.height > h:
            raise ValueError(
                f"box_inpaint field 'top'/'height': the box spans rows {self.top}..{self.top + self.height - 1} "
                f"but the image has only {h} rows"
            )
        if self.left + self.width > w:
            raise ValueError(
                f"box_inpaint field 'left'/'width': the box spans columns {self.left}..{self.left + self.width - 1} "
                f"but the image has only {w} columns"
            )
        m = torch.zeros((b, 1, h, w), dtype=dtype, device=device)
        m[:, :, self.top:self.top + self.height, self.left:self.left + self.width] = 1.0
        return m


@dataclass(frozen=True)
class RandomBoxInpaintParams(Settings):
    OWNER: ClassVar[str] = "degradation 'random_box_inpaint'"
    size: int = setting(256, min=8, max=_BOX_MAX, step=8,
                        tooltip="side of the square box, placed at random from the seed.")
    seed: int = setting(0, min=0, max=2**31 - 1, tooltip="seed that places the box (same seed, same box).")
    margin: int = setting(16, min=0, max=_BOX_MAX, widget=False,
                          tooltip="distance of the box from the image border in pixels (paper: 16).")


class RandomBoxInpaint(_InpaintBase):
    """A ``size x size`` box per batch element, top-left uniform in ``[margin, dim - size - margin]``.

    Boxes come from ``torch.Generator().manual_seed(seed)``, drawn (top, left) element after
    element, so the box of element ``b`` depends only on the spec and the image size, not on the
    batch size.
    """

    type_name, Params, required, widget_prefix = "random_box_inpaint", RandomBoxInpaintParams, ("size",), "random_box_"

    def __init__(self, size: int, seed: int = 0, margin: int = 16):
        super().__init__(size=size, seed=seed, margin=margin)

    @property
    def name(self) -> str:
        return f"Random box inpainting {self.size}×{self.size} (seed {self.seed}, margin {self.margin})"

    def boxes(self, x_shape: Sequence[int]) -> list[tuple[int, int, int, int]]:
        """``(top, left, height, width)`` per batch element."""
        b, h, w = int(x_shape[0]), int(x_shape[-2]), int(x_shape[-1])
        hi_t, hi_l = h - self.size - self.margin, w - self.size - self.margin
        if hi_t < self.margin or hi_l < self.margin:
            raise ValueError(
                f"random_box_inpaint field 'size' ({self.size}) with 'margin' ({self.margin}) does not fit a "
                f"{h}x{w} image: need size + 2 * margin <= {min(h, w)}"
            )
        g = torch.Generator().manual_seed(self.seed)
        out = []
        for _ in range(b):
            top = int(torch.randint(self.margin, hi_t + 1, (1,), generator=g))
            left = int(torch.randint(self.margin, hi_l + 1, (1,), generator=g))
            out.append((top, left, self.size, self.size))
        return out

    def pixel_mask(self, x_shape: Sequence[int], device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        b, h, w = int(x_shape[0]), int(x_shape[-2]), int(x_shape[-1])
        m = torch.zeros((b, 1, h, w), dtype=dtype, device=device)
        for i, (top, left, bh, bw) in enumerate(self.boxes(x_shape)):
            m[i, :, top:top + bh, left:left + bw] = 1.0
        return m


class MaskInpaint(_InpaintBase):
    """Pixels where the caller's mask is >= 0.5 are missing (set to 0).

    The mask (``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``, 1 = missing) is held as a
    non-persistent buffer and is *not* part of the JSON spec: rebuilding from the spec needs the
    mask again.  A batch-1 mask is broadcast over the image batch.
    """

    type_name = "mask_inpaint"
    needs_mask = True

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", _normalise_mask(mask), persistent=False)

    @property
    def name(self) -> str:
        frac = float(self.mask.mean()) * 100
        return f"Mask inpainting ({frac:.1f}% missing)"

    def pixel_mask(self, x_shape: Sequence[int], device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        m = _broadcast_mask(self.mask, x_shape)
        return m.to(device=device if device is not None else m.device, dtype=dtype)


@dataclass(frozen=True)
class JPEGParams(Settings):
    OWNER: ClassVar[str] = "degradation 'jpeg'"
    quality: int = setting(10, min=1, max=100, tooltip="JPEG quality 1-100 (paper: 10).")


class JPEG(Degradation):
    """Differentiable JPEG encode-decode (``kornia.enhance.jpeg_codec_differentiable``).

    Not linear.  Sizes not divisible by 16 are padded (replicate, bottom/right) and cropped
    back.  Needs 3 channels.  :meth:`naive_latent` is the identity: JPEG has no meaningful
    latent-grid analogue, so the naive baseline leaves the latent unchanged.
    """

    type_name, Params, required, widget_prefix = "jpeg", JPEGParams, ("quality",), "jpeg_"
    is_linear = False

    @property
    def name(self) -> str:
        return f"JPEG q={self.quality}"

    def __init__(self, quality: int):
        super().__init__(quality=quality)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from kornia.enhance import jpeg_codec_differentiable

        _check_image(x)
        if x.shape[1] != 3:
            raise ValueError(f"jpeg needs RGB images with 3 channels, got {x.shape[1]}")
        h, w = x.shape[-2:]
        ph, pw = (-h) % 16, (-w) % 16
        xp = F.pad(x, (0, pw, 0, ph), mode="replicate") if (ph or pw) else x
        q = torch.tensor([float(self.quality)], dtype=x.dtype, device=x.device)
        y = jpeg_codec_differentiable(xp, q)
        return y[..., :h, :w].clamp(0.0, 1.0)

    def naive_latent(self, z: torch.Tensor, mask: torch.Tensor | None = None, scale_factor: int = 8) -> torch.Tensor:
        """Identity (JPEG has no latent-grid analogue)."""
        _check_image(z, "latent")
        return z


# --------------------------------------------------------------------------------------------
# registry and factory
# --------------------------------------------------------------------------------------------

#: Every degradation type, in the order the Degradation node lists them (its ``type`` options and widgets).
DEGRADATIONS: tuple[type[Degradation], ...] = (GaussianBlur, SuperResolution, BoxInpaint, RandomBoxInpaint,
                                               MaskInpaint, JPEG, Identity)
_BY_TYPE: dict[str, type[Degradation]] = {cls.type_name: cls for cls in DEGRADATIONS}

#: All spec ``type`` values understood by :func:`build_degradation`.
DEGRADATION_TYPES: tuple[str, ...] = tuple(_BY_TYPE)
#: The types whose measurement misses pixels (an operator trained for ``mask_inpaint`` fits all of them).
INPAINT_TYPES: frozenset[str] = frozenset(cls.type_name for cls in DEGRADATIONS if cls.is_inpainting)


def _parse_spec(spec: Mapping[str, Any] | str) -> Mapping[str, Any]:
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"degradation spec is not valid JSON: {e}") from e
    if not isinstance(spec, Mapping):
        raise ValueError(f"degradation spec must be a dict with a 'type' field, got {type(spec).__name__}")
    return spec


def degradation_class(spec: Mapping[str, Any] | str) -> type[Degradation]:
    """The :class:`Degradation` subclass a spec names (``SpecFieldError`` on field ``type`` otherwise)."""
    spec = _parse_spec(spec)
    if "type" not in spec:
        raise SpecFieldError("type", f"degradation spec field 'type' is required; one of {', '.join(DEGRADATION_TYPES)}")
    kind = spec["type"]
    if not isinstance(kind, str) or kind not in _BY_TYPE:
        raise SpecFieldError("type", f"degradation spec field 'type' must be one of {', '.join(DEGRADATION_TYPES)}, "
                             f"got {bounded(repr(kind), 80)}")
    return _BY_TYPE[kind]


def build_degradation(spec: Mapping[str, Any] | str, mask: torch.Tensor | None = None) -> Degradation:
    """Build a :class:`Degradation` from a spec dict (or its JSON string).

    ``mask`` (1 = missing; ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``) is required by, and only
    accepted for, ``{"type": "mask_inpaint"}``; it is not part of the spec.  Invalid specs raise
    :class:`SpecFieldError` (a ``ValueError``) naming the offending field.
    """
    spec = _parse_spec(spec)
    return degradation_class(spec).from_spec(spec, mask=mask)


def normalise_spec(spec: Mapping[str, Any] | str) -> dict[str, Any]:
    """The spec with every default filled in (as :attr:`Degradation.spec`), without building a module or needing
    a mask; an invalid spec is returned as it is (a plain dict)."""
    spec = _parse_spec(spec)
    try:
        cls = degradation_class(spec)
        if cls.needs_mask:
            return {"type": cls.type_name}
        fields = cls.complete_spec({k: v for k, v in spec.items() if k != "type"})
        return {"type": cls.type_name, **cls.Params(**fields).as_dict()}
    except (ValueError, TypeError):
        return dict(spec)


# --------------------------------------------------------------------------------------------
# noise
# --------------------------------------------------------------------------------------------


def add_noise(y: torch.Tensor, sigma: float, seed: int | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """``y + sigma * N(0, 1)`` on the [0, 1] scale (the paper uses ``sigma = 0.01``).

    With ``seed`` the noise is drawn from a fresh CPU generator (same result on any device);
    with ``generator`` from that generator; with neither from the global RNG.  The result is
    *not* clamped: the measurement model is Gaussian, so callers clamp only for display.
    """
    if isinstance(sigma, torch.Tensor):
        sigma = float(sigma)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"noise sigma must be a finite number >= 0, got {sigma!r}")
    if seed is not None and generator is not None:
        raise ValueError("add_noise: give either seed or generator, not both")
    if sigma == 0:
        return y.clone()
    noise_dtype = y.dtype if y.dtype in (torch.float32, torch.float64) else torch.float32
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    if generator is not None:
        noise = torch.randn(y.shape, generator=generator, dtype=noise_dtype, device=generator.device)
        noise = noise.to(device=y.device, dtype=y.dtype)
    else:
        noise = torch.randn(y.shape, dtype=noise_dtype, device=y.device).to(y.dtype)
    return y + float(sigma) * noise


def describe_spec(spec: Mapping[str, Any] | str) -> str:
    """A readable name for a spec, without building it (so a ``mask_inpaint`` spec needs no mask); bounded in
    length (specs come from files)."""
    try:
        spec = _parse_spec(spec)
    except ValueError:
        return "unknown degradation"
    if spec.get("type") == "mask_inpaint":
        return "Mask inpainting (mask given with the measurement)"
    try:
        return build_degradation(spec).name
    except (ValueError, TypeError):
        return bounded(spec.get("type", "unknown"), 80)


class SpecMismatch(NamedTuple):
    """Why an operator trained for one degradation does not fit a measurement (see :func:`spec_mismatch`).

    ``level`` is ``"error"`` when the kind differs (never usable: a blur operator cannot explain a low-resolution
    photo) and ``"warning"`` when only parameters differ (σ=3 operator, σ=2 photo; ×4 operator, ×8 photo): such a
    pair is refused by default too, but a front end may let the user proceed (``overridable``). ``fields`` names
    the differing spec fields (``("type",)`` for a kind mismatch). ``why`` is a sentence, bounded in length.
    """

    level: str
    why: str
    fields: tuple[str, ...] = ()

    @property
    def overridable(self) -> bool:
        return self.level == "warning"


def spec_mismatch(operator_spec: Mapping[str, Any], measurement_spec: Mapping[str, Any]) -> SpecMismatch | None:
    """Does an operator trained for ``operator_spec`` emulate the degradation of a measurement?

    Returns None when it does, else a :class:`SpecMismatch` (a named tuple, so ``m[0]`` is the level and ``m[1]``
    the sentence as before). Both specs are compared with their defaults filled in (``{"sigma": 3}`` equals
    ``{"kernel_size": 61, "sigma": 3.0}``). An operator trained for ``mask_inpaint`` takes the mask as input and so
    fits every inpainting measurement.
    """
    a, b = normalise_spec(dict(operator_spec)), normalise_spec(dict(measurement_spec))
    if a.get("type") == "mask_inpaint" and b.get("type") in INPAINT_TYPES:
        return None
    if a.get("type") != b.get("type"):
        return SpecMismatch("error", f"the operator emulates {describe_spec(a)} but the measurement was made with "
                                     f"{describe_spec(b)}", ("type",))
    if b.get("type") == "mask_inpaint":
        return None
    diff = tuple(sorted(str(k) for k in set(a) | set(b) if k != "type" and a.get(k) != b.get(k)))
    if diff:
        shown = ", ".join(f"{bounded(k, 40)} {bounded(repr(a.get(k)), 40)} vs {bounded(repr(b.get(k)), 40)}"
                          for k in diff[:6])
        return SpecMismatch("warning", f"the operator was trained for {describe_spec(a)} but the measurement was "
                                       f"made with {describe_spec(b)} (operator vs measurement: {shown})", diff)
    return None
