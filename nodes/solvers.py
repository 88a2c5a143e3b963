"""Every guided solver as nodes: one registration makes a solver's KSampler and SAMPLER nodes, one sampler function
serves them all.

A solver is a pure-torch KSAMPLER function (``samplers/``) and its settings class, which declares the widgets and
what a run needs (:class:`~comfyui_silo.samplers.core.Needs`: the measurement's latent through a trained operator,
or its pixels through the VAE decoder; gradients through the UNet; the VAE encoder). :func:`register` turns that
into two node classes with the same inputs (KSampler's, then the measurement, the operator or the VAE, then the
settings' widgets); the help pages, the results boxes of the web extension and ``node_list.json`` are generated
from the same registrations (``scripts/build_docs.py``). Adding a solver as nodes is its solver file and one
:func:`register` call below.

Imports run one way: ``common`` ← ``host`` ← ``measurement`` ← ``solvers``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from comfy_api.latest import io, ui

from ..config import SettingError
from ..operators.degradations import spec_mismatch
from ..operators.fidelity import stored_mse, stored_verdict
from ..operators.io import latent_format_compatible
from ..operators.physics import LATENT_CLAMP, Measurement
from ..samplers.core import GuidanceSettings, partial_of
from ..samplers.latent_dps import LatentDPSSettings, sample_latent_dps
from ..samplers.resample import ReSampleSettings, sample_resample
from ..samplers.silo import SiloSettings, sample_silo
from .common import LatentOperator, SiloInputError, SiloNode, Trace, display_name, trace_text
from .common import Measurement as MeasurementSocket
from .families import parameterization
from .host import (
    check_same_model,
    differentiable_vae,
    diffusion_model,
    guarded_sample,
    ksampler,
    ksampler_inputs,
    latent_format_info,
    make_weights_differentiable,
    process_in,
    run_guided_ksampler,
)
from .measurement import check_early_stop, check_latent_fits, check_latent_image_finite
from .widgets import settings_from_widgets, widget_inputs

__all__ = ["SOLVERS", "SolverNodes", "build_sampler", "check_operator", "register", "solver_sampler_function"]


@dataclass(frozen=True)
class SolverNodes:
    """How one pure-torch solver appears as nodes: ``{node_id}KSampler`` / ``{node_id}Sampler`` named
    ``{title} KSampler`` / ``{title} Sampler``; ``description`` is the KSampler node's, ``sampler_description``
    the SAMPLER node's; ``trace_what`` names the consistency term in the node's summary."""

    node_id: str
    title: str
    settings: type[GuidanceSettings]
    sample: Callable
    description: str
    sampler_description: str
    trace_what: str = "‖y − A(D(ẑ₀))‖"

    @property
    def needs(self):
        return self.settings.NEEDS


# ------------------------------------------------------------------------------------------ operator checks

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


# ------------------------------------------------------------------------------------------ the sampler function

def _operator_options(node: str, x: torch.Tensor, meas: Measurement, op, model_patcher) -> dict:
    """SILO's inputs in the model's space: ``w = clamp(process_in(E(y)))`` and a differentiable ``H``."""
    w = process_in(model_patcher, meas.latent.to(x.device, torch.float32)).clamp(-LATENT_CLAMP, LATENT_CLAMP).clone()
    check_latent_fits(node, x, (w.shape[-2] * meas.downscale, w.shape[-1] * meas.downscale), w.shape[0],
                      meas.downscale)
    module = op.module.to(x.device)
    # operators loaded by a node come out of inference mode (the executor runs nodes under it): autograd must be
    # able to save their weights, in both gradient modes
    make_weights_differentiable(module)
    mask = None if meas.pixel_mask is None else meas.pixel_mask.to(x.device).clone()

    def operator(z0, sigma_y=meas.noise_sigma, mask=mask):
        return module(z0.float(), sigma_y=sigma_y, mask=mask)

    return {"measurement": w.to(x.dtype), "operator": operator,
            "noise_floor": latent_floor(model_patcher, meas, w, getattr(op, "training", None) or {}),
            "partial_measurement": partial_of(meas.degradation)}


def latent_floor(model_patcher, meas: Measurement, w: torch.Tensor, training: dict) -> torch.Tensor | None:
    """SILO's noise floor ``[B]``, the ``|| w - H(E(x)) ||`` expected at the true image: how far fresh noise of the
    photo's level moves its latent (Encode Measurement encoded it once more) and the operator's own held-out error
    (from its file), added in quadrature. None when neither is known."""
    parts = []
    if meas.latent_jitter is not None:
        jitter = process_in(model_patcher, meas.latent_jitter.to(w.device, torch.float32))
        diff = jitter.clamp(-LATENT_CLAMP, LATENT_CLAMP) - w.float()
        parts.append(diff.flatten(1).pow(2).sum(1).double().cpu())
    mse = stored_mse(training)
    if mse is not None:
        parts.append(torch.full((w.shape[0],), mse * w[0].numel(), dtype=torch.float64))
    return sum(parts).sqrt() if parts else None


def _vae_options(node: str, x: torch.Tensor, meas: Measurement, vae, model_patcher, settings) -> dict:
    """The pixel-space solvers' inputs: ``y``, ``A`` and the differentiable VAE (its encoder only when used)."""
    check_latent_fits(node, x, tuple(meas.lifted.shape[-2:]), meas.y.shape[0])
    try:
        decode, encode = differentiable_vae(vae, model_patcher)
    except ValueError as e:
        raise SiloInputError(node, "vae", str(e), "Connect the checkpoint's image VAE.") from None
    options = {"measurement": meas.y.to(x.device, torch.float32).clone(),
               "degradation": meas.degradation.to(x.device), "decoder": decode, "noise_floor": meas.pixel_floor()}
    if settings.needs_encoder():
        options["encoder"] = encode
    return options


