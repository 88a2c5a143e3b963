"""Pixel-space baselines next to SILO: Latent-DPS / PSLD and ReSample, as KSampler-like nodes and SAMPLERs.

They need no trained operator: the degradation is applied to the VAE-decoded estimate every step (or at the
consistency steps of ReSample), which is exactly the cost SILO removes. Same MEASUREMENT as SILO, so a workflow
switches solver by swapping one node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from comfy_api.latest import io, ui

from ..samplers.latent_dps import LatentDPSSettings, sample_latent_dps
from ..samplers.resample import ReSampleSettings, sample_resample
from .common import CATEGORY, Measurement, SiloInputError, Trace, display_name, trace_text
from .host import (
    check_same_model,
    differentiable_vae,
    diffusion_model,
    guarded_sample,
    ksampler,
    ksampler_inputs,
    make_weights_differentiable,
    run_guided_ksampler,
    with_model_parameterization,
)
from .measurement import check_early_stop, check_latent_fits, check_latent_image_finite
from .widgets import settings_from_widgets, widget_inputs


@dataclass(frozen=True)
class PixelSolver:
    """A pixel-space baseline as the glue sees it: its settings, its pure-torch sampler and what it needs."""

    settings: type
    sample: Callable
    vae_tooltip: str

    def unet_gradient(self, s) -> bool:
        """Does this run back-propagate through the UNet? (ReSample only for its optional DPS steps.)"""
        if isinstance(s, ReSampleSettings):
            return s.dps_eta > 0
        return s.gradient == "unet" and s.eta > 0

    def needs_encoder(self, s) -> bool:
        """ReSample's pixel-space optimisation and PSLD's gluing encode images back to latents."""
        return isinstance(s, ReSampleSettings) or s.gluing > 0


SOLVERS = {
    "latent_dps": PixelSolver(LatentDPSSettings, sample_latent_dps,
                              "The checkpoint's VAE: decoded every step (this is what makes these solvers slow)."),
    "resample": PixelSolver(ReSampleSettings, sample_resample,
                            "The checkpoint's VAE: used for the hard data-consistency optimisation."),
}


def pixel_guided_sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    """KSAMPLER function for the pixel-space baselines: differentiable VAE next to the UNet, measurement checked
    against the latent, then the pure-torch solver."""
    solver: PixelSolver = SOLVERS[options.pop("solver")]
    node = options.pop("node")
    meas = options.pop("measurement")
    vae = options.pop("vae")
    model_patcher = options.pop("model_patcher")
    settings = options["settings"]
    options.setdefault("trace", []).clear()  # a SAMPLER reused by SamplerCustom records its latest run only
    check_same_model(model, model_patcher, node)
    check_early_stop(node, settings.early_stop, sigmas)
    check_latent_fits(node, x, tuple(meas.lifted.shape[-2:]), meas.pixels.shape[0])
    dev, dtype = x.device, x.dtype
    with torch.inference_mode(False):
        try:
            decode, encode = differentiable_vae(vae, model_patcher)
        except ValueError as e:
            raise SiloInputError(node, "vae", str(e), "Connect the checkpoint's image VAE.") from None
        degradation = meas.degradation.to(dev)
        y = meas.pixels.to(dev, torch.float32).clone()
        if solver.unet_gradient(settings):
            make_weights_differentiable(diffusion_model(model_patcher))
        if solver.needs_encoder(settings):
            options["encoder"] = encode
    return guarded_sample(solver.sample, model, x, sigmas, extra_args, callback, disable, node=node,
                          model_patcher=model_patcher, downscale=meas.downscale, measurement=y,
                          degradation=degradation, decoder=decode, **options).to(dtype)


def build_pixel_sampler(solver: str, model, vae, measurement, node: str, widgets: dict):
    """``(SAMPLER, trace list)`` for a pixel-space baseline (``solver``: ``latent_dps`` or ``resample``) with the
    node's widget values."""
    settings = with_model_parameterization(settings_from_widgets(SOLVERS[solver].settings, node, **widgets), model,
                                           node)
    if measurement is None or getattr(measurement, "pixels", None) is None:
        raise SiloInputError(node, "measurement", "no pixel measurement was given.",
                             "Connect the MEASUREMENT output of Encode Measurement.")
    if getattr(settings, "gluing", 0.0) > 0 and not measurement.degradation.is_linear:
        raise SiloInputError(node, "gluing", f"PSLD's gluing term needs a linear degradation; "
                             f"{measurement.degradation.name} is not.", "Set gluing to 0 (Latent-DPS) for this one.")
    trace: list = []
    options = {"solver": solver, "node": node, "measurement": measurement, "vae": vae, "model_patcher": model,
               "settings": settings, "trace": trace}
    return ksampler(pixel_guided_sampler_function, options), trace


