"""Unit tests for comfyui_silo.operators.degradations (pure torch, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from PIL import Image

from comfyui_silo.operators.degradations import (
    DEFAULT_MEASUREMENT_NOISE,
    DEGRADATION_TYPES,
    STANDARD_DEGRADATIONS,
    Degradation,
    SpecFieldError,
    add_noise,
    build_degradation,
)

pytestmark = pytest.mark.unit


def _rand(*shape, dtype=torch.float64, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------------
# Gaussian blur vs scipy
# ------------------------------------------------------------------------------------------


def _scipy_blur(x: torch.Tensor, sigma: float, ks: int) -> np.ndarray:
    a = x.double().numpy()
    out = np.empty_like(a)
    for b in range(a.shape[0]):
        for c in range(a.shape[1]):
            out[b, c] = ndi.gaussian_filter(a[b, c], sigma, mode="reflect", truncate=(ks // 2) / sigma)
    return out


@pytest.mark.parametrize(
    ("shape", "ks", "sigma"),
    [((2, 3, 24, 20), 61, 3.0), ((1, 3, 70, 53), 61, 3.0), ((1, 3, 16, 33), 9, 1.7), ((1, 3, 5, 1), 61, 3.0),
     ((1, 3, 12, 12), 1, 0.5)],
)
def test_blur_matches_scipy_reflect(shape, ks, sigma):
    op = build_degradation({"type": "gaussian_blur", "kernel_size": ks, "sigma": sigma})
    x = _rand(*shape)
    ref = _scipy_blur(x, sigma, ks)
    y64 = op(x)
    assert y64.shape == x.shape and y64.dtype == torch.float64
    assert np.abs(y64.numpy() - ref).max() < 1e-12
    y32 = op(x.float())
    assert y32.dtype == torch.float32
    assert np.abs(y32.double().numpy() - ref).max() < 1e-4


def test_blur_kernel_is_normalised_and_default_size():
    op = build_degradation({"type": "gaussian_blur", "sigma": 3.0})
    assert op.spec == {"type": "gaussian_blur", "kernel_size": 61, "sigma": 3.0}
    k = op.kernel1d()
    assert k.numel() == 61 and abs(float(k.sum()) - 1.0) < 1e-14
    x = torch.full((1, 3, 20, 20), 0.37, dtype=torch.float64)
    assert torch.allclose(op(x), x, atol=1e-14)  # constant image unchanged (normalised, symmetric boundary)
    assert op.name == "Gaussian blur σ=3.0 (61×61)"


# ------------------------------------------------------------------------------------------
# Super-resolution vs PIL
# ------------------------------------------------------------------------------------------


def _pil_bicubic(x: torch.Tensor, size_hw) -> np.ndarray:
    a = x.double().numpy()
    out = np.empty((a.shape[0], a.shape[1], *size_hw))
    for b in range(a.shape[0]):
        for c in range(a.shape[1]):
            im = Image.fromarray(a[b, c].astype(np.float32))
            assert im.mode == "F"
            out[b, c] = np.asarray(im.resize((size_hw[1], size_hw[0]), Image.Resampling.BICUBIC))
    return out


@pytest.mark.parametrize("factor", [4, 8])
def test_super_resolution_matches_pil(factor):
    # PIL's BICUBIC on a downscale is the antialiased a=-0.5 cubic with edge-renormalised weights, the
    # same definition torch's antialias path uses, so the only difference is PIL's float32 arithmetic
    # (input rounded to float32, ~6e-8 relative, plus float32 accumulation): 1e-6 leaves a wide margin
    # while any difference of definition (a=-0.75, no antialias, other edges) is > 1e-3.
    op = build_degradation({"type": "super_resolution", "factor": factor})
    x = _rand(2, 3, 64, 96)
    y = op.linear(x)
    assert y.shape == (2, 3, 64 // factor, 96 // factor)
    ref = _pil_bicubic(x, (64 // factor, 96 // factor))
    assert np.abs(y.numpy() - ref).max() < 1e-6
    yc = op(x)
    assert yc.min() >= 0 and yc.max() <= 1
    assert torch.equal(yc, y.clamp(0, 1))


def test_super_resolution_indivisible_size_raises():
    op = build_degradation({"type": "super_resolution", "factor": 4})
    with pytest.raises(ValueError, match=r"divisible by 4.*30x32"):
        op(torch.rand(1, 3, 30, 32))


def test_super_resolution_lift():
    op = build_degradation({"type": "super_resolution", "factor": 4})
    y = _rand(1, 3, 8, 6)
    up = op.lift(y, size=(32, 24))
    assert up.shape == (1, 3, 32, 24) and up.min() >= 0 and up.max() <= 1
    assert op.lift(y).shape == (1, 3, 32, 24)
    assert torch.equal(build_degradation({"type": "identity"}).lift(y), y)


# ------------------------------------------------------------------------------------------
# Inpainting masks
# ------------------------------------------------------------------------------------------


def test_box_inpaint_exact():
    op = build_degradation({"type": "box_inpaint", "top": 3, "left": 5, "height": 7, "width": 4})
    x = _rand(2, 3, 20, 16, dtype=torch.float32) + 0.01  # strictly positive
    y = op(x)
    assert int((y == 0).sum()) == 2 * 3 * 7 * 4
    assert (y[:, :, 3:10, 5:9] == 0).all()
    keep = torch.ones_like(x, dtype=torch.bool)
    keep[:, :, 3:10, 5:9] = False
    assert torch.equal(y[keep], x[keep])
    pm = op.pixel_mask(x.shape, device="cpu")
    assert pm.shape == (2, 1, 20, 16) and int(pm.sum()) == 2 * 7 * 4
    with pytest.raises(ValueError, match="'left'"):
        op(torch.rand(1, 3, 20, 8))
    with pytest.raises(ValueError, match="'top'"):
        op(torch.rand(1, 3, 9, 16))


def test_random_box_inpaint_reproducible_and_within_margins():
    spec = {"type": "random_box_inpaint", "size": 8, "seed": 0, "margin": 4}
    op = build_degradation(spec)
    shape = (6, 3, 40, 48)
    b1 = op.boxes(shape)
    assert b1 == build_degradation(dict(spec)).boxes(shape)
    assert b1 != build_degradation({**spec, "seed": 1}).boxes(shape)
    assert op.boxes((2, 3, 40, 48)) == b1[:2]  # independent of batch size
    for top, left, h, w in b1:
        assert (h, w) == (8, 8)
        assert 4 <= top <= 40 - 8 - 4 and 4 <= left <= 48 - 8 - 4
    x = _rand(6, 3, 40, 48, dtype=torch.float32) + 0.01
    y = op(x)
    assert torch.equal(y, op(x))
    for i, (top, left, h, w) in enumerate(b1):
        assert int((y[i] == 0).sum()) == 3 * h * w
        assert (y[i, :, top:top + h, left:left + w] == 0).all()
    # the paper's range for 512 images: [16, 240]
    paper = build_degradation(STANDARD_DEGRADATIONS["random_box_inpaint"])
    tops = [t for t, _, _, _ in paper.boxes((64, 3, 512, 512))]
    assert min(tops) >= 16 and max(tops) <= 240
    with pytest.raises(ValueError, match="'size'"):
        op(torch.rand(1, 3, 15, 48))


@pytest.mark.parametrize("mshape", [(16, 12), (1, 16, 12), (2, 16, 12), (1, 1, 16, 12), (2, 1, 16, 12)])
def test_mask_inpaint_shapes(mshape):
    raw = torch.zeros(16, 12)
    raw[2:6, 3:9] = 0.8
    raw[10, 1] = 0.3  # below threshold: kept
    mask = raw.expand(*mshape).clone()
    op = build_degradation({"type": "mask_inpaint"}, mask=mask)
    x = _rand(2, 3, 16, 12, dtype=torch.float32) + 0.01
    y = op(x)
    assert int((y == 0).sum()) == 2 * 3 * 4 * 6
    assert (y[:, :, 2:6, 3:9] == 0).all()
    assert y[0, 0, 10, 1] == x[0, 0, 10, 1]
    assert op.pixel_mask(x.shape, device="cpu").shape == (2, 1, 16, 12)
    assert op.spec == {"type": "mask_inpaint"}


def test_mask_inpaint_errors():
    with pytest.raises(ValueError, match="needs a mask"):
        build_degradation({"type": "mask_inpaint"})
    op = build_degradation({"type": "mask_inpaint"}, mask=torch.ones(16, 12))
    with pytest.raises(ValueError, match=r"mask is 16x12.*image is 20x12"):
        op(torch.rand(1, 3, 20, 12))
    op3 = build_degradation({"type": "mask_inpaint"}, mask=torch.ones(3, 16, 12))
    with pytest.raises(ValueError, match="batch"):
        op3(torch.rand(2, 3, 16, 12))
    with pytest.raises(ValueError, match="mask"):
        build_degradation({"type": "gaussian_blur", "sigma": 1.0}, mask=torch.ones(4, 4))


def test_mask_buffer_moves_with_module():
    op = build_degradation({"type": "mask_inpaint"}, mask=torch.ones(4, 4))
    assert "mask" in dict(op.named_buffers())
    assert op.to(torch.float64).mask.dtype == torch.float64
    assert op(torch.rand(1, 3, 4, 4, dtype=torch.float64)).abs().sum() == 0


# ------------------------------------------------------------------------------------------
# JPEG
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(32, 48), (37, 51)])
def test_jpeg_differentiable(hw):
    op = build_degradation({"type": "jpeg", "quality": 10})
    assert not op.is_linear
    x = _rand(2, 3, *hw, dtype=torch.float32).requires_grad_(True)
    y = op(x)
    assert y.shape == x.shape
    assert y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().max() > 1e-3
    (g,) = torch.autograd.grad((y * torch.linspace(0, 1, y.numel()).view_as(y)).sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    with pytest.raises(ValueError, match="not linear"):
        op.A_adjoint(y.detach(), x.shape)


# ------------------------------------------------------------------------------------------
# adjoints
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "gaussian_blur", "kernel_size": 61, "sigma": 3.0},
        {"type": "gaussian_blur", "kernel_size": 7, "sigma": 1.2},
        {"type": "super_resolution", "factor": 4},
        {"type": "super_resolution", "factor": 8},
        {"type": "box_inpaint", "top": 4, "left": 6, "height": 10, "width": 12},
        {"type": "random_box_inpaint", "size": 8, "seed": 3, "margin": 2},
        {"type": "identity"},
    ],
)
def test_adjoint_identity(spec):
    op = build_degradation(spec)
    assert op.is_linear
    x = torch.randn(2, 3, 32, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ax = op.linear(x)
    y = torch.randn(ax.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    aty = op.A_adjoint(y, x.shape)
    assert aty.shape == x.shape
    lhs, rhs = float((ax * y).sum()), float((x * aty).sum())
    assert abs(lhs - rhs) <= 1e-10 * max(abs(lhs), abs(rhs))


def test_adjoint_mask_inpaint_and_shape_error():
    m = torch.zeros(1, 16, 16)
    m[:, 4:9, 2:12] = 1
    op = build_degradation({"type": "mask_inpaint"}, mask=m)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    y = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert torch.allclose((op(x) * y).sum(), (x * op.A_adjoint(y, x.shape)).sum(), rtol=1e-12)
    sr = build_degradation({"type": "super_resolution", "factor": 4})
    with pytest.raises(ValueError, match="shape"):
        sr.A_adjoint(torch.zeros(1, 3, 5, 5, dtype=torch.float64), (1, 3, 16, 16))


# ------------------------------------------------------------------------------------------
# specs
# ------------------------------------------------------------------------------------------


def test_standard_degradations_roundtrip_json():
    assert set(STANDARD_DEGRADATIONS) == {
        "gaussian_blur", "super_resolution_x4", "super_resolution_x8", "box_inpaint_center",
        "random_box_inpaint", "jpeg_q10",
    }
    assert DEFAULT_MEASUREMENT_NOISE == 0.01
    x = _rand(2, 3, 512, 512, dtype=torch.float32)
    for name, spec in STANDARD_DEGRADATIONS.items():
        op = build_degradation(spec)
        assert isinstance(op, Degradation)
        assert op.spec == spec, name
        op2 = build_degradation(json.loads(json.dumps(op.spec)))
        op3 = build_degradation(op.to_json())
        assert op2.spec == op3.spec == op.spec
        assert isinstance(op.name, str) and op.name
        with torch.no_grad():
            y = op(x)
            assert torch.equal(y, op2(x)), name
        assert y.min() >= 0 and y.max() <= 1


def test_all_types_listed():
    assert set(DEGRADATION_TYPES) == {
        "gaussian_blur", "super_resolution", "box_inpaint", "random_box_inpaint", "mask_inpaint", "jpeg", "identity",
    }
    assert build_degradation({"type": "random_box_inpaint", "size": 256}).spec == STANDARD_DEGRADATIONS[
        "random_box_inpaint"
    ]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"type": "motion_blur"}, "type"),
        ({"kernel_size": 3}, "type"),
        ({"type": "gaussian_blur", "kernel_size": 61, "sigma": -1}, "sigma"),
        ({"type": "gaussian_blur", "kernel_size": 61, "sigma": 0}, "sigma"),
        ({"type": "gaussian_blur", "kernel_size": 61, "sigma": "3"}, "sigma"),
        ({"type": "gaussian_blur", "kernel_size": 60, "sigma": 3.0}, "kernel_size"),
        ({"type": "gaussian_blur", "kernel_size": 0, "sigma": 3.0}, "kernel_size"),
        ({"type": "gaussian_blur", "kernel_size": 6.5, "sigma": 3.0}, "kernel_size"),
        ({"type": "gaussian_blur", "kernel_size": 61}, "sigma"),
        ({"type": "super_resolution", "factor": 1}, "factor"),
        ({"type": "super_resolution", "factor": True}, "factor"),
        ({"type": "super_resolution"}, "factor"),
        ({"type": "jpeg", "quality": 0}, "quality"),
        ({"type": "jpeg", "quality": 101}, "quality"),
        ({"type": "jpeg", "quality": 10, "extra": 1}, "extra"),
        ({"type": "box_inpaint", "top": 0, "left": 0, "height": 8}, "width"),
        ({"type": "box_inpaint", "top": -1, "left": 0, "height": 8, "width": 8}, "top"),
        ({"type": "random_box_inpaint", "size": 8, "margin": -2}, "margin"),
        ({"type": "identity", "sigma": 1}, "sigma"),
        ({"type": "mask_inpaint", "mask": [1]}, "mask"),
    ],
)
def test_bad_specs_raise_naming_field(spec, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        build_degradation(spec, mask=torch.ones(4, 4) if spec.get("type") == "mask_inpaint" else None)


def test_bad_spec_message_is_helpful():
    with pytest.raises(ValueError, match=r"degradation 'gaussian_blur' setting 'sigma' must be at least 0.1, got -1"):
        build_degradation({"type": "gaussian_blur", "kernel_size": 61, "sigma": -1})
    with pytest.raises(ValueError, match="not valid JSON"):
        build_degradation("{oops")
    # the field travels with the error, for front ends that name their own inputs (the Degradation node's widgets)
    for spec, field in (({"type": "gaussian_blur", "kernel_size": 60, "sigma": 3.0}, "kernel_size"),
                        ({"type": "box_inpaint", "top": 0, "left": 0, "height": 8}, "width"),
                        ({"type": "motion_blur"}, "type")):
        with pytest.raises(SpecFieldError) as info:
            build_degradation(spec)
        assert info.value.field == field


# ------------------------------------------------------------------------------------------
# noise
# ------------------------------------------------------------------------------------------


def test_add_noise():
    y = torch.full((2, 3, 128, 128), 0.5)
    n1 = add_noise(y, 0.01, seed=7)
    assert torch.equal(n1, add_noise(y, 0.01, seed=7))
    assert not torch.equal(n1, add_noise(y, 0.01, seed=8))
    assert abs(float((n1 - y).std()) - 0.01) < 3e-4
    assert abs(float((n1 - y).mean())) < 3e-4
    big = add_noise(torch.ones(1, 3, 32, 32), 0.5, seed=0)
    assert big.max() > 1  # not clamped
    g = torch.Generator().manual_seed(7)
    assert torch.equal(add_noise(y, 0.01, generator=g), n1)
    assert torch.equal(add_noise(y, 0.0), y)
    with pytest.raises(ValueError, match="sigma"):
        add_noise(y, -0.1)


# ------------------------------------------------------------------------------------------
# naive latent baselines
# ------------------------------------------------------------------------------------------


def test_naive_latent():
    z = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    blur = build_degradation(STANDARD_DEGRADATIONS["gaussian_blur"])
    zb = blur.naive_latent(z)
    assert zb.shape == z.shape
    tv = lambda t: (t[..., 1:, :] - t[..., :-1, :]).abs().mean()  # noqa: E731
    assert tv(zb) < tv(z)  # smoother
    # sigma 3 / 8 = 0.375 on the latent grid, radius ceil(30 / 8) = 4, same symmetric boundary
    assert np.abs(zb.numpy() - _scipy_blur(z, 0.375, 9)).max() < 1e-12
    strong = build_degradation({"type": "gaussian_blur", "sigma": 16.0}).naive_latent(z)
    assert tv(strong) < 0.5 * tv(z)

    for f in (4, 8):
        sr = build_degradation({"type": "super_resolution", "factor": f})
        zs = sr.naive_latent(z)
        assert zs.shape == z.shape and tv(zs) < tv(z)

    box = build_degradation({"type": "box_inpaint", "top": 32, "left": 64, "height": 64, "width": 48})
    zi = box.naive_latent(z)
    assert (zi[:, :, 4:12, 8:14] == 0).all()
    assert int((zi == 0).sum()) == 2 * 4 * 8 * 6
    m = torch.zeros(128, 192)
    m[:20, :] = 1  # 2.5 latent rows -> rows 0, 1 fully and row 2 half (not > 0.5)
    mi = build_degradation({"type": "mask_inpaint"}, mask=m)
    zm = mi.naive_latent(z)
    assert (zm[:, :, :2] == 0).all() and torch.equal(zm[:, :, 2:], z[:, :, 2:])
    assert torch.equal(box.naive_latent(z, mask=m), zm)

    rb = build_degradation({"type": "random_box_inpaint", "size": 64, "seed": 0, "margin": 16})
    assert int((rb.naive_latent(z) == 0).all(dim=1).sum()) == 2 * 8 * 8

    jpeg = build_degradation(STANDARD_DEGRADATIONS["jpeg_q10"])
    assert torch.equal(jpeg.naive_latent(z), z)
    assert jpeg.pixel_mask(z.shape, "cpu") is None and blur.pixel_mask(z.shape, "cpu") is None


def test_describe_spec_needs_no_mask():
    from comfyui_silo.operators import describe_spec

    assert "Mask inpainting" in describe_spec({"type": "mask_inpaint"})
    assert describe_spec('{"type": "super_resolution", "factor": 8}') == "Super-resolution ×8"


def test_spec_mismatch_tells_wrong_kind_from_other_parameters():
    from comfyui_silo.operators import spec_mismatch

    blur3 = {"type": "gaussian_blur", "kernel_size": 61, "sigma": 3.0}
    assert spec_mismatch(blur3, dict(blur3)) is None
    assert spec_mismatch({"type": "gaussian_blur", "sigma": 3}, blur3) is None, "defaults are filled in first"
    level, why, fields = spec_mismatch(blur3, {"type": "super_resolution", "factor": 4})
    assert level == "error" and "Gaussian blur" in why and "Super-resolution ×4" in why and fields == ("type",)
    assert not spec_mismatch(blur3, {"type": "super_resolution", "factor": 4}).overridable
    # a 61/σ3 blur operator on a 9/σ2 photo: refused by default (overridable), both parameters named
    m = spec_mismatch(blur3, {"type": "gaussian_blur", "kernel_size": 9, "sigma": 2.0})
    assert m.level == "warning" and m.overridable and m.fields == ("kernel_size", "sigma")
    assert "kernel_size 61 vs 9" in m.why and "sigma 3.0 vs 2.0" in m.why
    # an x4 operator on an x8 photo
    m = spec_mismatch({"type": "super_resolution", "factor": 4}, {"type": "super_resolution", "factor": 8})
    assert m.overridable and m.fields == ("factor",) and "×4" in m.why and "×8" in m.why
    assert m[0] == "warning" and m[1] == m.why, "indexing keeps working for callers of the old tuple"
    box = {"type": "box_inpaint", "top": 0, "left": 0, "height": 8, "width": 8}
    assert spec_mismatch({"type": "mask_inpaint"}, box) is None, "a mask operator takes any inpainting mask"
    assert spec_mismatch(box, {"type": "mask_inpaint"})[0] == "error"


def test_spec_mismatch_and_describe_spec_bound_strings_from_files():
    from comfyui_silo.operators import describe_spec, spec_mismatch

    huge = "x" * 5_000_000
    m = spec_mismatch({"type": huge}, {"type": "jpeg", "quality": 10})
    assert m.level == "error" and len(m.why) < 1000
    m = spec_mismatch({"type": "jpeg", "quality": huge}, {"type": "jpeg", "quality": 10})
    assert m.overridable and len(m.why) < 1000
    m = spec_mismatch({"type": "jpeg", "quality": 10, huge: 1}, {"type": "jpeg", "quality": 10})
    assert m is not None and len(m.why) < 1000
    assert len(describe_spec({"type": huge})) < 200


# ------------------------------------------------------------------------------------------
# one declaration per type, properties instead of type strings
# ------------------------------------------------------------------------------------------


def test_registry_derives_types_fields_and_inpaint_set_from_the_classes():
    from comfyui_silo.operators.degradations import DEGRADATIONS, INPAINT_TYPES

    assert DEGRADATION_TYPES == tuple(c.type_name for c in DEGRADATIONS)
    assert INPAINT_TYPES == {"box_inpaint", "random_box_inpaint", "mask_inpaint"}
    for cls in DEGRADATIONS:
        names = [s.name for s in cls.field_specs()]
        assert set(cls.required) <= set(names), cls
        if cls.needs_mask:
            continue
        # a spec with the declared defaults builds, and its normalised spec lists exactly the declared fields
        spec = {"type": cls.type_name, **{s.name: s.default for s in cls.field_specs()}}
        assert list(build_degradation(spec).spec) == ["type", *names]
    blur = next(c for c in DEGRADATIONS if c.type_name == "gaussian_blur")
    ks = {s.name: s for s in blur.field_specs()}["kernel_size"]
    assert (ks.default, ks.min, ks.max, ks.step) == (61, 1, 255, 2)


def test_properties_replace_type_strings():
    from comfyui_silo.operators.physics import DegradationLike

    x_shape = (1, 3, 64, 64)
    for spec, linear, same, inpaint in (
        ({"type": "gaussian_blur", "sigma": 1.0}, True, True, False),
        ({"type": "super_resolution", "factor": 4}, True, False, False),
        ({"type": "box_inpaint", "top": 0, "left": 0, "height": 8, "width": 8}, True, True, True),
        ({"type": "random_box_inpaint", "size": 8}, True, True, True),
        ({"type": "jpeg", "quality": 50}, False, True, False),
        ({"type": "identity"}, True, True, False),
    ):
        op = build_degradation(spec)
        assert isinstance(op, DegradationLike)
        assert (op.is_linear, op.same_size, op.is_inpainting, op.needs_mask) == (linear, same, inpaint, False), spec
        assert (op.pixel_mask(x_shape) is not None) == inpaint
        assert op.restored_size(op.measurement_shape(x_shape)[-2:]) == (64, 64)
        x = _rand(*x_shape, dtype=torch.float32)
        assert torch.equal(op.A(x), op(x))
    mask_op = build_degradation({"type": "mask_inpaint"}, mask=torch.ones(8, 8))
    assert mask_op.needs_mask and mask_op.is_inpainting and isinstance(mask_op, DegradationLike)


def test_blur_default_kernel_is_capped_at_the_declared_maximum():
    assert build_degradation({"type": "gaussian_blur", "sigma": 2}).kernel_size == 41
    assert build_degradation({"type": "gaussian_blur", "sigma": 20}).kernel_size == 255
    with pytest.raises(SpecFieldError, match="at most 255"):
        build_degradation({"type": "gaussian_blur", "kernel_size": 257, "sigma": 20})
    with pytest.raises(SpecFieldError, match="'sigma'"):
        build_degradation({"type": "gaussian_blur", "sigma": "wide"})


def test_mask_batch_advice_reads_well():
    op = build_degradation({"type": "mask_inpaint"}, mask=torch.ones(2, 8, 8))
    with pytest.raises(ValueError, match="batch size 2 but the image batch is 1; use a single mask"):
        op(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="mask contains NaN"):
        build_degradation({"type": "mask_inpaint"}, mask=torch.full((8, 8), float("nan")))