def solver_sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    """The KSAMPLER function of every solver node: checks the measurement against the latent, prepares what the
    solver needs (operator or VAE, a differentiable UNet when the gradient goes through it), then runs the solver's
    pure-torch function on the host's guard (Cancel, out-of-memory advice, non-finite states)."""
    entry: SolverNodes = options.pop("solver")
    node, meas, model_patcher = options.pop("node"), options.pop("measurement"), options.pop("model_patcher")
    operator, vae = options.pop("operator", None), options.pop("vae", None)
    settings = options["settings"]
    options.setdefault("trace", []).clear()  # a SAMPLER reused by SamplerCustom records its latest run only
    check_same_model(model, model_patcher, node)
    check_early_stop(node, settings.early_stop, sigmas)
    with torch.inference_mode(False):
        if entry.needs.operator:
            options.update(_operator_options(node, x, meas, operator, model_patcher))
        else:
            options.update(_vae_options(node, x, meas, vae, model_patcher, settings))
        if not settings.takes_noise_floor():
            options.pop("noise_floor", None)
            options.pop("partial_measurement", None)
        if settings.unet_gradient():
            make_weights_differentiable(diffusion_model(model_patcher))
    return guarded_sample(entry.sample, model, x, sigmas, extra_args, callback, disable, node=node,
                          model_patcher=model_patcher, downscale=meas.downscale, **options).to(x.dtype)


def _check_measurement(entry: SolverNodes, measurement, settings, node: str) -> None:
    if not isinstance(measurement, Measurement) or (entry.needs.operator and measurement.latent is None):
        raise SiloInputError(node, "measurement", "no encoded measurement was given.",
                             "Connect the MEASUREMENT output of Encode Measurement.")
    try:
        settings.check_degradation(measurement.degradation)
    except SettingError as e:
        raise SiloInputError(node, e.field, str(e)) from None


def build_sampler(entry: SolverNodes, model, measurement, node: str, widgets: dict, operator=None, vae=None,
                  on_mismatch: str = "error"):
    """``(SAMPLER, trace list, warning text)`` for a solver with the node's widget values."""
    settings = settings_from_widgets(entry.settings, node, **widgets)
    param = parameterization(model, node)
    warning = check_operator(model, operator, measurement, node, on_mismatch) if entry.needs.operator else ""
    _check_measurement(entry, measurement, settings, node)
    trace: list = []
    options = {"solver": entry, "node": node, "measurement": measurement, "model_patcher": model,
               "settings": settings, "trace": trace, "parameterization": param,
               **({"operator": operator} if entry.needs.operator else {"vae": vae})}
    return ksampler(solver_sampler_function, options), trace, warning


# ------------------------------------------------------------------------------------------ the nodes

#: Added after the solver's widgets, and optional, so workflows saved before it (UI or API format) load and run
#: with the default.
ON_MISMATCH_INPUT = io.Combo.Input(
    "on_mismatch", options=["error", "warn"], default="error", optional=True,
    tooltip="When the operator was trained for other parameters of the same degradation (a ×4 operator on a ×8 "
            "photo, another blur σ): error (default) stops with an explanation; warn runs anyway and shows the "
            "warning on this node (results may be off).")


def solver_inputs(entry: SolverNodes) -> list:
    """A solver node's own inputs: the measurement, the operator or the VAE, the settings' widgets (declared once
    in ``samplers``), and ``on_mismatch`` for operator solvers."""
    if entry.needs.operator:
        source = [LatentOperator.Input("operator", tooltip="From Latent Degradation Operator or Train Latent "
                                                           "Operator.")]
    else:
        source = [io.Vae.Input("vae", tooltip="The checkpoint's VAE: this solver compares the decoded latent with the "
                                              "photo in pixel space (what makes pixel-space solvers slow).")]
    return [MeasurementSocket.Input("measurement", tooltip="From Encode Measurement."), *source,
            *widget_inputs(entry.settings, optional=False), *([ON_MISMATCH_INPUT] if entry.needs.operator else []),
            *widget_inputs(entry.settings, optional=True)]


def _ui_text(*lines: str) -> ui.PreviewText | None:
    lines = [t for t in lines if t]
    return ui.PreviewText("\n".join(lines)) if lines else None


