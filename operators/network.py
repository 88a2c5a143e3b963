"""The learned latent degradation operator H_θ of SILO.

SILO (Raphaeli, Man & Elad, ICCV 2025, arXiv 2501.11746) guides a latent diffusion sampler with a small network
that emulates an image degradation *inside the VAE latent space*::

    H_θ(E(x), σ_y) ≈ E(A(x) + n),      n ~ N(0, σ_y² I)

During sampling the loss ``‖w − H_θ(ẑ₀)‖`` is back-propagated through ``H_θ`` at every step, so the network has
to be differentiable, cheap, and well behaved for any latent size.

:class:`LatentOperator` is this package's own architecture (not the paper's CNN, which only works on 64×64
latents; see :mod:`.reference` for that one):

* a small 3-level UNet (full, 1/2 and 1/4 latent resolution by default) with pre-activation residual blocks,
  GroupNorm (never a fixed-size LayerNorm) and no positional encodings, so it runs on any latent size and aspect
  ratio, odd sizes included (up-sampled maps are resized to the exact size of their skip connection);
* a dilated middle block at 1/4 resolution, giving a receptive field of several dozen latent pixels (enough context
  for ×8 super-resolution and inpainting) at a small cost;
* measurement-noise conditioning: ``σ_y`` (std on the [0, 1] image scale, typically 0–0.1) → sinusoidal embedding
  → MLP → per-block FiLM (scale and shift after the block's second GroupNorm). There is no diffusion timestep;
* an identity path: ``H(z) = z + f(z, σ_y, mask)`` where the last convolution of ``f`` is zero-initialised, so a
  freshly built operator is exactly the identity;
* an optional mask channel (``use_mask=True``) for inpainting-like degradations whose measurement depends on a
  per-image mask (1 = missing). The mask may be given at pixel or latent resolution and is area-averaged to the
  latent size by :func:`mask_to_latent`.

The constructor takes only JSON-serialisable hyper-parameters and :attr:`LatentOperator.config` returns them, so
``LatentOperator(**op.config)`` rebuilds the same architecture (this is what :mod:`.io` stores in operator files).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .degradations import build_degradation, degradation_class, mask_b1hw, normalise_spec

__all__ = [
    "LatentOperator",
    "PhysicsOperator",
    "count_parameters",
    "mask_to_latent",
    "sigma_embedding",
]

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_MAX_LEVELS, _MAX_BLOCKS, _MAX_DILATION, _MAX_GROUPS = 8, 16, 64, 256


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``module`` (all of them, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def mask_to_latent(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize a mask to a latent size by area averaging.

    Args:
        mask: ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``, at pixel or latent resolution; bool or float,
            1 = missing / to be filled. Values are clamped to [0, 1].
        size: the target ``(height, width)`` of the latent.

    Returns:
        A float ``[B, 1, h, w]`` tensor (``B`` = 1 for a 2-D mask) holding the fraction of each latent cell that is
        missing. Area averaging (``F.interpolate(mode="area")``, i.e. adaptive average pooling) is exact for the
        usual 8× pixel/latent ratio and also handles non-integer ratios and masks smaller than the latent.
    """
    mask = mask_b1hw(mask)
    if len(size) != 2:
        raise ValueError(f"size must be (height, width); got {size!r}")
    h, w = int(size[0]), int(size[1])
    if not mask.is_floating_point():
        mask = mask.float()
    mask = mask.clamp(0.0, 1.0)
    if tuple(mask.shape[-2:]) != (h, w):
        compute_dtype = mask.dtype if mask.dtype in (torch.float32, torch.float64) else torch.float32
        mask = F.interpolate(mask.to(compute_dtype), size=(h, w), mode="area").to(mask.dtype)
    return mask


