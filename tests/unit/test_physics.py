"""The measurement model y = noise(A(x)) as one object (operators/physics.py): what Encode Measurement and Apply
Degradation do before any VAE runs, with properties instead of type strings."""

from __future__ import annotations

import pytest
import torch

from comfyui_silo.operators.degradations import add_noise, build_degradation
from comfyui_silo.operators.physics import LATENT_CLAMP, DegradationLike, GaussianNoise, Measurement, MeasurementError

pytestmark = pytest.mark.unit


def _photo(b=1, h=32, w=48, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_super_resolution_photo_is_lifted_to_factor_times_its_size():
    sr = build_degradation({"type": "super_resolution", "factor": 4})
    y = _photo(h=16, w=8)
    m = Measurement.from_photo(y, sr, 0.01)
    assert m.image_size == (64, 32) and m.lifted.shape == (1, 3, 64, 32) and torch.equal(m.y, y)
    assert torch.equal(m.lifted, sr.lift(y, size=(64, 32))) and m.pixel_mask is None
    assert m.noise_sigma == 0.01 and m.noise == GaussianNoise(0.01) and m.degradation is sr


def test_same_size_types_keep_the_photo():
    for spec in ({"type": "gaussian_blur", "sigma": 1.0}, {"type": "jpeg", "quality": 20}, {"type": "identity"}):
        y = _photo() * 1.2 - 0.1  # a photo may stray out of 0-1 after noise; the lifted image is clamped
        m = Measurement.from_photo(y, build_degradation(spec), 0.0)
        assert torch.equal(m.y, y) and torch.equal(m.lifted, y.clamp(0, 1)) and m.image_size == (32, 48)


def test_inpainting_measures_only_the_pixels_outside_the_mask():
    box = build_degradation({"type": "box_inpaint", "top": 8, "left": 8, "height": 8, "width": 16})
    y = _photo(b=2)
    m = Measurement.from_photo(y, box, 0.01)
    assert m.pixel_mask.shape == (2, 1, 32, 48) and float(m.pixel_mask.sum()) == 2 * 8 * 16
    assert float(m.y[:, :, 8:16, 8:24].abs().sum()) == 0 and torch.equal(m.y[:, :, :8], y[:, :, :8])
    assert torch.equal(m.y, m.lifted)
    assert torch.allclose(m.residual(y), torch.zeros_like(y)), "y = A(x) for the photo itself"


@pytest.mark.parametrize(("spec", "size", "fix"), [
    ({"type": "identity"}, (30, 48), "Crop or pad the photo to a multiple of 8 pixels."),
    ({"type": "super_resolution", "factor": 4}, (7, 8), "its size times the factor is a multiple of 8"),
])
def test_sizes_that_do_not_fit_the_vae_name_the_image(spec, size, fix):
    with pytest.raises(MeasurementError) as exc:
        Measurement.from_photo(_photo(h=size[0], w=size[1]), build_degradation(spec), 0.01)
    assert exc.value.field == "image" and "not a multiple of 8" in exc.value.problem and fix in exc.value.fix


def test_box_and_mask_problems_get_their_own_advice():
    box = build_degradation({"type": "box_inpaint", "top": 24, "left": 0, "height": 16, "width": 8})
    with pytest.raises(MeasurementError) as exc:
        Measurement.from_photo(_photo(), box, 0.01)
    assert exc.value.field == "degradation" and "box" in exc.value.fix and "mask" not in exc.value.fix
    drawn = build_degradation({"type": "mask_inpaint"}, mask=torch.ones(2, 32, 48))
    with pytest.raises(MeasurementError) as exc:
        Measurement.from_photo(_photo(b=1), drawn, 0.01)
    assert exc.value.field == "degradation" and "the mask has a batch of 2" in exc.value.problem
    assert exc.value.reason == "mask_batch" and exc.value.fix == "Use one mask."
    assert "box" not in exc.value.fix
    wrong = build_degradation({"type": "mask_inpaint"}, mask=torch.ones(16, 16))
    with pytest.raises(MeasurementError, match="resize the mask to the image"):
        Measurement.from_photo(_photo(), wrong, 0.01)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_photos_are_refused(bad):
    y = _photo()
    y[0, 1, 2, 3] = bad
    with pytest.raises(MeasurementError, match="1 NaN or infinite") as exc:
        Measurement.from_photo(y, build_degradation({"type": "identity"}), 0.01)
    assert exc.value.field == "image"


def test_noise_travels_with_the_measurement_and_simulate_matches_add_noise():
    with pytest.raises(ValueError, match="finite number >= 0"):
        GaussianNoise(float("nan"))
    with pytest.raises(ValueError):
        GaussianNoise(-0.1)
    x = _photo(b=2, h=32, w=32)
    sr = build_degradation({"type": "super_resolution", "factor": 2})
    m = Measurement.simulate(x, sr, 0.05, seed=3)
    assert torch.equal(m.y, add_noise(sr(x), 0.05, seed=3).clamp(0, 1))
    assert m.lifted.shape == x.shape and m.noise_sigma == 0.05
    assert torch.equal(GaussianNoise(0.05)(sr(x), seed=3), add_noise(sr(x), 0.05, seed=3))


def test_protocol_is_what_callers_read():
    members = {"type_name", "is_linear", "same_size", "is_inpainting", "needs_mask", "spec", "name", "A",
               "A_adjoint", "lift", "pixel_mask", "measurement_shape", "restored_size", "naive_latent"}
    assert members <= set(dir(DegradationLike)) | set(DegradationLike.__annotations__)

    class NotADegradation:
        type_name = "x"

    assert not isinstance(NotADegradation(), DegradationLike)
    assert LATENT_CLAMP == 4.0
