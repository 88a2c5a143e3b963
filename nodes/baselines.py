"""Pixel-space baselines next to SILO: Latent-DPS / PSLD and ReSample, as KSampler-like nodes and SAMPLERs.

They need no trained operator: the degradation is applied to the VAE-decoded estimate every step (or at the
consistency steps of ReSample), which is exactly the cost SILO removes. Same MEASUREMENT as SILO, so a workflow
switches solver by swapping one node.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..samplers.latent_dps import sample_latent_dps
from ..samplers.resample import sample_resample
from .bridge import differentiable_vae
from .common import CATEGORY, Measurement, SiloInputError, Trace
from .sampling import (
    _diffusion_model,
    guarded_sample,
    ksampler_inputs,
    make_weights_differentiable,
    run_guided_ksampler,
    trace_text,
)

SOLVERS = {"latent_dps": ("Latent DPS / PSLD KSampler", sample_latent_dps),
           "resample": ("ReSample KSampler", sample_resample)}


def pixel_guided_sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    """KSAMPLER function for the pixel-space baselines: differentiable VAE next to the UNet, measurement checked
    against the latent, then the pure-torch solver."""
    solver = options.pop("solver")
    fn = SOLVERS[solver][1]
    node = options.pop("node")
    meas = options.pop("measurement")
    vae = options.pop("vae")
    model_patcher = options.pop("model_patcher")
    trace = options.setdefault("trace", [])
    trace.clear()
    dev, dtype = x.device, x.dtype
    with torch.inference_mode(False):
        size = tuple(meas.lifted.shape[-2:])
        if (x.shape[-2] * 8, x.shape[-1] * 8) != size:
            raise SiloInputError(node, "latent_image", f"the latent is {x.shape[-1] * 8}x{x.shape[-2] * 8} px but the "
                                 f"measurement is for {size[1]}x{size[0]} px.",
                                 "Use Encode Measurement's latent_image output (or a latent of the same size).")
        if meas.pixels.shape[0] not in (1, x.shape[0]):
            raise SiloInputError(node, "measurement", f"batch {meas.pixels.shape[0]} does not match the latent batch "
                                 f"{x.shape[0]}.", "Use one measurement per latent, or a single one.")
        try:
            decode, encode = differentiable_vae(vae, model_patcher)
        except ValueError as e:
            raise SiloInputError(node, "vae", str(e), "Connect the checkpoint's image VAE.") from None
        degradation = meas.degradation.to(dev)
        y = meas.pixels.to(dev, torch.float32).clone()
        if solver == "latent_dps":
            uses_unet_grad = options.get("gradient", "unet") == "unet" and float(options.get("eta", 0.0)) > 0
        else:  # ReSample back-propagates through the UNet only for its optional DPS steps
            uses_unet_grad = float(options.get("dps_eta", 0.0)) > 0
        if uses_unet_grad:
            unet = _diffusion_model(model)
            if unet is not None:
                make_weights_differentiable(unet)
        if solver == "latent_dps" and float(options.get("gluing", 0.0)) > 0:
            if not degradation.is_linear:
                raise SiloInputError(node, "gluing", f"PSLD's gluing term needs a linear degradation; "
                                     f"{degradation.name} is not.", "Set gluing to 0 (Latent-DPS) for this one.")
            options["encoder"] = encode
        if solver == "resample":
            options["encoder"] = encode

    return guarded_sample(fn, model, x, sigmas, extra_args, callback, disable, measurement=y,
                          degradation=degradation, decoder=decode, **options).to(dtype)


def build_pixel_sampler(solver: str, model, vae, measurement, node: str | None = None, **opts):
    import comfy.samplers

    node = node or SOLVERS[solver][0]
    if measurement is None or getattr(measurement, "pixels", None) is None:
        raise SiloInputError(node, "measurement", "no pixel measurement was given.",
                             "Connect the MEASUREMENT output of Encode Measurement.")
    trace: list = []
    options = {"solver": solver, "node": node, "measurement": measurement, "vae": vae, "model_patcher": model,
               "trace": trace, **opts}
    return comfy.samplers.KSAMPLER(pixel_guided_sampler_function, extra_options=options), trace


def _dps_inputs():
    return [
        Measurement.Input("measurement", tooltip="From Encode Measurement (carries the photo and the degradation)."),
        io.Vae.Input("vae", tooltip="The checkpoint's VAE: decoded every step (this is what makes these solvers slow)."),
        io.Float.Input("eta", default=1.0, min=0.0, max=50.0, step=0.05,
                       tooltip="Measurement-guidance step size (PSLD's ω; 0 = plain sampling)."),
        io.Float.Input("gluing", default=0.0, min=0.0, max=10.0, step=0.01,
                       tooltip="PSLD's gluing weight γ on ‖ẑ₀ − E(Aᵀy + (I − AᵀA)D(ẑ₀))‖²; 0 = Latent-DPS. PSLD "
                               "used 0.1 with η 1. Linear degradations only (not JPEG)."),
        io.Combo.Input("gluing_norm", options=["squared", "plain"], default="squared",
                       tooltip="Gluing term as in PSLD's paper (squared norm) or its public code (plain norm: the "
                               "pull has the same size whatever the mismatch, steadier with large γ)."),
        io.Combo.Input("update", options=["ddpm", "euler"], default="ddpm",
                       tooltip="ddpm: ancestral DDPM step (the papers). euler: deterministic DDIM step."),
        io.Combo.Input("gradient", options=["unet", "x0"], default="unet",
                       tooltip="unet: back-propagate through the UNet and the decoder (the papers). x0: only through "
                               "the decoder, at the denoised estimate."),
        io.Float.Input("grad_clamp", default=0.0, min=0.0, max=100.0, step=0.1,
                       tooltip="Element-wise gradient clamp; 0 = off (the papers do not clamp)."),
        io.Int.Input("early_stop", default=-1, min=-1, max=10000,
                     tooltip="-1: run to the end. k: return the denoised estimate at step k."),
    ]


def _dps_options(eta, gluing, gluing_norm, update, gradient, grad_clamp, early_stop) -> dict:
    # the node's gluing is PSLD's γ (its loss is ω·‖y − A(D(ẑ₀))‖ + γ·glue); the core scales its gluing by η = ω
    core_gluing = float(gluing) / float(eta) if eta > 0 else 0.0
    return {"eta": float(eta), "gluing": core_gluing, "gluing_norm": gluing_norm, "update": update,
            "gradient": gradient,
            "grad_clamp": None if grad_clamp <= 0 else float(grad_clamp),
            "early_stop": None if early_stop < 0 else int(early_stop)}


def _resample_inputs():
    return [
        Measurement.Input("measurement", tooltip="From Encode Measurement (carries the photo and the degradation)."),
        io.Vae.Input("vae", tooltip="The checkpoint's VAE: used for the hard data-consistency optimisation."),
        io.Int.Input("consistency_every", default=10, min=0, max=1000,
                     tooltip="Hard data consistency every this many steps in the later part of sampling (0 = off, "
                             "plain DDIM)."),
        io.Int.Input("latent_steps", default=500, min=1, max=100000,
                     tooltip="At most this many optimiser iterations per latent-space consistency step (each one a "
                             "decoder forward+backward)."),
        io.Float.Input("lr", default=5e-3, min=1e-6, max=1.0, step=1e-4, tooltip="Learning rate of that optimiser."),
        io.Combo.Input("optimization", options=["auto", "latent", "pixel"], default="auto",
                       tooltip="How consistency is enforced. auto (the authors' code): pixel-space optimisation in "
                               "the middle third of sampling, latent-space in the last third. latent: optimise the "
                               "latent through the decoder every time (the slowest). pixel: "
                               "optimise the decoded image, then encode it back (cheapest per iteration)."),
        io.Int.Input("pixel_steps", default=2000, min=1, max=100000,
                     tooltip="At most this many optimiser iterations per pixel-space consistency step (the authors' "
                             "code: 2000, learning rate 1e-2; cheap: no decoder backward)."),
        io.Float.Input("tolerance", default=1e-3, min=0.0, max=1.0, step=1e-4,
                       tooltip="Stop optimising once the measurement error falls below this."),
        io.Float.Input("gamma", default=40.0, min=0.0, max=1000.0, step=0.5,
                       tooltip="ReSample's γ: variance of the stochastic resampling (the paper: 40)."),
        io.Combo.Input("variance", options=["paper", "reference"], default="paper",
                       tooltip="Resampling variance: 'paper' σ² = γ(1−ᾱ_{t−1})/ᾱ_t·(1−ᾱ_t/ᾱ_{t−1}); 'reference' = γ × "
                               "the DDPM posterior variance, as the authors' public code computes it."),
        io.Float.Input("dps_eta", default=0.0, min=0.0, max=50.0, step=0.05,
                       tooltip="DPS guidance every step, through the UNet and the decoder (the authors' code: 0.5). "
                               "0 = plain DDIM between consistency steps: this pack's default, much cheaper."),
        io.Int.Input("early_stop", default=-1, min=-1, max=10000,
                     tooltip="-1: run to the end. k: return the denoised estimate at step k."),
    ]


def _resample_options(consistency_every, latent_steps, lr, optimization, pixel_steps, tolerance, gamma, variance,
                      dps_eta, early_stop) -> dict:
    return {"consistency_every": int(consistency_every), "latent_steps": int(latent_steps), "lr": float(lr),
            "optimization": optimization, "pixel_steps": int(pixel_steps),
            "tolerance": float(tolerance), "gamma": float(gamma), "variance": variance, "dps_eta": float(dps_eta),
            "early_stop": None if early_stop < 0 else int(early_stop)}


_OUTPUTS = [io.Latent.Output("LATENT", display_name="LATENT", tooltip="The restored latent (VAE Decode it)."),
            Trace.Output("trace", display_name="trace", tooltip="Per-step pixel-space consistency record.")]


class LatentDPSKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SILOLatentDPSKSampler",
            display_name="Latent DPS / PSLD KSampler",
            category=CATEGORY,
            description=("Baseline: Latent-DPS, or PSLD with gluing > 0. Every step decodes the denoised latent with "
                         "the VAE and pulls it towards ‖y − A(D(ẑ₀))‖ → 0 in pixel space. Needs no trained operator, "
                         "but is much slower and hungrier than SILO KSampler."),
            inputs=[*ksampler_inputs(), *_dps_inputs()],
            outputs=list(_OUTPUTS),
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, scheduler, positive, negative, latent_image, denoise, measurement, vae,
                eta, gluing, gluing_norm, update, gradient, grad_clamp, early_stop) -> io.NodeOutput:
        sampler, trace = build_pixel_sampler("latent_dps", model, vae, measurement,
                                             **_dps_options(eta, gluing, gluing_norm, update, gradient, grad_clamp,
                                                            early_stop))
        out = run_guided_ksampler(model, sampler, seed, steps, cfg, scheduler, positive, negative, latent_image,
                                  denoise)
        return io.NodeOutput(out, trace, ui=ui.PreviewText(trace_text(trace, "‖y − A(D(ẑ₀))‖")))


class ReSampleKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SILOReSampleKSampler",
            display_name="ReSample KSampler",
            category=CATEGORY,
            description=("Baseline: ReSample (hard data consistency). DDIM in latent space; at regular steps the "
                         "latent is optimised through the VAE decoder until it explains the photo, then resampled back "
                         "to the current noise level. Needs no trained operator."),
            inputs=[*ksampler_inputs(), *_resample_inputs()],
            outputs=list(_OUTPUTS),
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, scheduler, positive, negative, latent_image, denoise, measurement, vae,
                consistency_every, latent_steps, lr, optimization, pixel_steps, tolerance, gamma, variance, dps_eta,
                early_stop) -> io.NodeOutput:
        sampler, trace = build_pixel_sampler(
            "resample", model, vae, measurement,
            **_resample_options(consistency_every, latent_steps, lr, optimization, pixel_steps, tolerance, gamma,
                                variance, dps_eta, early_stop))
        out = run_guided_ksampler(model, sampler, seed, steps, cfg, scheduler, positive, negative, latent_image,
                                  denoise)
        return io.NodeOutput(out, trace, ui=ui.PreviewText(trace_text(trace, "‖y − A(D(ẑ₀))‖")))


class LatentDPSSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SILOLatentDPSSampler",
            display_name="Latent DPS / PSLD Sampler",
            category=CATEGORY,
            description="Latent-DPS / PSLD as a SAMPLER for SamplerCustom / SamplerCustomAdvanced.",
            inputs=[io.Model.Input("model", tooltip="The checkpoint's MODEL (for its latent format)."), *_dps_inputs()],
            outputs=[io.Sampler.Output("SAMPLER", display_name="SAMPLER", tooltip="For SamplerCustom(Advanced).")],
        )

    @classmethod
    def execute(cls, model, measurement, vae, eta, gluing, gluing_norm, update, gradient, grad_clamp,
                early_stop) -> io.NodeOutput:
        sampler, _ = build_pixel_sampler("latent_dps", model, vae, measurement, node="Latent DPS / PSLD Sampler",
                                         **_dps_options(eta, gluing, gluing_norm, update, gradient, grad_clamp,
                                                        early_stop))
        return io.NodeOutput(sampler)


class ReSampleSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SILOReSampleSampler",
            display_name="ReSample Sampler",
            category=CATEGORY,
            description="ReSample as a SAMPLER for SamplerCustom / SamplerCustomAdvanced.",
            inputs=[io.Model.Input("model", tooltip="The checkpoint's MODEL (for its latent format)."),
                    *_resample_inputs()],
            outputs=[io.Sampler.Output("SAMPLER", display_name="SAMPLER", tooltip="For SamplerCustom(Advanced).")],
        )

    @classmethod
    def execute(cls, model, measurement, vae, consistency_every, latent_steps, lr, optimization, pixel_steps,
                tolerance, gamma, variance, dps_eta, early_stop) -> io.NodeOutput:
        sampler, _ = build_pixel_sampler(
            "resample", model, vae, measurement, node="ReSample Sampler",
            **_resample_options(consistency_every, latent_steps, lr, optimization, pixel_steps, tolerance, gamma,
                                variance, dps_eta, early_stop))
        return io.NodeOutput(sampler)
