"""ReSample's hard data consistency: ``argmin_z ||y - A(D(z))||^2`` from a start latent (pure torch).

Two variants (Song et al., ICLR 2024, Sec. 3.1): ``"latent"`` optimises the latent through the decoder;
``"pixel"`` optimises the decoded image against ``||y - A(img)||^2`` and encodes it back (cheaper per iteration,
only as good as ``E(D(.))``).  Both run a plain Adam (or SGD) on the per-element mean squared residual, written out
so that a batch element stops exactly where it is once its RMS residual is below ``tolerance`` (the reference
code's ``MSE < eps**2``).  Each iteration reports ``progress(phase, done, total)``, where the node glue checks
Cancel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .core import MeasurementLoss, Progress, normal_tensor

__all__ = ["MODES", "OPTIMIZERS", "hard_consistency"]

OPTIMIZERS = ("adam", "sgd")
MODES = ("latent", "pixel")


def _optimise(param0, residual_fn, steps: int, lr: float, tolerance: float, optimizer: str,
              progress: Progress | None = None, phase: str = "consistency"):
    """Minimise the per-element MSE ``residual_fn(p) -> [B]`` from ``param0``; freeze elements with RMS < tol.

    Plain Adam (beta 0.9/0.999, eps 1e-8) or SGD.  Returns ``(param, iterations [B] long)``.
    """
    p = param0.clone().requires_grad_(True)
    b = p.shape[0]
    view = (b,) + (1,) * (p.ndim - 1)
    active = torch.ones(b, dtype=torch.bool, device=p.device)
    iters = torch.zeros(b, dtype=torch.long, device=p.device)
    m = torch.zeros_like(p) if optimizer == "adam" else None
    v = torch.zeros_like(p) if optimizer == "adam" else None
    b1, b2, eps = 0.9, 0.999, 1e-8
    for k in range(1, steps + 1):
        mse = residual_fn(p)
        with torch.no_grad():
            active &= ~(mse.detach().sqrt() < tolerance)
        if not bool(active.any()):
            break
        (g,) = torch.autograd.grad((mse * active.to(mse.dtype)).sum(), p)
        with torch.no_grad():
            if optimizer == "adam":
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                step = (m / (1 - b1**k)) / ((v / (1 - b2**k)).sqrt() + eps)
            else:
                step = g
            p.sub_(lr * step * active.reshape(view).to(p.dtype))
            iters += active.long()
        if progress is not None:
            progress(phase, k, steps)
    return p.detach(), iters


def _check(mode: str, optimizer: str, steps, lr, tolerance, encoder) -> None:
    if mode not in MODES:
        raise ValueError(f"optimization={mode!r} is not known; allowed values: 'latent', 'pixel'")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not known; allowed values: {', '.join(map(repr, OPTIMIZERS))}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{mode}_steps must be an int >= 0, got {steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0) or not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise ValueError(f"lr must be > 0 and tolerance >= 0, got lr={lr!r}, tolerance={tolerance!r}")
    if mode == "pixel" and (encoder is None or not callable(encoder)):
        raise ValueError("optimization='pixel' needs encoder= (a callable E(image) -> latent)")


def hard_consistency(z0: torch.Tensor, measurement: torch.Tensor, degradation: Callable[..., torch.Tensor],
                     decoder: Callable[[torch.Tensor], torch.Tensor], *,
                     steps: int, lr: float, encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     mode: str = "latent", tolerance: float = 1e-3,
                     optimizer: str = "adam", degradation_kwargs: dict | None = None,
                     progress: Progress | None = None, phase: str = "consistency") -> tuple[torch.Tensor, dict]:
    """Solve ReSample's hard data-consistency problem ``argmin ||y - A(D(z))||^2`` started at ``z0``.

    ``mode="latent"``: optimise ``z`` through the decoder; ``mode="pixel"``: optimise the image ``D(z0)`` against
    ``||y - A(img)||^2`` and return ``E(img)`` (needs ``encoder``); at most ``steps`` iterations of learning rate
    ``lr`` (ReSample's settings declare the reference code's values: ``latent_steps``/``lr`` 500/5e-3,
    ``pixel_steps``/``pixel_lr`` 2000/1e-2).  An element stops once its RMS residual is below ``tolerance``.  Works inside ComfyUI's inference mode; no parameter of the decoder/encoder gets ``.grad``.
    ``progress(phase, k, steps)`` is called after every iteration (it may raise to cancel).

    Returns:
        ``(z, info)`` with ``info = {"rms": [B] RMS residual of A(D(z)) at the returned z,
        "iterations": [B] optimiser iterations taken}``.
    """
    _check(mode, optimizer, steps, lr, tolerance, encoder)
    out_dtype, out_device = z0.dtype, z0.device
    with torch.inference_mode(False), torch.enable_grad():
        kw = {k: normal_tensor(v) for k, v in (degradation_kwargs or {}).items()}
        residual = MeasurementLoss("ReSample", measurement, lambda img: degradation(img, **kw),
                                   "degradation output shape {shape} (degradation applied to the decoded latent)",
                                   mse=True)
        z_start = normal_tensor(z0)
        if mode == "latent":
            z, iters = _optimise(z_start, lambda z: residual(decoder(z)), steps, lr, tolerance, optimizer,
                                 progress, phase)
        else:
            with torch.no_grad():
                img0 = normal_tensor(decoder(z_start))
            img, iters = _optimise(img0, residual, steps, lr, tolerance, optimizer, progress, phase)
            with torch.no_grad():
                z = normal_tensor(encoder(img))
        with torch.no_grad():
            rms = residual(decoder(z)).sqrt()
    info = {"rms": rms.float().cpu().tolist(), "iterations": iters.cpu().tolist()}
    return z.to(device=out_device, dtype=out_dtype), info
