"""How well a latent operator emulates its degradation, next to the two references that bound it.

SILO's restoration can be no more consistent with the photo than ``H(E(x))`` is with ``E(A(x))``, so an operator is
judged on held-out images that it never trained on, against:

* **identity** ``H(z) = z`` — doing nothing; every useful operator must beat it;
* **degradation on the latent** (``Degradation.naive_latent``) — the degradation applied to the latent as if it
  were an image (blur with σ / downscale, …): the other trivial guess;
* **the autoencoder's own floor** ``D(E(A x))`` — when a decoder is at hand, the best any latent can decode to.

Latent error is the relative L2 error ``‖H(E x) − E(A x)‖ / ‖E(A x)‖`` per image (mean over images) and the mean
absolute error. Decoded fidelity compares ``D(H(E x))``, ``D(E x)`` and ``D(E(A x))`` with ``A(x)`` (lifted to the
image size for super-resolution, as the VAE sees it) in PSNR and SSIM; **gap closed** is the operator's share of the
identity → floor distance in dB. Targets are noiseless (σ = 0): measurement noise changes a real encoder's latents
by 30–65 % of their norm (taef2, σ = 0.01), which would swamp the operator's own error.

:func:`verdict` turns the numbers into one plain sentence and a level (``good`` / ``usable`` / ``weak``); the
training report, the operator file and the nodes all show that sentence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .metrics import psnr, ssim
from .text import bounded

__all__ = ["GOOD_GAP", "USABLE_GAP", "HeldoutSet", "decoded_fidelity", "latent_errors", "relative_error",
           "stored_errors", "stored_verdict", "verdict"]

#: PSNR of identical images is infinite; per-image values are capped here so that means and gaps stay finite.
MAX_PSNR = 100.0
#: Share of the identity → autoencoder-floor gap (decoded dB) an operator must close to be called good / usable.
GOOD_GAP, USABLE_GAP = 0.8, 0.5
#: Without a decoder: the operator's latent error as a fraction of the best trivial baseline's, for good / usable.
GOOD_LATENT_RATIO, USABLE_LATENT_RATIO = 0.5, 0.9


def relative_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``‖pred − target‖ / ‖target‖`` per batch element (float64)."""
    p, t = pred.double().flatten(1), target.double().flatten(1)
    return (p - t).norm(dim=1) / t.norm(dim=1).clamp_min(1e-12)


@dataclass
class HeldoutSet:
    """Held-out pairs: clean crops ``x``, their latents ``z`` = E(x), noiseless targets ``target`` = E(lift(A x)),
    the measurement-noise level the operator is asked at (``sigma``, per image), the latent mask (inpainting) and
    the degradation with its lifted noiseless measurement ``measured`` = lift(A x) (for decoded fidelity)."""

    x: torch.Tensor
    z: torch.Tensor
    target: torch.Tensor
    sigma: torch.Tensor
    mask: torch.Tensor | None
    degradation: object
    measured: torch.Tensor

    def subset(self, n: int) -> HeldoutSet:
        """The first ``n`` pairs (the degradation is shared: its per-image parts, e.g. a drawn mask, stay whole)."""
        return HeldoutSet(self.x[:n], self.z[:n], self.target[:n], self.sigma[:n],
                          None if self.mask is None else self.mask[:n], self.degradation, self.measured[:n])


def _stats(pred: torch.Tensor, target: torch.Tensor) -> dict:
    err = (pred - target).float()
    return {"l1": float(err.abs().mean()), "mse": float(err.pow(2).mean()),
            "rel_l2": float(relative_error(pred, target).mean())}


def latent_errors(operator: Callable, held: HeldoutSet, downscale: int) -> tuple[dict, torch.Tensor]:
    """Latent error of the operator, identity and the degradation-on-latent baseline; also the operator's output."""
    with torch.no_grad():
        pred = operator(held.z, sigma_y=held.sigma, mask=held.mask)
        naive = held.degradation.naive_latent(held.z, mask=held.mask, scale_factor=downscale)
    return ({"operator": _stats(pred, held.target), "identity": _stats(held.z, held.target),
             "naive_latent": _stats(naive, held.target)}, pred)


