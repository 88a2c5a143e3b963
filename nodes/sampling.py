"""Encode Measurement, SILO KSampler and SILO Sampler: glue between ComfyUI sampling and ``samplers.silo``."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from comfy_api.latest import io, ui

from ..operators.degradations import spec_mismatch
from ..operators.io import latent_format_compatible
from ..samplers.silo import sample_silo
from .bridge import interrupt_check, latent_format_info, process_in
from .common import CATEGORY, Degradation, LatentOperator, Measurement, SiloInputError, Trace, image_to_bchw

LATENT_CLAMP = 4.0


@dataclass
class EncodedMeasurement:
    """What Encode Measurement hands to the solvers."""

    latent: torch.Tensor  # raw VAE latent of the (lifted) measurement, before the model's process_in
    pixels: torch.Tensor  # the measurement y in its natural size, [B,3,h,w] in [0,1]
    lifted: torch.Tensor  # y brought to full size, what was encoded
    degradation: object  # the Degradation module
    noise_sigma: float
    pixel_mask: torch.Tensor | None  # [B,1,H,W], 1 = missing (inpainting types)


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
            outputs=[Measurement.Output("MEASUREMENT", display_name="MEASUREMENT", tooltip="The encoded measurement, for the SILO samplers."),
                     io.Latent.Output("latent_image", display_name="latent_image", tooltip="The encoded (for super-resolution: upscaled) photo as a "
                                      "LATENT of the output size: SILO KSampler's latent_image (at denoise 1 only "
                                      "its size matters; lower denoise starts from the photo).")],
        )

    @classmethod
    def execute(cls, image, vae, degradation, noise_sigma) -> io.NodeOutput:
        node = "Encode Measurement"
        y = image_to_bchw(image, node)
        spec = degradation.spec
        h, w = y.shape[-2:]
        if spec["type"] == "super_resolution":
            h, w = h * spec["factor"], w * spec["factor"]
        if h % 8 or w % 8:
            fix = ("Resize or crop the photo so that its size times the factor is a multiple of 8."
                   if spec["type"] == "super_resolution" else "Crop or pad the photo to a multiple of 8 pixels.")
            raise SiloInputError(node, "image", f"the restored size {w}x{h} is not a multiple of 8.", fix)
        lifted = degradation.lift(y, size=(h, w)) if spec["type"] == "super_resolution" else y.clamp(0, 1)
        try:
            mask = degradation.pixel_mask((y.shape[0], 3, h, w))
        except ValueError as e:
            raise SiloInputError(node, "degradation", f"{e}.", "Make the box fit inside the photo (Degradation "
                                 "node), or draw the mask on this photo.") from None
        if mask is not None:
            if mask.shape[0] not in (1, y.shape[0]):
                raise SiloInputError(node, "degradation", f"the mask has batch {mask.shape[0]} but the image batch is "
                                     f"{y.shape[0]}.", "Use one mask, or one per image.")
            # only the pixels outside the mask are measured, y = A(x) = x·(1−m): what the photo still shows under
            # the mask (a photo with its holes painted in the mask editor) is not part of the measurement
            keep = 1.0 - mask.to(device=y.device, dtype=y.dtype)
            y, lifted = y * keep, lifted * keep
        latent = vae.encode(lifted.movedim(1, -1))
        meas = EncodedMeasurement(latent=latent, pixels=y, lifted=lifted, degradation=degradation,
                                  noise_sigma=float(noise_sigma), pixel_mask=mask)
        return io.NodeOutput(meas, {"samples": latent})


# ------------------------------------------------------------------------------------------- gradients

def make_weights_differentiable(module: torch.nn.Module) -> int:
    """Replace inference-mode parameters/buffers by ordinary tensors, one at a time, in place.

    ComfyUI loads models under ``torch.inference_mode()``; autograd refuses to save such tensors for backward.
    Swapping each tensor for a clone keeps at most one extra tensor alive at any moment, so no second copy of the
    UNet exists. Returns how many tensors were swapped.
    """
    swapped = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
                    swapped += 1
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.clone()
                    swapped += 1
    return swapped


def _sdpa_override(func, *args, **kwargs):
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)


def _diffusion_model(model_k):
    """The UNet behind the k-diffusion model wrapper ComfyUI hands to a KSAMPLER function."""
    obj = model_k
    for _ in range(6):
        if hasattr(obj, "diffusion_model"):
            return obj.diffusion_model
        obj = getattr(obj, "inner_model", None)
        if obj is None:
            break
    return None


def silo_sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    """KSAMPLER function: prepares the measurement in the model's space, makes the UNet differentiable when the
    gradient goes through it, then runs the pure-torch :func:`sample_silo`."""
    meas: EncodedMeasurement = options.pop("measurement")
    op = options.pop("operator")
    model_patcher = options.pop("model_patcher")
    node = options.pop("node", "SILO KSampler")
    trace = options.setdefault("trace", [])
    trace.clear()  # a SAMPLER reused by SamplerCustom records its latest run only
    dev, dtype = x.device, x.dtype
    with torch.inference_mode(False):
        w = process_in(model_patcher, meas.latent.to(dev, torch.float32)).clamp(-LATENT_CLAMP, LATENT_CLAMP).clone()
        if w.shape[-2:] != x.shape[-2:]:
            raise SiloInputError(node, "latent_image",
                                 f"the latent is {x.shape[-1] * 8}x{x.shape[-2] * 8} px but the measurement was encoded "
                                 f"at {w.shape[-1] * 8}x{w.shape[-2] * 8} px.",
                                 "Use Encode Measurement's latent_image output (or a latent of the same size).")
        if w.shape[0] not in (1, x.shape[0]):
            raise SiloInputError(node, "measurement", f"batch {w.shape[0]} does not match the latent "
                                 f"batch {x.shape[0]}.", "Use one measurement per latent, or a single one.")
        module = op.module.to(dev)
        # operators loaded by a node come out of inference mode (the executor runs nodes under it): autograd must be
        # able to save their weights, in both gradient modes
        make_weights_differentiable(module)
        mask = None if meas.pixel_mask is None else meas.pixel_mask.to(dev).clone()

        def operator(z0, sigma_y=meas.noise_sigma, mask=mask):
            return module(z0.float(), sigma_y=sigma_y, mask=mask)

        if options.get("gradient", "unet") == "unet" and float(options.get("eta", 0.0)) > 0:
            unet = _diffusion_model(model)
            if unet is not None:
                make_weights_differentiable(unet)
    return guarded_sample(sample_silo, model, x, sigmas, extra_args, callback, disable,
                          measurement=w.to(dtype), operator=operator, **options).to(dtype)


def sdpa_extra_args(extra_args: dict | None) -> dict:
    """A copy of the sampler's ``extra_args`` whose ``model_options`` route attention through PyTorch SDPA for this
    run only (SageAttention and some xformers builds cut or break gradients). Covers the SAMPLER nodes too, where
    the guider's MODEL is the user's; nothing the caller holds is changed."""
    extra = dict(extra_args or {})
    mo = dict(extra.get("model_options") or {})
    to = dict(mo.get("transformer_options") or {})
    to["optimized_attention_override"] = _sdpa_override
    mo["transformer_options"] = to
    extra["model_options"] = mo
    return extra


def guarded_sample(sample_fn, model, x, sigmas, extra_args, callback, disable, **options):
    """Run a pure-torch sampler with ComfyUI's Cancel checked every step and out-of-memory explained."""
    def step_callback(info):
        interrupt_check()  # Cancel stops at the next step, also in SamplerCustom without previews
        if callback is not None:
            callback(info)

    try:
        return sample_fn(model, x, sigmas, extra_args=sdpa_extra_args(extra_args), callback=step_callback,
                         disable=disable, **options)
    except torch.OutOfMemoryError as e:
        gradient = options.get("gradient")  # absent for ReSample, which has no such input
        advice = ("Try gradient 'x0' (no backward pass through the UNet), a smaller image or batch, or start "
                  "ComfyUI with --lowvram." if gradient == "unet" else
                  "Try a smaller image or batch, or start ComfyUI with --lowvram.")
        raise SiloOutOfMemoryError(
            f"guided sampling ran out of memory at {x.shape[-1] * 8}x{x.shape[-2] * 8} px, batch {x.shape[0]}"
            + (f", gradient '{gradient}'. " if gradient else ". ") + advice
            + f" ({str(e).splitlines()[0] if str(e) else 'out of memory'})") from None


