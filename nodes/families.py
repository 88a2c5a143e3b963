"""Model families: what the guided samplers need to know about the MODEL the user loaded (host glue).

The pure-torch core (``samplers/``) takes the noise parameterization as an option, ``"vp"`` (x = z₀ + σε) or
``"flow"`` (x = (1−σ)z₀ + σε). ComfyUI says which one a MODEL uses through its ``model_sampling`` object, a class
the host builds from two parts (``comfy.model_base.model_sampling``): a *prediction* class (``EPS``,
``V_PREDICTION``, ``EDM``, ``CONST``, ``X0``, ``COSMOS_RFLOW``, …) whose ``noise_scaling`` fixes the sampler state,
and a *schedule* class (``ModelSamplingDiscrete``, ``ModelSamplingDiscreteFlow``, ``ModelSamplingFlux``,
``ModelSamplingContinuousEDM``, …) that maps σ to the model's timestep. Nodes such as ModelSamplingDiscrete,
ModelSamplingSD3, ModelSamplingFlux or ModelSamplingContinuousEDM replace it on a MODEL clone, so the object the
sampler will use — not the checkpoint's ``model_type`` — is what is read here.

Accepted (everything else is refused with a message naming the kind, never sampled with the wrong math):

========================  ======================================================  ==========================
prediction                schedule                                                parameterization
========================  ======================================================  ==========================
``EPS``, ``V_PREDICTION``  ``ModelSamplingDiscrete`` (SD1.x, SD2.x, SDXL; also      ``"vp"``
                          after ModelSamplingDiscrete eps/v_prediction, zsnr)
``CONST``                 ``ModelSamplingDiscreteFlow`` (SD3.x, AuraFlow,          ``"flow"``
                          Lumina 2, HiDream…), ``ModelSamplingFlux`` (Flux,
                          Chroma)
========================  ======================================================  ==========================

Refused although the state is also x = z₀ + σε: ``EDM`` and v-prediction on continuous EDM/V schedules
(Playground 2.5, SDXL ``edm_vpred``, SV3D…), Stable Cascade's schedule and LCM/X0/IMG_TO_IMG predictions: the
pack's η schedule and its "ddpm" step are calibrated on the discrete 1000-step VP schedule and were never
tested on these. ``COSMOS_RFLOW`` and any class the host adds later are refused because their state is neither.
Models whose latents are not 2-D images (video models: Wan, Hunyuan Video, Mochi, LTXV, Cosmos, and the video-VAE
image models such as Qwen-Image; audio models) are refused too: the latent operators are 2-D.

A second piece of glue, :func:`gradient_transformer_options`, keeps backward passes through the diffusion model
correct on families whose host implementation adds in place into activations autograd saved (ComfyUI's Flux and
Chroma blocks do ``txt += …`` / ``x += …`` after a LayerNorm saved that tensor, so a backward pass fails with "one
of the variables needed for gradient computation has been modified by an inplace operation").
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch

from ..samplers.parameterization import Parameterization, get_parameterization
from .common import SiloInputError

_VP_PREDICTIONS = ("EPS", "V_PREDICTION")
_VP_SCHEDULES = ("ModelSamplingDiscrete",)
_FLOW_PREDICTIONS = ("CONST",)
_FLOW_SCHEDULES = ("ModelSamplingDiscreteFlow", "ModelSamplingFlux")

# latent-format class -> the family a user knows it by (several model families share one latent space)
_LATENT_FAMILIES = {"SD15": "SD1.x/SD2.x", "SDXL": "SDXL", "SD3": "SD3", "Flux": "Flux"}

SUPPORTED_TEXT = ("variance-preserving eps- or v-prediction models on the discrete schedule (SD1.x, SD2.x, SDXL) "
                  "and rectified-flow models (SD3.x, Flux, Chroma and other CONST models with image latents)")


def _comfy_model_sampling():
    import comfy.model_sampling

    return comfy.model_sampling


def _split_model_sampling(ms) -> tuple[type | None, type | None]:
    """``(prediction class, schedule class)`` of a host ``model_sampling`` object.

    The host's classes are ``class ModelSampling(schedule, prediction)``; nodes build ``ModelSamplingAdvanced`` the
    same way. The schedule is the first ``torch.nn.Module`` subclass after the object's own class, the prediction
    the first class that is not a module (``object`` excluded).
    """
    mro = type(ms).__mro__
    schedule = next((c for c in mro[1:] if issubclass(c, torch.nn.Module) and c is not torch.nn.Module), None)
    prediction = next((c for c in mro if not issubclass(c, torch.nn.Module) and c is not object), None)
    return prediction, schedule


def _is_host_class(cls: type | None, names: tuple[str, ...]) -> bool:
    """Exactly one of the host's ``comfy.model_sampling`` classes (a subclass may change the math)."""
    if cls is None:
        return False
    host = _comfy_model_sampling()
    return any(getattr(host, n, None) is cls for n in names)


