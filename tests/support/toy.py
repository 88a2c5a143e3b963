"""Analytic toy world for testing and benchmarking guided samplers (pure torch, float64).

A Gaussian prior ``z0 ~ N(mu, Sigma)`` on a small latent (default shape ``[2, 4, 4]``, 32 dims) with a
random well-conditioned SPD covariance, a linear degradation ``M`` and Gaussian measurement noise
``w = M z* + sigma_w n``.  Everything is closed form:

* the exact MMSE denoiser in ComfyUI sigma space (``x = z0 + sigma * eps``):
  ``E[z0 | x] = mu + Sigma (Sigma + sigma^2 I)^{-1} (x - mu)``;
* the same for flow-matching models' state ``x = (1 - sigma) z0 + sigma * eps`` (:meth:`flow_denoiser`):
  ``E[z0 | x] = mu + a Sigma (a^2 Sigma + sigma^2 I)^{-1} (x - a mu)``, ``a = 1 - sigma`` (``mu`` at ``sigma = 1``);
* the posterior ``p(z0 | w)``: mean ``mu + Sigma M^T (M Sigma M^T + sigma_w^2 I)^{-1} (w - M mu)`` and
  covariance ``Sigma - Sigma M^T (M Sigma M^T + sigma_w^2 I)^{-1} M Sigma``.

Usage::

    world = ToyGaussianWorld(seed=0)
    model = world.exact_denoiser                 # model(x, sigma_vec, **extra_args)
    z_star = world.sample_prior(1, generator=g)
    w = world.measure(z_star, generator=g)       # operator: world.operator(z)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PixelToyWorld", "ToyDenoiser", "ToyGaussianWorld", "flow_sigmas", "karras_sigmas", "vp_sigmas"]

OPERATOR_KINDS = ("blur", "downsample")


def karras_sigmas(n: int, sigma_min: float = 0.03, sigma_max: float = 14.6, rho: float = 7.0, dtype=torch.float64):
    """Karras et al. (2022) schedule: ``n`` decreasing sigmas from sigma_max to sigma_min, then a final 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sig = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sig, sig.new_zeros(1)]).to(dtype)


