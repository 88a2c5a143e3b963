"""Restoration Metrics and Pixel Uncertainty nodes: glue around ``operators.metrics``."""

from __future__ import annotations

import math

from comfy_api.latest import io, ui

from ..operators.metrics import measurement_consistency, pixel_uncertainty, psnr, ssim
from .common import (
    Measurement,
    SiloInputError,
    SiloNode,
    bchw_to_image,
    display_name,
    image_to_bchw,
    require_finite,
)
from .host import sample_seeds


def _fmt(v: float, unit: str = "") -> str:
    return "inf" if math.isinf(v) else f"{v:.4f}{unit}"


class RestorationMetrics(SiloNode):
    """Scores a restoration: PSNR and SSIM against a reference (the clean original, when you have it) and
    measurement consistency ‖A(x̂) − y‖ against the degraded photo, next to its noise floor."""

    NODE_ID, TITLE, SHOWS_TEXT = "SILORestorationMetrics", "Restoration Metrics", True

    @classmethod
    def inputs(cls) -> list:
        return [io.Image.Input("image", tooltip="The restored image(s)."),
                io.Image.Input("reference", optional=True, tooltip="The clean original (e.g. the photo fed to Apply "
                                                                   "Degradation), same size as the restoration."),
                Measurement.Input("measurement", optional=True,
                                  tooltip="From Encode Measurement: checks how well the restoration explains the "
                                          "degraded photo.")]

    @classmethod
    def outputs(cls) -> list:
        return [io.Float.Output("psnr", display_name="psnr", tooltip="Mean PSNR in dB (NaN without a reference)."),
                io.Float.Output("ssim", display_name="ssim", tooltip="Mean SSIM (NaN without a reference)."),
                io.Float.Output("consistency", display_name="consistency",
                                tooltip="Mean RMSE of A(x̂) − y on the 0-1 scale (NaN without a measurement); the "
                                        "measurement noise σ is the floor a perfect restoration reaches."),
                io.String.Output("report", display_name="report", tooltip="All of it as text.")]

    @classmethod
    def execute(cls, image, reference=None, measurement=None) -> io.NodeOutput:
        node = display_name(cls)
        if reference is None and measurement is None:
            raise SiloInputError(node, "reference", "nothing to compare with.",
                                 "Connect a reference image (the clean original) and/or the MEASUREMENT.")
        x = require_finite(image_to_bchw(image, node), node, "image", "the restoration",
                           "A NaN/inf image cannot be scored: fix the sampler run that produced it (lower eta, more "
                           "steps) before comparing.")
        lines, p_mean, s_mean, c_mean = [], math.nan, math.nan, math.nan
        if reference is not None:
            ref = require_finite(image_to_bchw(reference, node, "reference"), node, "reference", "the reference",
                                 "Connect the clean original photo.")
            if ref.shape[-2:] != x.shape[-2:] or ref.shape[0] not in (1, x.shape[0]):
                raise SiloInputError(node, "reference", f"the reference is {ref.shape[-1]}x{ref.shape[-2]} (batch "
                                     f"{ref.shape[0]}) but the image is {x.shape[-1]}x{x.shape[-2]} (batch "
                                     f"{x.shape[0]}).", "Compare images of the same size (and one reference or one "
                                     "per image).")
            p = psnr(x, ref.to(x.device)).tolist()
            s = ssim(x, ref.to(x.device)).tolist() if min(x.shape[-2:]) >= 11 else [math.nan] * len(p)
            p_mean, s_mean = sum(p) / len(p), sum(s) / len(s)
            for i, (pi, si) in enumerate(zip(p, s, strict=True)):
                lines.append(f"image {i}: PSNR {_fmt(pi, ' dB')}, SSIM {_fmt(si)}")
        if measurement is not None:
            try:
                c = measurement_consistency(x, measurement.y.to(x.device), measurement.degradation,
                                            noise_sigma=measurement.noise_sigma)
            except ValueError as e:
                raise SiloInputError(node, "measurement", str(e),
                                     "Score the restoration made from this measurement, at its full size.") from None
            rmse = c["rmse"].tolist()
            c_mean = sum(rmse) / len(rmse)
            lines.append(f"consistency ‖A(x̂) − y‖: RMSE {', '.join(f'{r:.4f}' for r in rmse)} "
                         f"(noise floor σ = {measurement.noise_sigma:.4f})")
        text = "\n".join(lines)
        return io.NodeOutput(p_mean, s_mean, c_mean, text, ui=ui.PreviewText(text))


def _uncertainty_outputs() -> list:
    return [
        io.Image.Output("mean", display_name="mean", tooltip="Pixel-wise mean (an MMSE-like estimate)."),
        io.Image.Output("uncertainty", display_name="uncertainty",
                        tooltip="Heat map of the per-pixel standard deviation (black 0 → red → yellow → white max)."),
        io.Mask.Output("std", display_name="std", tooltip="The per-pixel standard deviation itself (0-1 scale), as a "
                                                          "MASK."),
    ]


