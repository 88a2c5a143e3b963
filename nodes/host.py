"""Everything in the pack that touches ``comfy.*`` at run time: the one module between the host and the core.

What lives here, and nothing else does it elsewhere:

* latent spaces: :func:`latent_format_info`, :func:`process_in`, :func:`make_encoder` (what the operator nodes and
  the command line use), :func:`differentiable_vae` (what the pixel-space baselines use);
* gradients through host models: :func:`make_weights_differentiable`, :func:`diffusion_model` (the UNet of the
  ModelPatcher a node is given), :func:`sdpa_attention_override` / :func:`sdpa_extra_args` (PyTorch attention for a
  guided run only);
* running a solver the host's way: :func:`ksampler` (a ``comfy.samplers.KSAMPLER``), :func:`guarded_sample` (Cancel
  every step, out-of-memory advice, non-finite states named by their step), :func:`run_guided_ksampler` (what
  KSampler does around a sampler), :func:`sample_seeds` (what SamplerCustomAdvanced does, once per seed),
  :func:`progress_reporter` (Cancel and the node's progress bar during long inner work), :func:`interrupt_check`;
* :func:`ksampler_inputs`, KSampler's own inputs (they read the host's scheduler list).

Imports run one way: ``common`` ← ``families`` ← ``host`` ← ``measurement`` ← ``solvers``.

Model-scoped gradients (issue 12, item 5). Guidance back-propagates through the user's UNet (and, for the pixel
baselines, the VAE decoder). The host loads their weights under ``torch.inference_mode()``, and autograd refuses to
save inference tensors for backward. :func:`make_weights_differentiable` therefore replaces each inference
parameter/buffer of the module by an ordinary clone *in place*, one tensor at a time (so no second copy of the
model ever exists; a full copy on a clone of the ModelPatcher would double the VRAM of the largest object in the
graph). This is deliberate and proven harmless by ``tests/comfy/test_model_scoped_gradients.py``: a plain KSampler
on the same MODEL gives bit-identical latents before and after a guided run, the number of parameters and the live
tensor bytes are unchanged, and nothing else in the MODEL (its options, patches, attention override) is touched —
an ordinary tensor holding the same values computes exactly what the inference tensor did. The swapped module is
taken from the ModelPatcher the node is given (``model_patcher.model.diffusion_model``), never found by walking
the sampler's wrappers. Attention is switched to PyTorch SDPA per run through ``model_options`` (model-scoped; the
user's MODEL keeps its own override).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import time
from collections.abc import Callable

import torch

from ..samplers.core import NonFiniteStateError
from .common import SiloInputError
from .families import gradient_transformer_options, latent_format_facts, vae_downscale

__all__ = [
    "NonFiniteSampleError",
    "SiloOutOfMemoryError",
    "diffusion_model",
    "differentiable_vae",
    "guarded_sample",
    "interrupt_check",
    "ksampler",
    "ksampler_inputs",
    "latent_format_info",
    "make_decoder",
    "make_encoder",
    "make_weights_differentiable",
    "process_in",
    "progress_reporter",
    "progress_text",
    "run_guided_ksampler",
    "sample_seeds",
    "sdpa_attention_override",
    "sdpa_extra_args",
    "vae_downscale",
]


# ------------------------------------------------------------------------------------------- latent spaces

def latent_format_info(model=None, vae=None) -> dict:
    """The latent space a model samples in, as the JSON dict stored in operator files (with the family it belongs
    to): :func:`.families.latent_format_facts`, the one definition."""
    return latent_format_facts(model, vae)


def process_in(model, latent: torch.Tensor) -> torch.Tensor:
    """VAE latent -> the model's sampling space (what KSampler does to latents before sampling)."""
    return model.get_model_object("latent_format").process_in(latent)


