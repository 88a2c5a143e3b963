"""Pixel-space degradation operators A(x) for restoration tasks (SILO, arXiv 2501.11746).

Images are float tensors ``[B, 3, H, W]`` with values in ``[0, 1]``.  Every operator is a
:class:`Degradation` (a ``torch.nn.Module``) built from a small JSON-serialisable spec::

    op = build_degradation({"type": "gaussian_blur", "kernel_size": 61, "sigma": 3.0})
    y = add_noise(op(x), DEFAULT_MEASUREMENT_NOISE, seed=0)   # the measurement
    x0 = op.lift(y, size=x.shape[-2:])                         # full-size image for VAE encoding

Supported spec types (``DEGRADATION_TYPES``), with required fields and defaults:

* ``gaussian_blur``: ``sigma`` (> 0, required), ``kernel_size`` (odd >= 1; default
  ``2 * ceil(10 * sigma) + 1``, i.e. 61 for sigma 3).  Normalised separable Gaussian with the
  boundary handling of ``scipy.ndimage.gaussian_filter(mode="reflect")`` (half-sample symmetric).
* ``super_resolution``: ``factor`` (integer >= 2, required).  Antialiased bicubic downsampling
  (as PIL's bicubic resize), output clamped to ``[0, 1]``.
* ``box_inpaint``: ``top``, ``left``, ``height``, ``width`` (all required).  Missing pixels are 0.
* ``random_box_inpaint``: ``size`` (required), ``seed`` (default 0), ``margin`` (default 16).
  One ``size x size`` box per batch element, top-left drawn uniformly in
  ``[margin, dim - size - margin]`` from a ``torch.Generator`` seeded with ``seed``.
* ``mask_inpaint``: no fields.  The mask is given to :func:`build_degradation` by the caller
  (a ComfyUI MASK, 1 = missing) and is *not* part of the JSON spec.
* ``jpeg``: ``quality`` (integer 1..100, required).  Differentiable JPEG from kornia (not linear).
* ``identity``: no fields.

This module is pure torch (+ kornia); it never imports ComfyUI.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_MEASUREMENT_NOISE",
    "DEGRADATION_TYPES",
    "STANDARD_DEGRADATIONS",
    "SpecFieldError",
    "BoxInpaint",
    "Degradation",
    "GaussianBlur",
    "Identity",
    "JPEG",
    "MaskInpaint",
    "RandomBoxInpaint",
    "SuperResolution",
    "add_noise",
    "build_degradation",
    "gaussian_kernel1d",
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


# --------------------------------------------------------------------------------------------
# spec validation helpers
# --------------------------------------------------------------------------------------------


class SpecFieldError(ValueError):
    """A degradation spec field is missing or invalid; ``field`` names it (for front ends that map fields to
    their own input names)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _field_error(field: str, expected: str, value: Any) -> SpecFieldError:
    return SpecFieldError(field, f"degradation spec field '{field}' must be {expected}, got {value!r}")


