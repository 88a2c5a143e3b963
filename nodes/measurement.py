"""Encode Measurement, and the checks every solver node makes of a measurement against its latent.

Imports run one way: ``common`` ← ``host`` ← ``measurement`` ← ``silo`` / ``baselines``.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..operators.physics import Measurement, MeasurementError, NoiseSettings
from .common import Degradation, SiloInputError, SiloNode, display_name, image_to_bchw, require_finite
from .common import Measurement as MeasurementSocket
from .host import vae_downscale
from .widgets import widget_inputs

__all__ = ["EncodeMeasurement", "check_early_stop", "check_latent_fits", "check_latent_image_finite",
           "measurement_of"]


#: Encode Measurement's advice, naming this pack's and the host's nodes, for what the core's checks found.
_ADVICE = {
    "box_inpaint": "Make the box fit inside the photo (Degradation node's box_top/box_left/box_height/box_width).",
    "random_box_inpaint": "Use a random_box_size that fits inside the photo (Degradation node).",
    "mask_inpaint": "Draw the mask on this photo (Load Image's mask editor), or resize the mask to the photo.",
    ("size", True): "Crop or pad the photo to a multiple of {m} pixels (e.g. with an ImageCrop or Pad Image for "
                    "Outpainting node before Encode Measurement).",
    ("size", False): "Resize or crop the photo so that its size times the factor is a multiple of {m} (e.g. with an "
                     "Upscale Image or ImageCrop node before Encode Measurement).",
}


def measurement_of(node: str, photo: torch.Tensor, degradation, noise_sigma: float, downscale: int) -> Measurement:
    """:meth:`Measurement.from_photo` with its problems as the node's input errors and the node's advice."""
    try:
        return Measurement.from_photo(photo, degradation, noise_sigma, multiple=downscale)
    except MeasurementError as e:
        if e.reason == "size":
            fix = _ADVICE[("size", bool(degradation.same_size))].format(m=downscale)
        elif e.reason == "mask":
            fix = _ADVICE.get(degradation.spec.get("type", ""), e.fix)
        else:
            fix = e.fix
        raise SiloInputError(node, e.field, e.problem, fix) from None


class EncodeMeasurement(SiloNode):
    """Encodes the degraded photo with the checkpoint's VAE before sampling (low-resolution photos are first upscaled
    bicubically to the output size), and once more under fresh noise of noise_sigma for the noise floor that automatic
    η steers by. The result guides SILO KSampler towards restorations that are consistent with the photo."""

    NODE_ID, TITLE = "SILOEncodeMeasurement", "Encode Measurement"

    @classmethod
    def inputs(cls) -> list:
        noise = widget_inputs(NoiseSettings, noise_sigma={
            "tooltip": "Estimated noise std of the photo on the 0-1 scale (paper: 0.01); the operator is conditioned "
                       "on it."})
        return [io.Image.Input("image", tooltip="The degraded photo (for super-resolution: the small photo)."),
                io.Vae.Input("vae", tooltip="The VAE of the checkpoint you restore with."),
                Degradation.Input("degradation", tooltip="How the photo was degraded (Degradation (SILO) node)."),
                *noise]

    @classmethod
    def outputs(cls) -> list:
        return [MeasurementSocket.Output("MEASUREMENT", display_name="MEASUREMENT",
                                         tooltip="The encoded measurement, for the SILO samplers."),
                io.Latent.Output("latent_image", display_name="latent_image",
                                 tooltip="The encoded (for super-resolution: upscaled) photo as a LATENT of the output "
                                         "size: SILO KSampler's latent_image (at denoise 1 only its size matters; lower "
                                         "denoise starts from the photo).")]

    @classmethod
    def execute(cls, image, vae, degradation, noise_sigma) -> io.NodeOutput:
        node = display_name(cls)
        y = require_finite(image_to_bchw(image, node), node, "image", "the photo",
                           "Load the photo again, or check the node that produced it.")
        downscale = vae_downscale(vae)
        meas = measurement_of(node, y, degradation, float(noise_sigma), downscale)
        latent = vae.encode(meas.lifted.movedim(1, -1))
        require_finite(latent, node, "vae", "the VAE's latent of the photo",
                       "The VAE overflowed: run it in fp32 (--fp32-vae) or use another VAE.")
        jitter = vae.encode(meas.renoised().movedim(1, -1))  # how far the photo's noise moves its latent: SILO's floor
        return io.NodeOutput(meas.encoded(latent, downscale, jitter), {"samples": latent})


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
