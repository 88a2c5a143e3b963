"""In-process tier: Latent DPS / PSLD KSampler and ReSample KSampler with the random SD1.5 checkpoint."""

from __future__ import annotations

import pytest
import torch
from support.memory import live_tensors

pytestmark = pytest.mark.comfy

DEG = dict(type="gaussian_blur", blur_kernel_size=9, blur_sigma=2.0, sr_factor=4, box_top=0, box_left=0,
           box_height=8, box_width=8, random_box_size=16, random_box_seed=0, jpeg_quality=10)
COMMON = dict(seed=0, steps=4, cfg=1.0, scheduler="normal", denoise=1.0)


@pytest.fixture(scope="module")
def setup(comfy_host, sd15_small):
    model, clip, vae = sd15_small
    (cond,) = comfy_host.run_node("CLIPTextEncode", text="a photo", clip=clip)
    (deg,) = comfy_host.run_node("SILODegradation", **DEG)
    photo = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    measured, _ = comfy_host.run_node("SILOApplyDegradation", image=photo, degradation=deg, noise_sigma=0.01, seed=0)
    meas, latent = comfy_host.run_node("SILOEncodeMeasurement", image=measured, vae=vae, degradation=deg,
                                       noise_sigma=0.01)
    return model, cond, vae, meas, latent


def _pixel_error(comfy_host, vae, meas, samples):
    (img,) = comfy_host.run_node("VAEDecode", samples=samples, vae=vae)
    with torch.no_grad():
        return float((meas.degradation(img.permute(0, 3, 1, 2).float()) - meas.y).norm())


def _dps(comfy_host, setup, **kw):
    model, cond, vae, meas, latent = setup
    args = dict(model=model, positive=cond, negative=cond, latent_image=latent, measurement=meas, vae=vae, eta=1.0,
                gluing=0.0, gluing_norm="squared", update="ddpm", gradient="unet", grad_clamp=0.0, early_stop=-1, **COMMON)
    args.update(kw)
    return comfy_host.run_node("SILOLatentDPSKSampler", **args)


def _resample(comfy_host, setup, **kw):
    model, cond, vae, meas, latent = setup
    args = dict(model=model, positive=cond, negative=cond, latent_image=latent, measurement=meas, vae=vae,
                consistency_every=1, latent_steps=30, lr=0.05, optimization="auto", pixel_steps=2000, tolerance=1e-4,
                gamma=40.0, variance="paper", dps_eta=0.0, early_stop=-1, **COMMON)
    args.update(kw)
    return comfy_host.run_node("SILOReSampleKSampler", **args)


def test_latent_dps_and_psld_reduce_the_pixel_error(comfy_host, setup):
    _model, _cond, vae, meas, _latent = setup
    plain, _ = _dps(comfy_host, setup, eta=0.0)
    err_plain = _pixel_error(comfy_host, vae, meas, plain)
    # a random VAE is far from E(D(z)) = z, so PSLD's gluing term is large here: a small γ keeps it in check
    settings = {"Latent-DPS": dict(eta=20.0, gluing=0.0), "PSLD": dict(eta=20.0, gluing=0.01),
                "PSLD, plain gluing norm": dict(eta=20.0, gluing=0.5, gluing_norm="plain")}
    for name, kw in settings.items():
        for mode in ("unet", "x0"):
            out, trace = _dps(comfy_host, setup, gradient=mode, **kw)
            assert len(trace) == 4 and trace[-1]["loss"][0] < trace[0]["loss"][0], (name, mode)
            limit = 0.9 if name == "Latent-DPS" else 0.95  # the gluing term pulls elsewhere with a random VAE
            assert _pixel_error(comfy_host, vae, meas, out) < limit * err_plain, (name, mode)
            assert ("extra_loss" in trace[0]) == name.startswith("PSLD")
    assert "‖y − A(D(ẑ₀))‖" in comfy_host.last_ui["text"][0]


def test_resample_reduces_the_pixel_error(comfy_host, setup):
    _model, _cond, vae, meas, _latent = setup
    plain, _ = _resample(comfy_host, setup, consistency_every=0)
    err_plain = _pixel_error(comfy_host, vae, meas, plain)
    for variance in ("paper", "reference"):
        out, trace = _resample(comfy_host, setup, variance=variance)
        assert any(t.get("consistency") for t in trace)
        assert _pixel_error(comfy_host, vae, meas, out) < 0.7 * err_plain, variance