def _as_int(spec: Mapping[str, Any], field: str, expected: str, minimum: int | None = None,
            maximum: int | None = None) -> int:
    value = spec[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _field_error(field, expected, value)
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise _field_error(field, expected, value)
        value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise _field_error(field, expected, value)
    return int(value)


def _as_positive_float(spec: Mapping[str, Any], field: str) -> float:
    value = spec[field]
    expected = "a positive number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _field_error(field, expected, value)
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise _field_error(field, expected, spec[field])
    return value


def _check_fields(spec: Mapping[str, Any], kind: str, required: Sequence[str], optional: Sequence[str]) -> None:
    allowed = ("type", *required, *optional)
    extra = [k for k in spec if k not in allowed]
    if extra:
        names = ", ".join(repr(str(k)) for k in extra)
        raise ValueError(
            f"degradation spec for type '{kind}' has unknown field(s) {names}; "
            f"allowed fields are {', '.join(repr(a) for a in allowed)}"
        )
    for field in required:
        if field not in spec:
            raise SpecFieldError(field, f"degradation spec field '{field}' is required for type '{kind}' but is missing")


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


def _normalise_mask(mask: torch.Tensor) -> torch.Tensor:
    """ComfyUI MASK ([H,W], [B,H,W] or [B,1,H,W], 1 = missing) -> binary float32 [B,1,H,W]."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() == 2:
        mask = mask[None, None]
    elif mask.dim() == 3:
        mask = mask[:, None]
    elif mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must have shape [H, W], [B, H, W] or [B, 1, H, W], got {tuple(mask.shape)}")
    if mask.numel() == 0:
        raise ValueError(f"mask is empty (shape {tuple(mask.shape)})")
    return (mask.detach().float() >= 0.5).float()


def _broadcast_mask(mask: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
    b, h, w = int(x_shape[0]), int(x_shape[-2]), int(x_shape[-1])
    mh, mw = mask.shape[-2:]
    if (mh, mw) != (h, w):
        raise ValueError(f"the inpainting mask is {mh}x{mw} (HxW) but the image is {h}x{w}; resize the mask to the image")
    if mask.shape[0] != b:
        if mask.shape[0] != 1:
            raise ValueError(f"the inpainting mask has batch size {mask.shape[0]} but the image batch is {b}; use 1 or {b}")
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


class Degradation(torch.nn.Module):
    """Base class of a degradation operator ``y = A(x)`` (before measurement noise).

    Subclasses implement :meth:`linear` (linear ones) or :meth:`forward`, :meth:`_params`
    (the spec without ``type``), :attr:`name` and, where they differ from the defaults,
    :meth:`lift`, :meth:`pixel_mask` and :meth:`naive_latent`.
    """

    type_name: str = ""
    is_linear: bool = True
    #: True when the measurement has the image's own size (everything but super-resolution).
    same_size: bool = True

    # -- spec ---------------------------------------------------------------------------------
    def _params(self) -> dict[str, Any]:
        return {}

    @property
    def spec(self) -> dict[str, Any]:
        """Normalised, JSON-serialisable spec (all defaults filled in, ``type`` first)."""
        return {"type": self.type_name, **self._params()}

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


class GaussianBlur(Degradation):
    """Normalised separable Gaussian blur, boundary as ``scipy.ndimage.gaussian_filter(mode="reflect")``.

    Equivalent to ``gaussian_filter(x, sigma, mode="reflect", truncate=(kernel_size // 2) / sigma)``
    on each channel.
    """

    type_name = "gaussian_blur"

    def __init__(self, kernel_size: int, sigma: float):
        super().__init__()
        self.kernel_size = int(kernel_size)
        self.sigma = float(sigma)

    def _params(self) -> dict[str, Any]:
        return {"kernel_size": self.kernel_size, "sigma": self.sigma}

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


class SuperResolution(Degradation):
    """Antialiased bicubic downsampling by an integer ``factor`` (PIL-like, a = -0.5), clamped to [0, 1].

    :meth:`linear` is the unclamped map (its adjoint is :meth:`A_adjoint`).
    """

    type_name = "super_resolution"
    same_size = False

    def __init__(self, factor: int):
        super().__init__()
        self.factor = int(factor)

    def _params(self) -> dict[str, Any]:
        return {"factor": self.factor}

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


class BoxInpaint(_InpaintBase):
    """A fixed box ``[top, top + height) x [left, left + width)`` is missing (set to 0)."""

    type_name = "box_inpaint"

    def __init__(self, top: int, left: int, height: int, width: int):
        super().__init__()
        self.top, self.left, self.height, self.width = int(top), int(left), int(height), int(width)

    def _params(self) -> dict[str, Any]:
        return {"top": self.top, "left": self.left, "height": self.height, "width": self.width}

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


class RandomBoxInpaint(_InpaintBase):
    """A ``size x size`` box per batch element, top-left uniform in ``[margin, dim - size - margin]``.

    Boxes come from ``torch.Generator().manual_seed(seed)``, drawn (top, left) element after
    element, so the box of element ``b`` depends only on the spec and the image size, not on the
    batch size.
    """

    type_name = "random_box_inpaint"

    def __init__(self, size: int, seed: int = 0, margin: int = 16):
        super().__init__()
        self.size, self.seed, self.margin = int(size), int(seed), int(margin)

    def _params(self) -> dict[str, Any]:
        return {"size": self.size, "seed": self.seed, "margin": self.margin}

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


class JPEG(Degradation):
    """Differentiable JPEG encode-decode (``kornia.enhance.jpeg_codec_differentiable``).

    Not linear.  Sizes not divisible by 16 are padded (replicate, bottom/right) and cropped
    back.  Needs 3 channels.  :meth:`naive_latent` is the identity: JPEG has no meaningful
    latent-grid analogue, so the naive baseline leaves the latent unchanged.
    """

    type_name = "jpeg"
    is_linear = False

    def __init__(self, quality: int):
        super().__init__()
        self.quality = int(quality)

    def _params(self) -> dict[str, Any]:
        return {"quality": self.quality}

    @property
    def name(self) -> str:
        return f"JPEG q={self.quality}"

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
# factory
# --------------------------------------------------------------------------------------------


def _build_gaussian_blur(spec: Mapping[str, Any]) -> Degradation:
    _check_fields(spec, "gaussian_blur", ["sigma"], ["kernel_size"])
    sigma = _as_positive_float(spec, "sigma")
    if "kernel_size" in spec:
        ks = _as_int(spec, "kernel_size", "an odd integer >= 1", minimum=1)
        if ks % 2 == 0:
            raise _field_error("kernel_size", "an odd integer >= 1", spec["kernel_size"])
    else:
        ks = 2 * math.ceil(10 * sigma) + 1
    return GaussianBlur(ks, sigma)


def _build_super_resolution(spec: Mapping[str, Any]) -> Degradation:
    _check_fields(spec, "super_resolution", ["factor"], [])
    return SuperResolution(_as_int(spec, "factor", "an integer >= 2", minimum=2))


def _build_box_inpaint(spec: Mapping[str, Any]) -> Degradation:
    _check_fields(spec, "box_inpaint", ["top", "left", "height", "width"], [])
    top = _as_int(spec, "top", "an integer >= 0", minimum=0)
    left = _as_int(spec, "left", "an integer >= 0", minimum=0)
    height = _as_int(spec, "height", "an integer >= 1", minimum=1)
    width = _as_int(spec, "width", "an integer >= 1", minimum=1)
    return BoxInpaint(top, left, height, width)


def _build_random_box_inpaint(spec: Mapping[str, Any]) -> Degradation:
    _check_fields(spec, "random_box_inpaint", ["size"], ["seed", "margin"])
    size = _as_int(spec, "size", "an integer >= 1", minimum=1)
    seed = _as_int(spec, "seed", "an integer in 0..2**63-1", minimum=0, maximum=2**63 - 1) if "seed" in spec else 0
    margin = _as_int(spec, "margin", "an integer >= 0", minimum=0) if "margin" in spec else 16
    return RandomBoxInpaint(size, seed, margin)


def _build_jpeg(spec: Mapping[str, Any]) -> Degradation:
    _check_fields(spec, "jpeg", ["quality"], [])
    return JPEG(_as_int(spec, "quality", "an integer in 1..100", minimum=1, maximum=100))


def _build_identity(spec: Mapping[str, Any]) -> Degradation:
    _check_fields(spec, "identity", [], [])
    return Identity()


_BUILDERS = {
    "gaussian_blur": _build_gaussian_blur,
    "super_resolution": _build_super_resolution,
    "box_inpaint": _build_box_inpaint,
    "random_box_inpaint": _build_random_box_inpaint,
    "mask_inpaint": None,  # needs the caller's mask, handled in build_degradation
    "jpeg": _build_jpeg,
    "identity": _build_identity,
}

#: All spec ``type`` values understood by :func:`build_degradation`.
DEGRADATION_TYPES: tuple[str, ...] = tuple(_BUILDERS)


def build_degradation(spec: Mapping[str, Any] | str, mask: torch.Tensor | None = None) -> Degradation:
    """Build a :class:`Degradation` from a spec dict (or its JSON string).

    ``mask`` (1 = missing; ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``) is required by, and only
    accepted for, ``{"type": "mask_inpaint"}``; it is not part of the spec.  Invalid specs raise
    ``ValueError`` naming the offending field.
    """
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"degradation spec is not valid JSON: {e}") from e
    if not isinstance(spec, Mapping):
        raise ValueError(f"degradation spec must be a dict with a 'type' field, got {type(spec).__name__}")
    if "type" not in spec:
        raise SpecFieldError("type", f"degradation spec field 'type' is required; one of {', '.join(DEGRADATION_TYPES)}")
    kind = spec["type"]
    if not isinstance(kind, str) or kind not in _BUILDERS:
        raise SpecFieldError("type", f"degradation spec field 'type' must be one of {', '.join(DEGRADATION_TYPES)}, "
                             f"got {kind!r}")
    if kind == "mask_inpaint":
        _check_fields(spec, kind, [], [])
        if mask is None:
            raise ValueError("degradation type 'mask_inpaint' needs a mask (1 = missing pixel); none was given")
        return MaskInpaint(mask)
    if mask is not None:
        raise ValueError(f"a mask was given but degradation type '{kind}' does not use one (only 'mask_inpaint' does)")
    return _BUILDERS[kind](spec)


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
    """A readable name for a spec, without building it (so a ``mask_inpaint`` spec needs no mask)."""
    if isinstance(spec, str):
        spec = json.loads(spec)
    if spec.get("type") == "mask_inpaint":
        return "Mask inpainting (mask given with the measurement)"
    try:
        return build_degradation(spec).name
    except ValueError:
        return str(spec.get("type", "unknown"))


INPAINT_TYPES = frozenset({"box_inpaint", "random_box_inpaint", "mask_inpaint"})


def spec_mismatch(operator_spec: Mapping[str, Any], measurement_spec: Mapping[str, Any]) -> tuple[str, str] | None:
    """Does an operator trained for ``operator_spec`` emulate the degradation of a measurement?

    Returns None when it does, ``("error", why)`` when the kind differs (a blur operator cannot explain a
    low-resolution photo), ``("warning", why)`` when only parameters differ (σ=3 operator, σ=2 photo). An operator
    trained for ``mask_inpaint`` takes the mask as input and so fits every inpainting measurement.
    """
    a, b = dict(operator_spec), dict(measurement_spec)
    if a.get("type") == "mask_inpaint" and b.get("type") in INPAINT_TYPES:
        return None
    if a.get("type") != b.get("type"):
        return ("error", f"the operator emulates {describe_spec(a)} but the measurement was made with "
                         f"{describe_spec(b)}")
    if b.get("type") == "mask_inpaint":
        return None
    diff = sorted(k for k in set(a) | set(b) if k != "type" and a.get(k) != b.get(k))
    if diff:
        return ("warning", f"the operator was trained for {json.dumps(a)} but the measurement uses "
                           f"{json.dumps(b)} (different {', '.join(diff)})")
    return None
