"""Restoration metrics and pixel-wise uncertainty (pure torch; images ``[B, C, H, W]`` in ``[0, 1]``).

- :func:`psnr`, :func:`ssim` (Gaussian window 11, σ 1.5, the standard settings, computed on the valid region as
  scikit-image's ``structural_similarity(gaussian_weights=True, use_sample_covariance=False)`` does);
- :func:`measurement_consistency`: ``‖A(x̂) − y‖₂`` and its RMSE, the quantity DiracDiffusion tracks, next to the
  noise floor ``σ·√n`` that a perfect restoration reaches;
- :func:`pixel_uncertainty`: mean and standard deviation over several restorations of the same measurement (one per
  seed), and a heat map of the standard deviation (Dirac's uncertainty quantification).
"""

from __future__ import annotations

import math

import torch

__all__ = ["heatmap", "measurement_consistency", "pixel_uncertainty", "psnr", "ssim"]


def _check_pair(x: torch.Tensor, ref: torch.Tensor, what: str = "reference") -> None:
    if x.dim() != 4 or ref.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W]; got {tuple(x.shape)} and {tuple(ref.shape)}")
    if x.shape[1:] != ref.shape[1:]:
        raise ValueError(f"the image is {x.shape[-1]}x{x.shape[-2]} with {x.shape[1]} channels but the {what} is "
                         f"{ref.shape[-1]}x{ref.shape[-2]} with {ref.shape[1]} channels; they must match")
    if ref.shape[0] not in (1, x.shape[0]) and x.shape[0] != 1:
        raise ValueError(f"batch sizes {x.shape[0]} and {ref.shape[0]} do not match (one may be 1)")


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per batch element (``inf`` for identical images)."""
    _check_pair(x, ref)
    x, ref = torch.broadcast_tensors(x.double(), ref.double())
    mse = (x - ref).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, dtype, device) -> torch.Tensor:
    g = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(g**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per batch element: mean over channels and the valid (unpadded) region."""
    _check_pair(x, ref)
    if min(x.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} pixels, got {x.shape[-1]}x{x.shape[-2]}")
    x, ref = torch.broadcast_tensors(x.double(), ref.double())
    c = x.shape[1]
    w = _gaussian_window(window, sigma, x.dtype, x.device).expand(c, 1, window, window)

    def filt(t):
        return torch.nn.functional.conv2d(t, w, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = filt(x), filt(ref)
    sxx = filt(x * x) - mu_x**2
    syy = filt(ref * ref) - mu_y**2
    sxy = filt(x * ref) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def measurement_consistency(x: torch.Tensor, y: torch.Tensor, degradation, noise_sigma: float = 0.0) -> dict:
    """How well a restoration explains the measurement: ``‖A(x) − y‖₂`` per batch element, its RMSE, and the noise
    floor ``noise_sigma·√n`` (the expected norm of the measurement noise itself)."""
    with torch.no_grad():
        ax = degradation(x.float())
    if ax.shape[1:] != y.shape[1:]:
        raise ValueError(f"A(image) has shape {tuple(ax.shape[1:])} but the measurement has {tuple(y.shape[1:])}: "
                         "the restoration must have the size the measurement was made for")
    r = (ax.double() - y.double().to(ax.device)).flatten(1)
    n = r.shape[1]
    norm = torch.linalg.vector_norm(r, dim=1)
    return {"norm": norm, "rmse": norm / math.sqrt(max(n, 1)), "noise_floor": float(noise_sigma) * math.sqrt(n),
            "count": n}


def heatmap(values: torch.Tensor, vmax: float | None = None) -> torch.Tensor:
    """``[B, 1, H, W]`` non-negative values -> ``[B, 3, H, W]`` colour map (black → red → yellow → white)."""
    v = values.float()
    top = float(v.max()) if vmax is None else float(vmax)
    t = (v / top).clamp(0, 1) if top > 0 else torch.zeros_like(v)
    r = (3 * t).clamp(0, 1)
    g = (3 * t - 1).clamp(0, 1)
    b = (3 * t - 2).clamp(0, 1)
    return torch.cat([r, g, b], dim=1)


def pixel_uncertainty(samples: torch.Tensor) -> dict:
    """Pixel-wise mean and standard deviation over restorations ``[N, C, H, W]`` of one measurement (N ≥ 2).

    Returns ``mean`` ``[1,C,H,W]``, ``std`` ``[1,C,H,W]`` (unbiased), ``std_gray`` ``[1,1,H,W]`` (root mean square over
    channels), ``heatmap`` ``[1,3,H,W]`` (scaled to the largest std) and ``mean_std`` (a float summary)."""
    if samples.dim() != 4 or samples.shape[0] < 2:
        raise ValueError(f"pixel uncertainty needs at least 2 restorations [N, C, H, W], got {tuple(samples.shape)}")
    s = samples.double()
    mean = s.mean(0, keepdim=True)
    std = s.std(0, unbiased=True, keepdim=True)
    gray = std.pow(2).mean(1, keepdim=True).sqrt()
    return {"mean": mean.float(), "std": std.float(), "std_gray": gray.float(), "heatmap": heatmap(gray),
            "mean_std": float(gray.mean())}
