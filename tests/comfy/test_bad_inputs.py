"""In-process tier: bad input never gives a black image reported as success (issue 15, node side), mismatches are
refused with a named way to proceed, and long inner work shows progress and obeys Cancel (issue 14)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytestmark = pytest.mark.comfy

SD15 = {"name": "SD15", "latent_channels": 4, "scale_factor": 0.18215, "shift_factor": 0.0, "downscale": 8}
DEG = dict(type="gaussian_blur", blur_kernel_size=9, blur_sigma=2.0, sr_factor=4, box_top=0, box_left=0,
           box_height=8, box_width=8, random_box_size=16, random_box_seed=0, jpeg_quality=10)
KS = dict(seed=0, steps=3, cfg=1.0, scheduler="normal", denoise=1.0)
SILO = dict(eta=1.0, update="ddpm", gradient="unet", grad_clamp=1.0, early_stop=-1)
DPS = dict(eta=1.0, gluing=0.0, gluing_norm="squared", update="ddpm", gradient="x0", grad_clamp=0.0, early_stop=-1)
RESAMPLE = dict(consistency_every=1, latent_steps=4, lr=0.05, optimization="auto", pixel_steps=6, tolerance=0.0,
                gamma=40.0, variance="paper", dps_eta=0.0, early_stop=-1)


def _operator(comfy_host, sigma=2.0):
    from comfyui_silo.operators.io import save_operator
    from comfyui_silo.operators.network import LatentOperator

    name = f"test_bad_op_s{sigma}.safetensors"
    path = comfy_host.base / "models" / "latent_operators" / name
    if not path.exists():
        save_operator(path, LatentOperator(width=16), degradation={"type": "gaussian_blur", "kernel_size": 9,
                                                                     "sigma": sigma}, latent_format=SD15)
    return comfy_host.run_node("SILOLatentOperatorLoader", operator_name=name)[0]


@pytest.fixture(scope="module")
def setup(comfy_host, sd15_small):
    model, clip, vae = sd15_small
    (cond,) = comfy_host.run_node("CLIPTextEncode", text="a photo", clip=clip)
    (deg,) = comfy_host.run_node("SILODegradation", **DEG)
    photo = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(7))
    meas, latent = comfy_host.run_node("SILOEncodeMeasurement", image=photo, vae=vae, degradation=deg,
                                       noise_sigma=0.01)
    return dict(model=model, vae=vae, cond=cond, meas=meas, latent=latent, photo=photo)


def _silo(comfy_host, s, **kw):
    args = dict(model=s["model"], positive=s["cond"], negative=s["cond"], latent_image=s["latent"],
                measurement=s["meas"], operator=_operator(comfy_host), **KS, **SILO)
    args.update(kw)
    return comfy_host.run_node("SILOKSampler", **args)


# ------------------------------------------------------------------------------------------- non-finite input

def test_non_finite_photo_or_vae_latent_is_refused_by_encode_measurement(comfy_host, setup):
    (deg,) = comfy_host.run_node("SILODegradation", **DEG)
    photo = setup["photo"].clone()
    photo[0, 3, 5, 1] = float("nan")
    with pytest.raises(ValueError, match=r"Encode Measurement: input 'image': the photo contains 1 NaN/inf"):
        comfy_host.run_node("SILOEncodeMeasurement", image=photo, vae=setup["vae"], degradation=deg,
                            noise_sigma=0.01)

    class OverflowingVAE:  # what an fp16 VAE that overflows returns
        def encode(self, pixels):
            return torch.full((pixels.shape[0], 4, pixels.shape[1] // 8, pixels.shape[2] // 8), float("inf"))

    with pytest.raises(ValueError, match=r"Encode Measurement: input 'vae':.*NaN/inf.*fp32"):
        comfy_host.run_node("SILOEncodeMeasurement", image=setup["photo"], vae=OverflowingVAE(), degradation=deg,
                            noise_sigma=0.01)


def test_non_finite_latent_image_is_refused_by_every_solver(comfy_host, setup):
    bad = {"samples": setup["latent"]["samples"].clone()}
    bad["samples"][0, 1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"SILO KSampler: input 'latent_image': the latent contains 1 NaN/inf"):
        _silo(comfy_host, setup, latent_image=bad)
    common = dict(model=setup["model"], positive=setup["cond"], negative=setup["cond"], latent_image=bad,
                  measurement=setup["meas"], vae=setup["vae"], **KS)
    with pytest.raises(ValueError, match=r"Latent DPS / PSLD KSampler: input 'latent_image'.*NaN/inf"):
        comfy_host.run_node("SILOLatentDPSKSampler", **common, **DPS)
    with pytest.raises(ValueError, match=r"ReSample KSampler: input 'latent_image'.*NaN/inf"):
        comfy_host.run_node("SILOReSampleKSampler", **common, **RESAMPLE)
    # a SAMPLER node sees the latent only inside SamplerCustomAdvanced: checked there, named by the SAMPLER node
    model = setup["model"]
    (sampler,) = comfy_host.run_node("SILOSampler", model=model, measurement=setup["meas"],
                                     operator=_operator(comfy_host), **SILO)
    (noise,) = comfy_host.run_node("RandomNoise", noise_seed=0)
    (sigmas,) = comfy_host.run_node("BasicScheduler", model=model, scheduler="normal", steps=2, denoise=1.0)
    (guider,) = comfy_host.run_node("BasicGuider", model=model, conditioning=setup["cond"])
    bad["samples"][0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"SILO Sampler: input 'latent_image': the starting latent"):
        comfy_host.run_node("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                            latent_image=bad)


def test_metrics_refuse_a_nan_image_instead_of_reporting_psnr_nan(comfy_host, setup):
    clean = setup["photo"]
    broken = clean.clone()
    broken[0, :8] = float("nan")
    with pytest.raises(ValueError, match=r"Restoration Metrics: input 'image': the restoration contains 1536 "
                                         r"NaN/inf.*cannot be scored"):
        comfy_host.run_node("SILORestorationMetrics", image=broken, reference=clean)
    with pytest.raises(ValueError, match=r"Restoration Metrics: input 'reference'.*NaN/inf"):
        comfy_host.run_node("SILORestorationMetrics", image=clean, reference=broken)
    with pytest.raises(ValueError, match=r"Pixel Uncertainty: input 'samples'.*NaN/inf"):
        comfy_host.run_node("SILOPixelUncertainty", samples=torch.cat([clean, broken]))


class _NaNAfter(torch.nn.Module):
    """An operator that starts returning NaN at its n-th call, as a diverging run would."""

    def __init__(self, inner, at_call):
        super().__init__()
        self.inner, self.at_call, self.calls = inner, at_call, 0

    def forward(self, z, sigma_y=None, mask=None):
        self.calls += 1
        out = self.inner(z, sigma_y=sigma_y, mask=mask)
        return out * float("nan") if self.calls >= self.at_call else out


def test_a_state_that_becomes_non_finite_stops_with_the_node_and_step_named(comfy_host, setup):
    op = _operator(comfy_host)
    sab = dataclasses.replace(op, module=_NaNAfter(op.module, at_call=2))
    with pytest.raises(RuntimeError, match=r"\[comfyui-silo\] SILO KSampler: the sample became NaN/inf at step 1 "
                                           r"of 3 .*Lower eta"):
        _silo(comfy_host, setup, operator=sab)


# ------------------------------------------------------------------------------------------- mismatches

def test_degradation_parameter_mismatch_is_an_error_unless_the_node_says_warn(comfy_host, setup):
    """A σ=3 blur operator on a σ=2 blur photo: refused by default, with the way to proceed named; with
    on_mismatch 'warn' it runs and the warning is shown on the node (SILO KSampler and SILO Sampler)."""
    op3 = _operator(comfy_host, sigma=3.0)
    with pytest.raises(ValueError, match=r"SILO KSampler: input 'operator':.*sigma.*set on_mismatch to 'warn' to "
                                         r"run anyway"):
        _silo(comfy_host, setup, operator=op3)
    out, trace = _silo(comfy_host, setup, operator=op3, on_mismatch="warn", steps=2)
    assert torch.isfinite(out["samples"]).all() and len(trace) == 2
    text = comfy_host.last_ui["text"][0]
    assert text.startswith("Warning: the operator was trained for") and "results may be off" in text
    assert "consistency" in text, "the usual summary follows the warning"
    with pytest.raises(ValueError, match=r"SILO Sampler: input 'operator':.*on_mismatch"):
        comfy_host.run_node("SILOSampler", model=setup["model"], measurement=setup["meas"], operator=op3, **SILO)
    comfy_host.run_node("SILOSampler", model=setup["model"], measurement=setup["meas"], operator=op3,
                        on_mismatch="warn", **SILO)
    assert comfy_host.last_ui["text"][0].startswith("Warning: the operator was trained for")
    # a matching operator runs without any warning text
    _silo(comfy_host, setup, steps=2, on_mismatch="warn")
    assert not comfy_host.last_ui["text"][0].startswith("Warning")


# ------------------------------------------------------------------------------------------- wording

def test_mask_problems_get_mask_advice_and_sensible_counts(comfy_host, setup):
    vae, photo = setup["vae"], setup["photo"]
    two_masks = torch.zeros(2, 64, 64)
    two_masks[:, 8:24, 8:24] = 1.0
    (deg,) = comfy_host.run_node("SILODegradation", **dict(DEG, type="mask_inpaint", mask=two_masks))
    with pytest.raises(ValueError) as info:
        comfy_host.run_node("SILOEncodeMeasurement", image=photo, vae=vae, degradation=deg, noise_sigma=0.01)
    msg = str(info.value)
    assert "Encode Measurement: input 'degradation': the mask has a batch of 2 but the image is a single photo. " \
           "Use one mask." in msg
    assert "1 or 1" not in msg and "box" not in msg.lower()
    (deg,) = comfy_host.run_node("SILODegradation", **dict(DEG, type="mask_inpaint", mask=torch.ones(1, 32, 32)))
    with pytest.raises(ValueError) as info:
        comfy_host.run_node("SILOEncodeMeasurement", image=photo, vae=vae, degradation=deg, noise_sigma=0.01)
    assert "mask editor" in str(info.value) and "box" not in str(info.value).lower()


def test_early_stop_beyond_the_run_names_the_node_and_input(comfy_host, setup):
    with pytest.raises(ValueError, match=r"\[comfyui-silo\] SILO KSampler: input 'early_stop': step 3 does not "
                                         r"exist in a run of 3 steps"):
        _silo(comfy_host, setup, early_stop=3)
    with pytest.raises(ValueError, match=r"Latent DPS / PSLD KSampler: input 'early_stop'"):
        comfy_host.run_node("SILOLatentDPSKSampler", model=setup["model"], positive=setup["cond"],
                            negative=setup["cond"], latent_image=setup["latent"], measurement=setup["meas"],
                            vae=setup["vae"], **KS, **dict(DPS, early_stop=10))


# ------------------------------------------------------------------------------------------- progress and Cancel

@pytest.fixture()
def progress_hook():
    """Records every progress-bar update the nodes send (what the server forwards to the browser)."""
    import comfy.utils

    seen = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    yield seen
    comfy.utils.set_progress_bar_global_hook(previous)


def _resample(comfy_host, s, **kw):
    args = dict(model=s["model"], positive=s["cond"], negative=s["cond"], latent_image=s["latent"],
                measurement=s["meas"], vae=s["vae"], **dict(KS, steps=6), **RESAMPLE)
    args.update(kw)
    return comfy_host.run_node("SILOReSampleKSampler", **args)


def never_back(updates) -> bool:
    fractions = [v / t for v, t in updates]
    return all(b >= a - 1e-9 for a, b in zip(fractions, fractions[1:], strict=False))


def test_resample_inner_optimisation_moves_the_bar_within_its_steps(comfy_host, setup, progress_hook):
    """One bar per node (issue 19): the inner optimisation moves the bar between step marks, never back."""
    _resample(comfy_host, setup)
    assert {t for _, t in progress_hook} == {6}, f"one bar, in steps: {progress_hook}"
    assert never_back(progress_hook), progress_hook
    inner = [v for v, _ in progress_hook if v != int(v)]
    assert inner, f"the latent and pixel optimisations move the bar between steps: {progress_hook}"
    assert progress_hook[-1] == (6, 6)


def test_cancel_stops_resample_inside_its_inner_optimisation(comfy_host, setup, progress_hook):
    import comfy.model_management as mm

    def cancel_on_inner_progress(value, total, preview, node_id=None):
        progress_hook.append((value, total))
        if value != int(value):  # inner work of the first step (the latent optimisation), not a step mark
            mm.interrupt_current_processing(True)

    import comfy.utils

    comfy.utils.set_progress_bar_global_hook(cancel_on_inner_progress)
    with pytest.raises(mm.InterruptProcessingException):
        _resample(comfy_host, setup, optimization="latent", latent_steps=500)
    inner = [v for v, t in progress_hook if v != int(v)]
    within_step = [v - int(v) for v in inner]  # the share of the step's 500 inner iterations done
    assert inner and max(within_step) < 0.99 * 10 / 500, f"Cancel stopped the optimisation at once, not after " \
                                                         f"500 iterations: {inner}"
    assert not mm.processing_interrupted()
