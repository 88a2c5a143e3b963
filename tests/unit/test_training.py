"""Operator training in pure torch, with a small fixed convolutional 'encoder' standing in for a VAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skdata

from comfyui_silo.operators.degradations import build_degradation
from comfyui_silo.operators.network import LatentOperator
from comfyui_silo.operators.training import (
    TrainingDataError,
    TrainSettings,
    TrainState,
    _settings,
    _training_degradation,
    evaluate,
    format_report,
    prepare_heldout,
    train_operator,
)

pytestmark = pytest.mark.unit


def photos(n_max: int = 8) -> list[torch.Tensor]:
    """Real photographs bundled with scikit-image, as [3,H,W] in [0,1]."""
    out = []
    # natural photos last: tests hold out the last images
    for name in ("immunohistochemistry", "retina", "hubble_deep_field", "rocket", "motorcycle_left", "astronaut",
                 "coffee", "chelsea"):
        try:
            im = getattr(skdata, name)()
        except Exception:  # optional data files may be missing
            continue
        if im.ndim == 3 and im.shape[-1] >= 3:
            t = torch.from_numpy(np.ascontiguousarray(im[..., :3])).permute(2, 0, 1).float() / 255.0
            out.append(t)
        if len(out) == n_max:
            break
    assert len(out) >= 4, "scikit-image's sample photographs are needed"
    return out


class ToyEncoder(torch.nn.Module):
    """A fixed random 'VAE encoder': /8 downsampling, 4 channels, a nonlinearity — enough to make H non-trivial."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.c1 = torch.nn.Conv2d(3, 16, 4, stride=4)
        self.c2 = torch.nn.Conv2d(16, 4, 2, stride=2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.requires_grad_(False)

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x * 2 - 1)))


@pytest.fixture(scope="module")
def imgs():
    return photos()


@pytest.fixture(scope="module")
def encoder():
    return ToyEncoder()


def test_trained_blur_operator_beats_both_trivial_baselines(imgs, encoder):
    deg = build_degradation({"type": "gaussian_blur", "kernel_size": 21, "sigma": 3.0})
    res = train_operator(encoder, deg, imgs, steps=250, batch_size=8, crop_size=64, learning_rate=2e-3, eval_every=125,
                         heldout_fraction=0.25, seed=0, operator=LatentOperator(width=32))
    ev = res.report["heldout"]
    best_trivial = min(ev["identity"]["l1"], ev["naive_latent"]["l1"])
    # The toy encoder throws most of each 8x8 patch away, so E(blur(x)) is only partly predictable from E(x):
    # the reachable error is ~70% of the trivial baselines' (a 600-step run plateaus there too).
    assert ev["operator"]["l1"] < 0.8 * best_trivial, format_report(res.report)
    assert res.report["beats_identity"] and res.report["beats_naive_latent"]
    assert [c["step"] for c in res.report["curve"]] == [125, 250]
    assert res.report["heldout_images"] == 2 and res.report["images"] == len(imgs) - 2
    text = format_report(res.report)
    assert "of the best trivial baseline (degradation-on-latent" in text and "%" in text, text
    assert res.report["fidelity"]["verdict"]["level"] in ("good", "usable"), text
    assert not any(p.requires_grad for p in res.operator.parameters())


