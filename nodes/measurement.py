"""Encode Measurement, and the checks every solver node makes of a measurement against its latent.

Imports run one way: ``common`` ← ``host`` ← ``measurement`` ← ``silo`` / ``baselines``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_api.latest import io

from .common import CATEGORY, Degradation, Measurement, SiloInputError, display_name, image_to_bchw, require_finite
from .host import vae_downscale

__all__ = ["EncodeMeasurement", "EncodedMeasurement", "check_early_stop", "check_latent_fits",
           "check_latent_image_finite"]


@dataclass
class EncodedMeasurement:
    """What Encode Measurement hands to the solvers."""

    latent: torch.Tensor  # raw VAE latent of the (lifted) measurement, before the model's process_in
    pixels: torch.Tensor  # the measurement y in its natural size, [B,3,h,w] in [0,1]
    lifted: torch.Tensor  # y brought to full size, what was encoded
    degradation: object  # the Degradation module
    noise_sigma: float
    pixel_mask: torch.Tensor | None  # [B,1,H,W], 1 = missing (inpainting types)
    downscale: int = 8  # pixels per latent cell, read from the VAE that encoded it


_MASK_ADVICE = {
    "box_inpaint": "Make the box fit inside the photo (Degradation node's box_top/box_left/box_height/box_width).",
    "random_box_inpaint": "Use a random_box_size that fits inside the photo (Degradation node).",
    "mask_inpaint": "Draw the mask on this photo (Load Image's mask editor), or resize the mask to the photo.",
}


class EncodeMeasurement(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SILOEncodeMeasurement",
            display_name="Encode Measurement",
            category=CATEGORY,
            description=("Encodes the degraded photo once with the checkpoint's VAE (low-resolution photos are first "
                         "upscaled bicubically to the output size). The result guides SILO KSampler towards "
                         "restorations that are consistent with the photo."),
            inputs=[
                io.Image.Input("image", tooltip="The degraded photo (for super-resolution: the small photo)."),
                io.Vae.Input("vae", tooltip="The VAE of the checkpoint you restore with."),
                Degradation.Input("degradation", tooltip="How the photo was degraded (Degradation (SILO) node)."),
                io.Float.Input("noise_sigma", default=0.01, min=0.0, max=0.5, step=0.001,
                               tooltip="Estimated noise std of the photo on the 0-1 scale (paper: 0.01); the operator "
                                       "is conditioned on it."),
            ],
            outputs=[Measurement.Output("MEASUREMENT", display_name="MEASUREMENT",
                                        tooltip="The encoded measurement, for the SILO samplers."),
                     io.Latent.Output("latent_image", display_name="latent_image",
                                      tooltip="The encoded (for super-resolution: upscaled) photo as a "
                                      "LATENT of the output size: SILO KSampler's latent_image (at denoise 1 only "
                                      "its size matters; lower denoise starts from the photo).")],
        )

    @classmethod
    def execute(cls, image, vae, degradation, noise_sigma) -> io.NodeOutput:
        node = display_name(cls)
        y = require_finite(image_to_bchw(image, node), node, "image", "the photo",
                           "Load the photo again, or check the node that produced it.")
        downscale = vae_downscale(vae)
        size = cls._restored_size(node, degradation, y, downscale)
        mask = cls._mask(node, degradation, y)
        lifted = degradation.lift(y, size=size)
        if mask is not None:
            # only the pixels outside the mask are measured, y = A(x) = x·(1−m): what the photo still shows under
            # the mask (a photo with its holes painted in the mask editor) is not part of the measurement
            keep = 1.0 - mask.to(device=y.device, dtype=y.dtype)
            y, lifted = y * keep, lifted * keep
        latent = vae.encode(lifted.movedim(1, -1))
        require_finite(latent, node, "vae", "the VAE's latent of the photo",
                       "The VAE overflowed: run it in fp32 (--fp32-vae) or use another VAE.")
        meas = EncodedMeasurement(latent=latent, pixels=y, lifted=lifted, degradation=degradation,
                                  noise_sigma=float(noise_sigma), pixel_mask=mask, downscale=downscale)
        return io.NodeOutput(meas, {"samples": latent})

    @staticmethod
    def _restored_size(node: str, degradation, y: torch.Tensor, downscale: int = 8) -> tuple[int, int]:
        """The output size: the photo's, or (super-resolution) the photo's times the factor; a multiple of the VAE's
        downscale factor (8 for the SD/SDXL/SD3/Flux VAEs)."""
        h, w = y.shape[-2:]
        factor = 1 if degradation.same_size else int(degradation.spec["factor"])
        h, w = h * factor, w * factor
        if h % downscale or w % downscale:
            fix = (f"Resize or crop the photo so that its size times the factor is a multiple of {downscale} "
                   f"(e.g. with an Upscale Image or ImageCrop node before Encode Measurement)." if factor > 1 else
                   f"Crop or pad the photo to a multiple of {downscale} pixels (e.g. with an ImageCrop or Pad "
                   "Image for Outpainting node before Encode Measurement).")
            raise SiloInputError(node, "image", f"the restored size {w}x{h} is not a multiple of {downscale} (the "
                                 "VAE's downscale factor).", fix)
        return h, w

    @staticmethod
    def _mask(node: str, degradation, y: torch.Tensor) -> torch.Tensor | None:
        """The pixel mask of an inpainting degradation for this photo (None for the others), with errors that give
        the advice of the degradation's own kind (a box is moved, a mask is redrawn)."""
        kind = degradation.spec.get("type", "")
        drawn = getattr(degradation, "mask", None)
        b = y.shape[0]
        if isinstance(drawn, torch.Tensor) and drawn.ndim >= 3 and drawn.shape[0] not in (1, b):
            images = "a single photo" if b == 1 else f"a batch of {b} photos"
            fix = "Use one mask." if b == 1 else f"Use one mask, or one per photo ({b})."
            raise SiloInputError(node, "degradation", f"the mask has a batch of {drawn.shape[0]} but the image is "
                                 f"{images}.", fix)
        try:
            return degradation.pixel_mask((b, 3, *y.shape[-2:]))
        except ValueError as e:
            raise SiloInputError(node, "degradation", f"{e}.", _MASK_ADVICE.get(kind, "")) from None


