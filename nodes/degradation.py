"""Degradation nodes: build a DEGRADATION from parameters, and apply one to an IMAGE (for demos and tests).

The Degradation node's widgets are not declared here: each degradation class in the core declares its fields once
(``operators.degradations.DEGRADATIONS``, field ``f`` of a class shown as widget ``widget_prefix + f``), and the
node lists them in registry order. Saved workflows depend on the resulting names, order, defaults and ranges.
"""

from __future__ import annotations

import dataclasses

from comfy_api.latest import io

from ..operators.degradations import DEGRADATIONS, SpecFieldError, build_degradation, mask_b1hw
from ..operators.physics import Measurement, NoiseSettings
from .common import Degradation, SiloInputError, SiloNode, bchw_to_image, display_name, image_to_bchw, require_finite
from .widgets import widget_input, widget_inputs

DEGRADATION_TYPES = [cls.type_name for cls in DEGRADATIONS]
_CLASS_OF = {cls.type_name: cls for cls in DEGRADATIONS}


def degradation_widgets() -> list[tuple[str, str, object]]:
    """``(type, widget name, field spec)`` for every field a degradation class shows on the node, in order."""
    return [(cls.type_name, cls.widget_prefix + spec.name, spec)
            for cls in DEGRADATIONS for spec in cls.field_specs() if spec.widget]


def spec_from_widgets(kind: str, **widgets) -> dict:
    """Only the widgets that belong to ``kind`` make it into the spec."""
    cls = _CLASS_OF[kind]
    return {"type": kind, **{s.name: widgets[cls.widget_prefix + s.name] for s in cls.field_specs() if s.widget}}


def widget_of_field(kind: str, field: str) -> str:
    """The widget a spec field of ``kind`` comes from (``type`` for anything else), to name it in errors."""
    cls = _CLASS_OF.get(kind)
    if cls is not None and any(s.name == field and s.widget for s in cls.field_specs()):
        return cls.widget_prefix + field
    return "type"


def _owned_by(kind: str, widget: io.Input) -> io.Input:
    """Marks a widget as belonging to degradation type ``kind`` (an extra input option the host passes through)."""
    widget.extra_dict = {**(getattr(widget, "extra_dict", None) or {}), "silo_degradation_type": kind}
    return widget


class DegradationNode(SiloNode):
    """Describes how a photo was degraded (blur, low resolution, missing region, JPEG). Connect it to Encode
    Measurement and Apply Degradation; a latent operator must be trained for the same degradation. Only the widgets
    of the chosen type are shown and used."""

    NODE_ID, TITLE = "SILODegradation", "Degradation (SILO)"

    @classmethod
    def inputs(cls) -> list:
        # `silo_degradation_type` lets the web extension (web/js/silo_degradation.js) show only the chosen type's
        # widgets; the host passes unknown input options through to the frontend untouched.
        fields = [_owned_by(kind, widget_input(dataclasses.replace(spec, name=name), tooltip=f"{kind}: {spec.tooltip}"))
                  for kind, name, spec in degradation_widgets()]
        return [io.Combo.Input("type", options=DEGRADATION_TYPES, default="gaussian_blur",
                                       tooltip="The kind of degradation. The papers' settings are the defaults of each widget."),
                *fields,
                io.Mask.Input("mask", optional=True, tooltip="mask_inpaint: the missing region (white = missing), e.g. "
                                                                     "drawn in the mask editor of Load Image.")]

    @classmethod
    def outputs(cls) -> list:
        return [Degradation.Output("DEGRADATION", display_name="DEGRADATION", tooltip="The degradation, for Encode "
                                           "Measurement, Apply Degradation and Train Latent Operator.")]

    @classmethod
    def execute(cls, type, mask=None, **widgets) -> io.NodeOutput:
        node = display_name(cls)
        spec = spec_from_widgets(type, **widgets)
        needs_mask = _CLASS_OF[type].needs_mask
        if needs_mask and mask is None:
            raise SiloInputError(node, "mask", f"type '{type}' needs a mask (white = missing).",
                                 "Connect the MASK output of Load Image (draw it in the mask editor) or of a mask node.")
        try:
            deg = build_degradation(spec, mask=mask_b1hw(mask).float() if needs_mask else None)
        except SpecFieldError as e:
            raise SiloInputError(node, widget_of_field(type, e.field), f"{e}.") from None
        except ValueError as e:  # the mask (the only other input build_degradation checks)
            raise SiloInputError(node, "mask" if needs_mask else "type", f"{type}: {e}.") from None
        return io.NodeOutput(deg)


class ApplyDegradation(SiloNode):
    """Degrades a clean image with a DEGRADATION and adds Gaussian noise: makes a test measurement whose original is
    known, to compare restorations against it."""

    NODE_ID, TITLE = "SILOApplyDegradation", "Apply Degradation (SILO)"

    @classmethod
    def inputs(cls) -> list:
        noise = widget_inputs(NoiseSettings, noise_sigma={
            "tooltip": "Std of the added Gaussian noise on the 0-1 image scale (paper: 0.01)."})
        return [io.Image.Input("image", tooltip="The clean image(s) to degrade."),
                Degradation.Input("degradation", tooltip="From the Degradation (SILO) node."), *noise,
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1, control_after_generate=True,
                             tooltip="Seed of the measurement noise.")]

    @classmethod
    def outputs(cls) -> list:
        return [io.Image.Output("measurement", display_name="measurement",
                                tooltip="The degraded image in its natural size (small for super-resolution), noise "
                                        "added, clamped to 0-1."),
                io.Image.Output("upsampled", display_name="upsampled",
                                tooltip="The measurement brought to the original size (bicubic for super-resolution, "
                                        "unchanged otherwise) for side-by-side views.")]

    @classmethod
    def execute(cls, image, degradation, noise_sigma, seed) -> io.NodeOutput:
        node = display_name(cls)
        x = require_finite(image_to_bchw(image, node), node, "image")
        try:
            meas = Measurement.simulate(x, degradation, noise_sigma, seed=seed)
        except ValueError as e:
            raise SiloInputError(node, "image", str(e)) from None
        return io.NodeOutput(bchw_to_image(meas.y), bchw_to_image(meas.lifted))
