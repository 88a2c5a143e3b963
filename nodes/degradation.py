"""Degradation nodes: build a DEGRADATION from parameters, and apply one to an IMAGE (for demos and tests)."""

from __future__ import annotations

from comfy_api.latest import io

from ..operators.degradations import DEFAULT_MEASUREMENT_NOISE, SpecFieldError, add_noise, build_degradation
from .common import CATEGORY, Degradation, SiloInputError, bchw_to_image, image_to_bchw, mask_to_b1hw

DEGRADATION_TYPES = ["gaussian_blur", "super_resolution", "box_inpaint", "random_box_inpaint", "mask_inpaint", "jpeg",
                     "identity"]


def spec_from_widgets(kind: str, *, blur_kernel_size: int, blur_sigma: float, sr_factor: int, box_top: int,
                      box_left: int, box_height: int, box_width: int, random_box_size: int, random_box_seed: int,
                      jpeg_quality: int) -> dict:
    """Only the widgets that belong to ``kind`` make it into the spec."""
    if kind == "gaussian_blur":
        return {"type": kind, "kernel_size": blur_kernel_size, "sigma": blur_sigma}
    if kind == "super_resolution":
        return {"type": kind, "factor": sr_factor}
    if kind == "box_inpaint":
        return {"type": kind, "top": box_top, "left": box_left, "height": box_height, "width": box_width}
    if kind == "random_box_inpaint":
        return {"type": kind, "size": random_box_size, "seed": random_box_seed}
    if kind == "jpeg":
        return {"type": kind, "quality": jpeg_quality}
    return {"type": kind}


#: spec field -> the widget it comes from, to name the right input in errors
WIDGET_OF_FIELD = {"kernel_size": "blur_kernel_size", "sigma": "blur_sigma", "factor": "sr_factor", "top": "box_top",
                   "left": "box_left", "height": "box_height", "width": "box_width", "size": "random_box_size",
                   "seed": "random_box_seed", "quality": "jpeg_quality"}


class DegradationNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SILODegradation",
            display_name="Degradation (SILO)",
            category=CATEGORY,
            description=(
                "Describes how a photo was degraded (blur, low resolution, missing region, JPEG). Connect it to "
                "Encode Measurement and Apply Degradation; a latent operator must be trained for the same degradation. "
                "Only the widgets of the chosen type are used."),
            inputs=[
                io.Combo.Input("type", options=DEGRADATION_TYPES, default="gaussian_blur",
                               tooltip="The kind of degradation. The papers' settings are the defaults of each widget."),
                io.Int.Input("blur_kernel_size", default=61, min=1, max=255, step=2,
                             tooltip="gaussian_blur: odd kernel size in pixels (paper: 61)."),
                io.Float.Input("blur_sigma", default=3.0, min=0.1, max=50.0, step=0.1,
                               tooltip="gaussian_blur: standard deviation of the Gaussian in pixels (paper: 3.0)."),
                io.Int.Input("sr_factor", default=4, min=2, max=16,
                             tooltip="super_resolution: downscale factor (bicubic, antialiased; paper: 4 or 8)."),
                io.Int.Input("box_top", default=128, min=0, max=16384, step=8,
                             tooltip="box_inpaint: top edge of the missing box in pixels."),
                io.Int.Input("box_left", default=128, min=0, max=16384, step=8,
                             tooltip="box_inpaint: left edge of the missing box in pixels."),
                io.Int.Input("box_height", default=256, min=1, max=16384, step=8,
                             tooltip="box_inpaint: height of the missing box in pixels."),
                io.Int.Input("box_width", default=256, min=1, max=16384, step=8,
                             tooltip="box_inpaint: width of the missing box in pixels."),
                io.Int.Input("random_box_size", default=256, min=8, max=16384, step=8,
                             tooltip="random_box_inpaint: side of the square box, placed at random from the seed."),
                io.Int.Input("random_box_seed", default=0, min=0, max=2**31 - 1,
                             tooltip="random_box_inpaint: seed that places the box (same seed, same box)."),
                io.Int.Input("jpeg_quality", default=10, min=1, max=100,
                             tooltip="jpeg: JPEG quality 1-100 (paper: 10)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="mask_inpaint: the missing region (white = missing), e.g. drawn in the "
                                      "mask editor of Load Image."),
            ],
            outputs=[Degradation.Output("DEGRADATION", display_name="DEGRADATION", tooltip="The degradation, for Encode Measurement, "
                                                                 "Apply Degradation and Train Latent Operator.")],
        )

    @classmethod
    def execute(cls, type, blur_kernel_size, blur_sigma, sr_factor, box_top, box_left, box_height, box_width,
                random_box_size, random_box_seed, jpeg_quality, mask=None) -> io.NodeOutput:
        spec = spec_from_widgets(type, blur_kernel_size=blur_kernel_size, blur_sigma=blur_sigma, sr_factor=sr_factor,
                                 box_top=box_top, box_left=box_left, box_height=box_height, box_width=box_width,
                                 random_box_size=random_box_size, random_box_seed=random_box_seed,
                                 jpeg_quality=jpeg_quality)
        if type == "mask_inpaint" and mask is None:
            raise SiloInputError("Degradation (SILO)", "mask", "type 'mask_inpaint' needs a mask (white = missing).",
                                 "Connect the MASK output of Load Image (draw it in the mask editor) or of a mask node.")
        try:
            deg = build_degradation(spec, mask=mask_to_b1hw(mask) if type == "mask_inpaint" else None)
        except SpecFieldError as e:
            raise SiloInputError("Degradation (SILO)", WIDGET_OF_FIELD.get(e.field, "type"), f"{type}: {e}.") from None
        except ValueError as e:  # the mask (the only other input build_degradation checks)
            raise SiloInputError("Degradation (SILO)", "mask" if type == "mask_inpaint" else "type",
                                 f"{type}: {e}.") from None
        return io.NodeOutput(deg)


class ApplyDegradation(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SILOApplyDegradation",
            display_name="Apply Degradation (SILO)",
            category=CATEGORY,
            description=("Degrades a clean image with a DEGRADATION and adds Gaussian noise: makes a test measurement "
                         "whose original is known, to compare restorations against it."),
            inputs=[
                io.Image.Input("image", tooltip="The clean image(s) to degrade."),
                Degradation.Input("degradation", tooltip="From the Degradation (SILO) node."),
                io.Float.Input("noise_sigma", default=DEFAULT_MEASUREMENT_NOISE, min=0.0, max=1.0, step=0.001,
                               tooltip="Std of the added Gaussian noise on the 0-1 image scale (paper: 0.01)."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=True,
                             tooltip="Seed of the measurement noise."),
            ],
            outputs=[
                io.Image.Output("measurement", display_name="measurement", tooltip="The degraded image in its natural size (small for "
                                                        "super-resolution), noise added, clamped to 0-1."),
                io.Image.Output("upsampled", display_name="upsampled", tooltip="The measurement brought to the original size (bicubic for "
                                                      "super-resolution, unchanged otherwise) for side-by-side views."),
            ],
        )

    @classmethod
    def execute(cls, image, degradation, noise_sigma, seed) -> io.NodeOutput:
        node = "Apply Degradation (SILO)"
        x = image_to_bchw(image, node)
        try:
            y = degradation(x)
        except ValueError as e:
            raise SiloInputError(node, "image", str(e)) from None
        y = add_noise(y, noise_sigma, seed=seed).clamp(0, 1)
        full = degradation.lift(y, size=tuple(x.shape[-2:])).clamp(0, 1)
        return io.NodeOutput(bchw_to_image(y), bchw_to_image(full))
