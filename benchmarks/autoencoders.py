"""Autoencoders the operator-quality benchmark measures in: a TAESD-format encoder/decoder pair or a ComfyUI VAE file.

An :class:`Autoencoder` is what the benchmark and the pack's training need of a latent space: ``encode`` (image
``[B,3,H,W]`` in [0, 1] → latent in the sampler's scaled space), ``decode`` (the way back, to [0, 1]), the spatial
``downscale`` factor and the number of latent channels.

TAESD format (madebyollin/taesd: ``taesd``, ``taesdxl``, ``taesd3``, ``taef1``, ``taef2`` …; MIT licence) is rebuilt
here from its published description, not copied: an encoder of 3×3 convolutions and residual blocks (three
conv-ReLU-conv-ReLU-conv layers plus a 1×1 skip where the width changes, a ReLU after the sum) with three stride-2
convolutions (8× down) and a decoder that mirrors it with nearest up-sampling and starts with the soft clamp
``tanh(z / 3) · 3``. The FLUX.2 variant (``taef2``) adds to the three lowest-resolution blocks of each side a residual
1×1 conv → GroupNorm(4) → ReLU → 1×1 conv branch before the block. Which variant a file holds and its latent channel
count are read from the state dict's keys and shapes, never from the file name. Weight files are loaded with
``torch.load(weights_only=True)``: plain tensors only, nothing unpickled.

TAESD latents are already unit-scale (taef2: mean ≈ 0, std ≈ 0.85), so no scale factor is applied.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["Autoencoder", "TAESD_WIDTH", "comfy_vae", "random_taesd", "taesd_pair"]

#: Channels of every TAESD convolution block.
TAESD_WIDTH = 64


@dataclass
class Autoencoder:
    """What a latent space is to the benchmark: the two maps, the spatial factor and the channel count."""

    name: str
    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]
    downscale: int
    latent_channels: int


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class _SoftClamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class _TAEBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, pooled: bool = False):
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool = None
        if pooled:  # FLUX.2 variant: a global-statistics branch added to the input
            wide = 4 * n_in
            self.pool = nn.Sequential(nn.Conv2d(n_in, wide, 1, bias=False), nn.GroupNorm(4, wide), nn.ReLU(),
                                      nn.Conv2d(wide, n_in, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def _encoder(latent_channels: int, pooled: bool) -> nn.Sequential:
    w = TAESD_WIDTH
    layers: list[nn.Module] = [_conv(3, w), _TAEBlock(w, w)]
    for level in range(3):
        layers += [_conv(w, w, stride=2, bias=False)]
        layers += [_TAEBlock(w, w, pooled=pooled and level == 2) for _ in range(3)]
    return nn.Sequential(*layers, _conv(w, latent_channels))


def _decoder(latent_channels: int, pooled: bool) -> nn.Sequential:
    w = TAESD_WIDTH
    layers: list[nn.Module] = [_SoftClamp(), _conv(latent_channels, w), nn.ReLU()]
    for level in range(3):
        layers += [_TAEBlock(w, w, pooled=pooled and level == 0) for _ in range(3)]
        layers += [nn.Upsample(scale_factor=2), _conv(w, w, bias=False)]
    return nn.Sequential(*layers, _TAEBlock(w, w), _conv(w, 3))


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"TAESD weight file {path} does not exist")
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path.name} is not a TAESD state dict (expected a plain dict of tensors)")
    return state


def _layout(enc: dict, dec: dict, where: str) -> tuple[int, bool]:
    """(latent channels, FLUX.2 pooled variant) from the two state dicts' shapes and keys."""
    last = max((int(k.split(".")[0]) for k in enc if k.endswith(".weight") and k.split(".")[0].isdigit()), default=-1)
    weight = enc.get(f"{last}.weight")
    if weight is None or weight.ndim != 4 or weight.shape[1] != TAESD_WIDTH:
        raise ValueError(f"{where}: the encoder file does not have TAESD's layout (its last layer is not a "
                         f"{TAESD_WIDTH}-channel 3×3 convolution)")
    pooled = any(".pool." in k for k in enc)
    if pooled != any(".pool." in k for k in dec):
        raise ValueError(f"{where}: the encoder and decoder files are of different TAESD variants")
    return int(weight.shape[0]), pooled