def solver_inputs(solver: str) -> list:
    """The baseline's own inputs: the measurement, the VAE, then its settings (declared once in ``samplers``)."""
    return [
        Measurement.Input("measurement", tooltip="From Encode Measurement (carries the photo and the degradation)."),
        io.Vae.Input("vae", tooltip=SOLVERS[solver].vae_tooltip),
        *widget_inputs(SOLVERS[solver].settings),
    ]


def _run_ksampler(cls, solver, model, seed, steps, cfg, scheduler, positive, negative, latent_image, denoise,
                  measurement, vae, settings) -> io.NodeOutput:
    """A baseline KSampler node's run: KSampler's work around the baseline's SAMPLER, its summary on the node."""
    node = display_name(cls)
    check_latent_image_finite(node, latent_image)
    sampler, trace = build_pixel_sampler(solver, model, vae, measurement, node, settings)
    out = run_guided_ksampler(model, sampler, seed, steps, cfg, scheduler, positive, negative, latent_image, denoise)
    return io.NodeOutput(out, trace, ui=ui.PreviewText(trace_text(trace, "‖y − A(D(ẑ₀))‖")))


_OUTPUTS = [io.Latent.Output("LATENT", display_name="LATENT", tooltip="The restored latent (VAE Decode it)."),
            Trace.Output("trace", display_name="trace", tooltip="Per-step pixel-space consistency record.")]


class LatentDPSKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SILOLatentDPSKSampler",
            is_output_node=True,  # shows text: the host re-sends a cached output node's result
            display_name="Latent DPS / PSLD KSampler",
            category=CATEGORY,
            description=("Baseline: Latent-DPS, or PSLD with gluing > 0. Every step decodes the denoised latent with "
                         "the VAE and pulls it towards ‖y − A(D(ẑ₀))‖ → 0 in pixel space. Needs no trained operator, "
                         "but is much slower and hungrier than SILO KSampler."),
            inputs=[*ksampler_inputs(), *solver_inputs("latent_dps")],
            outputs=list(_OUTPUTS),
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, scheduler, positive, negative, latent_image, denoise, measurement, vae,
                **settings) -> io.NodeOutput:
        return _run_ksampler(cls, "latent_dps", model, seed, steps, cfg, scheduler, positive, negative, latent_image,
                             denoise, measurement, vae, settings)


class ReSampleKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SILOReSampleKSampler",
            is_output_node=True,  # shows text: the host re-sends a cached output node's result
            display_name="ReSample KSampler",
            category=CATEGORY,
            description=("Baseline: ReSample (hard data consistency). DDIM in latent space; at regular steps the "
                         "latent is optimised through the VAE decoder until it explains the photo, then resampled back "
                         "to the current noise level. Needs no trained operator."),
            inputs=[*ksampler_inputs(), *solver_inputs("resample")],
            outputs=list(_OUTPUTS),
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, scheduler, positive, negative, latent_image, denoise, measurement, vae,
                **settings) -> io.NodeOutput:
        return _run_ksampler(cls, "resample", model, seed, steps, cfg, scheduler, positive, negative, latent_image,
                             denoise, measurement, vae, settings)


class LatentDPSSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SILOLatentDPSSampler",
            display_name="Latent DPS / PSLD Sampler",
            category=CATEGORY,
            description="Latent-DPS / PSLD as a SAMPLER for SamplerCustom / SamplerCustomAdvanced.",
            inputs=[io.Model.Input("model", tooltip="The checkpoint's MODEL (for its latent format)."), *solver_inputs("latent_dps")],
            outputs=[io.Sampler.Output("SAMPLER", display_name="SAMPLER", tooltip="For SamplerCustom(Advanced).")],
        )

    @classmethod
    def execute(cls, model, measurement, vae, **settings) -> io.NodeOutput:
        return io.NodeOutput(build_pixel_sampler("latent_dps", model, vae, measurement, display_name(cls), settings)[0])


class ReSampleSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SILOReSampleSampler",
            display_name="ReSample Sampler",
            category=CATEGORY,
            description="ReSample as a SAMPLER for SamplerCustom / SamplerCustomAdvanced.",
            inputs=[io.Model.Input("model", tooltip="The checkpoint's MODEL (for its latent format)."),
                    *solver_inputs("resample")],
            outputs=[io.Sampler.Output("SAMPLER", display_name="SAMPLER", tooltip="For SamplerCustom(Advanced).")],
        )

    @classmethod
    def execute(cls, model, measurement, vae, **settings) -> io.NodeOutput:
        return io.NodeOutput(build_pixel_sampler("resample", model, vae, measurement, display_name(cls), settings)[0])
