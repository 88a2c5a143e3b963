"""In-process tier: every model family the pack supports, on tiny random checkpoints the host detects as that family
(SDXL, SD2.x v-prediction, SD3, Flux; SD1.5 is covered by the other files), and the refusal of every other kind.

The checkpoints come from tools/random_checkpoint.py (built once, cached in .cache/test-models); one family is
loaded at a time (module-scoped, parametrised fixture) and released before the next. Images are 64x64 (8x8
latents) and runs take 2-3 steps, so the whole file stays within a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import gc
import re
import traceback
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
    assert parameterization(family.model).name == PARAMETERIZATION[expect["model_type"]]
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
    MMDiT need no wrapper and get none (their backward runs in the SILO tests below); if the host ever changes
    that, this test says so. Gradients are computed on SD3 (the wrapper changes nothing) and Flux only."""
    from comfyui_silo.nodes.families import gradient_transformer_options, needs_saved_tensor_copies, saved_tensor_copies
    from comfyui_silo.nodes.host import make_weights_differentiable

    model = family.model
    needs = needs_saved_tensor_copies(model)
    assert needs == (family.variant == "flux")
    to = gradient_transformer_options(model, {})
    assert bool(to.get("wrappers")) == needs
    if family.variant not in ("sd3", "flux"):
        return
    make_weights_differentiable(model.model.diffusion_model)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.6])
    g = _denoised_grad(model, x, sigma, family.cond, to)
    assert torch.isfinite(g).all() and float(g.abs().sum()) > 0
    if needs:
        with pytest.raises(RuntimeError, match="inplace operation") as failed:
            _denoised_grad(model, x, sigma, family.cond, {})
        traceback.clear_frames(failed.tb)  # the failed backward's frames hold its graph: let later tests count 0
        del failed
    else:
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
            assert parameterization(m).name == PARAMETERIZATION[mt.name], mt
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
            assert parameterization(m).name == expect, node
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



# ----------------------------------------------------------------------------------- the nodes on every family

DEG = dict(type="gaussian_blur", blur_kernel_size=9, blur_sigma=2.0, sr_factor=4, box_top=0, box_left=0, box_height=8,
           box_width=8, random_box_size=16, random_box_seed=0, jpeg_quality=10)
KSAMPLER = dict(seed=0, steps=4, cfg=1.0, scheduler="normal", denoise=1.0)
# η per family for the guidance test, tuned on these random checkpoints (4 steps): with random networks and a random
# VAE the measurement residuals differ in size per family (SDXL's is ~20x SD2's), so the η that pulls the trace
# well below η = 0's within 4 steps differs too; too large an η overshoots (SDXL at 20).
ETA = {"sdxl": 5.0, "sd21v": 5.0, "sd3": 20.0, "flux": 20.0}
OTHER_FAMILY = {"sdxl": "sd21v", "sd21v": "sdxl", "sd3": "flux", "flux": "sd3"}  # a latent space that differs


def _measurement(comfy_host, fam, seed=0, size=64):
    (deg,) = comfy_host.run_node("SILODegradation", **DEG)
    photo = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(seed))
    return comfy_host.run_node("SILOEncodeMeasurement", image=photo, vae=fam.vae, degradation=deg, noise_sigma=0.01)


def _operator(comfy_host, latent_format: dict, tag: str):
    """An (untrained) operator for ``latent_format`` saved in the host's models/latent_operators and loaded through
    the loader node (under inference mode, as the executor does), like test_silo_ksampler.py's."""
    from comfyui_silo.operators.io import save_operator
    from comfyui_silo.operators.network import LatentOperator

    name = f"test_family_op_{tag}.safetensors"
    path = comfy_host.base / "models" / "latent_operators" / name
    if not path.exists():
        save_operator(path, LatentOperator(latent_channels=latent_format["latent_channels"], width=16),
                      degradation={"type": "gaussian_blur", "kernel_size": 9, "sigma": 2.0},
                      latent_format=latent_format)
    (op,) = comfy_host.run_node("SILOLatentOperatorLoader", operator_name=name)
    return op


@pytest.fixture(scope="module")
def restoration(comfy_host, family):
    """The family's blur measurement, its latent, and an operator for its latent space."""
    from comfyui_silo.nodes.families import latent_format_facts

    meas, latent = _measurement(comfy_host, family)
    facts = latent_format_facts(family.model, family.vae)
    return meas, latent, _operator(comfy_host, facts, family.variant)


