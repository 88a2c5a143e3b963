"""In-process tier: every model family the pack supports, on tiny random checkpoints the host detects as that family
(SDXL, SD2.x v-prediction, SD3, Flux; SD1.5 is covered by the other files), and the refusal of every other kind.

The checkpoints come from support/make_checkpoint.py (built once, cached in .cache/test-models); one family is
loaded at a time (module-scoped, parametrised fixture) and released before the next. Images are 64x64 (8x8
latents) and runs take 2-3 steps, so the whole file stays within a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import gc
import types

import pytest
import torch
from support.host import FAMILY_VARIANTS
from support.make_checkpoint import FAMILIES

pytestmark = pytest.mark.comfy

PARAMETERIZATION = {"EPS": "vp", "V_PREDICTION": "vp", "FLOW": "flow", "FLUX": "flow"}
LATENT_FAMILY = {"SD15": "SD1.x/SD2.x", "SDXL": "SDXL", "SD3": "SD3", "Flux": "Flux"}


@dataclasses.dataclass
class Family:
    variant: str
    model: object
    clip: object
    vae: object
    cond: list


@pytest.fixture(scope="module", params=FAMILY_VARIANTS)
def family(request, comfy_host, family_models):
    """One family's (MODEL, CLIP, VAE, prompt conditioning), loaded the way a user of that family loads it:
    CheckpointLoaderSimple; for Flux, whose file has no text encoder (T5-XXL cannot run here), a CLIP-L loaded with
    CLIPLoader type 'sd3', whose context (padded to 4096) and pooled vector (768 + 1280) the tiny Flux reads."""
    import comfy.model_management as mm

    variant = request.param
    model, clip, vae = comfy_host.run_node("CheckpointLoaderSimple", ckpt_name=family_models[variant])[:3]
    if clip is None:
        (clip,) = comfy_host.run_node("CLIPLoader", clip_name=family_models["clip_l"], type="sd3")
    (cond,) = comfy_host.run_node("CLIPTextEncode", text="a high quality photo", clip=clip)
    fam = Family(variant, model, clip, vae, cond)
    yield fam
    del fam, model, clip, vae, cond
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()


# ------------------------------------------------------------------------------------------ detection and glue

def test_the_host_detects_each_family_and_the_glue_reads_its_parameterization(family):
    from comfyui_silo.nodes.families import describe_model, latent_format_facts, parameterization

    expect = FAMILIES[family.variant]
    d = describe_model(family.model)
    assert (d["model_config"], d["loaded_model_type"], d["latent_format"]) == (
        expect["config"], expect["model_type"], expect["latent_format"]), d
    assert d["model_type"] == expect["model_type"], "the host's own ModelType for these model_sampling classes"
    assert parameterization(family.model) == PARAMETERIZATION[expect["model_type"]]
    facts = latent_format_facts(family.model, family.vae)
    lf = family.model.get_model_object("latent_format")
    assert facts["latent_channels"] == expect["channels"] == family.vae.latent_channels
    assert facts["scale_factor"] == pytest.approx(lf.scale_factor)
    assert facts["shift_factor"] == pytest.approx(getattr(lf, "shift_factor", None) or 0.0)
    assert facts["family"] == LATENT_FAMILY[expect["latent_format"]] and facts["model"] == expect["config"]
    assert facts["downscale"] == 8 and facts["latent_dimensions"] == 2


def _denoised_grad(model, x, sigma, cond, transformer_options):
    """d(sum of squared denoised)/dx through the host's apply_model, as SILO's 'unet' mode back-propagates; the
    conditioning goes through the model's own ``extra_conds`` as the host's samplers do."""
    base = model.model
    params = dict(cond[0][1], cross_attn=cond[0][0], device=x.device, noise=x, width=64, height=64,
                  prompt_type="positive")
    c = {k: v.cond for k, v in base.extra_conds(**params).items()}
    with torch.inference_mode(False), torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        out = base.apply_model(xg, sigma, transformer_options=transformer_options, **c)
        (g,) = torch.autograd.grad(out.float().square().sum(), xg)
    return g


def test_backward_through_each_family_works_with_the_glue(family):
    """'unet' gradients need a backward pass through the host's diffusion model. The host's Flux blocks add in place
    into tensors a LayerNorm saved (``txt += …``, ``x += …``), which breaks backward; the glue's APPLY_MODEL wrapper
    (saved-tensor copies) fixes that and gives the gradient of the out-of-place computation. The SD UNet and SD3's
    MMDiT need no wrapper (and get none); if the host ever changes that, this test says so."""
    from comfyui_silo.nodes.families import gradient_transformer_options, needs_saved_tensor_copies
    from comfyui_silo.nodes.host import make_weights_differentiable

    model = family.model
    make_weights_differentiable(model.model.diffusion_model)
    c = FAMILIES[family.variant]["channels"]
    x = torch.randn(1, c, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.6 if c == 16 else 3.0])
    needs = needs_saved_tensor_copies(model)
    assert needs == (family.variant == "flux")
    to = gradient_transformer_options(model, {})
    assert bool(to.get("wrappers")) == needs
    g = _denoised_grad(model, x, sigma, family.cond, to)
    assert torch.isfinite(g).all() and float(g.abs().sum()) > 0
    if needs:
        with pytest.raises(RuntimeError, match="inplace operation"):
            _denoised_grad(model, x, sigma, family.cond, {})
    elif family.variant == "sd3":  # the wrapper changes no gradient (checked on the cheapest model)
        from comfyui_silo.nodes.families import saved_tensor_copies

        with saved_tensor_copies():
            g2 = _denoised_grad(model, x, sigma, family.cond, {})
        torch.testing.assert_close(g2, g, rtol=1e-4, atol=1e-4)  # CPU reductions vary run to run


# ------------------------------------------------------------------------------ kinds the glue refuses or accepts

def _with_sampling(model, model_type):
    """A clone of ``model`` whose model_sampling is the host's class for ``model_type`` (what the ModelSampling*
    nodes do), built with the host's own ``model_base.model_sampling``."""
    import comfy.model_base

    m = model.clone()
    m.add_object_patch("model_sampling", comfy.model_base.model_sampling(m.model.model_config, model_type))
    return m