def _ksampler_node(entry: SolverNodes) -> type[io.ComfyNode]:
    class SolverKSampler(SiloNode):
        __doc__ = entry.description
        NODE_ID, TITLE, SHOWS_TEXT = f"{entry.node_id}KSampler", f"{entry.title} KSampler", True
        SOLVER = entry

        @classmethod
        def inputs(cls) -> list:
            return [*ksampler_inputs(), *solver_inputs(entry)]

        @classmethod
        def outputs(cls) -> list:
            return [io.Latent.Output("LATENT", display_name="LATENT", tooltip="The restored latent (VAE Decode it)."),
                    Trace.Output("trace", display_name="trace", tooltip="Per-step consistency record.")]

        @classmethod
        def execute(cls, model, seed, steps, cfg, scheduler, positive, negative, latent_image, denoise, measurement,
                    operator=None, vae=None, on_mismatch="error", **widgets) -> io.NodeOutput:
            node = display_name(cls)
            check_latent_image_finite(node, latent_image)
            sampler, trace, warning = build_sampler(entry, model, measurement, node, widgets, operator, vae,
                                                    on_mismatch)
            out = run_guided_ksampler(model, sampler, seed, steps, cfg, scheduler, positive, negative, latent_image,
                                      denoise)
            return io.NodeOutput(out, trace, ui=_ui_text(warning, trace_text(trace, entry.trace_what)))

    return SolverKSampler


def _sampler_node(entry: SolverNodes) -> type[io.ComfyNode]:
    class SolverSampler(SiloNode):
        __doc__ = entry.sampler_description
        NODE_ID, TITLE = f"{entry.node_id}Sampler", f"{entry.title} Sampler"
        SOLVER = entry

        @classmethod
        def inputs(cls) -> list:
            return [io.Model.Input("model", tooltip="The checkpoint's MODEL (for its latent format)."),
                    *solver_inputs(entry)]

        @classmethod
        def outputs(cls) -> list:
            return [io.Sampler.Output("SAMPLER", display_name="SAMPLER",
                                      tooltip="For SamplerCustom / SamplerCustomAdvanced.")]

        @classmethod
        def execute(cls, model, measurement, operator=None, vae=None, on_mismatch="error",
                    **widgets) -> io.NodeOutput:
            sampler, _trace, warning = build_sampler(entry, model, measurement, display_name(cls), widgets, operator,
                                                     vae, on_mismatch)
            return io.NodeOutput(sampler, ui=_ui_text(warning))

    return SolverSampler


#: Every registered solver's node pair, in the order of registration.
SOLVERS: dict[str, tuple[type[io.ComfyNode], type[io.ComfyNode]]] = {}


def register(entry: SolverNodes) -> tuple[type[io.ComfyNode], type[io.ComfyNode]]:
    """Make ``entry``'s KSampler and SAMPLER node classes and add them to the pack's node list."""
    pair = (_ksampler_node(entry), _sampler_node(entry))
    for cls, kind in zip(pair, ("KSampler", "Sampler"), strict=True):
        cls.__name__ = cls.__qualname__ = f"{entry.node_id}{kind}"
    SOLVERS[entry.node_id] = pair
    return pair


# ------------------------------------------------------------------------------------------ the registrations

_SILO = ("KSampler with SILO guidance: every step is pulled towards consistency with the encoded degraded photo "
         "through a latent degradation operator — no VAE decoding in the loop. Uses your loaded checkpoint; CFG 1 as "
         "in the paper, higher CFG also works.",
         "SILO guidance as a SAMPLER for SamplerCustom / SamplerCustomAdvanced (use with any scheduler's SIGMAS, guider "
         "and noise). Its own run uses PyTorch SDPA attention (others, e.g. SageAttention, cut gradients); your MODEL "
         "is not changed.", "‖w − H(ẑ₀)‖")
_LATENT_DPS = ("Baseline: Latent-DPS, or PSLD with gluing > 0. Every step decodes the denoised latent with the VAE and "
               "pulls it towards ‖y − A(D(ẑ₀))‖ → 0 in pixel space. Needs no trained operator, but is much slower and "
               "hungrier than SILO KSampler.", "Latent-DPS / PSLD as a SAMPLER for SamplerCustom / SamplerCustomAdvanced.")
_RESAMPLE = ("Baseline: ReSample (hard data consistency). DDIM in latent space; at regular steps the latent is optimised "
             "through the VAE decoder until it explains the photo, then resampled back to the current noise level. "
             "Needs no trained operator.", "ReSample as a SAMPLER for SamplerCustom / SamplerCustomAdvanced.")

SiloKSampler, SiloSampler = register(SolverNodes("SILO", "SILO", SiloSettings, sample_silo, *_SILO))
LatentDPSKSampler, LatentDPSSampler = register(SolverNodes("SILOLatentDPS", "Latent DPS / PSLD", LatentDPSSettings,
                                                           sample_latent_dps, *_LATENT_DPS))
ReSampleKSampler, ReSampleSampler = register(SolverNodes("SILOReSample", "ReSample", ReSampleSettings, sample_resample,
                                                         *_RESAMPLE))
