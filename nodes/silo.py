"""SILO KSampler and SILO Sampler: the glue between ComfyUI sampling and ``samplers.silo``.

Imports run one way: ``common`` ← ``host`` ← ``measurement`` ← ``silo``.
"""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io, ui

from ..operators.degradations import spec_mismatch
from ..operators.fidelity import stored_verdict
from ..operators.io import latent_format_compatible
from ..operators.training import LATENT_CLAMP
from ..samplers.silo import SiloSettings, sample_silo
from .common import CATEGORY, LatentOperator, Measurement, SiloInputError, Trace, display_name, trace_text
from .host import (
    check_same_model,
    diffusion_model,
    guarded_sample,
    ksampler,
    ksampler_inputs,
    latent_format_info,
    make_weights_differentiable,
    process_in,
    run_guided_ksampler,
    with_model_parameterization,
)
from .measurement import EncodedMeasurement, check_early_stop, check_latent_fits, check_latent_image_finite
from .widgets import settings_from_widgets, widget_inputs

__all__ = ["SILO_INPUTS", "SiloKSampler", "SiloSampler", "build_silo_sampler", "check_operator"]


def silo_sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    """KSAMPLER function: prepares the measurement in the model's space, makes the UNet differentiable when the
    gradient goes through it, then runs the pure-torch :func:`sample_silo`."""
    meas: EncodedMeasurement = options.pop("measurement")
    op = options.pop("operator")
    model_patcher = options.pop("model_patcher")
    node = options.pop("node")
    trace = options.setdefault("trace", [])
    trace.clear()  # a SAMPLER reused by SamplerCustom records its latest run only
    settings: SiloSettings = options["settings"]
    check_same_model(model, model_patcher, node)
    check_early_stop(node, settings.early_stop, sigmas)
    dev, dtype = x.device, x.dtype
    with torch.inference_mode(False):
        w = process_in(model_patcher, meas.latent.to(dev, torch.float32)).clamp(-LATENT_CLAMP, LATENT_CLAMP).clone()
        check_latent_fits(node, x, (w.shape[-2] * meas.downscale, w.shape[-1] * meas.downscale), w.shape[0],
                          meas.downscale)
        module = op.module.to(dev)
        # operators loaded by a node come out of inference mode (the executor runs nodes under it): autograd must be
        # able to save their weights, in both gradient modes
        make_weights_differentiable(module)
        mask = None if meas.pixel_mask is None else meas.pixel_mask.to(dev).clone()

        def operator(z0, sigma_y=meas.noise_sigma, mask=mask):
            return module(z0.float(), sigma_y=sigma_y, mask=mask)

        if settings.gradient == "unet" and settings.eta > 0:
            make_weights_differentiable(diffusion_model(model_patcher))
    return guarded_sample(sample_silo, model, x, sigmas, extra_args, callback, disable, node=node,
                          model_patcher=model_patcher, downscale=meas.downscale, measurement=w.to(dtype),
                          operator=operator, **options).to(dtype)


def check_operator(model, op, measurement, node: str, on_mismatch: str = "error") -> str:
    """The operator fits the checkpoint's latent space and the measurement's degradation. A different degradation
    kind is always an error; different parameters of the same kind (a ×4 operator on a ×8 photo) are an error
    unless ``on_mismatch`` is ``"warn"``, and then the returned warning is shown on the node. Returns ``""`` when
    everything fits."""
    ok, why = latent_format_compatible(op.latent_format, latent_format_info(model))
    if not ok:
        raise SiloInputError(node, "operator", f"this operator was trained for another latent space: {why.rstrip('.')}.",
                             "Use an operator trained for this checkpoint's model family, or train one with the "
                             "Train Latent Operator node.")
    judged = stored_verdict(op.training or {})
    quality = f"Operator quality: {judged['text']}" if judged is not None and judged["level"] == "weak" else ""
    if measurement is None:
        return quality
    mismatch = spec_mismatch(op.degradation, measurement.degradation.spec)
    if not mismatch:
        return quality
    why = mismatch.why
    fix = ("Load an operator trained for the same degradation as the Degradation node of Encode Measurement (or "
           "train one with Train Latent Operator).")
    if not mismatch.overridable:
        raise SiloInputError(node, "operator", why + ".", fix)
    if on_mismatch != "warn":
        raise SiloInputError(node, "operator", why + ".",
                             fix[:-1] + ", or set on_mismatch to 'warn' to run anyway (results may be off).")
    warning = f"Warning: {why}; results may be off (on_mismatch = 'warn')."
    logging.warning("[comfyui-silo] %s: %s", node, warning)
    return "\n".join(t for t in (warning, quality) if t)