@functools.lru_cache(maxsize=1)
def _host_model_types() -> dict[tuple[type, type], str]:
    """``(prediction, schedule) -> ModelType name``, from the host's own ``model_base.model_sampling``."""
    import comfy.model_base

    out = {}
    cfg = types.SimpleNamespace(sampling_settings={})
    for mt in comfy.model_base.ModelType:
        try:
            ms = comfy.model_base.model_sampling(cfg, mt)
        except Exception:  # noqa: BLE001 - a host type that needs real settings: simply not named
            continue
        out.setdefault(_split_model_sampling(ms), mt.name)
    return out


def _model_base(model):
    return getattr(model, "model", None)


def describe_model(model) -> dict:
    """What the host says about a MODEL: names of its prediction / schedule classes, the ComfyUI model type these
    make, the checkpoint's own model type and config, and the latent format. Plain strings, for messages/tests."""
    ms = model.get_model_object("model_sampling")
    prediction, schedule = _split_model_sampling(ms)
    base = _model_base(model)
    lf = model.get_model_object("latent_format")
    loaded_type = getattr(getattr(base, "model_type", None), "name", None)
    return {
        "prediction": prediction.__name__ if prediction else type(ms).__name__,
        "schedule": schedule.__name__ if schedule else type(ms).__name__,
        "model_type": _host_model_types().get((prediction, schedule)),
        "loaded_model_type": loaded_type,
        "model_config": type(getattr(base, "model_config", None)).__name__ if base is not None else None,
        "model_class": type(base).__name__ if base is not None else type(model).__name__,
        "latent_format": type(lf).__name__ if lf is not None else None,
        "latent_dimensions": int(getattr(lf, "latent_dimensions", 2)) if lf is not None else 2,
    }


def parameterization(model, node: str = "SILO KSampler", input_name: str = "model") -> Parameterization:
    """The core's :class:`~comfyui_silo.samplers.parameterization.Parameterization` of a ComfyUI MODEL (VP or flow),
    read from its ``model_sampling``.

    Raises :class:`SiloInputError` (node, input, problem, fix) for every other kind of model, naming it.
    """
    d = describe_model(model)
    pred, sched = _split_model_sampling(model.get_model_object("model_sampling"))
    what = _kind_text(d)
    if d["latent_dimensions"] != 2:
        kind = {1: "audio", 3: "video"}.get(d["latent_dimensions"], f"{d['latent_dimensions']}-D")
        raise SiloInputError(
            node, input_name,
            f"this is a {kind} model ({what}; its {d['latent_format']} latents have {d['latent_dimensions']} "
            "spatial dimension(s)). The SILO and baseline samplers restore images and their latent operators are "
            "2-D, so they do not support it.",
            f"Load an image checkpoint: {SUPPORTED_TEXT}.")
    if _is_host_class(pred, _VP_PREDICTIONS) and _is_host_class(sched, _VP_SCHEDULES):
        return get_parameterization("vp")
    if _is_host_class(pred, _FLOW_PREDICTIONS) and _is_host_class(sched, _FLOW_SCHEDULES):
        return get_parameterization("flow")
    loaded = d["loaded_model_type"]
    changed = loaded is not None and d["model_type"] != loaded and loaded in ("EPS", "V_PREDICTION", "FLOW", "FLUX")
    fix = ("The checkpoint itself is supported: remove the model-sampling node (ModelSamplingContinuousEDM, "
           "ModelSamplingContinuousV, ModelSamplingStableCascade, ModelSamplingDiscrete lcm/x0, …) between the "
           "loader and this node." if changed else f"Use a checkpoint of a supported family: {SUPPORTED_TEXT}.")
    raise SiloInputError(
        node, input_name,
        f"this model samples with {what}. SILO's guidance (the gradient's change of variables, the η schedule and "
        "the 'ddpm' step) is defined only for variance-preserving eps/v-prediction and rectified-flow models; it "
        "would be silently wrong for this one, so it is not run.", fix)


def _kind_text(d: dict) -> str:
    mt = f"ComfyUI model type {d['model_type']}" if d["model_type"] else "none of ComfyUI's model types"
    text = f"{d['prediction']} prediction on the {d['schedule']} schedule ({mt}; {d['model_class']} model"
    if d["loaded_model_type"] and d["loaded_model_type"] != d["model_type"]:
        text += f", loaded as {d['loaded_model_type']} and changed by a model-sampling node"
    return text + ")"


def vae_downscale(vae) -> int:
    """Pixels per latent cell of a VAE (8 for SD/SDXL/SD3/Flux VAEs), read from the VAE itself."""
    get = getattr(vae, "spacial_compression_encode", None)
    try:
        value = get() if callable(get) else getattr(vae, "downscale_ratio", 8)
    except Exception:  # noqa: BLE001 - an unusual VAE object: keep the common factor
        value = 8
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 8