class SiloOutOfMemoryError(torch.OutOfMemoryError):
    """Out-of-memory with advice; still an OutOfMemoryError, so ComfyUI's executor unloads models as usual."""


def check_operator(model, op, measurement=None, node: str = "SILO KSampler") -> None:
    ok, why = latent_format_compatible(op.latent_format, latent_format_info(model))
    if not ok:
        raise SiloInputError(node, "operator", f"this operator was trained for another latent space: {why}.",
                             "Use an operator trained for this checkpoint's model family, or train one with the "
                             "Train Latent Operator node.")
    if measurement is None:
        return
    mismatch = spec_mismatch(op.degradation, measurement.degradation.spec)
    if mismatch and mismatch[0] == "error":
        raise SiloInputError(node, "operator", mismatch[1] + ".",
                             "Load an operator trained for the same degradation as the Degradation node of Encode "
                             "Measurement (or train one with Train Latent Operator).")
    if mismatch:
        logging.warning("%s: %s; results may be off.", node, mismatch[1])


def build_silo_sampler(model, measurement, operator, eta, update, gradient, grad_clamp, early_stop,
                       node: str = "SILO KSampler"):
    import comfy.samplers

    check_operator(model, operator, measurement, node)
    trace: list = []
    opts = {"measurement": measurement, "operator": operator, "model_patcher": model, "node": node, "eta": float(eta),
            "update": update, "gradient": gradient, "grad_clamp": None if grad_clamp <= 0 else float(grad_clamp),
            "early_stop": None if early_stop < 0 else int(early_stop), "trace": trace}
    return comfy.samplers.KSAMPLER(silo_sampler_function, extra_options=opts), trace