def sigma_embedding(sigma: torch.Tensor, dim: int, sigma_max: float) -> torch.Tensor:
    """Sinusoidal embedding of the measurement-noise std.

    ``sigma`` ([B], [0, 1] image scale) is mapped to ``t = 1000 · σ / sigma_max`` (so the typical range 0–``sigma_max``
    spans the usual 0–1000 "timestep" range) and embedded with ``dim // 2`` cosine and sine features at geometric
    frequencies 1 … 1/10000, followed by the plain normalised value ``σ / sigma_max`` (an extra linear feature that
    makes monotone dependence easy). Output: float32 ``[B, 2 * (dim // 2) + 1]``.
    """
    s = sigma.float().reshape(-1) / float(sigma_max)
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=s.device, dtype=torch.float32) / max(half, 1))
    args = (1000.0 * s)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args), s[:, None]], dim=1)


def sigma_values(sigma_y, batch: int, device: torch.device) -> torch.Tensor:
    """The measurement-noise std per sample as float32 ``[B]`` from None (0), a number or a tensor (1 or B values)."""
    if sigma_y is None:
        return torch.zeros(batch, device=device, dtype=torch.float32)
    if isinstance(sigma_y, torch.Tensor):
        s = sigma_y.detach().to(device=device, dtype=torch.float32).reshape(-1)
        if s.numel() == 1:
            s = s.expand(batch)
        elif s.numel() != batch:
            raise ValueError(f"sigma_y has {s.numel()} values but the latent batch is {batch}; give 1 or {batch}")
        return s.clamp_min(0.0)
    try:
        value = float(sigma_y)
    except (TypeError, ValueError):
        raise TypeError(f"sigma_y must be None, a number or a tensor, got {type(sigma_y).__name__}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"sigma_y must be a finite non-negative noise std (0–0.1 typical), got {value}")
    return torch.full((batch,), value, device=device, dtype=torch.float32)


MISSING_MASK = (
    "This latent operator was trained with a mask input (use_mask=True, e.g. for inpainting) and needs "
    "`mask`: 1 = missing pixel, shaped [H, W], [B, H, W] or [B, 1, H, W] at image or latent resolution. "
    "Pass the same mask that was used to make the degraded image."
)


def _num_groups(channels: int, max_groups: int) -> int:
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


class _ResBlock(nn.Module):
    """Pre-activation residual block with FiLM conditioning after the second GroupNorm."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        cond_dim: int,
        groups: int,
        dilation: int = 1,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_num_groups(in_ch, groups), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation, padding_mode=padding_mode)
        self.norm2 = nn.GroupNorm(_num_groups(out_ch, groups), out_ch)
        self.film = nn.Linear(cond_dim, 2 * out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, padding_mode=padding_mode)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1.0 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class _Down(nn.Module):
    def __init__(self, ch: int, padding_mode: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1, padding_mode=padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Up(nn.Module):
    """Nearest up-sampling to an exact target size (odd sizes included), then a 3×3 convolution."""

    def __init__(self, in_ch: int, out_ch: int, padding_mode: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, padding_mode=padding_mode)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


def _check_architecture(latent_channels, width, channel_mults: list[int], num_res_blocks, mid_dilations: list[int],
                        sigma_embed_dim, cond_dim, sigma_max, norm_groups, padding_mode) -> None:
    """Refuse a :class:`LatentOperator` configuration with a ``ValueError`` before anything is built."""
    if latent_channels < 1 or width < 1 or num_res_blocks < 1 or not channel_mults:
        raise ValueError("latent_channels, width, num_res_blocks ≥ 1 and at least one level are required")
    if any(m < 1 for m in channel_mults) or any(d < 1 for d in mid_dilations):
        raise ValueError("channel_mults and mid_dilations must be positive integers")
    if sigma_embed_dim < 2 or cond_dim < 1 or not sigma_max > 0:
        raise ValueError("sigma_embed_dim ≥ 2, cond_dim ≥ 1 and sigma_max > 0 are required")
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
    # Structural bounds (far above any useful operator): a config read from a file cannot make construction
    # loop for long or a forward pass pad by a huge dilation. Sizes (width, channels) are bounded by the loader's
    # parameter count instead, computed on the meta device.
    if len(channel_mults) > _MAX_LEVELS or num_res_blocks > _MAX_BLOCKS or len(mid_dilations) > _MAX_BLOCKS:
        raise ValueError(f"at most {_MAX_LEVELS} levels and {_MAX_BLOCKS} blocks per level / mid dilations")
    if any(d > _MAX_DILATION for d in mid_dilations) or not 1 <= norm_groups <= _MAX_GROUPS:
        raise ValueError(f"mid_dilations must be at most {_MAX_DILATION} and norm_groups in 1..{_MAX_GROUPS}")


class LatentOperator(nn.Module):
    """Learned latent degradation operator ``H(z, σ_y, mask) ≈ E(A(x) + n)`` for any latent size.

    Args:
        latent_channels: channels of the VAE latent (4 for SD1.x/SDXL, 16 for SD3/Flux).
        width: channels at full latent resolution.
        channel_mults: channel multiplier per resolution level; ``len(channel_mults)`` levels, each one halving the
            spatial size (3 levels → full, 1/2, 1/4 resolution).
        num_res_blocks: residual blocks per level (≥ 1), in the encoder and in the decoder.
        mid_dilations: one residual block per entry at the coarsest level, with that dilation in its first
            convolution (cheap extra context).
        use_mask: add a mask input channel (1 = missing) for mask-dependent degradations such as inpainting.
        sigma_embed_dim: size of the sinusoidal σ_y embedding.
        cond_dim: width of the σ-conditioning MLP whose output drives every block's FiLM.
        sigma_max: σ_y value mapped to the top of the embedding range (σ_y above it is still accepted).
        norm_groups: maximum number of GroupNorm groups (the largest divisor of the channel count ≤ this is used).
        padding_mode: padding of the 3×3 convolutions ("zeros", "reflect", "replicate" or "circular").

    Call ``op(z, sigma_y=None, mask=None)``:

    * ``z``: ``[B, latent_channels, h, w]`` latent, any ``h, w`` ≥ 1, float32/float16/bfloat16. It is cast to the
      module's dtype and device internally; the result has ``z``'s dtype and device and shape.
    * ``sigma_y``: measurement-noise std on the [0, 1] image scale: ``None`` (= 0), a float, or a tensor with one
      value or one value per sample.
    * ``mask``: needed when ``use_mask=True`` (else ``ValueError``); ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]`` at
      pixel or latent resolution, a batch-1 mask broadcasts over the batch. When ``use_mask=False`` a given mask is
      ignored (so callers may always pass the mask they have).
    """

    def __init__(
        self,
        latent_channels: int = 4,
        width: int = 48,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        mid_dilations: Sequence[int] = (2, 4),
        use_mask: bool = False,
        sigma_embed_dim: int = 64,
        cond_dim: int = 128,
        sigma_max: float = 0.1,
        norm_groups: int = 8,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        channel_mults = [int(m) for m in channel_mults]
        mid_dilations = [int(d) for d in mid_dilations]
        _check_architecture(latent_channels, width, channel_mults, num_res_blocks, mid_dilations, sigma_embed_dim,
                            cond_dim, sigma_max, norm_groups, padding_mode)
        self._config = {
            "latent_channels": int(latent_channels),
            "width": int(width),
            "channel_mults": channel_mults,
            "num_res_blocks": int(num_res_blocks),
            "mid_dilations": mid_dilations,
            "use_mask": bool(use_mask),
            "sigma_embed_dim": int(sigma_embed_dim),
            "cond_dim": int(cond_dim),
            "sigma_max": float(sigma_max),
            "norm_groups": int(norm_groups),
            "padding_mode": str(padding_mode),
        }
        self.latent_channels = int(latent_channels)
        self.use_mask = bool(use_mask)
        self.sigma_embed_dim = int(sigma_embed_dim)
        self.sigma_max = float(sigma_max)

        pm = padding_mode
        chans = [width * m for m in channel_mults]
        emb_in = 2 * (sigma_embed_dim // 2) + 1
        self.sigma_mlp = nn.Sequential(nn.Linear(emb_in, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        in_ch = latent_channels + (1 if use_mask else 0)
        self.stem = nn.Conv2d(in_ch, chans[0], 3, padding=1, padding_mode=pm)
        ch = self._build_encoder(chans, num_res_blocks, cond_dim, norm_groups, pm)
        self.mid = nn.ModuleList(
            _ResBlock(ch, ch, cond_dim, norm_groups, dilation=d, padding_mode=pm) for d in mid_dilations
        )
        ch = self._build_decoder(chans, ch, num_res_blocks, cond_dim, norm_groups, pm)
        self.out_norm = nn.GroupNorm(_num_groups(ch, norm_groups), ch)
        self.out_conv = nn.Conv2d(ch, latent_channels, 3, padding=1, padding_mode=pm)
        # Zero-initialised head: a fresh operator is exactly the identity H(z) = z.
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def _build_encoder(self, chans: list[int], num_res_blocks: int, cond_dim: int, norm_groups: int,
                       pm: str) -> int:
        """The encoder levels (``enc``: residual blocks per level; ``down``: a stride-2 convolution between levels);
        returns the channels at the coarsest level."""
        self.enc = nn.ModuleList()
        self.down = nn.ModuleList()
        ch = chans[0]
        for level, out_ch in enumerate(chans):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(_ResBlock(ch, out_ch, cond_dim, norm_groups, padding_mode=pm))
                ch = out_ch
            self.enc.append(blocks)
            if level < len(chans) - 1:
                self.down.append(_Down(ch, pm))
        return ch

    def _build_decoder(self, chans: list[int], ch: int, num_res_blocks: int, cond_dim: int, norm_groups: int,
                       pm: str) -> int:
        """The decoder levels, coarsest first (``dec``: a block taking the skip connection, then more blocks;
        ``up``: up-sampling to the next finer level); returns the channels at full resolution."""
        self.dec = nn.ModuleList()
        self.up = nn.ModuleList()
        for level in reversed(range(len(chans))):
            skip_ch = chans[level]
            blocks = nn.ModuleList()
            blocks.append(_ResBlock(ch + skip_ch, skip_ch, cond_dim, norm_groups, padding_mode=pm))
            ch = skip_ch
            for _ in range(num_res_blocks - 1):
                blocks.append(_ResBlock(ch, ch, cond_dim, norm_groups, padding_mode=pm))
            self.dec.append(blocks)
            if level > 0:
                self.up.append(_Up(ch, chans[level - 1], pm))
                ch = chans[level - 1]
        return ch

    @property
    def config(self) -> dict:
        """JSON-serialisable constructor arguments: ``LatentOperator(**op.config)`` rebuilds the architecture."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._config.items()}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._config.items())

    # ------------------------------------------------------------------ inputs
    def _sigma(self, sigma_y, batch: int, device: torch.device) -> torch.Tensor:
        return sigma_values(sigma_y, batch, device)

    def _mask(self, mask, batch: int, size: Sequence[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if mask is None:
            raise ValueError(MISSING_MASK)
        m = mask_to_latent(mask.to(device), size).to(dtype)
        if m.shape[0] == 1 and batch > 1:
            m = m.expand(batch, -1, -1, -1)
        elif m.shape[0] != batch:
            raise ValueError(
                f"mask batch size {m.shape[0]} does not match latent batch size {batch} (use 1 or {batch})"
            )
        return m

    # ------------------------------------------------------------------ forward
    def forward(self, z: torch.Tensor, sigma_y=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(z, torch.Tensor) or z.dim() != 4:
            raise ValueError(f"z must be a [B, C, h, w] latent tensor; got {getattr(z, 'shape', type(z).__name__)}")
        if z.shape[1] != self.latent_channels:
            raise ValueError(
                f"this operator expects {self.latent_channels}-channel latents, got {z.shape[1]} channels "
                "(was it trained for another model family's VAE?)"
            )
        param = self.stem.weight
        dtype, device = param.dtype, param.device
        b, _, h, w = z.shape
        x = z.to(device=device, dtype=dtype)

        cond = self.sigma_mlp(
            sigma_embedding(self._sigma(sigma_y, b, device), self.sigma_embed_dim, self.sigma_max).to(dtype)
        )

        inp = x
        if self.use_mask:
            inp = torch.cat([x, self._mask(mask, b, (h, w), device, dtype)], dim=1)

        hcur = self.stem(inp)
        skips = []
        for level, blocks in enumerate(self.enc):
            for block in blocks:
                hcur = block(hcur, cond)
            skips.append(hcur)
            if level < len(self.down):
                hcur = self.down[level](hcur)
        for block in self.mid:
            hcur = block(hcur, cond)
        for i, blocks in enumerate(self.dec):
            skip = skips[-1 - i]
            if hcur.shape[-2:] != skip.shape[-2:]:  # never for the coarsest level; kept for safety
                hcur = F.interpolate(hcur, size=skip.shape[-2:], mode="nearest")
            hcur = torch.cat([hcur, skip], dim=1)
            for block in blocks:
                hcur = block(hcur, cond)
            if i < len(self.up):
                hcur = self.up[i](hcur, skips[-2 - i].shape[-2:])
        delta = self.out_conv(F.silu(self.out_norm(hcur)))
        out = x + delta
        return out.to(device=z.device, dtype=z.dtype)


def _pixel_mask(mask: torch.Tensor, batch: int, size: Sequence[int], device, dtype) -> torch.Tensor:
    """A caller's mask (pixel or latent resolution, 2-4 dims, 1 = missing) as ``[B, 1, H, W]`` at pixel ``size``:
    a coarser mask is repeated (nearest), a finer or odd-sized one area-averaged and binarised (>= 0.5)."""
    m = mask_to_latent(mask.to(device), (mask.shape[-2], mask.shape[-1])).to(dtype)
    if tuple(m.shape[-2:]) != tuple(size):
        mode = "nearest" if all(t % s == 0 and t >= s for t, s in zip(size, m.shape[-2:], strict=True)) else "area"
        m = F.interpolate(m, size=tuple(size), mode=mode)
        if mode == "area":
            m = (m >= 0.5).to(dtype)
    if m.shape[0] == 1 and batch > 1:
        m = m.expand(batch, -1, -1, -1)
    elif m.shape[0] != batch:
        raise ValueError(f"mask batch size {m.shape[0]} does not match latent batch size {batch} (use 1 or {batch})")
    return m


class PhysicsOperator(nn.Module):
    """A latent operator with the exact degradation inside: ``H(z) = z + g(z, S(A(d(z))))``.

    Measured on a real learned latent space (FLUX.2's tiny autoencoder taef2, BENCHMARKS.md "Operator quality"),
    a plain latent-to-latent network emulates the degradation poorly: the latent of a blurred or downscaled photo
    differs from the sharp photo's by 70–100 % of its norm, and the map between them is a decode → degrade →
    encode that a small UNet learns slowly from a few hundred photos. This architecture builds that structure in:

    * ``d`` — a small decoder at latent resolution (``decoder_blocks`` residual blocks of ``decoder_width``
      channels) whose ``3·s²`` output channels are unfolded (pixel shuffle, ``s`` = the VAE's ``downscale``) into
      a full-size image estimate: a coarse picture, not a VAE decode (about 25 dB; the degradation hides most of
      what it gets wrong);
    * ``A`` — the degradation itself, exactly, from the spec the operator is trained for (blur, bicubic ×N then
      the lift back to full size, JPEG through kornia's differentiable codec, ``x·(1 − m)`` with the caller's mask
      for inpainting), always in float32;
    * ``S`` — pixel unshuffle back to the latent grid (``3·s²`` channels per cell) and ``g`` — an encoder of
      ``num_blocks`` residual blocks of ``width`` channels that sees both ``z`` and the degraded picture and
      predicts the change of the latent; its last convolution is zero-initialised, so a fresh operator is the
      identity.

    Every block is FiLM-conditioned on the measurement-noise std ``σ_y`` as in :class:`LatentOperator`. The call
    is the same as :class:`LatentOperator`'s (``op(z, sigma_y=None, mask=None)``; any latent size; a mask is
    required for inpainting types and may be at pixel or latent resolution). :meth:`fit_outputs` serves training
    (the decoder is also taught to reproduce the clean crop, and the encoder to read the degraded crop itself).
    The degradation is rebuilt from ``degradation`` (a spec, stored in the operator file's architecture config),
    never held as a module, so the state dict holds weights only.
    """

    def __init__(
        self,
        latent_channels: int = 4,
        degradation: dict | None = None,
        downscale: int = 8,
        width: int = 128,
        num_blocks: int = 5,
        decoder_width: int = 96,
        decoder_blocks: int = 2,
        use_mask: bool = False,
        sigma_embed_dim: int = 32,
        cond_dim: int = 64,
        sigma_max: float = 0.1,
        norm_groups: int = 8,
    ) -> None:
        super().__init__()
        if not isinstance(degradation, dict):
            raise ValueError("PhysicsOperator needs the degradation spec it emulates (a dict with a 'type')")
        cls = degradation_class(degradation)
        spec = {"type": cls.type_name} if cls.needs_mask else normalise_spec(degradation)
        if latent_channels < 1 or width < 1 or decoder_width < 1 or num_blocks < 1 or decoder_blocks < 0:
            raise ValueError("latent_channels, width, decoder_width, num_blocks >= 1 and decoder_blocks >= 0 required")
        if not 1 <= downscale <= 64 or num_blocks > _MAX_BLOCKS or decoder_blocks > _MAX_BLOCKS:
            raise ValueError(f"downscale must be in 1..64 and at most {_MAX_BLOCKS} blocks per part")
        if sigma_embed_dim < 2 or cond_dim < 1 or not sigma_max > 0 or not 1 <= norm_groups <= _MAX_GROUPS:
            raise ValueError("sigma_embed_dim >= 2, cond_dim >= 1, sigma_max > 0 and norm_groups in 1..256 required")
        self._config = {
            "latent_channels": int(latent_channels), "degradation": spec, "downscale": int(downscale),
            "width": int(width), "num_blocks": int(num_blocks), "decoder_width": int(decoder_width),
            "decoder_blocks": int(decoder_blocks), "use_mask": bool(use_mask) or cls.is_inpainting,
            "sigma_embed_dim": int(sigma_embed_dim), "cond_dim": int(cond_dim), "sigma_max": float(sigma_max),
            "norm_groups": int(norm_groups),
        }
        self.latent_channels, self.scale = int(latent_channels), int(downscale)
        self.use_mask, self.is_inpainting = self._config["use_mask"], cls.is_inpainting
        self.sigma_embed_dim, self.sigma_max = int(sigma_embed_dim), float(sigma_max)
        self._degradation = None  # built on first use (a plain attribute: never in the state dict)

        pix = 3 * self.scale * self.scale
        self.sigma_mlp = nn.Sequential(nn.Linear(2 * (sigma_embed_dim // 2) + 1, cond_dim), nn.SiLU(),
                                       nn.Linear(cond_dim, cond_dim))
        self.dec_stem = nn.Conv2d(latent_channels, decoder_width, 3, padding=1)
        self.dec_blocks = nn.ModuleList(_ResBlock(decoder_width, decoder_width, cond_dim, norm_groups)
                                        for _ in range(decoder_blocks))
        self.dec_out = nn.Conv2d(decoder_width, pix, 3, padding=1)
        self.enc_stem = nn.Conv2d(latent_channels + pix + (1 if self.use_mask else 0), width, 3, padding=1)
        self.enc_blocks = nn.ModuleList(_ResBlock(width, width, cond_dim, norm_groups) for _ in range(num_blocks))
        self.out_norm = nn.GroupNorm(_num_groups(width, norm_groups), width)
        self.out_conv = nn.Conv2d(width, latent_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    @property
    def config(self) -> dict:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self._config.items()}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._config.items())

    @property
    def degradation(self):
        """The pixel-space degradation (inpainting types: None; their physics is ``x·(1 − mask)``)."""
        if self._degradation is None and not self.is_inpainting:
            self._degradation = build_degradation(self._config["degradation"])
        return self._degradation

    # ------------------------------------------------------------------ parts
    def _cond(self, sigma_y, batch: int, device, dtype) -> torch.Tensor:
        s = sigma_values(sigma_y, batch, device)
        return self.sigma_mlp(sigma_embedding(s, self.sigma_embed_dim, self.sigma_max).to(dtype))

    def decode_pixels(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The coarse full-size image estimate ``d(z)`` (about [0, 1], not clamped)."""
        h = self.dec_stem(z)
        for block in self.dec_blocks:
            h = block(h, cond)
        return F.pixel_shuffle(self.dec_out(F.silu(h)), self.scale) + 0.5

    def degrade(self, x: torch.Tensor, pixel_mask: torch.Tensor | None) -> torch.Tensor:
        """``lift(A(x))`` at full size, in float32 whatever autocast is active, unshuffled to the latent grid."""
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if self.is_inpainting:
                y = x * (1.0 - pixel_mask.float())
            else:
                deg = self.degradation
                y = deg.lift(deg(x.clamp(0.0, 1.0)), size=x.shape[-2:])
            return F.pixel_unshuffle(y - 0.5, self.scale)

    def emulate(self, z: torch.Tensor, degraded: torch.Tensor, cond: torch.Tensor,
                latent_mask: torch.Tensor | None) -> torch.Tensor:
        parts = [z, degraded.to(z.dtype)] + ([latent_mask] if latent_mask is not None else [])
        h = self.enc_stem(torch.cat(parts, dim=1))
        for block in self.enc_blocks:
            h = block(h, cond)
        return z + self.out_conv(F.silu(self.out_norm(h)))

    def _inputs(self, z, sigma_y, mask):
        if not isinstance(z, torch.Tensor) or z.dim() != 4:
            raise ValueError(f"z must be a [B, C, h, w] latent tensor; got {getattr(z, 'shape', type(z).__name__)}")
        if z.shape[1] != self.latent_channels:
            raise ValueError(f"this operator expects {self.latent_channels}-channel latents, got {z.shape[1]} "
                             "channels (was it trained for another model family's VAE?)")
        param = self.enc_stem.weight
        b, _, h, w = z.shape
        x = z.to(device=param.device, dtype=param.dtype)
        cond = self._cond(sigma_y, b, param.device, param.dtype)
        pm = lm = None
        if self.use_mask:
            if mask is None:
                raise ValueError(MISSING_MASK)
            pm = _pixel_mask(mask, b, (h * self.scale, w * self.scale), param.device, param.dtype)
            lm = F.interpolate(pm, size=(h, w), mode="area")
        return x, cond, pm, lm

    # ------------------------------------------------------------------ calls
    def forward(self, z: torch.Tensor, sigma_y=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, cond, pm, lm = self._inputs(z, sigma_y, mask)
        out = self.emulate(x, self.degrade(self.decode_pixels(x, cond), pm), cond, lm)
        return out.to(device=z.device, dtype=z.dtype)

    def fit_outputs(self, z: torch.Tensor, sigma_y, mask, clean: torch.Tensor,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: ``(prediction, pixel estimate)``. The encoder reads the degraded clean crop for half of the
        batch and the degraded (detached) estimate for the other half, so the two parts learn their own jobs and
        the encoder also sees the estimate's errors; the caller adds a pixel loss between the estimate and
        ``clean``."""
        x, cond, pm, lm = self._inputs(z, sigma_y, mask)
        estimate = self.decode_pixels(x, cond)
        use_clean = torch.rand(x.shape[0], generator=generator).to(x.device).view(-1, 1, 1, 1) < 0.5
        source = torch.where(use_clean, clean.to(estimate.dtype), estimate.detach())
        return self.emulate(x, self.degrade(source, pm), cond, lm), estimate