def _silo(comfy_host, fam, latent, meas, op, cond=None, **kw):
    cond = fam.cond if cond is None else cond
    args = dict(model=fam.model, positive=cond, negative=cond, latent_image=latent, measurement=meas, operator=op,
                eta=2.0, update="ddpm", gradient="unet", grad_clamp=1.0, early_stop=-1, **KSAMPLER)
    args.update(kw)
    return comfy_host.run_node("SILOKSampler", **args)


def test_silo_ksampler_guides_every_family_in_both_gradient_modes(comfy_host, family, restoration):
    meas, latent, op = restoration
    c = FAMILIES[family.variant]["channels"]
    assert latent["samples"].shape == (1, c, 8, 8)
    w = family.model.get_model_object("latent_format").process_in(meas.latent.float()).clamp(-4, 4)

    def residual(samples):
        with torch.no_grad():
            return float((w - op(samples.float(), sigma_y=0.01)).norm())

    plain, plain_trace = _silo(comfy_host, family, latent, meas, op, eta=0.0)
    res_plain = residual(plain["samples"])
    for mode in ("unet", "x0"):
        out, trace = _silo(comfy_host, family, latent, meas, op, gradient=mode, eta=ETA[family.variant])
        assert len(trace) == KSAMPLER["steps"] and torch.isfinite(out["samples"]).all(), mode
        assert trace[-1]["loss"][0] < 0.8 * plain_trace[-1]["loss"][0], (mode, trace[-1], plain_trace[-1])
        assert residual(out["samples"]) < 0.8 * res_plain, mode


def test_train_latent_operator_works_with_every_family_vae(comfy_host, family, restoration):
    """Train Latent Operator on the family's VAE (a few steps): the file names the family's latent space, the
    loader lists and loads it, and SILO KSampler accepts it for this family."""
    import folder_paths

    meas, latent, _op = restoration
    expect = FAMILIES[family.variant]
    (deg,) = comfy_host.run_node("SILODegradation", **DEG)
    images = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    name = f"ci/family_{family.variant}"
    op, report = comfy_host.run_node("SILOTrainLatentOperator", images=images, model=family.model, vae=family.vae,
                                     degradation=deg, steps=2, batch_size=2, crop_size=64, learning_rate=1e-3,
                                     max_noise_sigma=0.05, pool_size=4, seed=0, filename=name)[:2]
    lf = family.model.get_model_object("latent_format")
    assert op.latent_format["name"] == expect["latent_format"]
    assert op.latent_format["latent_channels"] == expect["channels"]
    assert op.latent_format["scale_factor"] == pytest.approx(lf.scale_factor)
    assert op.latent_format["shift_factor"] == pytest.approx(getattr(lf, "shift_factor", None) or 0.0)
    files = [f for f in folder_paths.get_filename_list("latent_operators") if f.startswith(name)]
    assert files, report
    (loaded,) = comfy_host.run_node("SILOLatentOperatorLoader", operator_name=sorted(files)[-1])
    out, trace = _silo(comfy_host, family, latent, meas, loaded, gradient="x0", steps=1)
    assert len(trace) == 1 and torch.isfinite(out["samples"]).all()


def test_an_operator_for_another_latent_space_is_refused(comfy_host, family, restoration, family_models):
    """Same check as for SD1.5: channels, scale and shift factors. SD2.x shares SD1.x's latent space, so an SD1.5
    operator is accepted there (and one for SDXL refused)."""
    from comfyui_silo.operators.io import latent_format_compatible

    meas, latent, op = restoration
    other = FAMILIES[OTHER_FAMILY[family.variant]]
    lf = {"SD15": (0.18215, 0.0), "SDXL": (0.13025, 0.0), "SD3": (1.5305, 0.0609), "Flux": (0.3611, 0.1159)}
    scale, shift = lf[other["latent_format"]]
    fmt = {"name": other["latent_format"], "latent_channels": other["channels"], "scale_factor": scale,
           "shift_factor": shift, "downscale": 8}
    wrong = _operator(comfy_host, fmt, f"{other['latent_format']}_for_{family.variant}")
    with pytest.raises(ValueError, match=r"SILO KSampler: input 'operator'.*another latent space") as err:
        _silo(comfy_host, family, latent, meas, wrong, steps=1)
    assert ".." not in str(err.value), str(err.value)
    if family.variant == "sd21v":
        sd15 = dict(fmt, name="SD15", scale_factor=0.18215)
        assert latent_format_compatible(op.latent_format, sd15)[0], "SD2.x operators are SD1.x operators"