def vp_sigmas(n: int, beta_start: float = 0.00085, beta_end: float = 0.012, timesteps: int = 1000, dtype=torch.float64):
    """DDPM-like schedule: Stable Diffusion's scaled-linear betas, ``n`` evenly spaced timesteps, then 0.

    ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``; runs from ~14.6 down to ~0.03 with the defaults.
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2
    abar = torch.cumprod(1.0 - betas, dim=0)
    all_sig = ((1 - abar) / abar) ** 0.5
    idx = torch.linspace(timesteps - 1, 0, n, dtype=torch.float64).round().long()
    sig = all_sig[idx]
    return torch.cat([sig, sig.new_zeros(1)]).to(dtype)


def flow_sigmas(n: int, shift: float = 3.0, timesteps: int = 1000, dtype=torch.float64):
    """Flow-matching schedule as ComfyUI's SD3-style ``ModelSamplingDiscreteFlow`` gives it: ``n`` levels
    ``sigma = shift t / (1 + (shift - 1) t)`` for ``t`` evenly spaced from 1 down to ``1 / timesteps``, then 0.
    Starts at exactly ``sigma = 1`` (pure noise, where the VP-equivalent level is infinite)."""
    t = torch.linspace(1.0, 1.0 / timesteps, n, dtype=torch.float64)
    sig = shift * t / (1 + (shift - 1) * t)
    return torch.cat([sig, sig.new_zeros(1)]).to(dtype)


def _blur_matrix(channels: int, h: int, w: int, mix: float) -> torch.Tensor:
    """Zero-padded 3x3 binomial blur per channel followed by a mild channel mix, as a dense matrix."""
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64) / 4

    def blur1d(n: int) -> torch.Tensor:
        b = torch.zeros(n, n, dtype=torch.float64)
        for r in range(n):
            for o, v in zip((-1, 0, 1), k1.tolist(), strict=True):
                if 0 <= r + o < n:
                    b[r, r + o] = v
        return b

    spatial = torch.kron(blur1d(h), blur1d(w))
    cmix = torch.full((channels, channels), mix, dtype=torch.float64) + (1 - mix) * torch.eye(
        channels, dtype=torch.float64
    )
    return torch.kron(cmix, spatial)


def _downsample_matrix(channels: int, h: int, w: int) -> torch.Tensor:
    """2x2 average pooling per channel as a dense matrix ([C*h/2*w/2, C*h*w])."""
    if h % 2 or w % 2:
        raise ValueError("downsample operator needs even spatial size")

    def pool1d(n: int) -> torch.Tensor:
        p = torch.zeros(n // 2, n, dtype=torch.float64)
        for r in range(n // 2):
            p[r, 2 * r] = p[r, 2 * r + 1] = 0.5
        return p

    return torch.kron(torch.eye(channels, dtype=torch.float64), torch.kron(pool1d(h), pool1d(w)))


class ToyGaussianWorld:
    """Gaussian prior + linear operator + Gaussian noise, all analytic (float64).

    Args:
        shape: latent shape ``(C, H, W)``.
        seed: seeds mu, Sigma (and nothing else).
        operator: ``"blur"`` (same-shape output, ill-conditioned) or ``"downsample"`` (2x2 average pool).
        sigma_w: measurement noise std.
        eig_range: eigenvalue range of Sigma (condition number = ratio).
    """

    def __init__(
        self,
        shape: tuple[int, int, int] = (2, 4, 4),
        seed: int = 0,
        operator: str = "blur",
        sigma_w: float = 0.05,
        eig_range: tuple[float, float] = (0.25, 2.0),
        channel_mix: float = 0.3,
    ):
        if operator not in OPERATOR_KINDS:
            raise ValueError(f"operator={operator!r} unknown; allowed values: {', '.join(map(repr, OPERATOR_KINDS))}")
        self.shape = tuple(shape)
        self.dim = int(math.prod(self.shape))
        self.sigma_w = float(sigma_w)
        g = torch.Generator().manual_seed(seed)
        dt = torch.float64
        self.mu = 0.5 * torch.randn(self.dim, generator=g, dtype=dt)
        q, _ = torch.linalg.qr(torch.randn(self.dim, self.dim, generator=g, dtype=dt))
        lo, hi = eig_range
        self.eigvals = torch.exp(torch.linspace(math.log(lo), math.log(hi), self.dim, dtype=dt))
        self.eigvecs = q
        self.cov = (q * self.eigvals) @ q.T
        self.cov = 0.5 * (self.cov + self.cov.T)
        c, h, w = self.shape
        if operator == "blur":
            self.M = _blur_matrix(c, h, w, channel_mix)
            self.out_shape = self.shape
        else:
            self.M = _downsample_matrix(c, h, w)
            self.out_shape = (c, h // 2, w // 2)
        self.m = self.M.shape[0]
        self.operator_kind = operator

    # ----------------------------------------------------------------- model
    def exact_denoiser(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        """MMSE denoiser ``mu + Sigma (Sigma + sigma^2 I)^{-1} (x - mu)`` (batched, differentiable).

        ``sigma``: scalar or ``[B]``.  Extra keyword arguments (e.g. ComfyUI's ``seed``) are ignored.
        """
        b = x.shape[0]
        xf = x.reshape(b, self.dim).to(torch.float64)
        sig = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
        if sig.numel() == 1:
            sig = sig.expand(b)
        q = self.eigvecs.to(x.device)
        lam = self.eigvals.to(x.device)
        mu = self.mu.to(x.device)
        gain = lam / (lam + sig[:, None] ** 2)  # [B, D] in the eigenbasis
        coeff = (xf - mu) @ q
        out = mu + (coeff * gain) @ q.T
        return out.reshape(x.shape).to(x.dtype)

    __call__ = exact_denoiser

    def flow_denoiser(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        """MMSE denoiser for ``x = (1 - sigma) z0 + sigma eps``: ``mu + a Sigma (a^2 Sigma + sigma^2 I)^{-1} (x - a mu)``
        with ``a = 1 - sigma`` (batched, differentiable; exactly ``mu`` at ``sigma = 1``)."""
        b = x.shape[0]
        xf = x.reshape(b, self.dim).to(torch.float64)
        sig = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
        if sig.numel() == 1:
            sig = sig.expand(b)
        a = (1.0 - sig)[:, None]
        q, lam, mu = self.eigvecs.to(x.device), self.eigvals.to(x.device), self.mu.to(x.device)
        gain = a * lam / (a * a * lam + sig[:, None] ** 2)  # [B, D] in the eigenbasis
        out = mu + (((xf - a * mu) @ q) * gain) @ q.T
        return out.reshape(x.shape).to(x.dtype)

    def denoiser(self, parameterization: str = "vp"):
        """The exact denoiser for the ``"vp"`` or ``"flow"`` state."""
        return {"vp": self.exact_denoiser, "flow": self.flow_denoiser}[parameterization]

    # -------------------------------------------------------------- operator
    def operator(self, z: torch.Tensor, **kwargs) -> torch.Tensor:
        """Linear degradation ``M z`` -> ``[B, *out_shape]`` (differentiable; kwargs ignored)."""
        b = z.shape[0]
        return (z.reshape(b, self.dim) @ self.M.to(device=z.device, dtype=z.dtype).T).reshape(b, *self.out_shape)

    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` samples of ``z0 ~ N(mu, Sigma)`` -> ``[n, *shape]``."""
        e = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        z = self.mu + (e * self.eigvals.sqrt()) @ self.eigvecs.T
        return z.reshape(n, *self.shape)

    def measure(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``w = M z + sigma_w n``."""
        clean = self.operator(z)
        return clean + self.sigma_w * torch.randn(clean.shape, generator=generator, dtype=clean.dtype)

    # ------------------------------------------------------------- posterior
    def _gain(self) -> torch.Tensor:
        s_mt = self.cov @ self.M.T
        k = self.M @ s_mt + self.sigma_w**2 * torch.eye(self.m, dtype=torch.float64)
        return torch.linalg.solve(k, s_mt.T).T  # Sigma M^T K^{-1}, [D, m]

    def posterior_mean(self, w: torch.Tensor) -> torch.Tensor:
        """``E[z0 | w]`` for ``w`` of shape ``[B, *out_shape]`` -> ``[B, *shape]``."""
        b = w.shape[0]
        wf = w.reshape(b, self.m).to(torch.float64)
        mean = self.mu + (wf - self.mu @ self.M.T) @ self._gain().T
        return mean.reshape(b, *self.shape)

    def posterior_cov(self) -> torch.Tensor:
        """``Cov[z0 | w]`` (independent of ``w``) -> ``[D, D]``."""
        p = self.cov - self._gain() @ self.M @ self.cov
        return 0.5 * (p + p.T)

    def noise_floor(self) -> float:
        """Expected measurement residual of the true signal: ``sigma_w * sqrt(m)``."""
        return self.sigma_w * math.sqrt(self.m)

    def posterior_residual(self, w: torch.Tensor) -> torch.Tensor:
        """RMS residual ``sqrt(E ||w - M z||^2)`` for ``z ~ p(z0 | w)`` -> ``[B]``."""
        b = w.shape[0]
        r = w.reshape(b, self.m) - self.posterior_mean(w).reshape(b, self.dim) @ self.M.T
        tr = torch.trace(self.M @ self.posterior_cov() @ self.M.T)
        return (r.pow(2).sum(1) + tr).sqrt()


class ToyDenoiser(nn.Module):
    """``nn.Module`` wrapper of :meth:`ToyGaussianWorld.exact_denoiser` with a dummy parameter.

    The parameter (``scale = 1``) multiplies the output, so it sits in the autograd graph: tests use it to
    check that guidance never populates parameter ``.grad``.
    """

    def __init__(self, world: ToyGaussianWorld):
        super().__init__()
        self.world = world
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))
        self.calls = 0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        self.calls += 1
        return self.world.exact_denoiser(x, sigma) * self.scale


class PixelToyWorld:
    """:class:`ToyGaussianWorld` + a linear decoder/encoder (``E = pinv(D)``) + pixel-space degradations with
    analytic posteriors: ``y = A(D z* + n)``, ``n ~ N(0, sigma_y^2)``, so the posterior is Gaussian with
    ``M = A D`` (the Latent-DPS / PSLD / ReSample toy)."""

    def __init__(self, seed: int = 0, sigma_y: float = 0.05):
        from comfyui_silo.operators.degradations import BoxInpaint

        self.sigma_y = float(sigma_y)
        self.world = ToyGaussianWorld(seed=seed)
        g = torch.Generator().manual_seed(100 + seed)
        u, _ = torch.linalg.qr(torch.randn(64, 32, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
        self.Dm = (u * torch.linspace(0.8, 1.5, 32, dtype=torch.float64)) @ v.T  # [64, 32]
        self.Em = torch.linalg.pinv(self.Dm)  # [32, 64], Em @ Dm = I
        self.box = BoxInpaint(1, 1, 6, 6)

    def dec(self, z):
        return (z.reshape(z.shape[0], 32) @ self.Dm.T).reshape(z.shape[0], 1, 8, 8)

    def enc(self, im):
        return (im.reshape(im.shape[0], 64) @ self.Em.T).reshape(im.shape[0], 2, 4, 4)

    @staticmethod
    def down(im):  # orthonormal rows: A A^T = I
        return 2.0 * F.avg_pool2d(im, 2)

    @staticmethod
    def down_adj(y):
        return F.interpolate(y, scale_factor=2, mode="nearest") / 2.0

    def matrix(self, op):
        """``A D`` as a dense [m_out, 32] matrix (probing ``op`` with the image basis)."""
        a = op(torch.eye(64, dtype=torch.float64).reshape(64, 1, 8, 8)).reshape(64, -1).T
        return a @ self.Dm

    def measure(self, op, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        clean = self.dec(self.world.sample_prior(1, g))
        return op(clean + self.sigma_y * torch.randn(clean.shape, generator=g, dtype=torch.float64))

    def posterior_mean(self, op, y):
        m = self.matrix(op)
        s = self.world.cov
        k = m @ s @ m.T + self.sigma_y**2 * torch.eye(m.shape[0], dtype=torch.float64)
        return (self.world.mu + s @ m.T @ torch.linalg.solve(k, y.flatten() - m @ self.world.mu)).reshape(2, 4, 4)

    def noise_floor(self, op):
        m_obs = int((self.matrix(op).abs().sum(1) > 0).sum())  # box: masked pixels carry no noise
        return self.sigma_y * math.sqrt(m_obs)