def make_encoder(vae, model) -> Callable[[torch.Tensor], torch.Tensor]:
    """image [B,3,H,W] in [0,1] -> latent in the model's sampling space, as an ordinary (non-inference) tensor.

    The VAE runs through ComfyUI's own ``VAE.encode`` (device placement, batching, dtype), under inference mode
    like any node; the result is cloned out of inference mode so autograd code may use it.
    """
    lf = model.get_model_object("latent_format")

    def encode(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            z = lf.process_in(vae.encode(x.movedim(1, -1).float()).float())
        return z.clone()

    return encode


def make_decoder(vae, model) -> Callable[[torch.Tensor], torch.Tensor]:
    """latent in the model's sampling space -> image [B,3,H,W] in [0,1] through ComfyUI's own ``VAE.decode`` (for
    the training report's decoded fidelity; never used for guidance)."""
    lf = model.get_model_object("latent_format")

    def decode(z: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = vae.decode(lf.process_out(z.detach().float())).float()
        return x.clone().movedim(-1, 1).to(z.device).clamp(0.0, 1.0)

    return decode


def differentiable_vae(vae, model):
    """``(decode, encode)`` for pixel-space guidance (Latent-DPS, PSLD, ReSample), both differentiable.

    ``decode(z)``: latent in the model's sampling space -> image ``[B,3,H,W]``, about ``[0,1]`` (not clamped, so
    gradients survive at the range ends); ``encode(x)``: image ``[B,3,H,W]`` -> latent in the sampling space (the
    posterior mode). They call the VAE's ``first_stage_model`` directly: ComfyUI's ``VAE.decode/encode`` are
    inference-only, may tile and move the model. The VAE is loaded next to the UNet once and its weights are made
    ordinary tensors in place (no copy, see the module doc); attention inside it is the VAE's own (PyTorch SDPA by
    default).
    """
    import comfy.model_management as mm

    if getattr(vae, "first_stage_model", None) is None or not hasattr(vae.first_stage_model, "decode"):
        raise ValueError("this VAE has no first_stage_model with decode(); pixel-space guidance needs an image VAE")
    mm.load_models_gpu([vae.patcher], force_full_load=True)
    fsm = vae.first_stage_model
    make_weights_differentiable(fsm)
    lf = model.get_model_object("latent_format")
    dtype, device = vae.vae_dtype, vae.device

    def decode(z: torch.Tensor) -> torch.Tensor:
        raw = lf.process_out(z.float())
        img = fsm.decode(raw.to(device=device, dtype=dtype)).float()
        return (img + 1.0) / 2.0

    def encode(x: torch.Tensor) -> torch.Tensor:
        raw = fsm.encode((x.float() * 2.0 - 1.0).to(device=device, dtype=dtype)).float()
        return lf.process_in(raw)

    return decode, encode


# ------------------------------------------------------------------------------------------- gradients

def make_weights_differentiable(module: torch.nn.Module) -> int:
    """Replace inference-mode parameters/buffers by ordinary tensors, one at a time, in place.

    ComfyUI loads models under ``torch.inference_mode()``; autograd refuses to save such tensors for backward.
    Swapping each tensor for a clone keeps at most one extra tensor alive at any moment, so no second copy of the
    model exists; values, dtypes and devices are unchanged (see the module doc for why this is harmless). Returns
    how many tensors were swapped (0 once done: later runs cost one walk over the modules).
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


def diffusion_model(model_patcher) -> torch.nn.Module:
    """The denoiser network (UNet / DiT) of a ComfyUI MODEL: ``model_patcher.model.diffusion_model``."""
    return model_patcher.model.diffusion_model


def check_same_model(model_k, model_patcher, node: str) -> None:
    """The SAMPLER nodes take a MODEL of their own; the guider must sample that model (its UNet is the one made
    differentiable). ``model_k`` is what the host hands a KSAMPLER function: ``KSamplerX0Inpaint`` around the
    guider, whose ``model_patcher`` is the MODEL being sampled."""
    guider = getattr(model_k, "inner_model", None)
    sampled = getattr(guider, "model_patcher", None)
    if sampled is not None and sampled.model is not model_patcher.model:
        raise SiloInputError(node, "model", "the guider samples another checkpoint than the MODEL given to this node.",
                             "Connect the same MODEL (the checkpoint's) to this node and to the guider.")


def sdpa_attention_override(func, *args, **kwargs):
    """``optimized_attention_override`` that runs PyTorch's SDPA (differentiable, unlike SageAttention or some
    xformers builds)."""
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)


def sdpa_extra_args(extra_args: dict | None, model_patcher=None) -> dict:
    """A copy of the sampler's ``extra_args`` whose ``model_options`` route attention through PyTorch SDPA for this
    run only (SageAttention and some xformers builds cut or break gradients) and, for models that need it, add the
    model-scoped wrapper that keeps backward passes correct (:func:`.families.gradient_transformer_options`).
    Covers the SAMPLER nodes too, where the guider's MODEL is the user's; nothing the caller holds is changed."""
    extra = dict(extra_args or {})
    mo = dict(extra.get("model_options") or {})
    to = dict(mo.get("transformer_options") or {})
    if model_patcher is not None:
        to = gradient_transformer_options(model_patcher, to)
    to["optimized_attention_override"] = sdpa_attention_override
    mo["transformer_options"] = to
    extra["model_options"] = mo
    return extra


# ------------------------------------------------------------------------------------------- operator files

OPERATOR_FOLDER = "latent_operators"


def register_operator_folder() -> str:
    """``models/latent_operators`` (plus any folders ``extra_model_paths.yaml`` gave under that key)."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, OPERATOR_FOLDER)
    os.makedirs(default, exist_ok=True)
    if OPERATOR_FOLDER in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[OPERATOR_FOLDER]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[OPERATOR_FOLDER] = (paths, set(exts) | {".safetensors"})
    else:
        folder_paths.folder_names_and_paths[OPERATOR_FOLDER] = ([default], {".safetensors"})
    return default


def operator_file_names() -> list[str]:
    """The operator files the loader offers (relative names, as ComfyUI lists model files)."""
    import folder_paths

    return folder_paths.get_filename_list(OPERATOR_FOLDER)


def operator_file_path(name: str) -> str | None:
    """The full path of a listed operator file, or None."""
    import folder_paths

    return folder_paths.get_full_path(OPERATOR_FOLDER, name)


def operator_save_folder() -> str:
    """Where new operator files are written: the first ``latent_operators`` folder."""
    import folder_paths

    return folder_paths.get_folder_paths(OPERATOR_FOLDER)[0]


def compute_device():
    """The device ComfyUI computes on (GPU, or CPU with ``--cpu``)."""
    import comfy.model_management as mm

    return mm.get_torch_device()


def progress_bar(total: int) -> Callable[[int, int], None]:
    """``update(done, total)`` moving the running node's progress bar in the browser."""
    import comfy.utils

    bar = comfy.utils.ProgressBar(total)
    return bar.update_absolute


# ------------------------------------------------------------------------------------------- running solvers

def interrupt_check() -> None:
    """Raises ComfyUI's interrupt exception when the user pressed Cancel."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


#: The running node's bar when one node samples several times (Restore with N Seeds): ``(offset, total)`` in
#: steps, so run k's step i shows as ``offset + i`` of ``total``. None: the bar is the sampler's own steps.
_BAR_SPAN: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("silo_bar_span", default=None)


def progress_reporter(n_steps: int, on_step: Callable[[], None] | None = None,
                      min_interval: float = 0.25) -> Callable[[str, int, int], None]:
    """A ``progress(phase, done, total)`` callable for a solver run of ``n_steps`` steps, so that the node has one
    bar that never moves backwards. Every call checks Cancel. Phase ``"step"`` (a step is finished, its inner work
    included) calls ``on_step`` (:func:`guarded_sample` hands the host's step callback over then, so the step's bar
    update and preview come after its inner work). Any other phase (ReSample's consistency optimisation) is inner
    work of the current step and moves the bar *within* that step: ``steps done + done/total`` (at most every
    ``min_interval`` seconds), never past the next step's mark and never back."""
    import comfy.utils

    offset, bar_total = _BAR_SPAN.get() or (0, n_steps)
    bar = comfy.utils.ProgressBar(bar_total)
    state = {"steps": 0, "shown": float(offset), "at": 0.0}

    def progress(phase: str, done: int, total: int) -> None:
        interrupt_check()
        if phase == "step":
            state["steps"] = int(done)
            state["shown"] = max(state["shown"], float(offset + min(int(done), n_steps)))
            if on_step is not None:
                on_step()
            return
        if total <= 0:
            return
        now = time.monotonic()
        if done < total and now - state["at"] < min_interval:
            return
        step = min(state["steps"], max(n_steps - 1, 0))
        value = offset + step + 0.99 * min(max(done / total, 0.0), 1.0)
        if value > state["shown"]:
            state["shown"], state["at"] = value, now
            bar.update_absolute(value, bar_total)

    return progress


def progress_text(text: str) -> None:
    """A line of text under the running node's title in the browser (e.g. which seed is sampling)."""
    from comfy_execution.utils import get_executing_context
    from server import PromptServer

    context = get_executing_context()
    server = getattr(PromptServer, "instance", None)
    if context is None or server is None or getattr(server, "client_id", None) is None:
        return
    with contextlib.suppress(Exception):  # a display nicety: never fail a run for it
        server.send_progress_text(text, context.node_id, server.client_id)


class SiloOutOfMemoryError(torch.OutOfMemoryError):
    """Out-of-memory with advice; still an OutOfMemoryError, so ComfyUI's executor unloads models as usual."""


class NonFiniteSampleError(RuntimeError):
    """The sampling state became NaN/inf: says which node and which step, and what to try."""


def guarded_sample(sample_fn, model, x, sigmas, extra_args, callback, disable, *, node: str, model_patcher,
                   downscale: int = 8, **options):
    """Run a pure-torch sampler the host's way: attention forced to SDPA for this run, Cancel checked every step and
    every inner iteration (``progress``, which also moves the node's bar during a solver's inner optimisation),
    out-of-memory explained, and a non-finite state reported as the node's error naming the step."""
    pending: list = []  # the host's callback for the current step, handed over when the step is finished

    def step_callback(info):
        interrupt_check()  # Cancel stops at the next step, also in SamplerCustom without previews
        if callback is not None:
            pending[:] = [info]

    def hand_over():
        if pending:
            callback(pending.pop())

    try:
        out = sample_fn(model, x, sigmas, extra_args=sdpa_extra_args(extra_args, model_patcher),
                        callback=step_callback, disable=disable,
                        progress=progress_reporter(max(len(sigmas) - 1, 0), hand_over), **options)
        hand_over()  # an early stop returns before its step is finished
        return out
    except torch.OutOfMemoryError as e:
        gradient = getattr(options.get("settings"), "gradient", None)  # ReSample has no such input
        advice = ("Try gradient 'x0' (no backward pass through the UNet), a smaller image or batch, or start "
                  "ComfyUI with --lowvram." if gradient == "unet" else
                  "Try a smaller image or batch, or start ComfyUI with --lowvram.")
        raise SiloOutOfMemoryError(
            f"guided sampling ran out of memory at {x.shape[-1] * downscale}x{x.shape[-2] * downscale} px, batch "
            f"{x.shape[0]}"
            + (f", gradient '{gradient}'. " if gradient else ". ") + advice
            + f" ({str(e).splitlines()[0] if str(e) else 'out of memory'})") from None
    except NonFiniteStateError as e:
        raise NonFiniteSampleError(
            f"[comfyui-silo] {node}: the sample became NaN/inf at step {e.step} of {len(sigmas) - 1} (sigma "
            f"{e.sigma:.4g}; the {e.what}). Lower eta, set grad_clamp above 0 or use more steps; if it persists, "
            "run the model in higher precision (e.g. --fp32-unet) and check that the operator and the measurement "
            "belong to this photo.") from None


def ksampler(sampler_function: Callable, options: dict):
    """The host's SAMPLER object around a KSAMPLER-convention function with its extra options."""
    import comfy.samplers

    return comfy.samplers.KSAMPLER(sampler_function, extra_options=options)


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
    steps = sigmas.shape[-1] - 1
    total = steps * len(seeds)
    previews = latent_preview.prepare_callback(guider.model_patcher, total, {})  # one bar: seeds x steps
    out = []
    try:
        for k, seed in enumerate(seeds):
            interrupt_check()
            progress_text(f"seed {seed} ({k + 1} of {len(seeds)})")
            noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))

            def callback(step, x0, x, total_steps, offset=k * steps):
                previews(offset + step, x0, x, total)

            token = _BAR_SPAN.set((k * steps, total))
            try:
                z = guider.sample(noise, latent, sampler, sigmas, denoise_mask=latent_image.get("noise_mask"),
                                  callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
            finally:
                _BAR_SPAN.reset(token)
            out.append(z.to(mm.intermediate_device()))
    finally:
        with contextlib.suppress(Exception):
            mm.soft_empty_cache()
    return torch.cat(out)


def ksampler_inputs() -> list:
    """KSampler's own inputs (model ... denoise), shared by every KSampler-like node of the pack."""
    import comfy.samplers
    from comfy_api.latest import io

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