# ------------------------------------------------------------------------------- checks shared by the solvers

def check_latent_image_finite(node: str, latent_image: dict) -> None:
    """A KSampler-like node's ``latent_image`` holds no NaN/inf (it would give an all-NaN, black result)."""
    require_finite(latent_image["samples"], node, "latent_image", "the latent",
                   "Use Encode Measurement's latent_image output (or an Empty Latent Image).")


def check_latent_fits(node: str, x: torch.Tensor, size: tuple[int, int], batch: int, downscale: int = 8) -> None:
    """The sampler's latent ``x`` matches the measurement: ``size`` (H, W) in pixels and its batch."""
    if (x.shape[-2] * downscale, x.shape[-1] * downscale) != tuple(size):
        raise SiloInputError(node, "latent_image", f"the latent is {x.shape[-1] * downscale}x{x.shape[-2] * downscale}"
                             f" px but the measurement is for {size[1]}x{size[0]} px.",
                             "Use Encode Measurement's latent_image output (or a latent of the same size).")
    if batch not in (1, x.shape[0]):
        raise SiloInputError(node, "measurement", f"batch {batch} does not match the latent batch {x.shape[0]}.",
                             "Use one measurement per latent, or a single one.")
    require_finite(x, node, "latent_image", "the starting latent (latent_image with its noise)",
                   "Use Encode Measurement's latent_image output (or an Empty Latent Image).")


def check_early_stop(node: str, early_stop: int | None, sigmas: torch.Tensor) -> None:
    """``early_stop`` names a step of this run (the schedule is only known when sampling starts)."""
    n = len(sigmas) - 1
    if early_stop is not None and early_stop >= n:
        raise SiloInputError(node, "early_stop", f"step {early_stop} does not exist in a run of {n} steps "
                             f"(0..{n - 1}).", "Use -1 (run to the end) or a smaller step.")