def run_guided_ksampler(model, sampler, seed, steps, cfg, scheduler, positive, negative, latent_image, denoise):
    """What KSampler does (noise, sigmas, previews, progress bar), with a guided SAMPLER (which routes attention
    through SDPA for its run, see :func:`sdpa_extra_args`); the cache is emptied afterwards, also after an error or
    an interrupt. Returns the LATENT dict."""
    import comfy.model_management as mm
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    import latent_preview

    latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
    noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
    total = steps if denoise >= 1.0 else int(steps / max(denoise, 1e-4))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, total).cpu()
    sigmas = sigmas[-(steps + 1):]
    callback = latent_preview.prepare_callback(model, steps)
    try:
        samples = comfy.sample.sample_custom(
            model, noise, cfg, sampler, sigmas, positive, negative, latent,
            noise_mask=latent_image.get("noise_mask"), callback=callback,
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    finally:
        with contextlib.suppress(Exception):
            mm.soft_empty_cache()
    out = dict(latent_image)
    out.pop("downscale_ratio_spacial", None)
    out["samples"] = samples
    return out


def sample_seeds(guider, sampler, sigmas, latent_image, seeds: list[int]) -> torch.Tensor:
    """Sample one latent per seed as SamplerCustomAdvanced does with that seed's noise; returns them stacked [N,...]
    on the intermediate device. Only one sample is sampled at a time; the cache is emptied afterwards."""
    import comfy.model_management as mm
    import comfy.sample
    import comfy.utils
    import latent_preview

    latent = comfy.sample.fix_empty_latent_channels(guider.model_patcher, latent_image["samples"])
    out = []
    try:
        for seed in seeds:
            interrupt_check()
            noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
            callback = latent_preview.prepare_callback(guider.model_patcher, sigmas.shape[-1] - 1, {})
            z = guider.sample(noise, latent, sampler, sigmas, denoise_mask=latent_image.get("noise_mask"),
                              callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
            out.append(z.to(mm.intermediate_device()))
    finally:
        with contextlib.suppress(Exception):
            mm.soft_empty_cache()
    return torch.cat(out)


def trace_text(trace: list, what: str = "‖w − H(ẑ₀)‖") -> str:
    if not trace:
        return "no guided steps"
    first, last = trace[0], trace[-1]
    f = sum(first["loss"]) / len(first["loss"])
    la = sum(last["loss"]) / len(last["loss"])
    return f"consistency {what}: step 0 {f:.3f} → step {last['step']} {la:.3f} ({len(trace)} steps)"


def ksampler_inputs() -> list:
    """KSampler's own inputs (model ... denoise), shared by every KSampler-like node of the pack."""
    import comfy.samplers

    return [
        io.Model.Input("model", tooltip="The checkpoint's MODEL."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="Seed of the initial noise and of the sampler's (DDPM) noise."),
        io.Int.Input("steps", default=50, min=1, max=10000,
                     tooltip="Sampling steps (the papers: 999-1000; fewer need a larger η)."),
        io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance (the papers: 1.0 = none)."),
        io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                       tooltip="Noise schedule."),
        io.Conditioning.Input("positive", tooltip="e.g. 'a high quality photo'."),
        io.Conditioning.Input("negative", tooltip="Negative prompt (unused at CFG 1)."),
        io.Latent.Input("latent_image", tooltip="Latent of the output size: Encode Measurement's latent_image (or "
                                                "Empty Latent Image / VAE Encode of the photo with denoise < 1)."),
        io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="1.0 starts from noise."),
    ]


