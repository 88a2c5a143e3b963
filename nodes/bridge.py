"""Bridges between ComfyUI objects (MODEL, VAE, latent formats) and the pure-torch core.

Imported by the nodes and by the command line (after it has put the host on ``sys.path``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def latent_format_info(model=None, vae=None) -> dict:
    """The latent space a model samples in, as the JSON dict stored in operator files.

    ``model`` is a ComfyUI MODEL (ModelPatcher); its latent format fixes the scale/shift of the ``process_in``
    space the samplers work in. ``vae`` adds the channel count and down-scale ratio.
    """
    lf = None
    if model is not None:
        lf = model.get_model_object("latent_format")
    info = {
        "name": type(lf).__name__ if lf is not None else "unknown",
        "latent_channels": int(getattr(lf, "latent_channels", getattr(vae, "latent_channels", 4))),
        "scale_factor": float(getattr(lf, "scale_factor", 1.0)) if lf is not None else 1.0,
        "shift_factor": float(getattr(lf, "shift_factor", 0.0) or 0.0) if lf is not None else 0.0,
        "downscale": int(getattr(vae, "downscale_ratio", 8)) if vae is not None else 8,
    }
    if lf is not None and getattr(lf, "latents_mean", None) is not None:
        info["latents_mean"] = [float(v) for v in torch.as_tensor(lf.latents_mean).flatten()]
        info["latents_std"] = [float(v) for v in torch.as_tensor(lf.latents_std).flatten()]
    return info


def process_in(model, latent: torch.Tensor) -> torch.Tensor:
    """VAE latent -> the model's sampling space (what KSampler does to latents before sampling)."""
    return model.get_model_object("latent_format").process_in(latent)


def make_encoder(vae, model) -> Callable[[torch.Tensor], torch.Tensor]:
    """image [B,3,H,W] in [0,1] -> latent in the model's sampling space, as an ordinary (non-inference) tensor.

    The VAE runs through ComfyUI's own ``VAE.encode`` (device placement, batching, dtype), under inference mode
    like any node; the result is cloned out of inference mode so autograd code may use it.
    """
    lf = model.get_model_object("latent_format")

    def encode(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            z = lf.process_in(vae.encode(x.movedim(1, -1).float()).float())
        return z.clone()

    return encode


def interrupt_check() -> None:
    """Raises ComfyUI's interrupt exception when the user pressed Cancel."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()