def test_both_baselines_run_on_every_family(comfy_host, family):
    # each guided step decodes (and back-propagates through) the full-size VAE: a 32x32 photo and 2 steps only
    meas, latent = _measurement(comfy_host, family, size=32)
    common = dict(model=family.model, positive=family.cond, negative=family.cond, latent_image=latent,
                  measurement=meas, vae=family.vae, **dict(KSAMPLER, steps=2))
    out, trace = comfy_host.run_node("SILOLatentDPSKSampler", eta=1.0, gluing=0.01, gluing_norm="squared",
                                     update="ddpm", gradient="unet", grad_clamp=0.0, early_stop=-1, **common)
    assert len(trace) == 2 and torch.isfinite(out["samples"]).all() and trace[-1]["grad_norm"][0] > 0
    assert "extra_loss" in trace[0], "PSLD's gluing term was computed through this family's VAE"
    out, trace = comfy_host.run_node("SILOReSampleKSampler", consistency_every=1, latent_steps=2, lr=0.05,
                                     optimization="latent", pixel_steps=50, tolerance=1e-4, gamma=40.0,
                                     variance="paper", dps_eta=0.0, early_stop=-1, **common)
    assert len(trace) == 2 and torch.isfinite(out["samples"]).all() and any(t.get("consistency") for t in trace)


def test_flux_guidance_embedding_reaches_the_model_at_cfg_1(comfy_host, family, restoration):
    """Flux-dev's distilled guidance is a conditioning value (FluxGuidance), not CFG: at CFG 1 (one model call per
    step) SILO's result changes with it, so the embedding reaches the model through the guided sampler."""
    if family.variant != "flux":
        pytest.skip("guidance embedding: Flux only")
    meas, latent, op = restoration
    outs = []
    for g in (1.0, 30.0):
        (cond,) = comfy_host.run_node("FluxGuidance", conditioning=family.cond, guidance=g)
        out, trace = _silo(comfy_host, family, latent, meas, op, cond=cond, gradient="x0", steps=2)
        outs.append(out["samples"])
    assert not torch.allclose(outs[0], outs[1], atol=1e-4), "the guidance value must change the model's output"


def test_a_model_of_an_unsupported_kind_is_refused_by_the_nodes(comfy_host, sd15_small):
    """The checkpoint's EDM/continuous/other sampling never runs with the wrong math: every guided node stops with the
    message naming the kind (here an SD1.5 MODEL turned into an EDM model by ModelSamplingContinuousEDM)."""
    model, clip, vae = sd15_small
    (edm,) = comfy_host.run_node("ModelSamplingContinuousEDM", model=model, sampling="edm", sigma_max=80.0,
                                 sigma_min=0.002)
    (cond,) = comfy_host.run_node("CLIPTextEncode", text="a photo", clip=clip)
    fam = Family("sd15", edm, clip, vae, cond)
    meas, latent = _measurement(comfy_host, fam)
    from comfyui_silo.nodes.families import latent_format_facts

    op = _operator(comfy_host, latent_format_facts(model, vae), "sd15")
    common = dict(model=edm, positive=cond, negative=cond, latent_image=latent, measurement=meas, **KSAMPLER)
    expect = r"{}: input 'model': this model samples with EDM prediction .*ComfyUI model type EDM"
    with pytest.raises(ValueError, match=expect.format("SILO KSampler")):
        _silo(comfy_host, fam, latent, meas, op)
    with pytest.raises(ValueError, match=expect.format(re.escape("Latent DPS / PSLD KSampler"))):
        comfy_host.run_node("SILOLatentDPSKSampler", vae=vae, eta=1.0, gluing=0.0, gluing_norm="squared",
                            update="ddpm", gradient="unet", grad_clamp=0.0, early_stop=-1, **common)
    with pytest.raises(ValueError, match=expect.format("ReSample KSampler")):
        comfy_host.run_node("SILOReSampleKSampler", vae=vae, consistency_every=1, latent_steps=5, lr=0.05,
                            optimization="latent", pixel_steps=50, tolerance=1e-4, gamma=40.0, variance="paper",
                            dps_eta=0.0, early_stop=-1, **common)
