"""In-process tier: SILO KSampler with the random SD1.5 checkpoint."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from support.memory import live_tensors

pytestmark = pytest.mark.comfy

SD15 = {"name": "SD15", "latent_channels": 4, "scale_factor": 0.18215, "shift_factor": 0.0, "downscale": 8}


def _operator(comfy_host, latent_format):
    """An (untrained) operator file in the host's models/latent_operators, loaded through the loader node, i.e.
    under inference mode as the executor runs it."""
    from comfyui_silo.operators.io import save_operator
    from comfyui_silo.operators.network import LatentOperator

    name = f"test_op_{latent_format['name']}.safetensors"
    path = comfy_host.base / "models" / "latent_operators" / name
    if not path.exists():
        save_operator(path, LatentOperator(width=16), degradation={"type": "gaussian_blur", "kernel_size": 9,
                                                                     "sigma": 2.0}, latent_format=latent_format)
    (op,) = comfy_host.run_node("SILOLatentOperatorLoader", operator_name=name)
    assert all(p.is_inference() for p in op.module.parameters()), "loaded as the executor loads it"
    return op


def _blur_measurement(comfy_host, vae, seed=0):
    """Encode Measurement of a random 64x64 photo under a 9x9 Gaussian blur: ``(MEASUREMENT, latent_image)``."""
    (deg,) = comfy_host.run_node("SILODegradation", **_deg_widgets())
    photo = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(seed))
    return comfy_host.run_node("SILOEncodeMeasurement", image=photo, vae=vae, degradation=deg, noise_sigma=0.01)


def _run(comfy_host, model, cond, latent, meas, op, **kw):
    args = dict(model=model, seed=0, steps=4, cfg=1.0, scheduler="normal", positive=cond, negative=cond,
                latent_image=latent, denoise=1.0, measurement=meas, operator=op, eta=0.5, update="ddpm",
                gradient="unet", grad_clamp=1.0, early_stop=-1)
    args.update(kw)
    return comfy_host.run_node("SILOKSampler", **args)


def test_silo_ksampler_pulls_towards_the_measurement_in_both_modes(comfy_host, sd15_small, tmp_path):
    model, clip, vae = sd15_small
    (cond,) = comfy_host.run_node("CLIPTextEncode", text="a high quality photo", clip=clip)
    meas, latent = _blur_measurement(comfy_host, vae)
    assert torch.equal(latent["samples"], meas.latent) and latent["samples"].shape == (1, 4, 8, 8)
    op = _operator(comfy_host, SD15)
    unet = model.model.diffusion_model
    n_params = len(list(unet.parameters()))
    w = (meas.latent * 0.18215).clamp(-4, 4)

    def residual(samples):
        with torch.no_grad():
            return float((w - op(samples.float(), sigma_y=0.01)).norm())

    (plain, _), = [_run(comfy_host, model, cond, latent, meas, op, eta=0.0)]
    res_plain = residual(plain["samples"])
    for mode in ("unet", "x0"):
        out, trace = _run(comfy_host, model, cond, latent, meas, op, eta=2.0, gradient=mode)
        assert len(trace) == 4 and trace[-1]["loss"][0] < trace[0]["loss"][0]
        assert residual(out["samples"]) < 0.8 * res_plain, mode
    assert len(list(unet.parameters())) == n_params
    assert not any(p.is_inference() for p in unet.parameters())  # made differentiable in place, not copied


def test_operator_for_another_latent_format_is_refused(comfy_host, sd15_small, tmp_path):
    model, clip, vae = sd15_small
    sdxl = dict(SD15, name="SDXL", scale_factor=0.13025)
    op = _operator(comfy_host, sdxl)
    with pytest.raises(ValueError, match="operator.*another latent space.*scale"):
        _run(comfy_host, model, None, {"samples": torch.zeros(1, 4, 8, 8)}, None, op)


def test_operator_for_another_degradation_is_refused(comfy_host, sd15_small):
    model, clip, vae = sd15_small
    (deg,) = comfy_host.run_node("SILODegradation", **_deg_widgets(type="super_resolution", sr_factor=4))
    meas, latent = comfy_host.run_node("SILOEncodeMeasurement", image=torch.rand(1, 16, 16, 3), vae=vae,
                                       degradation=deg, noise_sigma=0.01)
    op = _operator(comfy_host, SD15)  # trained for Gaussian blur
    with pytest.raises(ValueError, match=r"SILO KSampler.*'operator'.*Gaussian blur.*Super-resolution ×4"):
        _run(comfy_host, model, None, latent, meas, op)


def test_encode_measurement_explains_bad_sizes(comfy_host, sd15_small):
    _model, _clip, vae = sd15_small
    (deg,) = comfy_host.run_node("SILODegradation", type="gaussian_blur", blur_kernel_size=9, blur_sigma=2.0,
                                 sr_factor=4, box_top=0, box_left=0, box_height=8, box_width=8, random_box_size=16,
                                 random_box_seed=0, jpeg_quality=10)
    with pytest.raises(ValueError, match="Encode Measurement.*'image'.*multiple of 8.*ImageCrop"):
        comfy_host.run_node("SILOEncodeMeasurement", image=torch.rand(1, 60, 64, 3), vae=vae, degradation=deg,
                            noise_sigma=0.01)
    with pytest.raises(ValueError, match="empty"):
        comfy_host.run_node("SILOEncodeMeasurement", image=torch.rand(0, 64, 64, 3), vae=vae, degradation=deg,
                            noise_sigma=0.01)


def test_super_resolution_measurement_gives_a_full_size_latent(comfy_host, sd15_small):
    _model, _clip, vae = sd15_small
    (deg,) = comfy_host.run_node("SILODegradation", **_deg_widgets(type="super_resolution", sr_factor=4))
    meas, latent = comfy_host.run_node("SILOEncodeMeasurement", image=torch.rand(1, 16, 24, 3), vae=vae,
                                       degradation=deg, noise_sigma=0.01)
    assert meas.y.shape == (1, 3, 16, 24) and meas.lifted.shape == (1, 3, 64, 96)
    assert latent["samples"].shape == (1, 4, 8, 12)


def test_inpainting_measurement_is_the_photo_outside_the_mask(comfy_host, sd15_small):
    """A photo whose hole still shows content (painted in Load Image's mask editor) is measured as y = x·(1−m),
    exactly what Apply Degradation makes of it without noise; a box outside the photo is a clear input error."""
    _model, _clip, vae = sd15_small
    photo = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 64, 64)
    mask[:, 8:40, 16:48] = 1.0
    for widgets in (dict(type="box_inpaint", box_top=8, box_left=16, box_height=32, box_width=32),
                    dict(type="mask_inpaint", mask=mask)):
        (deg,) = comfy_host.run_node("SILODegradation", **_deg_widgets(**widgets))
        applied, _ = comfy_host.run_node("SILOApplyDegradation", image=photo, degradation=deg, noise_sigma=0.0,
                                         seed=0)
        meas, latent = comfy_host.run_node("SILOEncodeMeasurement", image=photo, vae=vae, degradation=deg,
                                           noise_sigma=0.01)
        ref, ref_latent = comfy_host.run_node("SILOEncodeMeasurement", image=applied, vae=vae, degradation=deg,
                                              noise_sigma=0.01)
        assert float(meas.y[..., 8:40, 16:48].abs().max()) == 0.0, widgets["type"]
        torch.testing.assert_close(meas.y, ref.y)
        torch.testing.assert_close(latent["samples"], ref_latent["samples"])
        assert torch.equal(meas.y[..., :8, :], photo.movedim(-1, 1)[..., :8, :]), "the rest is the photo"
    (deg,) = comfy_host.run_node("SILODegradation", **_deg_widgets(type="box_inpaint", box_top=48, box_height=32))
    with pytest.raises(ValueError, match=r"Encode Measurement: input 'degradation'.*rows 48\.\.79.*64 rows.*fit"):
        comfy_host.run_node("SILOEncodeMeasurement", image=photo, vae=vae, degradation=deg, noise_sigma=0.01)


def test_degradation_errors_name_the_widget(comfy_host):
    with pytest.raises(ValueError, match=r"Degradation \(SILO\): input 'blur_kernel_size': .*gaussian_blur.*odd"):
        comfy_host.run_node("SILODegradation", **_deg_widgets(blur_kernel_size=8))
    with pytest.raises(ValueError, match=r"input 'blur_sigma'"):
        comfy_host.run_node("SILODegradation", **_deg_widgets(blur_sigma=0.0))


def _deg_widgets(**kw):
    args = dict(type="gaussian_blur", blur_kernel_size=9, blur_sigma=2.0, sr_factor=4, box_top=0, box_left=0,
                box_height=8, box_width=8, random_box_size=16, random_box_seed=0, jpeg_quality=10)
    args.update(kw)
    return args


class _Sabotage(torch.nn.Module):
    """Wraps an operator module; at its n-th call it presses Cancel or raises, as a user or a failure would."""

    def __init__(self, inner, at_call, action):
        super().__init__()
        self.inner, self.at_call, self.action, self.calls = inner, at_call, action, 0

    def forward(self, z, sigma_y=None, mask=None):
        self.calls += 1
        if self.calls == self.at_call:
            self.action()
        return self.inner(z, sigma_y=sigma_y, mask=mask)


@pytest.mark.parametrize("failure", ["interrupt", "error", "oom"])
def test_memory_is_returned_after_an_interrupt_or_an_error(comfy_host, sd15_small, tmp_path, failure):
    import comfy.model_management as mm

    model, clip, vae = sd15_small
    (cond,) = comfy_host.run_node("CLIPTextEncode", text="a photo", clip=clip)
    (deg,) = comfy_host.run_node("SILODegradation", **_deg_widgets())
    photo = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    meas, latent = comfy_host.run_node("SILOEncodeMeasurement", image=photo, vae=vae, degradation=deg,
                                       noise_sigma=0.01)
    op = _operator(comfy_host, SD15)
    _run(comfy_host, model, cond, latent, meas, op, steps=2, eta=1.0)  # warm-up: weights made differentiable once
    before_bytes, before_graph = live_tensors()
    patches_before = (dict(model.model_options.get("transformer_options", {})), len(model.patches))

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    action = {"interrupt": lambda: mm.interrupt_current_processing(True),
              "error": lambda: (_ for _ in ()).throw(RuntimeError("operator exploded")),
              "oom": oom}[failure]
    sab = dataclasses.replace(op, module=_Sabotage(op.module, at_call=3, action=action))
    expected = {"interrupt": mm.InterruptProcessingException, "error": RuntimeError,
                "oom": torch.OutOfMemoryError}[failure]
    with pytest.raises(expected) as info:
        _run(comfy_host, model, cond, latent, meas, sab, steps=6, eta=1.0)
    if failure == "oom":
        assert "gradient 'x0'" in str(info.value) and "64x64" in str(info.value)
    assert sab.module.calls < 6, "the run stopped at the failure"
    assert not mm.processing_interrupted()
    del info, sab
    after_bytes, after_graph = live_tensors()
    # relative to before: a deliberate failing backward in an earlier test module may still hold its graph
    assert after_graph == before_graph, f"no autograd graph or .grad survives the failed run ({before_graph} before, {after_graph} after)"
    assert after_bytes - before_bytes < 64 * 1024, f"{after_bytes - before_bytes} bytes of tensors leaked"
    assert (dict(model.model_options.get("transformer_options", {})), len(model.patches)) == patches_before
    out, trace = _run(comfy_host, model, cond, latent, meas, op, steps=2, eta=1.0)  # and the host still samples
    assert torch.isfinite(out["samples"]).all() and len(trace) == 2


def test_sampler_nodes_force_sdpa_attention_for_their_run_only(comfy_host, sd15_small):
    """A MODEL whose attention cannot be differentiated (like SageAttention, here a model-scoped override that
    detaches) still gets exact gradients from the SILO / Latent DPS SAMPLER nodes: they route attention through
    PyTorch SDPA for their own run; the user's MODEL keeps its override and plain samplers still use it."""
    from comfy.ldm.modules.attention import attention_pytorch

    model, clip, vae = sd15_small
    (cond,) = comfy_host.run_node("CLIPTextEncode", text="a photo", clip=clip)
    meas, latent = _blur_measurement(comfy_host, vae)
    op = _operator(comfy_host, SD15)
    calls = []

    def forward_only(func, *args, **kwargs):
        calls.append(1)
        return attention_pytorch(*args, **kwargs).detach()

    user = model.clone()
    user.model_options["transformer_options"] = {"optimized_attention_override": forward_only}
    (noise,) = comfy_host.run_node("RandomNoise", noise_seed=0)
    (sigmas,) = comfy_host.run_node("BasicScheduler", model=user, scheduler="normal", steps=2, denoise=1.0)
    outs = {}
    for name, m in (("user", user), ("plain", model)):
        (guider,) = comfy_host.run_node("BasicGuider", model=m, conditioning=cond)
        silo = comfy_host.run_node("SILOSampler", model=m, measurement=meas, operator=op, eta=2.0, update="ddpm",
                                   gradient="unet", grad_clamp=0.0, early_stop=-1)[0]
        dps = comfy_host.run_node("SILOLatentDPSSampler", model=m, measurement=meas, vae=vae, eta=5.0, gluing=0.0,
                                  gluing_norm="squared", update="ddpm", gradient="unet", grad_clamp=0.0,
                                  early_stop=-1)[0]
        for solver, sampler in (("silo", silo), ("dps", dps)):
            outs[name, solver] = comfy_host.run_node("SamplerCustomAdvanced", noise=noise, guider=guider,
                                                     sampler=sampler, sigmas=sigmas, latent_image=latent)[0]["samples"]
    assert calls == [], "the guided samplers must not use the MODEL's forward-only attention"
    for solver in ("silo", "dps"):  # same result as on a MODEL without the override: the gradient was exact
        torch.testing.assert_close(outs["user", solver], outs["plain", solver], rtol=1e-4, atol=1e-4)
    assert user.model_options["transformer_options"]["optimized_attention_override"] is forward_only
    (euler,) = comfy_host.run_node("KSamplerSelect", sampler_name="euler")
    (guider,) = comfy_host.run_node("BasicGuider", model=user, conditioning=cond)
    comfy_host.run_node("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=euler, sigmas=sigmas,
                        latent_image=latent)
    assert calls, "a plain sampler still runs the MODEL's own attention"


def test_silo_gradients_go_through_a_unet_compiled_by_the_host(comfy_host, sd15_small):
    """The host's TorchCompileModel mechanism (``set_torch_compile_wrapper``: a model-scoped APPLY_MODEL wrapper
    that swaps in a ``torch.compile``d UNet) composes with SILO: both gradient modes run the compiled UNet — in
    'unet' mode its compiled backward too — and give what the eager UNet gives. The backend counts its graphs'
    calls (AOTAutograd without code generation, so no C++ compiler is needed)."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.utils import counters
    from torch._functorch.aot_autograd import make_boxed_func

    model, clip, vae = sd15_small
    (cond,) = comfy_host.run_node("CLIPTextEncode", text="a photo", clip=clip)
    meas, latent = _blur_measurement(comfy_host, vae)
    op = _operator(comfy_host, SD15)
    calls = {"forward": 0, "backward": 0}

    def counting(kind):
        def compiler(gm, example_inputs):
            def run(*args):
                calls[kind] += 1
                return gm(*args)
            return make_boxed_func(run)
        return compiler

    compiled = model.clone()
    set_torch_compile_wrapper(model=compiled, backend=aot_autograd(fw_compiler=counting("forward"),
                                                                   bw_compiler=counting("backward")))
    torch._dynamo.reset()
    try:
        for mode, backward in (("unet", 3), ("x0", 0)):
            calls.update(forward=0, backward=0)
            counters.clear()
            out, trace = _run(comfy_host, compiled, cond, latent, meas, op, steps=3, eta=2.0, gradient=mode,
                              grad_clamp=0.0)
            assert calls == {"forward": 3, "backward": backward}, (mode, calls)
            assert not counters["graph_break"], f"the guided UNet compiles as one graph: {dict(counters['graph_break'])}"
            ref, ref_trace = _run(comfy_host, model, cond, latent, meas, op, steps=3, eta=2.0, gradient=mode,
                                  grad_clamp=0.0)
            assert calls["forward"] == 3, "the user's own MODEL is not compiled"
            torch.testing.assert_close(out["samples"], ref["samples"], rtol=1e-4, atol=1e-4)
            assert [t["grad_norm"][0] for t in trace] == pytest.approx([t["grad_norm"][0] for t in ref_trace], rel=1e-4)
    finally:
        torch._dynamo.reset()


def test_auto_eta_on_the_node_shows_the_floor_and_the_eta_path(comfy_host, sd15_small):
    """eta_mode auto (issue 21): Encode Measurement encodes the photo once more under fresh noise, the floor reaches
    the sampler, and the node's text reports it with the η path; an untrained operator's file has no held-out error,
    so the floor is the encoder's noise term alone."""
    from comfyui_silo.nodes.solvers import latent_floor

    model, clip, vae = sd15_small
    (cond,) = comfy_host.run_node("CLIPTextEncode", text="a photo", clip=clip)
    meas, latent = _blur_measurement(comfy_host, vae)
    assert meas.latent_jitter is not None and meas.latent_jitter.shape == meas.latent.shape
    assert not torch.equal(meas.latent_jitter, meas.latent)
    op = _operator(comfy_host, SD15)
    w = (meas.latent * 0.18215).clamp(-4, 4)
    floor = latent_floor(model, meas, w, {})
    expected = ((meas.latent_jitter * 0.18215).clamp(-4, 4) - w).flatten(1).norm(dim=1)
    assert torch.allclose(floor.float(), expected.float(), rtol=1e-4) and float(floor[0]) > 0
    with_op = latent_floor(model, meas, w, {"heldout": {"operator": {"mse": 0.01}}})
    assert float(with_op[0]) ** 2 == pytest.approx(float(floor[0]) ** 2 + 0.01 * w[0].numel(), rel=1e-6)
    out, trace = _run(comfy_host, model, cond, latent, meas, op, eta=20.0, eta_mode="auto")
    assert torch.isfinite(out["samples"]).all()
    assert all(e["floor"] == [pytest.approx(float(floor[0]), rel=1e-5)] for e in trace)
    text = "\n".join(comfy_host.last_ui["text"])
    assert "noise floor" in text and "η auto: first" in text
    assert all(e["eta"] <= 20.0 for e in trace)  # η is the ceiling in auto
    # a blur measures the whole image: the glue says so, and the target follows the floor path
    from comfyui_silo.samplers.core import AUTO_END, get_parameterization, partial_of

    assert partial_of(meas.degradation) is False
    s0 = get_parameterization("vp").ve_sigma(trace[0]["sigma"])
    assert trace[0]["target"] == [pytest.approx(float(floor[0]) * math.hypot(AUTO_END, s0), rel=1e-4)]