def decoded_fidelity(decode: Callable[[torch.Tensor], torch.Tensor], held: HeldoutSet, pred: torch.Tensor,
                     batch: int = 8) -> dict:
    """PSNR/SSIM of the decoded operator output, identity and floor against the lifted measurement; gap closed."""
    def run(latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([decode(latents[i:i + batch]).float().clamp(0, 1) for i in range(0, len(latents), batch)])

    ref = held.measured.float()
    out = {}
    for name, latents in (("operator", pred), ("floor", held.target), ("identity", held.z)):
        img = run(latents).to(ref.device)
        if img.shape[-2:] != ref.shape[-2:]:
            raise ValueError(f"the decoder returned {img.shape[-1]}x{img.shape[-2]} images for "
                             f"{ref.shape[-1]}x{ref.shape[-2]} crops; is the VAE's downscale factor right?")
        out[name] = {"psnr": float(psnr(img, ref).clamp(max=MAX_PSNR).mean()), "ssim": float(ssim(img, ref).mean())}
    span = out["floor"]["psnr"] - out["identity"]["psnr"]
    out["gap_closed"] = (out["operator"]["psnr"] - out["identity"]["psnr"]) / span if span > 1e-6 else None
    return out


def verdict(latent: Mapping, decoded: Mapping | None = None, metric: str = "rel_l2") -> dict:
    """``{"level": "good" | "usable" | "weak", "text": ...}`` from :func:`latent_errors` (+ :func:`decoded_fidelity`).

    With decoded fidelity the share of the gap closed decides (≥ 80 % good, ≥ 50 % usable); without it, the latent
    error as a fraction of the best trivial baseline's (≤ 50 % good, ≤ 90 % usable). An operator that does not beat
    both trivial baselines is always weak, whatever else it shows. ``metric``: the latent error compared
    (``rel_l2``, or ``l1`` for files written before relative errors were stored).
    """
    what = "latent error" if metric == "rel_l2" else "latent L1"
    op = latent["operator"][metric]
    best_name, best = min((("identity", latent["identity"][metric]),
                           ("degradation-on-latent", latent["naive_latent"][metric])), key=lambda kv: kv[1])
    ratio = op / best if best > 0 else float("inf")
    if ratio >= 1.0:
        return {"level": "weak", "text": (
            f"WARNING: the operator does not beat the {best_name} baseline ({what} {op:.4g} vs {best:.4g}); "
            "it will not guide sampling usefully: train longer, on more images, or check the degradation")}
    gap = None if decoded is None else decoded.get("gap_closed")
    if gap is not None:
        share = f"closes {gap:.0%} of the gap from doing nothing to the VAE's own limit"
        if gap >= GOOD_GAP:
            return {"level": "good", "text": f"good: {share}"}
        if gap >= USABLE_GAP:
            return {"level": "usable", "text": f"usable: {share}; train longer or on more images"}
        return {"level": "weak", "text": f"WARNING: weak: only {share}; train longer or on more images"}
    share = f"{what} {op:.4g} is {ratio:.1%} of the best trivial baseline ({best_name}, {best:.4g})"
    if ratio <= GOOD_LATENT_RATIO:
        return {"level": "good", "text": f"good: {share}"}
    if ratio <= USABLE_LATENT_RATIO:
        return {"level": "usable", "text": f"usable: {share}; train longer or on more images"}
    return {"level": "weak", "text": f"WARNING: weak: {share}; train longer or on more images"}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def stored_errors(training: Mapping) -> tuple[str, tuple[float, float, float]] | None:
    """``(metric, (operator, identity, degradation-on-latent))`` from an operator file's training metadata: the
    relative errors of the fidelity report, or the held-out block of older files (relative L2 when stored, else L1).
    None when the file holds no usable numbers. Values from a file are checked, never trusted."""
    fid = training.get("fidelity")
    block = fid.get("latent") if isinstance(fid, Mapping) else None
    if not isinstance(block, Mapping):
        block = training.get("heldout")
    if not isinstance(block, Mapping):
        return None
    for metric in ("rel_l2", "l1"):
        vals = [block.get(k).get(metric) if isinstance(block.get(k), Mapping) else None
                for k in ("operator", "identity", "naive_latent")]
        if all(_number(v) for v in vals):
            return metric, (float(vals[0]), float(vals[1]), float(vals[2]))
    return None


def stored_mse(training: Mapping) -> float | None:
    """The operator's held-out mean squared latent error per element (its own error at the true image, part of the
    latent noise floor), from the fidelity report or the held-out block; None when the file holds none."""
    for block in ((training.get("fidelity") or {}).get("latent") if isinstance(training.get("fidelity"), Mapping)
                  else None, training.get("heldout")):
        op = block.get("operator") if isinstance(block, Mapping) else None
        value = op.get("mse") if isinstance(op, Mapping) else None
        if _number(value) and value >= 0:
            return float(value)
    return None


def stored_verdict(training: Mapping) -> dict | None:
    """The verdict of an operator file: the one stored with its fidelity report (level and text, text bounded), or,
    for files written before verdicts were stored, one computed from their held-out numbers. None without either."""
    fid = training.get("fidelity")
    stored = fid.get("verdict") if isinstance(fid, Mapping) else None
    if isinstance(stored, Mapping) and stored.get("level") in ("good", "usable", "weak") \
            and isinstance(stored.get("text"), str):
        return {"level": stored["level"], "text": bounded(stored["text"], 300)}
    errors = stored_errors(training)
    if errors is None:
        return None
    metric, values = errors
    return verdict({k: {metric: v} for k, v in zip(("operator", "identity", "naive_latent"), values, strict=True)},
                   metric=metric)