def latent_format_facts(model, vae=None) -> dict:
    """The latent space a MODEL samples in, as the JSON dict stored in operator files, plus the family it belongs to.

    Keys: ``name`` (the host's latent-format class: SD15, SDXL, SD3, Flux, …), ``family`` (what users call that
    latent space: "SD1.x/SD2.x", "SDXL", "SD3", "Flux"; the class name for others), ``model`` (the checkpoint's
    model config, e.g. SD20, SDXL, Flux, or None), ``latent_channels``, ``scale_factor``, ``shift_factor``
    (0 when the format has none), ``downscale`` (pixels per latent cell, from the VAE, else 8),
    ``latent_dimensions``; ``latents_mean`` / ``latents_std`` when the format normalises per channel.
    ``process_in(z) = (z − shift_factor) · scale_factor`` is the sampling space the operators work in.
    """
    lf = model.get_model_object("latent_format") if model is not None else None
    base = _model_base(model) if model is not None else None
    name = type(lf).__name__ if lf is not None else "unknown"
    info = {
        "name": name,
        "family": _LATENT_FAMILIES.get(name, name),
        "model": type(base.model_config).__name__ if getattr(base, "model_config", None) is not None else None,
        "latent_channels": int(getattr(lf, "latent_channels", getattr(vae, "latent_channels", 4))),
        "scale_factor": float(getattr(lf, "scale_factor", 1.0)) if lf is not None else 1.0,
        "shift_factor": float(getattr(lf, "shift_factor", 0.0) or 0.0) if lf is not None else 0.0,
        "downscale": vae_downscale(vae) if vae is not None else 8,
        "latent_dimensions": int(getattr(lf, "latent_dimensions", 2)) if lf is not None else 2,
    }
    if lf is not None and getattr(lf, "latents_mean", None) is not None:
        info["latents_mean"] = [float(v) for v in torch.as_tensor(lf.latents_mean).flatten()]
        info["latents_std"] = [float(v) for v in torch.as_tensor(lf.latents_std).flatten()]
    return info


# ----------------------------------------------------------------------------- gradients through the model

_WRAPPER_KEY = "comfyui-silo-saved-tensor-copies"


def _known_inplace_safe_classes() -> tuple[type, ...]:
    """Diffusion-model classes whose host forward never changes a tensor autograd saved (checked by
    tests/comfy/test_families.py on tiny checkpoints): the SD UNet (SD1.x/SD2.x/SDXL) and SD3's MMDiT."""
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT, OpenAISignatureMMDITWrapper
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return (UNetModel, MMDiT, OpenAISignatureMMDITWrapper)


def needs_saved_tensor_copies(model) -> bool:
    """Whether backward passes through this MODEL's diffusion model need :func:`saved_tensor_copies`: every class
    not known to be safe (Flux and Chroma are known to need it; unknown future models get it to be safe)."""
    base = _model_base(model)
    dm = getattr(base, "diffusion_model", None)
    return dm is None or type(dm) not in _known_inplace_safe_classes()


def _pack(t: torch.Tensor) -> torch.Tensor:
    # activations only (they have a grad_fn): weights are leaves and are never changed in place by a forward
    return t.clone() if t.grad_fn is not None else t


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


@contextlib.contextmanager
def saved_tensor_copies():
    """Autograd keeps its own copy of every activation it saves while this is active, so a forward that later adds
    into that tensor in place (``x += …``) no longer breaks the backward pass; the gradient is the same as for an
    out-of-place forward. Costs one copy per saved activation (weights are not copied); no effect without grad."""
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield


def _apply_model_wrapper(executor, *args, **kwargs):
    if not torch.is_grad_enabled():
        return executor(*args, **kwargs)
    with saved_tensor_copies():
        return executor(*args, **kwargs)


def gradient_transformer_options(model, transformer_options: dict | None) -> dict:
    """A copy of ``transformer_options`` that makes backward passes through ``model`` correct: for models that need
    it (:func:`needs_saved_tensor_copies`), an APPLY_MODEL wrapper (the host's model-scoped wrapper mechanism) runs
    the model under :func:`saved_tensor_copies`. Nothing the caller holds is changed; other wrappers are kept.

    Use it where the sampler's ``extra_args["model_options"]["transformer_options"]`` is prepared for a guided run.
    """
    import comfy.patcher_extension as pe

    to = dict(transformer_options or {})
    if not needs_saved_tensor_copies(model):
        return to
    wrappers = {kind: {key: list(fns) for key, fns in by_key.items()}
                for kind, by_key in (to.get("wrappers") or {}).items()}
    to["wrappers"] = wrappers
    if _WRAPPER_KEY not in wrappers.get(pe.WrappersMP.APPLY_MODEL, {}):
        pe.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, _WRAPPER_KEY, _apply_model_wrapper, to)
    return to
