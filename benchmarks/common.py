"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import math

import torch


def emit(lines: list[str], markdown: str | None) -> None:
    """Print a markdown table (given as lines) and, with ``markdown``, append it to that file."""
    text = "\n".join(lines) + "\n"
    print(text)
    if markdown:
        with open(markdown, "a") as f:
            f.write("\n" + text)


def smooth_photo(size: int) -> torch.Tensor:
    """A deterministic smooth synthetic image [1,size,size,3] in [0,1]: gradients, waves and two soft discs."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    disc1 = torch.sigmoid((0.18 - ((x - 0.35) ** 2 + (y - 0.4) ** 2).sqrt()) * 40)
    disc2 = torch.sigmoid((0.12 - ((x - 0.7) ** 2 + (y - 0.65) ** 2).sqrt()) * 40)
    r = 0.3 + 0.3 * x + 0.15 * torch.sin(2 * math.pi * 3 * y) + 0.3 * disc1
    g = 0.25 + 0.35 * y + 0.1 * torch.cos(2 * math.pi * 2 * (x + y)) + 0.25 * disc2
    b = 0.5 + 0.2 * torch.sin(2 * math.pi * 1.5 * x) * torch.cos(2 * math.pi * y) - 0.2 * disc1 + 0.2 * disc2
    return torch.stack([r, g, b], dim=-1).clamp(0, 1)[None]


def photos(n_max: int = 8) -> list[torch.Tensor]:
    """Real photographs bundled with scikit-image, as [3,H,W] in [0,1] (natural photos last: training holds out the
    last images). What the training benchmarks learn from: an operator's held-out error depends on real content."""
    import numpy as np
    from skimage import data as skdata

    out = []
    for name in ("immunohistochemistry", "retina", "hubble_deep_field", "rocket", "motorcycle_left", "astronaut",
                 "coffee", "chelsea"):
        try:
            im = getattr(skdata, name)()
        except Exception:  # noqa: S112 - optional data files may be missing
            continue
        if im.ndim == 3 and im.shape[-1] >= 3:
            out.append(torch.from_numpy(np.ascontiguousarray(im[..., :3])).permute(2, 0, 1).float() / 255.0)
        if len(out) == n_max:
            break
    if len(out) < 4:
        raise RuntimeError("scikit-image's sample photographs are needed (pip install scikit-image pooch)")
    return out