def test_every_host_model_type_is_classified_or_refused_by_name(comfy_host, sd15_small):
    import comfy.model_base

    from comfyui_silo.nodes.common import SiloInputError
    from comfyui_silo.nodes.families import describe_model, parameterization

    model = sd15_small[0]
    seen = set()
    for mt in comfy.model_base.ModelType:
        m = _with_sampling(model, mt)
        assert describe_model(m)["model_type"] == mt.name
        if mt.name in PARAMETERIZATION:
            assert parameterization(m) == PARAMETERIZATION[mt.name], mt
            seen.add(PARAMETERIZATION[mt.name])
            continue
        with pytest.raises(SiloInputError) as info:
            parameterization(m, node="SILO KSampler")
        msg = str(info.value)
        assert msg.startswith("[comfyui-silo] SILO KSampler: input 'model': this model samples with "), msg
        assert f"ComfyUI model type {mt.name};" in msg and "loaded as EPS" in msg, msg
        assert "remove the model-sampling node" in msg, msg
    assert seen == {"vp", "flow"}


def test_model_sampling_nodes_keep_or_change_the_parameterization(comfy_host, sd15_small):
    """The host's ModelSampling* nodes on a MODEL: what they leave supported stays so, what they turn into another
    kind (LCM, x0, EDM, continuous V, Stable Cascade) is refused, naming the prediction."""
    from comfyui_silo.nodes.common import SiloInputError
    from comfyui_silo.nodes.families import parameterization

    model = sd15_small[0]
    cases = [
        ("ModelSamplingDiscrete", dict(sampling="v_prediction", zsnr=True), "vp"),
        ("ModelSamplingDiscrete", dict(sampling="eps", zsnr=False), "vp"),
        ("ModelSamplingDiscrete", dict(sampling="lcm", zsnr=False), "LCM prediction"),
        ("ModelSamplingDiscrete", dict(sampling="x0", zsnr=False), "X0 prediction"),
        ("ModelSamplingDiscrete", dict(sampling="img_to_img", zsnr=False), "IMG_TO_IMG prediction"),
        ("ModelSamplingContinuousEDM", dict(sampling="eps", sigma_max=120.0, sigma_min=0.002),
         "EPS prediction on the ModelSamplingContinuousEDM schedule"),
        ("ModelSamplingContinuousEDM", dict(sampling="edm", sigma_max=80.0, sigma_min=0.002), "EDM prediction"),
        ("ModelSamplingContinuousV", dict(sampling="v_prediction", sigma_max=500.0, sigma_min=0.03),
         "ModelSamplingContinuousV schedule"),
        ("ModelSamplingStableCascade", dict(shift=2.0), "StableCascadeSampling schedule"),
        ("ModelSamplingSD3", dict(shift=3.0), "flow"),
        ("ModelSamplingAuraFlow", dict(shift=1.73), "flow"),
        ("ModelSamplingFlux", dict(max_shift=1.15, base_shift=0.5, width=64, height=64), "flow"),
    ]
    for node, widgets, expect in cases:
        (m,) = comfy_host.run_node(node, model=model, **widgets)
        if expect in ("vp", "flow"):
            assert parameterization(m) == expect, node
        else:
            with pytest.raises(SiloInputError, match=rf"samples with .*{expect}.*remove the model-sampling node"):
                parameterization(m, node="Latent DPS KSampler")


def test_video_and_audio_models_are_refused(comfy_host, sd15_small):
    import comfy.latent_formats
    import comfy.model_base

    from comfyui_silo.nodes.common import SiloInputError
    from comfyui_silo.nodes.families import parameterization

    m = _with_sampling(sd15_small[0], comfy.model_base.ModelType.FLOW)
    for fmt, kind in ((comfy.latent_formats.Wan21(), "video"), (comfy.latent_formats.StableAudio1(), "audio")):
        v = m.clone()
        v.add_object_patch("latent_format", fmt)
        with pytest.raises(SiloInputError, match=rf"input 'model': this is a {kind} model .*Load an image checkpoint"):
            parameterization(v, node="ReSample KSampler")


def test_gradient_transformer_options_copies_and_keeps_other_wrappers(comfy_host, sd15_small):
    import comfy.patcher_extension as pe

    from comfyui_silo.nodes import families

    model = sd15_small[0]
    assert families.gradient_transformer_options(model, None) == {}  # the SD UNet needs nothing
    flux_like = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=torch.nn.Linear(1, 1)))

    def other(executor, *a, **k):
        return executor(*a, **k)

    user = {"wrappers": {pe.WrappersMP.APPLY_MODEL: {"user": [other]}}, "patches": {"x": 1}}
    snapshot = {"wrappers": {pe.WrappersMP.APPLY_MODEL: {"user": [other]}}, "patches": {"x": 1}}
    to = families.gradient_transformer_options(flux_like, user)
    assert user == snapshot, "the caller's options are not changed"
    fns = pe.get_all_wrappers(pe.WrappersMP.APPLY_MODEL, to)
    assert other in fns and len(fns) == 2 and to["patches"] == {"x": 1}
    assert families.gradient_transformer_options(flux_like, to) == to, "added once"

