"""Operator files: save/load round trip, refusal messages, latent-format checks, paper reference CNN import."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comfyui_silo.operators.io import (
    ARCHITECTURES,
    FORMAT,
    LoadedOperator,
    latent_format_compatible,
    load_operator,
    read_operator_metadata,
    save_operator,
)
from comfyui_silo.operators.network import LatentOperator, count_parameters
from comfyui_silo.operators.reference import (
    SIGMA_TO_TIMESTEP,
    SiloReferenceCNN,
    _unet_timestep_features,
    extract_time_embedding,
    import_reference_operator,
)

pytestmark = pytest.mark.unit

SD15 = {"name": "SD15", "latent_channels": 4, "scale_factor": 0.18215, "shift_factor": 0.0, "downscale": 8}
SDXL = {"name": "SDXL", "latent_channels": 4, "scale_factor": 0.13025, "shift_factor": 0.0, "downscale": 8}
SD3 = {"name": "SD3", "latent_channels": 16, "scale_factor": 1.5305, "shift_factor": 0.0609, "downscale": 8}
FLUX = {"name": "Flux", "latent_channels": 16, "scale_factor": 1.5305, "shift_factor": 0.1159, "downscale": 8}
DEG = {"name": "gaussian_blur", "kernel_size": 61, "sigma": 3.0}
TRAINING = {"steps": 1000, "images": 512, "final_loss": 0.0123, "heldout": {"psnr": 31.2}}


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module


def _rewrite_metadata(path, **changes):
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    meta.update(changes)
    save_file(tensors, str(path), metadata=meta)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    op = _randomize(LatentOperator(use_mask=True)).eval()
    path = save_operator(tmp_path / "blur.safetensors", op, degradation=DEG, latent_format=SD15, training=TRAINING)
    return op, path


def test_round_trip_is_bit_exact(saved):
    op, path = saved
    loaded = load_operator(path)
    assert isinstance(loaded, LoadedOperator)
    assert loaded.degradation == DEG and loaded.latent_format == SD15 and loaded.training == TRAINING
    assert loaded.architecture == {"class": "LatentOperator", "config": op.config}
    assert loaded.path == str(path) and loaded.name == "blur" and loaded.use_mask
    assert not loaded.module.training
    assert all(not p.requires_grad for p in loaded.module.parameters())
    z = torch.randn(2, 4, 13, 21)
    mask = torch.rand(1, 104, 168)
    with torch.no_grad():
        assert torch.equal(loaded(z, 0.03, mask=mask), op(z, 0.03, mask=mask))
        assert torch.equal(loaded(z, torch.tensor([0.0, 0.07]), mask), op(z, torch.tensor([0.0, 0.07]), mask))
    # the frozen module still passes gradients to its input (what SILO guidance needs)
    zg = z.clone().requires_grad_(True)
    loaded(zg, 0.03, mask=mask).square().sum().backward()
    assert zg.grad is not None and zg.grad.abs().sum() > 0


def test_metadata_layout_and_header_only_read(saved):
    op, path = saved
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert meta["format"] == FORMAT == "comfyui-silo.latent-operator"
    assert meta["format_version"] == "1"
    assert meta["created_by"].startswith("comfyui-silo ")
    assert json.loads(meta["architecture"])["class"] == "LatentOperator"
    assert json.loads(meta["latent_format"]) == SD15
    assert dtypes == {"F32"}
    info = read_operator_metadata(path)
    assert info["degradation"] == DEG and info["training"] == TRAINING and info["format_version"] == 1
    assert info["num_parameters"] == count_parameters(op)


def test_load_dtype_and_device(saved):
    op, path = saved
    loaded = load_operator(path, device="cpu", dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    z = torch.randn(1, 4, 8, 8)
    out = loaded(z, 0.01, mask=torch.zeros(8, 8))
    assert out.dtype == torch.float32 and out.shape == z.shape


def test_non_float32_module_is_stored_in_its_dtype(tmp_path):
    op = _randomize(LatentOperator()).to(torch.bfloat16)
    path = save_operator(tmp_path / "bf16.safetensors", op, degradation=DEG, latent_format=SD15)
    loaded = load_operator(path)
    assert loaded.dtype == torch.bfloat16 and loaded.training == {}
    z = torch.randn(1, 4, 9, 9)
    with torch.no_grad():
        assert torch.equal(loaded(z, 0.02), op(z, 0.02))


def test_refuses_checkpoint_without_metadata(tmp_path):
    path = tmp_path / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(path))
    for fn in (load_operator, read_operator_metadata):
        with pytest.raises(ValueError) as exc:
            fn(path)
        msg = str(exc.value)
        assert "is not a comfyui-silo latent operator (no 'format' metadata)" in msg
        assert "Train Latent Operator" in msg and "train-operator" in msg and "models/checkpoints" in msg


def test_refuses_lora_with_hint(tmp_path):
    path = tmp_path / "style.safetensors"
    save_file({"lora_unet_down.lora_up.weight": torch.zeros(2, 2)}, str(path), metadata={"ss_network_dim": "8"})
    with pytest.raises(ValueError, match=r"no 'format' metadata\).*LoRA"):
        load_operator(path)


def test_refuses_other_format(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a comfyui-silo latent operator"):
        load_operator(path)


@pytest.mark.parametrize("content", [b"", b"hello", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}", None])
def test_refuses_random_bytes(tmp_path, content):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes()
        if content is None
        else content
    )
    with pytest.raises(ValueError, match="is not a safetensors file"):
        load_operator(path)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt"])
def test_refuses_pickle_paths(tmp_path, suffix):
    path = tmp_path / f"sr_8_cnn_ffhq_operator{suffix}"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="import_reference_operator"):
        load_operator(path)


def test_refuses_future_format_version(saved):
    _, path = saved
    _rewrite_metadata(path, format_version="3")
    with pytest.raises(ValueError, match=r"format version 3.*supports up to version 2.*Update comfyui-silo"):
        load_operator(path)


def test_refuses_unknown_architecture(saved):
    _, path = saved
    _rewrite_metadata(path, architecture=json.dumps({"class": "TransformerOperator", "config": {}}))
    with pytest.raises(ValueError, match=r"'TransformerOperator'.*does not know.*LatentOperator"):
        load_operator(path)
    with pytest.raises(ValueError, match="does not know"):
        read_operator_metadata(path)


def test_strict_weights(saved, tmp_path):
    _, path = saved
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    dropped = dict(tensors)
    removed = sorted(dropped)[0]
    del dropped[removed]
    dropped["extra.weight"] = torch.zeros(3)
    bad = tmp_path / "bad.safetensors"
    save_file(dropped, str(bad), metadata=meta)
    with pytest.raises(ValueError, match=rf"missing: {removed}.*unexpected: extra.weight"):
        load_operator(bad)


def test_save_validation(tmp_path):
    op = LatentOperator()
    with pytest.raises(ValueError, match="latent channels"):
        save_operator(tmp_path / "x.safetensors", op, degradation=DEG, latent_format=SD3)
    with pytest.raises(ValueError, match=".safetensors"):
        save_operator(tmp_path / "x.pt", op, degradation=DEG, latent_format=SD15)
    with pytest.raises(ValueError, match="JSON"):
        save_operator(tmp_path / "x.safetensors", op, degradation={"f": object()}, latent_format=SD15)
    with pytest.raises(ValueError, match="architectures"):
        save_operator(tmp_path / "x.safetensors", torch.nn.Linear(2, 2), degradation=DEG, latent_format=SD15)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_latent_format_compatibility():
    assert latent_format_compatible(SD15, dict(SD15, name="SD15 (renamed)")) == (True, "")
    assert latent_format_compatible(SD15, dict(SD15, scale_factor=0.18215 + 5e-7))[0]
    assert latent_format_compatible({"latent_channels": 4, "scale_factor": 0.18215}, SD15)[0]  # shift defaults to 0
    ok, reason = latent_format_compatible(SD15, SDXL)
    assert not ok and "scale_factor 0.18215 vs 0.13025" in reason and "SD15" in reason and "SDXL" in reason
    ok, reason = latent_format_compatible(SD15, SD3)
    assert not ok and "4 vs 16 latent channels" in reason
    ok, reason = latent_format_compatible(SD3, FLUX)
    assert not ok and "shift_factor" in reason
    ok, reason = latent_format_compatible({"latent_channels": 4}, SD15)
    assert not ok and "scale_factor" in reason


def test_registry():
    from comfyui_silo.operators.io import ARCHITECTURE_VERSIONS
    from comfyui_silo.operators.network import PhysicsOperator

    assert ARCHITECTURES == {"LatentOperator": LatentOperator, "SiloReferenceCNN": SiloReferenceCNN,
                             "PhysicsOperator": PhysicsOperator}
    assert set(ARCHITECTURE_VERSIONS) == set(ARCHITECTURES)


# ---------------------------------------------------------------------- paper reference CNN
def _time_embedding(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.diffusion_model.time_embed.0.weight": torch.randn(1280, 320, generator=g) / math.sqrt(320),
        "model.diffusion_model.time_embed.0.bias": torch.randn(1280, generator=g) * 0.01,
        "model.diffusion_model.time_embed.2.weight": torch.randn(1280, 1280, generator=g) / math.sqrt(1280),
        "model.diffusion_model.time_embed.2.bias": torch.randn(1280, generator=g) * 0.01,
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),  # unrelated tensors are ignored
    }


@pytest.fixture(scope="module")
def reference_pt(tmp_path_factory):
    torch.manual_seed(0)
    ref = _randomize(SiloReferenceCNN(), seed=2).eval()
    path = tmp_path_factory.mktemp("ref") / "sr_8_cnn_ffhq_operator.pt"
    torch.save(ref.state_dict(), path)
    return ref, path


def test_reference_architecture_matches_paper_layout():
    ref = SiloReferenceCNN()
    keys = ref.reference_state_keys()
    assert len(keys) == 42 and count_parameters(ref) == 3_548_566
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert shapes["sigma_condition_precondition.0.weight"] == (32, 1280)
    assert shapes["sigma_condition_precondition.2.weight"] == (4096, 32)
    assert shapes["encoder.0.weight"] == (17, 5, 3, 3)
    assert shapes["encoder.10.weight"] == (128, 64, 64)
    assert shapes["decoder.0.weight"] == (128, 64, 3, 3)  # ConvTranspose2d: [in, out, k, k]
    assert shapes["adjust_encoding.0.weight"] == (16, 129, 1, 1)
    assert shapes["processing.3.weight"] == (4, 16, 3, 3)
    layernorm = sum(v.numel() for k, v in ref.state_dict().items() if len(v.shape) == 3)
    assert layernorm == 3_170_304


def test_unet_timestep_features_follow_sd_convention():
    t = torch.tensor([0.01 * SIGMA_TO_TIMESTEP])  # σ_y = 0.01 → their σ 0.02 → t = 0.2 · 999
    assert math.isclose(float(t), 199.8, rel_tol=1e-6)
    f = _unet_timestep_features(t, 320)
    assert f.shape == (1, 320)
    assert math.isclose(float(f[0, 0]), math.cos(199.8), abs_tol=1e-4)  # flip_sin_to_cos: cos first
    assert math.isclose(float(f[0, 160]), math.sin(199.8), abs_tol=1e-4)
    assert math.isclose(float(f[0, 1]), math.cos(199.8 * 10000 ** (-1 / 160)), abs_tol=1e-4)


def test_import_reference_round_trip(reference_pt, tmp_path):
    ref, pt = reference_pt
    te = _time_embedding()
    out = import_reference_operator(
        pt, tmp_path / "ref.safetensors", degradation=DEG, latent_format=SD15, time_embedding=te
    )
    loaded = load_operator(out)
    assert loaded.architecture["class"] == "SiloReferenceCNN"
    assert loaded.architecture["config"]["time_embedding"] is True
    assert loaded.training["original_file"] == pt.name and loaded.training["time_embedding_attached"]
    expected = SiloReferenceCNN()
    expected.load_state_dict(ref.state_dict())
    expected.attach_time_embedding(te).eval()
    z = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        a = loaded(z, torch.tensor([0.0, 0.02]), mask=torch.ones(64, 64))  # mask ignored
        b = expected(z, torch.tensor([0.0, 0.02]))
        assert torch.equal(a, b)
        assert not torch.equal(loaded(z, 0.0), loaded(z, 0.05))
        # the same σ embedding computed by hand, fed as sigma_emb
        feats = _unet_timestep_features(torch.full((2,), 0.02 * SIGMA_TO_TIMESTEP), 320)
        w = extract_time_embedding(te)
        emb = torch.nn.functional.linear(
            torch.nn.functional.silu(torch.nn.functional.linear(feats, w["0.weight"], w["0.bias"])),
            w["2.weight"],
            w["2.bias"],
        )
        torch.testing.assert_close(loaded.module(z, sigma_emb=emb), loaded(z, 0.02))


def test_import_without_time_embedding(reference_pt, tmp_path):
    ref, pt = reference_pt
    out = import_reference_operator(pt, tmp_path / "ref.safetensors", degradation=DEG, latent_format=SD15)
    loaded = load_operator(out)
    z = torch.randn(1, 4, 64, 64)
    with pytest.raises(ValueError, match="time_embedding"):
        loaded(z, 0.01)
    emb = torch.randn(1, 1280)
    with torch.no_grad():
        assert torch.equal(loaded.module(z, sigma_emb=emb), ref(z, sigma_emb=emb))
    loaded.module.attach_time_embedding(_time_embedding())
    assert loaded(z, 0.01).shape == z.shape


def test_reference_rejects_other_sizes(reference_pt):
    ref, _ = reference_pt
    with pytest.raises(ValueError, match=r"only works on 64×64 latents.*Got a 32×48 latent"):
        ref(torch.randn(1, 4, 32, 48), sigma_emb=torch.randn(1, 1280))


def test_import_rejects_wrong_keys(reference_pt, tmp_path):
    ref, _ = reference_pt
    sd = ref.state_dict()
    sd["encoder.3.weight_renamed"] = sd.pop("encoder.3.weight")
    sd["processing.3.bias"] = torch.zeros(7)
    pt = tmp_path / "broken.pt"
    torch.save(sd, pt)
    with pytest.raises(ValueError) as exc:
        import_reference_operator(pt, tmp_path / "x.safetensors", degradation=DEG, latent_format=SD15)
    msg = str(exc.value)
    assert "missing keys: encoder.3.weight" in msg
    assert "unexpected keys: encoder.3.weight_renamed" in msg
    assert "processing.3.bias (7,) (expected (4,))" in msg
    assert not (tmp_path / "x.safetensors").exists()


def test_import_rejects_other_files(tmp_path):
    rg = tmp_path / "rg.pt"
    torch.save({"aggregation_network": {"w": torch.zeros(1)}}, rg)
    with pytest.raises(ValueError, match="Readout-Guidance"):
        import_reference_operator(rg, tmp_path / "x.safetensors", degradation=DEG, latent_format=SD15)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="weights-only"):
        import_reference_operator(junk, tmp_path / "x.safetensors", degradation=DEG, latent_format=SD15)


# ---------------------------------------------------------------------- hostile and damaged files (issue 15)
def _hostile(tmp_path, name="hostile.safetensors", tensors=None, **meta_changes):
    """A file with valid comfyui-silo metadata (overridable) and, by default, one dummy tensor."""
    meta = {"format": FORMAT, "format_version": "1", "created_by": "test",
            "architecture": json.dumps({"class": "LatentOperator", "config": {"width": 48}}),
            "degradation": json.dumps(DEG), "latent_format": json.dumps(SD15), "training": "{}"}
    meta.update(meta_changes)
    path = tmp_path / name
    save_file(tensors if tensors is not None else {"stem.weight": torch.zeros(1)}, str(path), metadata=meta)
    return path


def _max_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("width", [1024, 200_000])
def test_oversized_architecture_fails_fast_without_allocating(tmp_path, width):
    import time

    path = _hostile(tmp_path, architecture=json.dumps({"class": "LatentOperator", "config": {"width": width}}))
    before, t0 = _max_rss_mib(), time.perf_counter()
    for fn in (load_operator, read_operator_metadata):
        with pytest.raises(ValueError) as exc:
            fn(path)
        msg = str(exc.value)
        assert "hostile.safetensors" in msg and "at most 64 M parameters" in msg and "Nothing was allocated" in msg
        assert "damaged or not an operator file" in msg
    assert time.perf_counter() - t0 < 5.0
    assert _max_rss_mib() - before < 200, "the loader must not build the module the metadata describes"


def test_small_architecture_with_wrong_tensors_is_refused_from_the_header(tmp_path):
    path = _hostile(tmp_path, architecture=json.dumps({"class": "LatentOperator", "config": {"width": 64}}))
    with pytest.raises(ValueError, match=r"do not match its LatentOperator architecture.*missing: .*wrong shape: "
                                         r"stem.weight \(1,\) \(expected \(64, 4, 3, 3\)\)"):
        read_operator_metadata(path)


def test_structural_config_bounds_keep_meta_construction_cheap(tmp_path):
    for config in ({"num_res_blocks": 10_000}, {"channel_mults": [1] * 100}, {"norm_groups": 10**12},
                   {"mid_dilations": [10**9]}, {"width": "wide"}, {"no_such_argument": 1}):
        path = _hostile(tmp_path, architecture=json.dumps({"class": "LatentOperator", "config": config}))
        with pytest.raises(ValueError, match="cannot build LatentOperator.*damaged or not an operator file") as exc:
            load_operator(path)
        assert "Update comfyui-silo" not in str(exc.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_file_and_tensor(saved, tmp_path, bad):
    _, path = saved
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors["out_conv.bias"][1] = bad
    broken = tmp_path / "diverged.safetensors"
    save_file(tensors, str(broken), metadata=meta)
    with pytest.raises(ValueError, match=r"diverged.safetensors: its weight 'out_conv.bias' holds 1 NaN or infinite"):
        load_operator(broken)


def test_header_table_checks_dtypes_and_byte_ranges(saved, tmp_path):
    _, path = saved
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    ints = dict(tensors, **{"stem.bias": tensors["stem.bias"].to(torch.int32)})
    save_file(ints, str(tmp_path / "ints.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="'stem.bias' is stored as I32.*float32, float16 or bfloat16"):
        load_operator(tmp_path / "ints.safetensors")
    mixed = dict(tensors, **{"stem.bias": tensors["stem.bias"].half()})
    save_file(mixed, str(tmp_path / "mixed.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="mix dtypes"):
        load_operator(tmp_path / "mixed.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated.*damaged or not an operator file"):
        load_operator(tmp_path / "cut.safetensors")


def test_huge_metadata_strings_stay_out_of_messages(tmp_path):
    huge = "N" * 5_000_000
    cases = [
        {"architecture": json.dumps({"class": huge, "config": {}})},
        {"format": huge},
        {"format_version": huge},
        {"architecture": json.dumps({"class": "LatentOperator", "config": {huge: 1}})},
    ]
    for i, change in enumerate(cases):
        path = _hostile(tmp_path, name=f"h{i}.safetensors", **change)
        for fn in (load_operator, read_operator_metadata):
            with pytest.raises(ValueError) as exc:
                fn(path)
            assert len(str(exc.value)) < 2000, (i, len(str(exc.value)))
    # a tensor with a 5 MB name: the mismatch listing is bounded too
    path = _hostile(tmp_path, name="names.safetensors", tensors={huge: torch.zeros(1)})
    with pytest.raises(ValueError) as exc:
        load_operator(path)
    assert len(str(exc.value)) < 3000
    # metadata that parses: strings kept in the object are bounded where they are shown
    ok = _hostile(tmp_path, name="ok.safetensors", created_by=huge)
    with pytest.raises(ValueError, match="do not match"):
        read_operator_metadata(ok)


def test_oversized_header_is_refused_before_parsing(tmp_path):
    path = _hostile(tmp_path, training=json.dumps({"note": "x" * (17 * 2**20)}))
    with pytest.raises(ValueError, match="operator headers are at most 16 MiB"):
        read_operator_metadata(path)


def test_update_advice_only_for_newer_files(saved):
    _, path = saved
    for change, damaged in (({"format_version": "3"}, False), ({"format_version": "x"}, True),
                            ({"architecture": "{not json"}, True), ({"degradation": "[1, 2]"}, True),
                            ({"architecture": json.dumps({"class": "Future", "config": {}})}, True)):
        _rewrite_metadata(path, **{"format_version": "1", **change})
        with pytest.raises(ValueError) as exc:
            load_operator(path)
        msg = str(exc.value)
        assert ("Update comfyui-silo" in msg) is not damaged, msg
        assert ("damaged or not an operator file" in msg) is damaged, msg


# ---------------------------------------------------------------------- 16-channel latents and families (issue 13)
def test_sixteen_channel_operator_round_trip_and_family(tmp_path):
    torch.manual_seed(3)
    op = _randomize(LatentOperator(latent_channels=16, width=16)).eval()
    path = save_operator(tmp_path / "blur_sd3.safetensors", op, degradation=DEG, latent_format=SD3)
    info = read_operator_metadata(path)
    assert info["latent_format"]["name"] == "SD3" and info["num_parameters"] == count_parameters(op)
    loaded = load_operator(path)
    assert loaded.family == "SD3" and loaded.module.latent_channels == 16
    z = torch.randn(2, 16, 12, 10)
    with torch.no_grad():
        assert torch.equal(loaded(z, 0.02), op(z, 0.02))
    with pytest.raises(ValueError, match="expects 16-channel latents, got 4"):
        loaded(torch.randn(1, 4, 8, 8))
    ok, why = latent_format_compatible(loaded.latent_format, FLUX)
    assert not ok and "SD3 (16 channels" in why and "Flux (16 channels" in why and "shift_factor" in why
    assert "scale_factor 1.5305 vs" not in why  # the fixture's Flux shares SD3's scale: only the shift differs
    ok, why = latent_format_compatible(loaded.latent_format, SD15)
    assert not ok and "16 vs 4 latent channels" in why and "SD15" in why
    assert latent_format_compatible(loaded.latent_format, dict(SD3, name="SD3.5"))[0]


def test_family_is_inferred_when_a_writer_gives_none(tmp_path):
    from comfyui_silo.operators.files import latent_family

    unnamed = {k: v for k, v in SDXL.items() if k != "name"}
    path = save_operator(tmp_path / "x.safetensors", LatentOperator(width=8), degradation=DEG, latent_format=unnamed)
    assert read_operator_metadata(path)["latent_format"]["name"] == "SDXL"
    flux = {"latent_channels": 16, "scale_factor": 0.3611, "shift_factor": 0.1159}
    assert latent_family(flux) == "Flux" and latent_family({"latent_channels": 3, "scale_factor": 1.0}) == "unknown"
    ok, why = latent_format_compatible(flux, {"latent_channels": 16, "scale_factor": 1.5305, "shift_factor": 0.0609})
    assert not ok and "Flux" in why and "SD3" in why
    ok, why = latent_format_compatible({"latent_channels": "4", "scale_factor": 0.18215}, SD15)
    assert not ok and "numeric 'latent_channels'" in why


# ---------------------------------------------------------------------- file names (checked before training)
@pytest.mark.parametrize(("name", "expected"), [
    ("my_operator", "my_operator.safetensors"), ("ci/sr4 tiny", "ci/sr4_tiny.safetensors"),
    ("blur.safetensors", "blur.safetensors"), ("é-blur", "_-blur.safetensors"),
])
def test_operator_file_names(name, expected):
    from comfyui_silo.operators.files import operator_file_name

    assert operator_file_name(name) == expected


@pytest.mark.parametrize(("name", "why"), [
    ("", "empty"), (".", "'.'"), ("..", "'..'"), ("a/../b", "'..'"), (".hidden", "starts with '.'"),
    ("a" * 300, "300 characters long; at most 100"), ("/etc/x", "is a path"), ("a\\b", "is a path"),
    ("C:evil", "is a path"), ("NUL", "reserved device name"), ("sub//x", "empty"),
])
def test_bad_operator_file_names_are_refused(name, why):
    from comfyui_silo.operators.files import operator_file_name

    with pytest.raises(ValueError, match=why) as exc:
        operator_file_name(name)
    assert len(str(exc.value)) < 400


def test_command_line_output_paths_are_checked(tmp_path):
    from comfyui_silo.operators.files import check_output_path

    assert check_output_path(tmp_path / "sub" / "ok.safetensors") == tmp_path / "sub" / "ok.safetensors"
    assert (tmp_path / "sub").is_dir()
    for bad, why in ((tmp_path / "x.pt", "must end in .safetensors"), (tmp_path / ".x.safetensors", "starts with"),
                     (tmp_path / ("a" * 300 + ".safetensors"), "at most 100")):
        with pytest.raises(ValueError, match=why):
            check_output_path(bad)


def test_saved_files_get_the_mode_of_an_ordinary_file(tmp_path):
    """The atomic save writes through a private temporary file (mode 0600); the saved operator must not keep that
    mode, or other users of a shared ComfyUI (and the server running as another user) could not read it."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = save_operator(tmp_path / "op.safetensors", LatentOperator(width=8), degradation=DEG, latent_format=SD15)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