def _frozen(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _build(name: str, enc_state: dict | None, dec_state: dict | None, channels: int, pooled: bool,
           dtype: torch.dtype | None) -> Autoencoder:
    encoder, decoder = _encoder(channels, pooled), _decoder(channels, pooled)
    if enc_state is not None:
        encoder.load_state_dict(enc_state)
        decoder.load_state_dict(dec_state)
    encoder, decoder = _frozen(encoder), _frozen(decoder)
    encoder = encoder.to(memory_format=torch.channels_last)

    def run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = x.float().contiguous(memory_format=torch.channels_last)
        if dtype is not None and dtype != torch.float32:
            with torch.autocast(x.device.type, dtype=dtype):
                return module(x).float()
        return module(x)

    return Autoencoder(name=name, encode=lambda x: run(encoder, x),
                       decode=lambda z: run(decoder, z).clamp(0.0, 1.0), downscale=8, latent_channels=channels)


def taesd_pair(encoder_path: str | Path, decoder_path: str | Path | None = None,
               dtype: torch.dtype | None = None) -> Autoencoder:
    """A TAESD-format autoencoder from its ``*_encoder.pth`` and ``*_decoder.pth`` files.

    ``encoder_path`` may also be a folder holding exactly one ``*_encoder.pth`` / ``*_decoder.pth`` pair.
    ``dtype=torch.bfloat16`` runs both under autocast (about 4× faster on CPUs with AMX; latents within ~2 %).
    """
    enc_path = Path(encoder_path).expanduser()
    if enc_path.is_dir():
        found = sorted(enc_path.glob("*_encoder.pth"))
        if len(found) != 1:
            raise FileNotFoundError(f"{enc_path} must hold exactly one *_encoder.pth file, found {len(found)}")
        enc_path = found[0]
    dec_path = Path(decoder_path).expanduser() if decoder_path else enc_path.with_name(
        enc_path.name.replace("_encoder.pth", "_decoder.pth"))
    enc, dec = _read_state(enc_path), _read_state(dec_path)
    channels, pooled = _layout(enc, dec, enc_path.name)
    return _build(enc_path.name.replace("_encoder.pth", ""), enc, dec, channels, pooled, dtype)


def random_taesd(latent_channels: int = 4, pooled: bool = False, seed: int = 0) -> Autoencoder:
    """A TAESD-architecture autoencoder with random weights (tests: the benchmark's code path without weight files)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ae = _build(f"random-taesd-{latent_channels}", None, None, latent_channels, pooled, None)
    return ae


def comfy_vae(path: str | Path, latent_format: str = "SD15") -> Autoencoder:
    """A ComfyUI VAE file (``models/vae/*.safetensors``) through the host's own loader (the host must be importable).

    A VAE file does not say which model family's latent scaling applies, so ``latent_format`` names it (a class of
    ``comfy.latent_formats``: ``SD15``, ``SDXL``, ``SD3``, ``Flux`` …); latents are in that format's ``process_in``
    space, the space the sampler and the operators use.
    """
    import comfy.latent_formats
    import comfy.sd
    import comfy.utils

    fmt_cls = getattr(comfy.latent_formats, latent_format, None)
    if not isinstance(fmt_cls, type):
        raise ValueError(f"unknown latent format {latent_format!r}: use a class name of comfy.latent_formats "
                         "(SD15, SDXL, SD3, Flux, ...)")
    fmt = fmt_cls()
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path), safe_load=True))

    def encode(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            z = fmt.process_in(vae.encode(x.movedim(1, -1).float()).float())
        return z.clone().to(x.device)

    def decode(z: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = vae.decode(fmt.process_out(z.detach().float())).float()
        return x.clone().movedim(-1, 1).to(z.device).clamp(0.0, 1.0)

    return Autoencoder(name=Path(path).stem, encode=encode, decode=decode,
                       downscale=int(vae.spacial_compression_encode()), latent_channels=int(vae.latent_channels))
