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


def differentiable_vae(vae, model):
    """``(decode, encode)`` for pixel-space guidance (Latent-DPS, PSLD, ReSample), both differentiable.

    ``decode(z)``: latent in the model's sampling space -> image ``[B,3,H,W]``, about ``[0,1]`` (not clamped, so
    gradients survive at the range ends); ``encode(x)``: image ``[B,3,H,W]`` -> latent in the sampling space (the
    posterior mode). They call the VAE's ``first_stage_model`` directly: ComfyUI's ``VAE.decode/encode`` are
    inference-only, may tile and move the model. The VAE is loaded next to the UNet once and its weights are made
    ordinary tensors in place (no copy); attention inside it is the VAE's own (PyTorch SDPA by default).
    """
    import comfy.model_management as mm

    from .sampling import make_weights_differentiable

    if getattr(vae, "first_stage_model", None) is None or not hasattr(vae.first_stage_model, "decode"):
        raise ValueError("this VAE has no first_stage_model with decode(); pixel-space guidance needs an image VAE")
    mm.load_models_gpu([vae.patcher], force_full_load=True)
    fsm = vae.first_stage_model
    make_weights_differentiable(fsm)
    lf = model.get_model_object("latent_format")
    dtype, device = vae.vae_dtype, vae.device

    def decode(z: torch.Tensor) -> torch.Tensor:
        raw = lf.process_out(z.float())
        img = fsm.decode(raw.to(device=device, dtype=dtype)).float()
        return (img + 1.0) / 2.0

    def encode(x: torch.Tensor) -> torch.Tensor:
        raw = fsm.encode((x.float() * 2.0 - 1.0).to(device=device, dtype=dtype)).float()
        return lf.process_in(raw)

    return decode, encode
