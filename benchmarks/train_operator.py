"""Operator-training cost: steps/s, images/s, peak memory and the held-out fidelity curve.

GPU run (issue 3; full-size random-weight SD1.5 VAE, 512x512 Gaussian blur)::

    python -m benchmarks.train_operator --variant full --crop-size 512 --batch-size 8 --steps 300 \
        --markdown BENCHMARKS.md

CPU smoke::

    python -m benchmarks.train_operator --variant small --crop-size 64 --batch-size 2 --steps 3

The checkpoint is built with ComfyUI's own classes (tools/random_checkpoint.py) and cached in
.cache/test-models; weights are random, so this measures cost and convergence mechanics, not final quality.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from benchmarks.common import emit

ROOT = Path(__file__).resolve().parents[1]


def _parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=["small", "full"], default="full")
    p.add_argument("--crop-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--degradation", default="gaussian_blur")
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or os.path.expanduser("~/ComfyUI"))
    p.add_argument("--markdown", default=None, help="append the table to this markdown file")
    return p.parse_args(argv)


def _load_encoder(args: argparse.Namespace):
    """Start the host, load the random-weight checkpoint: the VAE encoder and the torch device."""
    from comfyui_silo.tools.cli import bootstrap_host
    from comfyui_silo.tools.host_harness import ensure_checkpoint

    os.environ["COMFYUI_PATH"] = args.comfyui
    ckpt = ensure_checkpoint(args.variant)
    bootstrap_host(args.comfyui)
    import comfy.model_management as mm
    import comfy.sd

    from comfyui_silo.nodes.host import make_encoder

    model, _clip, vae = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=False)[:3]
    return make_encoder(vae, model), mm.get_torch_device()


def _timed_training(encode, args: argparse.Namespace, device: torch.device):
    """Train on the bundled photos (upscaled to the crop size) with a fresh pair every step; returns the result,
    the steady-state steps per second, the total seconds and the peak GiB (NaN off CUDA)."""
    from benchmarks.common import photos
    from comfyui_silo.operators.training import train_operator
    from comfyui_silo.tools.cli import parse_degradation

    spec = parse_degradation(args.degradation)
    imgs = [torch.nn.functional.interpolate(im[None], scale_factor=max(1.0, args.crop_size / min(im.shape[-2:])),
                                            mode="bicubic").clamp(0, 1)[0] for im in photos()]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []

    def progress(step, total, info):
        if info.get("phase") == "encoding":
            return
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter())

    t0 = time.perf_counter()
    res = train_operator(encode, spec, imgs, steps=args.steps, batch_size=args.batch_size, crop_size=args.crop_size,
                         eval_every=args.eval_every, heldout_fraction=0.25, seed=0, device=device, progress=progress,
                         pool_size=0)
    total = time.perf_counter() - t0
    steady = times[len(times) // 5:]
    sps = (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 2 else args.steps / total
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return res, sps, total, peak


def _report_lines(args: argparse.Namespace, curve: list[dict], sps: float, total: float, peak: float,
                  cuda: bool) -> list[str]:
    """The markdown: the setting, the cost table and the held-out curve."""
    name = torch.cuda.get_device_name() if cuda else platform.processor() or "CPU"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    lines = [
        f"### Operator training ({args.degradation}, {args.crop_size}², batch {args.batch_size}, "
        f"{args.variant} random SD1.5 VAE)",
        "",
        f"{name}, torch {torch.__version__}, {dt.date.today()}, commit {commit.strip()}",
        "",
        "| steps/s | images/s | peak GiB | total s |",
        "|---|---|---|---|",
        f"| {sps:.2f} | {sps * args.batch_size:.1f} | {peak:.2f} | {total:.1f} |",
        "",
        "| step | train L1 | held-out L1 | identity L1 | degradation-on-latent L1 |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {c['step']} | {c['train_loss']:.4f} | {c['heldout_l1']:.4f} | {c['identity_l1']:.4f} | "
              f"{c['naive_l1']:.4f} |" for c in curve]
    return lines


def main(argv=None) -> int:
    args = _parse_args(argv)
    encode, device = _load_encoder(args)
    res, sps, total, peak = _timed_training(encode, args, device)
    emit(_report_lines(args, res.report["curve"], sps, total, peak, device.type == "cuda"), args.markdown)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
