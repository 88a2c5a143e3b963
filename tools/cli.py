"""The command line: train an operator from a folder of images, import the paper's operators, run workflows."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ..operators.degradations import STANDARD_DEGRADATIONS, build_degradation

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def default_comfyui_path() -> str:
    return os.environ.get("COMFYUI_PATH") or os.path.expanduser("~/ComfyUI")


def bootstrap_host(comfyui: str, cpu: bool = False):
    """Import ComfyUI from a checkout (its own argument parser stays off)."""
    root = Path(comfyui).expanduser().resolve()
    if not (root / "comfy").is_dir():
        raise SystemExit(f"error: no ComfyUI checkout at {root} (pass --comfyui PATH or set COMFYUI_PATH)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options

    comfy.options.args_parsing = False
    import comfy.cli_args

    if cpu or not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    return root


def parse_degradation(text: str) -> dict:
    if text in STANDARD_DEGRADATIONS:
        return dict(STANDARD_DEGRADATIONS[text])
    try:
        spec = json.loads(text)
    except json.JSONDecodeError:
        names = ", ".join(STANDARD_DEGRADATIONS)
        raise SystemExit(f"error: --degradation must be one of {names} or a JSON spec, got {text!r}") from None
    build_degradation(spec)  # validates, with a message naming the field
    return spec


def load_image_folder(folder: str, limit: int | None = None) -> list[torch.Tensor]:
    from PIL import Image, ImageOps

    paths = sorted(p for p in Path(folder).expanduser().rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"error: no images ({', '.join(IMAGE_SUFFIXES)}) found in {folder}")
    images = []
    for p in paths[:limit]:
        with Image.open(p) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3)
            images.append(t.permute(2, 0, 1).float() / 255.0)
    return images


def cmd_train_operator(args) -> int:
    bootstrap_host(args.comfyui, cpu=args.cpu)
    import comfy.sd

    from ..nodes.bridge import latent_format_info, make_encoder
    from ..operators.io import save_operator
    from ..operators.training import format_report, train_operator

    spec = parse_degradation(args.degradation)
    images = load_image_folder(args.images, args.max_images)
    print(f"{len(images)} images from {args.images}; degradation {json.dumps(spec)}")
    out = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=False,
                                                embedding_directory=None)
    model, vae = out[0], out[2]
    if vae is None:
        raise SystemExit(f"error: {args.checkpoint} has no VAE")
    encode = make_encoder(vae, model)
    latent_format = latent_format_info(model, vae)

    from tqdm.auto import tqdm

    bar = tqdm(total=args.steps, desc="training", unit="step")

    def progress(step, total, info):
        if info.get("phase") == "encoding":
            bar.set_postfix_str(f"encoding pairs {info['encoded']}/{info['pool_size']}")
            return
        bar.n = step
        post = f"loss {info['smoothed']:.4f}"
        if info.get("heldout"):
            h = info["heldout"]
            post += f" | held-out {h['heldout_l1']:.4f} (identity {h['identity_l1']:.4f})"
        bar.set_postfix_str(post)
        bar.refresh()

    result = train_operator(encode, spec, images, steps=args.steps, batch_size=args.batch_size,
                            crop_size=args.crop_size, lr=args.lr, seed=args.seed, pool_size=args.pool_size,
                            ema_decay=args.ema, eval_every=args.eval_every, resume=args.resume,
                            state_path=args.state, progress=progress)
    bar.close()
    result.report["checkpoint"] = Path(args.checkpoint).name
    save_operator(args.out, result.operator, degradation=build_degradation(spec).spec, latent_format=latent_format,
                  training=result.report)
    print(format_report(result.report))
    print(f"wrote {args.out}")
    return 0


def cmd_import_reference(args) -> int:
    from ..operators.reference import import_reference_operator

    latent = {"name": "SD15", "latent_channels": 4, "scale_factor": 0.18215, "shift_factor": 0.0, "downscale": 8}
    if args.latent_format:
        latent = json.loads(args.latent_format)
    import_reference_operator(args.pt, args.out, degradation=parse_degradation(args.degradation),
                              latent_format=latent)
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m comfyui_silo", description="comfyui-silo command line")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-operator", help="train a latent degradation operator for a checkpoint's VAE")
    t.add_argument("--checkpoint", required=True, help="checkpoint file (.safetensors) whose VAE/latent space to use")
    t.add_argument("--images", required=True, help="folder of training photos (searched recursively)")
    t.add_argument("--degradation", default="gaussian_blur",
                   help=f"one of {', '.join(STANDARD_DEGRADATIONS)} or a JSON spec")
    t.add_argument("--out", required=True, help="operator file to write (.safetensors), e.g. "
                                                "ComfyUI/models/latent_operators/blur_sd15.safetensors")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--crop-size", type=int, default=256, help="training crop size in pixels (multiple of 8)")
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--ema", type=float, default=None, help="EMA decay of the weights, e.g. 0.999 (default off)")
    t.add_argument("--pool-size", type=int, default=None,
                   help="encode this many training pairs once and reuse them (fast on CPU; default: fresh pairs)")
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--max-images", type=int, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--state", default=None, help="save a resumable training state here")
    t.add_argument("--resume", default=None, help="resume from a state saved with --state")
    t.add_argument("--comfyui", default=default_comfyui_path(), help="ComfyUI checkout (default $COMFYUI_PATH)")
    t.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    t.set_defaults(func=cmd_train_operator)

    r = sub.add_parser("import-reference", help="convert an operator .pt of the SILO paper's code to our format")
    r.add_argument("pt", help="the paper's CNN operator state dict (.pt), loaded with weights_only=True")
    r.add_argument("--out", required=True)
    r.add_argument("--degradation", required=True, help="what the operator was trained for (preset or JSON)")
    r.add_argument("--latent-format", default=None, help="JSON latent format (default SD1.5)")
    r.set_defaults(func=cmd_import_reference)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
