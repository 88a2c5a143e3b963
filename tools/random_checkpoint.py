"""Build random-weight checkpoints of every model family the pack supports, with ComfyUI's own model classes.

Run as a script (it imports the ComfyUI host from ``--comfyui`` / ``COMFYUI_PATH``)::

    python tools/random_checkpoint.py --variant small --out /tmp/sd15_small.safetensors
    python tools/random_checkpoint.py --variant sdxl --out /tmp/sdxl_small.safetensors --measure

Variants (every one is detected by the host's own loader, ``comfy.sd.load_checkpoint_guess_config`` /
CheckpointLoaderSimple, as the family named; see :data:`FAMILIES` for the expected detection):

- ``full``: the real SD1.5 architecture (UNet 860 M parameters, VAE, CLIP-L), ≈2.1 GB as fp16.
- ``small``: SD1.5 with the same VAE and CLIP-L, a UNet with model_channels 320, channel_mult [1, 2] and one res
  block (≈107 M parameters, ≈600 MB as fp16). ComfyUI still detects it as SD15.
- ``sdxl``: SDXL (EPS). Detection pins model_channels 320, context_dim 2048, adm_in_channels 2816, linear transformer
  projections and the input-side transformer depths [0, 0, 2, 2, 10, 10] (so three levels of two res blocks); the
  channel multipliers, the middle and the output-side depths are free: channel_mult [1, 1, 1] (320 channels
  everywhere), middle depth 1, output depths [0, 0, 0, 1, 1, 1, 1, 1, 1]. Text encoders: the real SDXL pair
  (CLIP-L + OpenCLIP-bigG, ≈817 M parameters, most of the file): the host's SDXL text encoder has a fixed size and
  no other text encoder gives SDXL's 2048-wide context with a 1280-wide pooled vector. 4-channel SDXL VAE.
- ``sd21v``: SD2.x v-prediction (768-v). SD20 detection pins model_channels 320, context_dim 1024 and linear
  projections; the host decides v-prediction from the spread of ``output_blocks.11.1.transformer_blocks.0.norm1.bias``
  (std > 0.09), so the UNet keeps twelve output blocks (channel_mult [1, 1, 1, 1], two res blocks) with attention in
  the last one, and that bias is drawn with std 0.2. OpenCLIP-H text encoder (fixed size, 354 M parameters).
- ``sd3``: SD3 (flow, ``CONST``), an MMDiT of depth 2 (the host reads depth as width / 64: width 128, 2 heads),
  16-channel SD3 VAE (no quant convs, like the real one), and CLIP-L only as its text encoder (the host's SD3 text
  encoder works with any subset of CLIP-L / CLIP-G / T5-XXL, like ``sd3_medium_incl_clips`` without T5).
- ``flux``: Flux-dev architecture (``FLUX`` model type, guidance embedding) with one double and one single block.
  The host's Flux detection fixes the width (3072, 24 heads) and the context width (4096), and reads only the
  block counts and the pooled-vector width; the file holds the model and the 16-channel Flux VAE, no text encoder
  (Flux's T5-XXL is 4.7 B parameters, far beyond a 2-core test machine). ``vec_in_dim`` is 2048 so that the
  host's SD3 text encoder with CLIP-L alone (context padded to 4096, pooled 768+1280) conditions it: load the text
  encoder with CLIPLoader (``clip_l`` variant, type ``sd3``).
- ``clip_l``: a standalone CLIP-L text encoder file (Hugging Face ``text_model.*`` keys, what CLIPLoader reads).

Measured on the 2-core test machine (``--measure``: the host's loader, then the diffusion model at a 32x32 latent,
backward to the input latent; one thread, the machine busy with other work; builds with two threads, busy):

=========  ==============  ==========  ========  =======  ==================
variant    model params    file        build     forward  forward + backward
=========  ==============  ==========  ========  =======  ==================
small      107 M (UNet)    599 MiB     ~15 s     1.4 s    3.6 s
sdxl       160 M           2024 MiB    86 s      0.9 s    3.3 s
sd21v      79 M            985 MiB     30 s      1.0 s    2.2 s
sd3        1.9 M           400 MiB     27 s      0.02 s   0.04 s
flux       550 M           1208 MiB    42 s      5.3 s    10.6 s
clip_l     123 M (text)    236 MiB     17 s      -        -
=========  ==============  ==========  ========  =======  ==================

(Flux's forward+backward needs the saved-tensor copies of ``nodes/families.py``: the host's Flux blocks add in place
into tensors autograd saved.) The tests run 64x64 images (8x8 latents), where every family takes well under a
second per step except Flux (its 3072-wide blocks on 77 text + 16 image tokens).

Every floating-point tensor is drawn at random (no zero-initialised layer is left, so gradients reach every
parameter); weights are scaled by 1/sqrt(fan_in) so activations stay finite. Checkpoints are saved in the family's
standard key layout through the host's own ``state_dict_for_saving`` helpers and load with no key warnings.
The weights are meaningless: these files are for plumbing, speed and memory tests only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

FULL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SMALL_UNET = dict(
    FULL_UNET, num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1],
    transformer_depth_output=[1, 1, 1, 1],
)
SDXL_SMALL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 1, 1],
    "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 2048,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# transformer_depth_output is listed from the highest resolution's blocks (output_blocks.9-11) to the lowest's
SD21_SMALL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 0, 0, 0, 0, 0, 0, 0], "channel_mult": [1, 1, 1, 1], "transformer_depth_middle": 1,
    "use_linear_in_transformer": True, "context_dim": 1024,
    "transformer_depth_output": [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SD21_VPRED_KEY = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD3_DEPTH = 2
SD3_POS_EMBED_MAX = 64  # up to 64x64 patches: 1024 px images
SD3_SMALL_MMDIT = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": SD3_DEPTH, "input_size": None,
    "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear",
                                "params": {"in_features": 4096, "out_features": 64 * SD3_DEPTH}},
    "num_patches": SD3_POS_EMBED_MAX ** 2, "pos_embed_max_size": SD3_POS_EMBED_MAX,
    "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
}
FLUX_TINY_DIT = {
    "image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 2048,
    "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1,
    "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True,
}
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}

# variant -> what the host's loader must make of it (checked by the tests and by --measure)
FAMILIES = {
    "small": {"config": "SD15", "model_type": "EPS", "latent_format": "SD15", "channels": 4},
    "full": {"config": "SD15", "model_type": "EPS", "latent_format": "SD15", "channels": 4},
    "sdxl": {"config": "SDXL", "model_type": "EPS", "latent_format": "SDXL", "channels": 4},
    "sd21v": {"config": "SD20", "model_type": "V_PREDICTION", "latent_format": "SD15", "channels": 4},
    "sd3": {"config": "SD3", "model_type": "FLOW", "latent_format": "SD3", "channels": 16},
    "flux": {"config": "Flux", "model_type": "FLUX", "latent_format": "Flux", "channels": 16},
}
VARIANTS = (*FAMILIES, "clip_l")
#: The SD1.x latent space (ComfyUI's ``SD15`` latent format: the ``small``, ``full`` and ``sd21v`` variants', the
#: SILO paper's operators') as an operator file records it; copy it (``dict(SD15_LATENT_FORMAT)``) before changing it.
SD15_LATENT_FORMAT = {"name": "SD15", "latent_channels": 4, "scale_factor": 0.18215, "shift_factor": 0.0,
                      "downscale": 8}


def _randomise_(module, generator):
    import torch

    for name, t in module.state_dict(keep_vars=True).items():
        if not torch.is_floating_point(t):
            continue
        with torch.no_grad():
            leaf = name.rsplit(".", 1)[-1]
            if t.ndim >= 2:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=generator) / math.sqrt(max(fan_in, 1)))
            elif leaf in ("weight", "scale"):  # norm scales
                t.copy_(1.0 + 0.05 * torch.randn(t.shape, generator=generator))
            else:  # biases and scalars: small, never zero
                t.copy_(0.02 * torch.randn(t.shape, generator=generator))


def _sd_vae(latent_channels: int, gen):
    """The SD VAE architecture with ``latent_channels`` latent channels: with quant convs for 4 channels (SD1.x,
    SDXL), without for 16 (SD3 / Flux ``ae``), as the real files are and as the host rebuilds them."""
    from comfy.ldm.models.autoencoder import AutoencoderKL, AutoencodingEngine

    ddconfig = dict(SD_VAE, z_channels=latent_channels)
    if latent_channels == 4:
        vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    else:
        vae = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
    _randomise_(vae, gen)
    return vae


def _model_and_encoders(variant: str, gen):
    """``(base_model, clip_state_dict or None, vae)`` for a checkpoint variant."""
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.text_encoders.sd2_clip
    import comfy.text_encoders.sd3_clip
    import torch

    config_cls, unet_config, clip_cls, channels = {
        "full": (comfy.supported_models.SD15, FULL_UNET, comfy.sd1_clip.SD1ClipModel, 4),
        "small": (comfy.supported_models.SD15, SMALL_UNET, comfy.sd1_clip.SD1ClipModel, 4),
        "sdxl": (comfy.supported_models.SDXL, SDXL_SMALL_UNET, comfy.sdxl_clip.SDXLClipModel, 4),
        "sd21v": (comfy.supported_models.SD20, SD21_SMALL_UNET, comfy.text_encoders.sd2_clip.SD2ClipModel, 4),
        "sd3": (comfy.supported_models.SD3, SD3_SMALL_MMDIT,
                comfy.text_encoders.sd3_clip.sd3_clip(clip_l=True, clip_g=False, t5=False), 16),
        "flux": (comfy.supported_models.Flux, FLUX_TINY_DIT, None, 16),
    }[variant]
    model_config = config_cls(dict(unet_config))
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    _randomise_(base.diffusion_model, gen)
    if variant == "sd21v":  # the host reads v-prediction from this bias's spread (SD20.model_type: std > 0.09)
        with torch.no_grad():
            t = base.diffusion_model.state_dict(keep_vars=True)[SD21_VPRED_KEY]
            t.copy_(0.2 * torch.randn(t.shape, generator=gen))
    # SD1.5 draws its VAE before its text encoder, as the first version of this builder did: the same seed then
    # gives the same weights as the SD1.5 checkpoints the tests' tolerances were measured on
    vae = _sd_vae(channels, gen) if variant in ("small", "full") else None
    clip_sd = None
    if clip_cls is not None:
        clip = clip_cls()
        _randomise_(clip, gen)
        clip_sd = clip.state_dict()
    return base, clip_sd, vae if vae is not None else _sd_vae(channels, gen)


def _save(sd: dict, out: str, description: str) -> None:
    import comfy.utils
    import torch

    for k in list(sd):  # converted one tensor at a time: no second full copy in memory
        v = sd[k].detach()
        sd[k] = v.to(torch.float16).contiguous() if torch.is_floating_point(v) else v.contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".partial"
    comfy.utils.save_torch_file(sd, tmp, metadata={"comfyui-silo": description})
    os.replace(tmp, out)


def build(variant: str, out: str, seed: int = 0) -> str:
    import torch

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    gen = torch.Generator().manual_seed(seed)
    if variant == "clip_l":
        import comfy.sd1_clip

        clip = comfy.sd1_clip.SD1ClipModel()
        _randomise_(clip, gen)
        prefix = "clip_l.transformer."
        sd = {k[len(prefix):]: v for k, v in clip.state_dict().items() if k.startswith(prefix)}
        _save(sd, out, f"random-weight CLIP-L text encoder, seed {seed}")
        return out
    base, clip_sd, vae = _model_and_encoders(variant, gen)
    sd = base.state_dict_for_saving(clip_sd, vae.state_dict(), None)
    del base, clip_sd, vae
    _save(sd, out, f"random-weight {FAMILIES[variant]['config']} ({variant}), seed {seed}")
    return out


def measure(path: str, variant: str, latent_size: int = 32) -> dict:
    """Load ``path`` with the host's loader, check the detected family, and time one forward and one
    forward+backward (gradient w.r.t. the input latent, as SILO's 'unet' mode needs) of the diffusion model."""
    import comfy.sd
    import torch

    expect = FAMILIES[variant]
    t0 = time.perf_counter()
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)[:3]
    load_s = time.perf_counter() - t0
    base = model.model
    found = {"config": type(base.model_config).__name__, "model_type": base.model_type.name,
             "latent_format": type(base.latent_format).__name__, "channels": base.latent_format.latent_channels}
    if found != expect:
        raise AssertionError(f"{path}: the host detected {found}, expected {expect}")
    n_params = sum(p.numel() for p in base.diffusion_model.parameters())
    c = expect["channels"]
    x = torch.randn(1, c, latent_size, latent_size)
    sigma = torch.tensor([0.5 if expect["model_type"] in ("FLOW", "FLUX") else 5.0])
    if variant in ("sd3", "flux"):
        cond = {"c_crossattn": torch.randn(1, 77, 4096), "y": torch.randn(1, 2048)}
        if variant == "flux":
            cond["guidance"] = torch.tensor([3.5])
    elif variant == "sdxl":
        cond = {"c_crossattn": torch.randn(1, 77, 2048), "y": torch.randn(1, 2816)}
    else:
        cond = {"c_crossattn": torch.randn(1, 77, 1024 if variant == "sd21v" else 768)}
    with torch.no_grad():
        base.apply_model(x, sigma, **cond)  # warm-up
        t0 = time.perf_counter()
        base.apply_model(x, sigma, **cond)
        fwd = time.perf_counter() - t0
    for p in base.parameters():
        p.requires_grad_(False)
    xg = x.clone().requires_grad_(True)

    def pack(t):  # the host's Flux blocks add in place into tensors autograd saved (nodes/families.py)
        return t.clone() if t.grad_fn is not None else t

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = base.apply_model(xg, sigma, **cond)
    (g,) = torch.autograd.grad(out.float().square().sum(), xg)
    fwd_bwd = time.perf_counter() - t0
    if not torch.isfinite(out).all() or not torch.isfinite(g).all() or float(g.abs().sum()) == 0.0:
        raise AssertionError(f"{variant}: non-finite output or gradient")
    return {"variant": variant, "detected": found, "unet_params_M": round(n_params / 1e6, 1),
            "file_MiB": round(os.path.getsize(path) / 2**20), "load_s": round(load_s, 1),
            "clip": clip is not None, "vae_latent_channels": getattr(vae, "latent_channels", None),
            f"forward_s_at_{latent_size}": round(fwd, 2), f"forward_backward_s_at_{latent_size}": round(fwd_bwd, 2)}


def _host_process():
    """tools/host_process.py, the one way to import the host, whether this file runs as a script (its folder is then
    the first on ``sys.path``) or is imported from the package."""
    try:
        from . import host_process
    except ImportError:
        import host_process
    return host_process


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, default="small")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure", action="store_true",
                        help="after building (or when --out exists), load it with the host's loader, check the "
                             "detected family and time a forward and a forward+backward at a 32x32 latent")
    host_process = _host_process()
    parser.add_argument("--comfyui", default=str(host_process.comfyui_path()),
                        help="ComfyUI checkout (default $COMFYUI_PATH, else ~/ComfyUI)")
    args = parser.parse_args(argv)
    try:
        host_process.import_host(args.comfyui, cpu=True)
    except host_process.HostNotFoundError as e:
        parser.error(str(e))
    if not (args.measure and os.path.isfile(args.out)):
        t0 = time.time()
        build(args.variant, args.out, args.seed)
        size = os.path.getsize(args.out) / 2**20
        print(f"wrote {args.out} ({size:.0f} MiB, {args.variant}) in {time.time() - t0:.1f} s")
    if args.measure and args.variant != "clip_l":
        print(json.dumps(measure(args.out, args.variant)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