class PixelUncertainty(SiloNode):
    """Pixel-wise uncertainty of a restoration (DiracDiffusion): give it several restorations of the same photo —
    e.g. Repeat Latent Batch → SILO KSampler → VAE Decode, every batch element gets its own noise — and get their
    mean, a heat map of the per-pixel standard deviation (bright = the solver is unsure there) and the samples."""

    NODE_ID, TITLE, SHOWS_TEXT = "SILOPixelUncertainty", "Pixel Uncertainty", True

    @classmethod
    def inputs(cls) -> list:
        return [io.Image.Input("samples", tooltip="At least 2 restorations of one measurement, as a batch.")]

    @classmethod
    def outputs(cls) -> list:
        return [*_uncertainty_outputs(),
                                     io.Image.Output("samples_out", display_name="samples", tooltip="The individual restorations.")]

    @classmethod
    def execute(cls, samples) -> io.NodeOutput:
        node = display_name(cls)
        x = require_finite(image_to_bchw(samples, node, "samples"), node, "samples", "the restorations",
                           "Fix the sampler run that produced them (lower eta, more steps).")
        if x.shape[0] < 2:
            raise SiloInputError(node, "samples", f"got {x.shape[0]} image; uncertainty needs at least 2 "
                                 "restorations of the same photo.", "Use Repeat Latent Batch (e.g. 8) before the "
                                 "sampler, or batch several runs with Batch Images.")
        out = pixel_uncertainty(x)
        text = f"{x.shape[0]} samples; mean per-pixel std {out['mean_std']:.4f} (max {float(out['std_gray'].max()):.4f})"
        return io.NodeOutput(bchw_to_image(out["mean"]), bchw_to_image(out["heatmap"]), out["std_gray"][:, 0],
                             samples, ui=ui.PreviewText(text))


class RestoreSeeds(SiloNode):
    """Runs the sampler you give it (SILO Sampler, Latent DPS / PSLD Sampler, ReSample Sampler or any core sampler)
    once per seed — noise_seed, noise_seed+1, ... — exactly as SamplerCustomAdvanced would, decodes each result
    and returns the pixel-wise mean, a heat map of the per-pixel standard deviation (bright = the solver is
    unsure there) and the samples. One sample is in memory at a time while sampling, so it fits wherever a single
    restoration fits."""

    NODE_ID, TITLE, SHOWS_TEXT = "SILORestoreSeeds", "Restore with N Seeds (uncertainty)", True

    @classmethod
    def inputs(cls) -> list:
        return [io.Guider.Input("guider", tooltip="Basic Guider (CFG 1, as in the paper) or CFG Guider with the "
                                                  "checkpoint's model."),
                io.Sampler.Input("sampler", tooltip="The solver, e.g. SILO Sampler with its measurement and operator."),
                io.Sigmas.Input("sigmas", tooltip="The noise schedule, e.g. Basic Scheduler."),
                io.Latent.Input("latent_image", tooltip="Where to start: Encode Measurement's latent_image (or an "
                                                        "Empty Latent Image of the photo's size)."),
                io.Vae.Input("vae", tooltip="Decodes every sample (the checkpoint's VAE)."),
                io.Int.Input("noise_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the first sample; sample i uses noise_seed + i."),
                io.Int.Input("seeds", default=4, min=2, max=64,
                             tooltip="How many restorations to draw (at least 2 for a standard deviation).")]

    @classmethod
    def outputs(cls) -> list:
        return [*_uncertainty_outputs(),
                io.Image.Output("samples", display_name="samples", tooltip="The individual restorations, in seed "
                                                                           "order."),
                io.Latent.Output("latents", display_name="latents", tooltip="The sampled latents, in seed order.")]

    @classmethod
    def execute(cls, guider, sampler, sigmas, latent_image, vae, noise_seed, seeds) -> io.NodeOutput:
        import torch

        node = display_name(cls)
        if latent_image["samples"].shape[0] != 1:
            raise SiloInputError(node, "latent_image", f"got a batch of {latent_image['samples'].shape[0]} latents; "
                                 "this node draws several restorations of ONE photo.",
                                 "Pass a single latent (Encode Measurement's latent_image), not a Repeat Latent "
                                 "Batch.")
        latents = sample_seeds(guider, sampler, sigmas, latent_image, [noise_seed + i for i in range(seeds)])
        images = torch.cat([vae.decode(z[None]) for z in latents]).float()
        require_finite(images, node, "sampler", "the decoded restorations",
                       "The solver diverged: lower its eta (or set grad_clamp above 0) or use more steps.")
        out = pixel_uncertainty(images.permute(0, 3, 1, 2))
        text = (f"{seeds} seeds ({noise_seed}…{noise_seed + seeds - 1}); mean per-pixel std "
                f"{out['mean_std']:.4f} (max {float(out['std_gray'].max()):.4f})")
        latent_out = {k: v for k, v in latent_image.items() if k not in ("samples", "batch_index")}
        latent_out["samples"] = latents
        return io.NodeOutput(bchw_to_image(out["mean"]), bchw_to_image(out["heatmap"]), out["std_gray"][:, 0],
                             images, latent_out, ui=ui.PreviewText(text))