def build_silo_sampler(model, measurement, operator, settings: SiloSettings, node: str, on_mismatch: str = "error"):
    """``(SAMPLER, trace list, warning text)`` for SILO with these settings."""
    settings = with_model_parameterization(settings, model, node)
    warning = check_operator(model, operator, measurement, node, on_mismatch)
    trace: list = []
    opts = {"measurement": measurement, "operator": operator, "model_patcher": model, "node": node,
            "settings": settings, "trace": trace}
    return ksampler(silo_sampler_function, opts), trace, warning


#: The SILO nodes' own inputs: what to restore, then SILO's settings (declared once in ``samplers.silo``).
SILO_INPUTS = [
    Measurement.Input("measurement", tooltip="From Encode Measurement."),
    LatentOperator.Input("operator", tooltip="From Latent Degradation Operator or Train Latent Operator."),
    *widget_inputs(SiloSettings),
]

#: Added after the solver's widgets, and optional, so workflows saved before it (UI or API format) load and run
#: with the default.
ON_MISMATCH_INPUT = io.Combo.Input(
    "on_mismatch", options=["error", "warn"], default="error", optional=True,
    tooltip="When the operator was trained for other parameters of the same degradation (a ×4 operator on a ×8 "
            "photo, another blur σ): error (default) stops with an explanation; warn runs anyway and shows the "
            "warning on this node (results may be off).")


def _ui_text(warning: str, text: str = "") -> ui.PreviewText | None:
    lines = [t for t in (warning, text) if t]
    return ui.PreviewText("\n".join(lines)) if lines else None


class SiloKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SILOKSampler",
            is_output_node=True,  # shows text: the host re-sends a cached output node's result
            display_name="SILO KSampler",
            category=CATEGORY,
            description=("KSampler with SILO guidance: every step is pulled towards consistency with the encoded "
                         "degraded photo through a latent degradation operator — no VAE decoding in the loop. Uses "
                         "your loaded checkpoint; CFG 1 as in the paper, higher CFG also works."),
            inputs=[*ksampler_inputs(), *SILO_INPUTS, ON_MISMATCH_INPUT],
            outputs=[io.Latent.Output("LATENT", display_name="LATENT", tooltip="The restored latent (VAE Decode it)."),
                     Trace.Output("trace", display_name="trace", tooltip="Per-step consistency loss record.")],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, scheduler, positive, negative, latent_image, denoise, measurement,
                operator, on_mismatch="error", **settings) -> io.NodeOutput:
        node = display_name(cls)
        check_latent_image_finite(node, latent_image)
        sampler, trace, warning = build_silo_sampler(model, measurement, operator,
                                                     settings_from_widgets(SiloSettings, node, **settings), node,
                                                     on_mismatch)
        out = run_guided_ksampler(model, sampler, seed, steps, cfg, scheduler, positive, negative, latent_image,
                                  denoise)
        return io.NodeOutput(out, trace, ui=_ui_text(warning, trace_text(trace)))


class SiloSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SILOSampler",
            display_name="SILO Sampler",
            category=CATEGORY,
            description=("SILO guidance as a SAMPLER for SamplerCustom / SamplerCustomAdvanced (use with any "
                         "scheduler's SIGMAS, guider and noise). Its own run uses PyTorch SDPA attention (others, "
                         "e.g. SageAttention, cut gradients); your MODEL is not changed."),
            inputs=[io.Model.Input("model", tooltip="The checkpoint's MODEL (for its latent format)."), *SILO_INPUTS,
                    ON_MISMATCH_INPUT],
            outputs=[io.Sampler.Output("SAMPLER", display_name="SAMPLER",
                                       tooltip="For SamplerCustom / SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, measurement, operator, on_mismatch="error", **settings) -> io.NodeOutput:
        node = display_name(cls)
        sampler, _trace, warning = build_silo_sampler(model, measurement, operator,
                                                      settings_from_widgets(SiloSettings, node, **settings), node,
                                                      on_mismatch)
        return io.NodeOutput(sampler, ui=_ui_text(warning))