def _centre_mask(size: int = 64) -> torch.Tensor:
    m = torch.zeros(1, 1, size, size)
    m[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    return m


def test_inpainting_operator_uses_the_mask_and_beats_baselines(imgs, encoder):
    deg = build_degradation({"type": "mask_inpaint"}, mask=_centre_mask(128))
    res = train_operator(encoder, deg, imgs, steps=200, batch_size=8, crop_size=64, learning_rate=2e-3, eval_every=200,
                         heldout_fraction=0.25, seed=1, operator=LatentOperator(width=32, use_mask=True))
    assert res.operator.use_mask
    ev = res.report["heldout"]
    assert ev["operator"]["l1"] < 0.8 * min(ev["identity"]["l1"], ev["naive_latent"]["l1"]), format_report(res.report)


def test_mask_inpaint_trains_with_the_users_mask_not_random_rectangles():
    g = torch.Generator().manual_seed(0)
    deg = build_degradation({"type": "mask_inpaint"}, mask=_centre_mask(128))
    crops = _training_degradation(deg, 5, 64, g)
    m = crops.pixel_mask((5, 3, 64, 64))
    assert torch.equal(m, _centre_mask(64).expand(5, -1, -1, -1)), "each crop gets the user's mask, resized"
    # a batch of masks: each crop gets one of them
    two = torch.cat([_centre_mask(128), torch.zeros(1, 1, 128, 128)])
    m = _training_degradation(build_degradation({"type": "mask_inpaint"}, mask=two), 16, 64, g).pixel_mask(
        (16, 3, 64, 64))
    sums = {float(s) for s in m.flatten(1).sum(1)}
    assert sums == {0.0, 32.0 * 32.0}
    box = build_degradation({"type": "box_inpaint", "top": 0, "left": 0, "height": 8, "width": 8})
    assert _training_degradation(box, 2, 64, g) is box, "only caller-drawn masks are replaced per crop"


def test_same_seed_same_operator_and_exact_resume(imgs, encoder, tmp_path):
    deg = build_degradation({"type": "super_resolution", "factor": 4})
    kw = dict(batch_size=4, crop_size=64, learning_rate=1e-3, eval_every=5, heldout_fraction=0.25, seed=7, ema_decay=0.9)
    full = train_operator(encoder, deg, imgs, steps=10, operator_config={"width": 16}, **kw)
    again = train_operator(encoder, deg, imgs, steps=10, operator_config={"width": 16}, **kw)
    for a, b in zip(full.operator.state_dict().values(), again.operator.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    state_file = tmp_path / "state.safetensors"
    train_operator(encoder, deg, imgs, steps=5, operator_config={"width": 16}, state_path=state_file, **kw)
    state = TrainState.load(state_file)
    assert state.step == 5 and state.ema is not None
    resumed = train_operator(encoder, deg, imgs, steps=10, operator_config={"width": 16}, resume=state_file, **kw)
    assert resumed.report["resumed_from"] == 5
    for a, b in zip(full.operator.state_dict().values(), resumed.operator.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [c["step"] for c in resumed.report["curve"]] == [5, 10]


def test_pool_mode_encodes_once_and_trains(imgs, encoder):
    calls = []

    def counting_encoder(x):
        calls.append(x.shape[0])
        return encoder(x)

    deg = build_degradation({"type": "gaussian_blur", "kernel_size": 21, "sigma": 3.0})
    res = train_operator(counting_encoder, deg, imgs, steps=100, batch_size=8, pool_size=64, crop_size=64, learning_rate=2e-3,
                         eval_every=100, heldout_fraction=0.25, seed=0, operator_config={"width": 32})
    # pool (64 inputs + 64 targets) and the held-out set: nothing is encoded during the 100 steps
    # +1: the probe that reads the latent channels; held-out: 2 images x 5 fixed crops x (input, target)
    assert sum(calls) == 64 * 2 + 2 * 5 * 2 + 1, calls
    z = torch.randn(2, 4, 8, 8)
    assert not torch.allclose(res.operator(z), z), "the operator must have moved away from the identity"
    assert [c["step"] for c in res.report["curve"]] == [100]


def test_progress_and_interrupt(imgs, encoder):
    seen = []

    class Stop(Exception):
        pass

    def should_stop():
        if len(seen) >= 3:
            raise Stop

    deg = build_degradation({"type": "identity"})
    with pytest.raises(Stop):
        train_operator(encoder, deg, imgs, steps=50, batch_size=2, crop_size=32, heldout_fraction=0, pool_size=0,
                       progress=lambda s, n, info: seen.append((s, n)), should_stop=should_stop,
                       operator=LatentOperator(width=8))
    assert seen == [(1, 50), (2, 50), (3, 50)]
    # with a pool (the default), its encoding reports progress too and can be stopped
    phases = []
    with pytest.raises(Stop):
        train_operator(encoder, deg, imgs, steps=50, batch_size=2, crop_size=32, heldout_fraction=0, pool_size=64,
                       progress=lambda s, n, info: phases.append(info), should_stop=lambda: len(phases) >= 3 and
                       (_ for _ in ()).throw(Stop()), operator=LatentOperator(width=8))
    assert [p["encoded"] for p in phases] == [2, 4, 6] and all(p["phase"] == "encoding" for p in phases)


@pytest.mark.parametrize(("opts", "field"), [
    ({"steps": 0}, "steps"), ({"loss": "huber"}, "loss"), ({"crop_size": 30}, "crop_size"),
    ({"lr_schedule": "step"}, "lr_schedule"), ({"min_noise_sigma": 0.1, "max_noise_sigma": 0.0}, "min_noise_sigma"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"pool_size": 1, "batch_size": 4}, "pool_size"), ({"not_an_option": 1}, "not_an_option"),
    ({"ema_decay": 1.0}, "ema_decay"),
])
def test_bad_options_name_the_field(imgs, encoder, opts, field):
    calls = []
    with pytest.raises(ValueError, match=field) as info:
        train_operator(lambda x: calls.append(x) or encoder(x), {"type": "identity"}, imgs, **opts)
    assert getattr(info.value, "field", field) == field
    assert not calls, "settings are checked before anything is encoded"


def test_images_too_small_for_the_crop_are_refused(encoder):
    with pytest.raises(ValueError, match="too small for crop_size"):
        train_operator(encoder, {"type": "identity"}, torch.rand(3, 3, 40, 40), crop_size=256, heldout_fraction=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_training_images_are_refused_before_training(encoder, bad):
    images = torch.rand(3, 3, 64, 64)
    images[1, 0, 5, 5] = bad
    calls = []
    with pytest.raises(TrainingDataError, match="training image 1 has 1 NaN or infinite") as info:
        train_operator(lambda x: calls.append(x) or encoder(x), {"type": "identity"}, images, crop_size=32)
    assert info.value.field == "images" and not calls
    with pytest.raises(TrainingDataError, match="NaN") as info:
        train_operator(encoder, {"type": "identity"}, torch.rand(3, 3, 64, 64), crop_size=32, heldout_images=images)
    assert info.value.field == "heldout_images"


def test_settings_declared_once_round_trip_and_defaults():
    cfg = TrainSettings(steps=3, min_noise_sigma=0.0, max_noise_sigma=0.02)
    d = cfg.as_dict()
    assert d["max_noise_sigma"] == 0.02 and d["steps"] == 3 and cfg.sigma_range == (0.0, 0.02)
    assert TrainSettings.from_values(cfg.widget_values()) == cfg
    assert TrainSettings().steps == 1000, "the node's default (saved workflows) is the default everywhere"
    assert TrainSettings.from_values({"pool_size": 0}).pool_size is None, "0 on the node means off"
    widgets = [s.name for s in TrainSettings.specs() if s.widget]
    assert widgets == ["steps", "batch_size", "crop_size", "learning_rate", "max_noise_sigma", "pool_size", "seed"]


def test_resume_files_with_the_earlier_setting_names_still_load():
    """Resume files written by the earlier ``TrainConfig`` store ``lr``, ``sigma_range`` and ``crop_scale``."""
    old = {"lr": 2e-3, "sigma_range": [0.0, 0.03], "crop_scale": [0.5, 0.9], "steps": 7, "retired": 1}
    state = TrainState(step=3, operator={}, ema=None, optimizer={}, config=old)
    cfg = _settings(None, {"steps": 20}, state)
    assert (cfg.learning_rate, cfg.sigma_range, cfg.crop_scale, cfg.steps) == (2e-3, (0.0, 0.03), (0.5, 0.9), 20)
    with pytest.raises(ValueError, match="sigma_range") as info:
        _settings(None, {}, TrainState(step=3, operator={}, ema=None, optimizer={}, config={"sigma_range": 0.1}))
    assert info.value.field == "sigma_range"
    with pytest.raises(ValueError, match="no setting 'lr'"):
        train_operator(lambda x: x, {"type": "identity"}, torch.rand(2, 3, 64, 64), lr=1e-3)


def test_training_works_for_sixteen_channel_latents(imgs, tmp_path):
    """SD3/Flux VAEs have 16 latent channels: the operator takes its width from the encoder, and the file round
    trips with the family named."""
    from comfyui_silo.operators.io import load_operator, read_operator_metadata, save_operator

    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 8, stride=8), torch.nn.Tanh()).requires_grad_(False)
    deg = build_degradation({"type": "super_resolution", "factor": 2})
    res = train_operator(enc, deg, imgs, steps=3, batch_size=2, crop_size=32, heldout_fraction=0.25, eval_every=3,
                         operator_config={"width": 8})
    assert res.operator.latent_channels == 16 and res.report["heldout"] is not None
    sd3 = {"latent_channels": 16, "scale_factor": 1.5305, "shift_factor": 0.0609, "downscale": 8}
    path = save_operator(tmp_path / "sr2_sd3.safetensors", res.operator, degradation=deg.spec, latent_format=sd3,
                         training=res.report)
    assert read_operator_metadata(path)["latent_format"]["name"] == "SD3"
    z = torch.randn(1, 16, 6, 5)
    assert torch.equal(load_operator(path)(z, 0.01), res.operator(z, 0.01))


def test_downscale_is_read_from_the_encoder_and_the_report_shows_decoded_fidelity(imgs):
    """A 4x 'autoencoder' (pixel unshuffle, exactly invertible): the report names downscale 4, the naive baseline
    blurs the latent with sigma / 4 (not / 8), and with the decoder the report adds PSNR/SSIM next to the floor,
    the gap closed and the verdict, on the node's text and the chart."""
    from comfyui_silo.operators.charts import training_curve_chart

    encode = lambda x: torch.nn.functional.pixel_unshuffle(x, 4) - 0.5  # noqa: E731
    decode = lambda z: torch.nn.functional.pixel_shuffle(z + 0.5, 4)  # noqa: E731
    spec = {"type": "gaussian_blur", "kernel_size": 21, "sigma": 3.0}
    res = train_operator(encode, spec, imgs, steps=60, batch_size=4, crop_size=32, pool_size=32, eval_every=60,
                         heldout_fraction=0.25, decode=decode, operator_config={"width": 16, "num_blocks": 1,
                                                                                "decoder_width": 16})
    rep = res.report
    assert rep["downscale"] == 4 and rep["architecture"] == "PhysicsOperator"
    assert res.operator.config["downscale"] == 4
    held = rep["fidelity"]["latent"]
    deg = build_degradation(spec)
    again = prepare_heldout(encode, deg, imgs[-rep["heldout_images"]:], 32, 0.0, 0, area=0.65)
    at4, at8 = (evaluate(res.operator, deg, again, s)["naive_latent"]["rel_l2"] for s in (4, 8))
    assert held["naive_latent"]["rel_l2"] == pytest.approx(at4) and abs(at4 - at8) > 1e-3
    dec = rep["fidelity"]["decoded"]
    assert dec["floor"]["psnr"] > 90, "an exact autoencoder's floor is perfect"
    assert dec["operator"]["psnr"] > dec["identity"]["psnr"] and 0 < dec["gap_closed"] <= 1
    text = format_report(rep)
    assert "VAE floor" in text and "gap closed" in text and rep["fidelity"]["verdict"]["text"] in text
    assert rep["steps_per_second"] > 0 and rep["encodes_per_second"] > 0 and rep["encodes"] == 64
    assert training_curve_chart(rep).size == (640, 400)


def test_autoencoder_precision_runs_the_encoder_and_decoder_under_bf16_autocast_where_the_cpu_is_fast(
        imgs, encoder, monkeypatch):
    """``autoencoder_precision``: bfloat16 runs every encode and the report's decodes under bf16 autocast (the
    callables still return float32), float32 leaves them alone, and auto picks bf16 only on a CPU with AMX or
    AVX512-BF16 (never on a GPU, where the host's VAE dtype decides); the report names what was used."""
    from comfyui_silo.operators import training

    seen = {"encode": set(), "decode": set()}

    def enc(x):
        seen["encode"].add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return encoder(x)

    def dec(z):
        seen["decode"].add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return torch.nn.functional.interpolate(z[:, :3], scale_factor=8).sigmoid()

    spec = {"type": "gaussian_blur", "kernel_size": 21, "sigma": 3.0}
    common = dict(steps=4, batch_size=4, crop_size=64, pool_size=8, eval_every=4, heldout_fraction=0.25, decode=dec,
                  operator_config={"width": 16, "num_blocks": 1, "decoder_width": 16})
    res = train_operator(enc, spec, imgs, autoencoder_precision="bfloat16", **common)
    assert seen == {"encode": {torch.bfloat16}, "decode": {torch.bfloat16}}
    assert res.report["autoencoder_dtype"] == "bfloat16"
    assert res.report["fidelity"]["latent"]["operator"]["rel_l2"] > 0

    seen = {"encode": set(), "decode": set()}
    res = train_operator(enc, spec, imgs, autoencoder_precision="float32", **common)
    assert seen == {"encode": {None}, "decode": {None}} and res.report["autoencoder_dtype"] == "as given"

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for amx, bf16 in ((True, False), (False, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda bf16=bf16: bf16)
        want = torch.bfloat16 if amx or bf16 else None
        assert training.autoencoder_dtype("auto", cpu) == want
        assert training.autoencoder_dtype("auto", gpu) is None
        assert training.autoencoder_dtype("float32", cpu) is None
        assert training.autoencoder_dtype("bfloat16", gpu) == torch.bfloat16
    assert TrainSettings().autoencoder_precision == "auto"