def test_resample_optimization_mode_and_iteration_caps_are_the_users(comfy_host, setup):
    """The node's optimization / pixel_steps / latent_steps reach the solver: each consistency step runs the chosen
    optimisation and never more iterations than its cap (auto: pixel early, latent late, as the authors' code)."""
    caps = {"latent": 4, "pixel": 6}
    for mode in ("auto", "latent", "pixel"):
        _out, trace = _resample(comfy_host, setup, steps=6, optimization=mode, latent_steps=caps["latent"],
                                pixel_steps=caps["pixel"], tolerance=0.0)
        steps = [t for t in trace if t.get("consistency")]
        modes = [t["mode"] for t in steps]
        assert steps and all(max(t["iterations"]) == caps[t["mode"]] for t in steps), (mode, steps)
        if mode == "auto":
            assert modes[0] == "pixel" and modes[-1] == "latent", modes
        else:
            assert set(modes) == {mode}, modes


def test_sampler_nodes_name_themselves_in_errors(comfy_host, setup):
    model, _cond, vae, meas, _latent = setup
    small = {"samples": torch.zeros(1, 4, 4, 4)}
    (noise,) = comfy_host.run_node("RandomNoise", noise_seed=0)
    (sigmas,) = comfy_host.run_node("BasicScheduler", model=model, scheduler="normal", steps=2, denoise=1.0)
    (guider,) = comfy_host.run_node("BasicGuider", model=model, conditioning=_cond)
    samplers = {
        "Latent DPS / PSLD Sampler": comfy_host.run_node(
            "SILOLatentDPSSampler", model=model, measurement=meas, vae=vae, eta=1.0, gluing=0.0, gluing_norm="squared",
            update="ddpm", gradient="unet", grad_clamp=0.0, early_stop=-1)[0],
        "ReSample Sampler": comfy_host.run_node(
            "SILOReSampleSampler", model=model, measurement=meas, vae=vae, consistency_every=1, latent_steps=3,
            lr=0.05, optimization="auto", pixel_steps=3, tolerance=1e-4, gamma=40.0, variance="paper", dps_eta=0.0,
            early_stop=-1)[0]}
    for name, sampler in samplers.items():
        with pytest.raises(ValueError, match=rf"\[comfyui-silo\] {name}: input 'latent_image'"):
            comfy_host.run_node("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                                latent_image=small)


def test_baselines_leave_no_memory_behind(comfy_host, setup):
    _dps(comfy_host, setup, steps=2)  # warm-up: weights made differentiable once
    _resample(comfy_host, setup, steps=2, latent_steps=3)
    before = live_tensors()
    _dps(comfy_host, setup, steps=2, gluing=0.1)
    _resample(comfy_host, setup, steps=2, latent_steps=3)
    after = live_tensors()
    assert after[1] == before[1], f"no autograd graph survives ({before[1]} before, {after[1]} after)"
    assert after[0] - before[0] < 64 * 1024, f"{after[0] - before[0]} bytes of tensors leaked"


def test_baselines_explain_what_the_measurement_lacks(comfy_host, setup, sd15_small):
    model, cond, vae, meas, latent = setup
    with pytest.raises(ValueError, match=r"Latent DPS / PSLD KSampler.*'measurement'.*Encode Measurement"):
        _dps(comfy_host, setup, measurement=None)
    small = {"samples": torch.zeros(1, 4, 4, 4)}
    with pytest.raises(ValueError, match=r"ReSample KSampler.*'latent_image'.*32x32.*64x64"):
        _resample(comfy_host, setup, latent_image=small)
    (jpeg,) = comfy_host.run_node("SILODegradation", **dict(DEG, type="jpeg"))
    photo = torch.rand(1, 64, 64, 3)
    jmeas, jlatent = comfy_host.run_node("SILOEncodeMeasurement", image=photo, vae=vae, degradation=jpeg,
                                         noise_sigma=0.01)
    with pytest.raises(ValueError, match=r"'gluing'.*linear.*Latent-DPS"):
        _dps(comfy_host, setup, measurement=jmeas, latent_image=jlatent, gluing=0.1)


def test_restore_with_n_seeds_runs_a_solver_per_seed(comfy_host, setup):
    """Dirac-style uncertainty: one solver, N seeds; sample i is what SamplerCustomAdvanced gives with seed s+i."""
    model, cond, vae, meas, latent = setup
    (guider,) = comfy_host.run_node("BasicGuider", model=model, conditioning=cond)
    (sigmas,) = comfy_host.run_node("BasicScheduler", model=model, scheduler="normal", steps=3, denoise=1.0)
    (sampler,) = comfy_host.run_node("SILOLatentDPSSampler", model=model, measurement=meas, vae=vae, eta=5.0,
                                     gluing=0.0, gluing_norm="squared", update="ddpm", gradient="x0", grad_clamp=0.0,
                                     early_stop=-1)
    before = live_tensors()
    mean, heat, std, samples, latents = comfy_host.run_node(
        "SILORestoreSeeds", guider=guider, sampler=sampler, sigmas=sigmas, latent_image=latent, vae=vae,
        noise_seed=7, seeds=3)
    assert samples.shape == (3, 64, 64, 3) and latents["samples"].shape == (3, 4, 8, 8)
    assert mean.shape == heat.shape == (1, 64, 64, 3) and std.shape == (1, 64, 64)
    torch.testing.assert_close(mean[0], samples.mean(0), rtol=0, atol=1e-5)
    # the seeds give different restorations, so the spread is not zero; it is the pixel-wise std of the samples
    assert float((samples[0] - samples[1]).abs().max()) > 1e-3
    torch.testing.assert_close(std[0], samples.double().std(0).pow(2).mean(-1).sqrt().float(), rtol=1e-4, atol=1e-5)
    assert "3 seeds (7…9)" in comfy_host.last_ui["text"][0]
    # sample 1 is exactly SamplerCustomAdvanced with seed 8
    (noise,) = comfy_host.run_node("RandomNoise", noise_seed=8)
    out, _ = comfy_host.run_node("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                                 latent_image=latent)
    torch.testing.assert_close(latents["samples"][1], out["samples"][0], rtol=1e-5, atol=1e-5)
    del mean, heat, std, samples, latents, out
    after = live_tensors()
    assert after[0] <= before[0] + 1e6 and after[1] == before[1]
    with pytest.raises(ValueError, match="'latent_image'.*batch of 2.*ONE photo"):
        comfy_host.run_node("SILORestoreSeeds", guider=guider, sampler=sampler, sigmas=sigmas,
                            latent_image={"samples": latent["samples"].repeat(2, 1, 1, 1)}, vae=vae, noise_seed=0,
                            seeds=2)


def test_restore_with_n_seeds_shows_one_bar_over_all_seeds_and_names_the_seed(comfy_host, setup, monkeypatch):
    """Issue 19: one bar of seeds x steps that never moves back (ReSample's inner work folded into its steps), and
    the node says which seed is sampling."""
    import importlib

    import comfy.utils

    model, cond, vae, meas, latent = setup
    # the module the host loaded the pack as (custom_nodes.comfyui-silo...), whose sample_seeds the node calls
    host = importlib.import_module(comfy_host.node_class("SILORestoreSeeds").__module__.rsplit(".", 1)[0] + ".host")
    (guider,) = comfy_host.run_node("BasicGuider", model=model, conditioning=cond)
    (sigmas,) = comfy_host.run_node("BasicScheduler", model=model, scheduler="normal", steps=3, denoise=1.0)
    (sampler,) = comfy_host.run_node(
        "SILOReSampleSampler", model=model, measurement=meas, vae=vae, consistency_every=1, latent_steps=3,
        lr=0.05, optimization="auto", pixel_steps=3, tolerance=1e-4, gamma=40.0, variance="paper", dps_eta=0.0,
        early_stop=-1)
    texts, bar = [], []
    monkeypatch.setattr(host, "progress_text", texts.append)
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: bar.append((value, total)))
    try:
        comfy_host.run_node("SILORestoreSeeds", guider=guider, sampler=sampler, sigmas=sigmas, latent_image=latent,
                            vae=vae, noise_seed=7, seeds=2)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert texts == ["seed 7 (1 of 2)", "seed 8 (2 of 2)"]
    assert {t for _, t in bar} == {6}, f"one bar of 2 seeds x 3 steps: {bar}"
    fractions = [v / t for v, t in bar]
    assert all(b >= a - 1e-9 for a, b in zip(fractions, fractions[1:], strict=False)), bar
    assert any(v != int(v) for v, _ in bar), f"ReSample's inner work moves the bar within its steps: {bar}"
    assert (3, 6) in bar and bar[-1] == (6, 6)