SILO_INPUTS = [
    Measurement.Input("measurement", tooltip="From Encode Measurement."),
    LatentOperator.Input("operator", tooltip="From Latent Degradation Operator or Train Latent Operator."),
    io.Float.Input("eta", default=0.5, min=0.0, max=20.0, step=0.05,
                   tooltip="Guidance strength η (paper: 0.5; 1.0 for inpainting; larger with fewer steps). 0 = plain "
                           "sampling."),
    io.Combo.Input("update", options=["ddpm", "euler"], default="ddpm",
                   tooltip="ddpm: the paper's ancestral DDPM step. euler: deterministic DDIM/Euler step."),
    io.Combo.Input("gradient", options=["unet", "x0"], default="unet",
                   tooltip="unet: back-propagate through the UNet (the paper). x0: gradient at the denoised estimate "
                           "only — faster, much less VRAM."),
    io.Float.Input("grad_clamp", default=1.0, min=0.0, max=100.0, step=0.1,
                   tooltip="Element-wise gradient clamp (paper: 1.0); 0 = off."),
    io.Int.Input("early_stop", default=-1, min=-1, max=10000,
                 tooltip="-1: run to the end (perception-optimised). k: return the denoised estimate at step k "
                         "(smoother, distortion-optimised)."),
]


class SiloKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:

        return io.Schema(
            node_id="SILOKSampler",
            display_name="SILO KSampler",
            category=CATEGORY,
            description=("KSampler with SILO guidance: every step is pulled towards consistency with the encoded "
                         "degraded photo through a latent degradation operator — no VAE decoding in the loop. Uses "
                         "your loaded checkpoint; CFG 1 as in the paper, higher CFG also works."),
            inputs=[
                *ksampler_inputs(),
                *SILO_INPUTS,
            ],
            outputs=[io.Latent.Output("LATENT", display_name="LATENT", tooltip="The restored latent (VAE Decode it)."),
                     Trace.Output("trace", display_name="trace", tooltip="Per-step consistency loss record.")],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, scheduler, positive, negative, latent_image, denoise, measurement,
                operator, eta, update, gradient, grad_clamp, early_stop) -> io.NodeOutput:
        sampler, trace = build_silo_sampler(model, measurement, operator, eta, update, gradient, grad_clamp,
                                            early_stop)
        out = run_guided_ksampler(model, sampler, seed, steps, cfg, scheduler, positive, negative, latent_image,
                                  denoise)
        return io.NodeOutput(out, trace, ui=ui.PreviewText(trace_text(trace)))


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
            inputs=[io.Model.Input("model", tooltip="The checkpoint's MODEL (for its latent format)."), *SILO_INPUTS],
            outputs=[io.Sampler.Output("SAMPLER", display_name="SAMPLER", tooltip="For SamplerCustom / SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, measurement, operator, eta, update, gradient, grad_clamp, early_stop) -> io.NodeOutput:
        sampler, _trace = build_silo_sampler(model, measurement, operator, eta, update, gradient, grad_clamp,
                                             early_stop, node="SILO Sampler")
        return io.NodeOutput(sampler)
