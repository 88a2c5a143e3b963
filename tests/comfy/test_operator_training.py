"""In-process tier: operator training against the random SD1.5 VAE, the training node and the loader node."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.comfy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_training import photos  # noqa: E402  (real photographs from scikit-image)


def _host_module(comfy_host, name):
    """A module of our pack as the host loaded it (custom_nodes/comfyui-silo/...)."""
    for key, mod in sys.modules.items():
        if key.endswith("comfyui-silo." + name) or key.endswith("comfyui-silo/" + name):
            return mod
    raise AssertionError(f"host did not load {name}")


@pytest.mark.slow
def test_operator_trained_on_the_random_sd15_vae_beats_trivial_baselines(comfy_host, sd15_small):
    from comfyui_silo.operators.degradations import build_degradation
    from comfyui_silo.operators.io import load_operator, save_operator
    from comfyui_silo.operators.training import format_report, train_operator

    bridge = _host_module(comfy_host, "nodes.host")
    model, _clip, vae = sd15_small
    encode = bridge.make_encoder(vae, model)
    # Inpainting with a user-drawn mask (two painted regions; training uses that mask, resized to the crops): the
    # random VAE's latents of the missing region are predictable, so the operator can show what it learned. (With
    # random VAE weights a blur is barely predictable from E(x): an operator stays near the identity's error.)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:40, 8:30] = 1
    mask[..., 40:56, 36:60] = 1
    deg = build_degradation({"type": "mask_inpaint"}, mask=mask)
    imgs = photos()
    res = train_operator(encode, deg, imgs, steps=300, batch_size=8, pool_size=192, crop_size=64, learning_rate=1e-3,
                         crop_scale_min=0.02, crop_scale_max=0.2, max_noise_sigma=0.01, eval_every=150,
                         heldout_fraction=0.25, seed=0, operator_config={"width": 32})
    ev = res.report["heldout"]
    best = min(ev["identity"]["l1"], ev["naive_latent"]["l1"])
    assert ev["operator"]["l1"] < 0.85 * best, format_report(res.report)

    # save -> load reproduces the outputs bit-exactly
    path = comfy_host.base / "models" / "latent_operators" / "test_blur_roundtrip.safetensors"
    lf = bridge.latent_format_info(model, vae)
    assert lf["name"] == "SD15" and lf["scale_factor"] == pytest.approx(0.18215)
    save_operator(path, res.operator, degradation=deg.spec, latent_format=lf, training=res.report)
    loaded = load_operator(path)
    z = torch.randn(2, 4, 8, 12)
    mask = (torch.rand(2, 1, 64, 96) > 0.5).float()
    assert torch.equal(res.operator(z, sigma_y=0.01, mask=mask), loaded(z, sigma_y=0.01, mask=mask))
    path.unlink()


def test_training_node_writes_a_file_the_loader_lists_and_loads(comfy_host, sd15_small, monkeypatch):
    import sys

    import comfy.utils
    import folder_paths

    model, _clip, vae = sd15_small
    (deg,) = comfy_host.run_node("SILODegradation", type="super_resolution", blur_kernel_size=61, blur_sigma=3.0,
                                 sr_factor=4, box_top=0, box_left=0, box_height=8, box_width=8, random_box_size=16,
                                 random_box_seed=0, jpeg_quality=10)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 64, 64, 3, generator=g)
    op, report, curve = comfy_host.run_node("SILOTrainLatentOperator", images=images, model=model, vae=vae,
                                            degradation=deg, steps=4, batch_size=2, crop_size=64, learning_rate=1e-3,
                                            max_noise_sigma=0.05, pool_size=4, seed=0, filename="ci/sr4_tiny")
    assert "saved sr4_tiny" in report and "held-out latent error" in report
    # the node has the VAE: the report gives decoded fidelity next to the VAE's own floor, and a verdict
    assert "VAE floor" in report and "gap closed" in report, report
    assert any(report.splitlines()[-1].startswith(v) for v in ("good", "usable", "WARNING")), report
    # the training curve: an IMAGE chart with the operator's line and the two baselines in distinct colours
    assert curve.ndim == 4 and curve.shape[0] == 1 and curve.shape[-1] == 3 and curve.shape[1] >= 200
    colours = {tuple(c) for c in (curve[0] * 255).round().reshape(-1, 3).int().tolist()}
    assert len(colours) > 20, "a chart, not a blank or one-colour image"
    assert op.latent_format["name"] == "SD15" and op.degradation["factor"] == 4
    names = folder_paths.get_filename_list("latent_operators")
    assert "ci/sr4_tiny.safetensors" in names
    loader = comfy_host.node_class("SILOLatentOperatorLoader")
    assert loader.validate_inputs(operator_name="ci/sr4_tiny.safetensors") is True
    (loaded,) = comfy_host.run_node("SILOLatentOperatorLoader", operator_name="ci/sr4_tiny.safetensors")
    z = torch.randn(1, 4, 8, 8)
    assert torch.equal(loaded(z, sigma_y=0.02), op(z, sigma_y=0.02))
    shown = comfy_host.last_ui["text"][0]
    assert "super-resolution" in shown.lower() or "×4" in shown
    # the loader shows what the file says about the operator's quality: the same numbers and verdict
    assert "architecture: PhysicsOperator" in shown and "VAE floor" in shown, shown
    assert report.splitlines()[-1] in shown, (report, shown)
    # a second run never overwrites the first file; its bar moves during encoding too, and never back (issue 19)
    texts, bar = [], []
    operator_nodes = sys.modules[comfy_host.node_class("SILOTrainLatentOperator").__module__]  # as the host loaded it
    monkeypatch.setattr(operator_nodes, "progress_text", texts.append)
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: bar.append((value, total)))
    try:
        _op, report2, _curve = comfy_host.run_node(
            "SILOTrainLatentOperator", images=images, model=model, vae=vae, degradation=deg, steps=2, batch_size=2,
            crop_size=64, learning_rate=1e-3, max_noise_sigma=0.05, pool_size=4, seed=0, filename="ci/sr4_tiny")
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert "ci/sr4_tiny_2.safetensors" in folder_paths.get_filename_list("latent_operators")
    assert report2.startswith("saved sr4_tiny_2.safetensors"), "the node's text names the saved file"
    assert texts == ["encoding 4 training pairs", "training 2 steps"]
    assert {t for _, t in bar} == {6} and bar[0] == (2, 6) and bar[-1] == (6, 6), bar
    assert all(b[0] >= a[0] for a, b in zip(bar, bar[1:], strict=False)), bar


def test_loader_refuses_a_file_that_is_not_an_operator(comfy_host, small_checkpoint):
    import folder_paths

    bogus = Path(folder_paths.get_folder_paths("latent_operators")[0]) / "not_an_operator.safetensors"
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.x": torch.zeros(2)}, str(bogus))
    loader = comfy_host.node_class("SILOLatentOperatorLoader")
    msg = loader.validate_inputs(operator_name="not_an_operator.safetensors")
    assert isinstance(msg, str) and "not a comfyui-silo latent operator" in msg
    with pytest.raises(ValueError, match="Latent Degradation Operator.*operator_name"):
        comfy_host.run_node("SILOLatentOperatorLoader", operator_name="not_an_operator.safetensors")
    bogus.unlink()


def test_a_missing_operator_file_says_how_to_get_one(comfy_host):
    loader = comfy_host.node_class("SILOLatentOperatorLoader")
    msg = loader.validate_inputs(operator_name="jpeg_q10_sd15.safetensors")
    assert "is not in models/latent_operators" in msg
    assert "silo_train_operator_from_generated_images" in msg and "train-operator" in msg and "(R)" in msg
    with pytest.raises(ValueError, match="silo_train_operator_from_generated_images.*train-operator"):
        comfy_host.run_node("SILOLatentOperatorLoader", operator_name="jpeg_q10_sd15.safetensors")


def test_training_node_explains_bad_settings(comfy_host, sd15_small):
    model, _clip, vae = sd15_small
    (deg,) = comfy_host.run_node("SILODegradation", type="gaussian_blur", blur_kernel_size=61, blur_sigma=3.0,
                                 sr_factor=4, box_top=0, box_left=0, box_height=8, box_width=8, random_box_size=16,
                                 random_box_seed=0, jpeg_quality=10)
    with pytest.raises(ValueError, match="crop_size.*larger than the images"):
        comfy_host.run_node("SILOTrainLatentOperator", images=torch.rand(2, 32, 32, 3), model=model, vae=vae,
                            degradation=deg, steps=1, batch_size=1, crop_size=64, learning_rate=1e-3,
                            max_noise_sigma=0.0, pool_size=0, seed=0, filename="x")
    with pytest.raises(ValueError, match="at least 2"):
        comfy_host.run_node("SILOTrainLatentOperator", images=torch.rand(1, 64, 64, 3), model=model, vae=vae,
                            degradation=deg, steps=1, batch_size=1, crop_size=64, learning_rate=1e-3,
                            max_noise_sigma=0.0, pool_size=0, seed=0, filename="x")


BLUR_WIDGETS = dict(blur_kernel_size=61, blur_sigma=3.0, sr_factor=4, box_top=0, box_left=0, box_height=8, box_width=8,
                    random_box_size=16, random_box_seed=0, jpeg_quality=10)


def test_degradation_node_builds_each_type_from_its_declared_widgets(comfy_host):
    from comfyui_silo.operators.degradations import DEGRADATIONS

    for cls in DEGRADATIONS:
        if cls.needs_mask:
            (deg,) = comfy_host.run_node("SILODegradation", type=cls.type_name, mask=torch.ones(1, 8, 8),
                                         **BLUR_WIDGETS)
        else:
            (deg,) = comfy_host.run_node("SILODegradation", type=cls.type_name, **BLUR_WIDGETS)
        assert deg.type_name == cls.type_name
        for spec in cls.field_specs():
            if spec.widget:
                assert deg.spec[spec.name] == BLUR_WIDGETS[cls.widget_prefix + spec.name]
    with pytest.raises(ValueError, match=r"Degradation \(SILO\): input 'blur_kernel_size'.*odd"):
        comfy_host.run_node("SILODegradation", type="gaussian_blur", **dict(BLUR_WIDGETS, blur_kernel_size=60))
    with pytest.raises(ValueError, match=r"input 'mask'.*needs a mask"):
        comfy_host.run_node("SILODegradation", type="mask_inpaint", **BLUR_WIDGETS)


def _train(comfy_host, sd15_small, **changes):
    model, _clip, vae = sd15_small
    (deg,) = comfy_host.run_node("SILODegradation", type="gaussian_blur", **BLUR_WIDGETS)
    kw = dict(images=torch.rand(2, 64, 64, 3), model=model, vae=vae, degradation=deg, steps=1_000_000, batch_size=1,
              crop_size=64, learning_rate=1e-3, max_noise_sigma=0.0, pool_size=0, seed=0, filename="never_written")
    kw.update(changes)
    return comfy_host.run_node("SILOTrainLatentOperator", **kw)


@pytest.mark.parametrize(("filename", "why"), [(".", "'.'"), ("a" * 300, "300 characters long"),
                                               ("..", "'..'"), ("sub/.hidden", "starts with '.'")])
def test_training_node_checks_the_file_name_before_training(comfy_host, sd15_small, filename, why):
    import folder_paths

    folder = Path(folder_paths.get_folder_paths("latent_operators")[0])
    before = sorted(folder.rglob("*"))
    # 1,000,000 steps: were the name checked after training, this test would never end
    with pytest.raises(ValueError, match=rf"Train Latent Operator: input 'filename':.*{why}") as exc:
        _train(comfy_host, sd15_small, filename=filename)
    assert len(str(exc.value)) < 500
    assert sorted(folder.rglob("*")) == before


def test_training_node_refuses_non_finite_images_before_training(comfy_host, sd15_small):
    images = torch.rand(2, 64, 64, 3)
    images[1, 3, 3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"Train Latent Operator: input 'images':.*training image 1 has 1 NaN"):
        _train(comfy_host, sd15_small, images=images)


def test_loader_bounds_file_strings_and_refuses_nan_weights(comfy_host):
    import json

    import folder_paths
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from comfyui_silo.operators.io import save_operator
    from comfyui_silo.operators.network import LatentOperator

    folder = Path(folder_paths.get_folder_paths("latent_operators")[0])
    path = save_operator(folder / "huge_strings.safetensors", LatentOperator(width=8),
                         degradation={"type": "gaussian_blur", "sigma": 3.0},
                         latent_format={"name": "SD15", "latent_channels": 4, "scale_factor": 0.18215})
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    huge = "Z" * 2_000_000  # six of them stay under the 16 MiB header limit
    meta.update(degradation=json.dumps({"type": huge}), created_by=huge,
                latent_format=json.dumps({"name": huge, "latent_channels": 4, "scale_factor": 0.18215}),
                training=json.dumps({"steps": huge, "date": huge, "heldout": {"operator": {"l1": huge}}}))
    save_file(tensors, str(path), metadata=meta)
    comfy_host.run_node("SILOLatentOperatorLoader", operator_name="huge_strings.safetensors")
    text = comfy_host.last_ui["text"][0]
    assert len(text) < 2000 and "ZZZZ" in text
    tensors["stem.weight"][0, 0, 0, 0] = float("nan")
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"operator_name.*huge_strings.safetensors: its weight 'stem.weight' holds "
                                         r"1 NaN") as exc:
        comfy_host.run_node("SILOLatentOperatorLoader", operator_name="huge_strings.safetensors")
    assert len(str(exc.value)) < 1000
    path.unlink()


def test_loader_flags_a_useless_operator_from_an_older_file(comfy_host, sd15_small):
    """A file written before verdicts were stored (held-out L1 only, operator no better than identity) is flagged
    by the loader with a WARNING that names the baseline it fails to beat, and the SILO samplers that use it say so
    on their node too."""
    import folder_paths

    from comfyui_silo.operators.io import save_operator
    from comfyui_silo.operators.network import LatentOperator

    folder = Path(folder_paths.get_folder_paths("latent_operators")[0])
    old_report = {"steps": 300, "images": 8, "date": "2026-01-01",
                  "heldout": {"operator": {"l1": 0.0424}, "identity": {"l1": 0.0423}, "naive_latent": {"l1": 0.0401}}}
    save_operator(folder / "old_useless.safetensors", LatentOperator(width=8),
                  degradation={"type": "gaussian_blur", "kernel_size": 61, "sigma": 3.0},
                  latent_format={"name": "SD15", "latent_channels": 4, "scale_factor": 0.18215}, training=old_report)
    (op,) = comfy_host.run_node("SILOLatentOperatorLoader", operator_name="old_useless.safetensors")
    shown = comfy_host.last_ui["text"][0]
    assert "held-out L1: operator 0.0424 | identity 0.0423 | degradation-on-latent 0.0401" in shown, shown
    assert "WARNING: the operator does not beat the degradation-on-latent baseline" in shown, shown
    silo = _host_module(comfy_host, "nodes.solvers")
    warning = silo.check_operator(sd15_small[0], op, None, "SILO KSampler")
    assert warning.startswith("Operator quality: WARNING: the operator does not beat"), warning
    (folder / "old_useless.safetensors").unlink()
