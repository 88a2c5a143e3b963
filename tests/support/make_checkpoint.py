"""Build a random-weight SD1.5 checkpoint with ComfyUI's own model classes.

Run as a script (it imports the ComfyUI host from ``--comfyui`` / ``COMFYUI_PATH``)::

    python tests/support/make_checkpoint.py --variant small --out /tmp/sd15_small.safetensors

Variants:
- ``full``: the real SD1.5 architecture (UNet 860 M parameters, VAE, CLIP-L), ≈2.1 GB as fp16.
- ``small``: the same VAE and CLIP-L, a UNet with model_channels 320, channel_mult [1, 2] and one res block
  (≈80 M parameters, ≈550 MB as fp16). ComfyUI still detects it as SD15.

Every floating-point tensor is drawn at random (no zero-initialised layer is left, so gradients reach every
parameter); weights are scaled by 1/sqrt(fan_in) so activations stay finite. The checkpoint is saved in the
standard SD1.x key layout through the host's own ``state_dict_for_saving`` helpers and loads with no key warnings.
The weights are meaningless: this file is for plumbing, speed and memory tests only.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
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
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


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
            elif leaf == "weight":  # norm scales
                t.copy_(1.0 + 0.05 * torch.randn(t.shape, generator=generator))
            else:  # biases and scalars: small, never zero
                t.copy_(0.02 * torch.randn(t.shape, generator=generator))


def build(variant: str, out: str, seed: int = 0) -> str:
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.utils
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    gen = torch.Generator().manual_seed(seed)
    unet_config = dict(FULL_UNET if variant == "full" else SMALL_UNET)
    model_config = comfy.supported_models.SD15(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    _randomise_(base.diffusion_model, gen)

    vae = AutoencoderKL(ddconfig=dict(SD_VAE), embed_dim=4)
    _randomise_(vae, gen)
    clip = comfy.sd1_clip.SD1ClipModel()
    _randomise_(clip, gen)

    sd = base.state_dict_for_saving(clip.state_dict(), vae.state_dict(), None)
    sd = {k: v.detach().to(torch.float16).contiguous() if torch.is_floating_point(v) else v.contiguous()
          for k, v in sd.items()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".partial"
    comfy.utils.save_torch_file(sd, tmp, metadata={"comfyui-silo": f"random-weight SD1.5 ({variant}), seed {seed}"})
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["small", "full"], default="small")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", os.path.expanduser("~/ComfyUI")))
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.comfyui))
    import comfy.options

    comfy.options.args_parsing = False
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    t0 = time.time()
    build(args.variant, args.out, args.seed)
    size = os.path.getsize(args.out) / 2**20
    print(f"wrote {args.out} ({size:.0f} MiB, {args.variant}) in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
