"""SILO KSampler cost next to plain KSampler: seconds per image and per step, peak VRAM, consistency loss.

GPU run (issue 4; full-size random-weight SD1.5, 512x512, 50 steps, Gaussian blur 61x61 sigma 3)::

    python -m benchmarks.silo_sampling --variant full --size 512 --steps 50 --markdown BENCHMARKS.md

With the baselines of issue 5 (Latent DPS, PSLD, ReSample) in the same table::

    python -m benchmarks.silo_sampling --variant full --size 512 --steps 50 --baselines --markdown BENCHMARKS.md

CPU smoke::

    python -m benchmarks.silo_sampling --variant small --size 64 --steps 2 --repeats 1

Every node runs through the real ComfyUI host in this process (tests/support/host.py), exactly as the executor calls
it: KSampler (ddpm, normal, CFG 1), then SILO KSampler (eta 0.5, ddpm update) with gradient "unet" (through the
UNet, the paper) and "x0" (at the denoised estimate only). The operator is a freshly built, untrained
LatentOperator (the identity at init) and the weights are random, so this measures cost, not restoration quality.
Peak VRAM is ``torch.cuda.max_memory_allocated`` over a run, reset before it; it includes the resident weights.
The first of ``--repeats`` runs is a warm-up (model loading, kernel selection) and is left out unless repeats is 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import emit, smooth_photo
from comfyui_silo.tools.host_process import comfyui_path
from comfyui_silo.tools.random_checkpoint import SD15_LATENT_FORMAT

ROOT = Path(__file__).resolve().parents[1]
DEGRADATION = dict(type="gaussian_blur", blur_kernel_size=61, blur_sigma=3.0, sr_factor=4, box_top=0, box_left=0,
                   box_height=8, box_width=8, random_box_size=16, random_box_seed=0, jpeg_quality=10)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=["small", "full"], default="full")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (multiple of 8)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2, help="runs per sampler; the first is a warm-up unless 1")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    p.add_argument("--comfyui", default=str(comfyui_path()))
    p.add_argument("--markdown", default=None, help="append the table to this markdown file")
    p.add_argument("--baselines", action="store_true",
                   help="also time Latent DPS, PSLD and ReSample (pixel-space, no operator) on the same measurement")
    args = p.parse_args(argv)
    if args.size % 8:
        p.error("--size must be a multiple of 8")
    if args.repeats < 1 or args.steps < 1:
        p.error("--repeats and --steps must be at least 1")

    from comfyui_silo.tools.host_harness import InProcessHost, ensure_checkpoint, make_base_directory

    os.environ["COMFYUI_PATH"] = args.comfyui
    ckpt = ensure_checkpoint(args.variant)
    with tempfile.TemporaryDirectory(prefix="silo-bench-") as tmp:
        base = make_base_directory(Path(tmp), [ckpt])
        host = InProcessHost(base, cpu=args.cpu)  # the GPU when there is one, unless --cpu
        return run(args, host, ckpt)


def run(args, host, ckpt: Path) -> int:
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    device = host.mm.get_torch_device()
    cuda = device.type == "cuda"
    inputs = _inputs(host, ckpt, args.size)
    common = dict(model=inputs["model"], seed=0, steps=args.steps, cfg=1.0, scheduler="normal",
                  positive=inputs["positive"], negative=inputs["negative"], latent_image=inputs["latent"],
                  denoise=1.0)
    rows = [(label, *_time(host, node, {**common, **extra}, args.repeats, cuda))
            for label, node, extra in _configs(inputs, args.baselines)]
    emit(_table(args, rows, inputs["model"], device, cuda), args.markdown)
    return 0


def _inputs(host, ckpt: Path, size: int) -> dict:
    """What every sampler gets: the checkpoint's MODEL and VAE, the prompts, an empty latent, the measurement of a
    blurred smooth photo and an untrained operator (the identity at init) saved where the loader finds it."""
    from comfyui_silo.operators.io import save_operator
    from comfyui_silo.operators.network import LatentOperator

    model, clip, vae = host.run_node("CheckpointLoaderSimple", ckpt_name=ckpt.name)[:3]
    (positive,) = host.run_node("CLIPTextEncode", text="a high quality photo", clip=clip)
    (negative,) = host.run_node("CLIPTextEncode", text="", clip=clip)
    (latent,) = host.run_node("EmptyLatentImage", width=size, height=size, batch_size=1)
    (deg,) = host.run_node("SILODegradation", **DEGRADATION)
    measured, _upsampled = host.run_node("SILOApplyDegradation", image=smooth_photo(size), degradation=deg,
                                         noise_sigma=0.01, seed=0)
    meas = host.run_node("SILOEncodeMeasurement", image=measured, vae=vae, degradation=deg, noise_sigma=0.01)[0]
    op_name = "bench_untrained.safetensors"
    save_operator(base_operator_dir(host) / op_name, LatentOperator(), degradation=dict(deg.spec),
                  latent_format=dict(SD15_LATENT_FORMAT))
    (operator,) = host.run_node("SILOLatentOperatorLoader", operator_name=op_name)
    return dict(model=model, vae=vae, positive=positive, negative=negative, latent=latent, measurement=meas,
                operator=operator)


def _configs(inputs: dict, baselines: bool) -> list[tuple[str, str, dict]]:
    """``(table label, node, node inputs beyond the common ones)`` for every sampler timed."""
    meas, vae = inputs["measurement"], inputs["vae"]
    silo = dict(measurement=meas, operator=inputs["operator"], eta=0.5, update="ddpm", grad_clamp=1.0, early_stop=-1)
    configs = [
        ("KSampler (ddpm)", "KSampler", dict(sampler_name="ddpm")),
        ("SILO KSampler, gradient unet", "SILOKSampler", dict(silo, gradient="unet")),
        ("SILO KSampler, gradient x0", "SILOKSampler", dict(silo, gradient="x0")),
    ]
    if baselines:  # issue 5: the pixel-space solvers on the same measurement, checkpoint and steps
        dps = dict(measurement=meas, vae=vae, eta=1.0, gluing=0.0, gluing_norm="squared", update="ddpm",
                   gradient="unet", grad_clamp=0.0, early_stop=-1)
        configs += [
            ("Latent DPS KSampler", "SILOLatentDPSKSampler", dps),
            ("PSLD (Latent DPS KSampler, gluing 0.1)", "SILOLatentDPSKSampler", dict(dps, gluing=0.1)),
            ("ReSample KSampler (every 10 steps, ≤500 its)", "SILOReSampleKSampler",
             dict(measurement=meas, vae=vae, consistency_every=10, latent_steps=500, lr=5e-3, optimization="auto",
                  pixel_steps=2000, tolerance=1e-3, gamma=40.0, variance="paper", dps_eta=0.0, early_stop=-1)),
        ]
    return configs


def _time(host, node: str, inputs: dict, repeats: int, cuda: bool) -> tuple[float, float, list | None]:
    """``(mean seconds, peak VRAM GiB, trace)`` of ``repeats`` runs of ``node``; the first is a warm-up, left out,
    unless there is only one. The trace (a guided sampler's second output) is the last run's."""
    def sync():
        if cuda:
            torch.cuda.synchronize()

    times, peaks, trace = [], [], None
    for _ in range(repeats):
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = host.run_node(node, **inputs)
        sync()
        times.append(time.perf_counter() - t0)
        peaks.append(torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"))
        if node != "KSampler":
            trace = out[1]
    keep = slice(1, None) if repeats > 1 else slice(None)
    return sum(times[keep]) / len(times[keep]), max(peaks[keep]), trace


def _table(args, rows: list, model, device, cuda: bool) -> list[str]:
    """The markdown table: one row per sampler, its cost next to plain KSampler's (the first row)."""
    plain = rows[0][1]
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "CPU"
    unet_dtype = model.model_dtype()
    cast = getattr(model.model, "manual_cast_dtype", None)
    dtype = str(unet_dtype).removeprefix("torch.") + (f" (computes in {str(cast).removeprefix('torch.')})"
                                                        if cast is not None else "")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    measured_runs = args.repeats - 1 if args.repeats > 1 else 1
    lines = [
        f"### SILO KSampler vs KSampler ({args.size}², {args.steps} steps, gaussian blur 61×61 σ=3, "
        f"{args.variant} random SD1.5, untrained operator)",
        "",
        f"{name}, torch {torch.__version__}, UNet dtype {dtype}, {args.size}², {args.steps} steps, "
        f"{dt.date.today()}, commit {commit.strip()}; mean of {measured_runs} run(s)"
        + (" after 1 warm-up" if args.repeats > 1 else " (no warm-up: includes model loading)"),
        "",
        "| sampler | s/image | s/step | × KSampler | peak VRAM GiB | consistency loss step 0 → last (SILO: latent "
        "‖w − H(ẑ₀)‖; baselines: pixel ‖y − A(D(ẑ₀))‖) |",
        "|---|---|---|---|---|---|",
    ]
    for label, sec, peak, trace in rows:
        vram = f"{peak:.2f}" if cuda else "n/a (CPU)"
        loss = "—" if trace is None else (
            f"{trace[0]['loss'][0]:.4f} → {trace[-1]['loss'][0]:.4f}" if trace else "no guided steps")
        lines.append(f"| {label} | {sec:.3f} | {sec / args.steps:.4f} | {sec / plain:.2f} | {vram} | {loss} |")
    return lines


def base_operator_dir(host) -> Path:
    d = Path(host.folder_paths.models_dir) / "latent_operators"
    d.mkdir(parents=True, exist_ok=True)
    return d


if __name__ == "__main__":
    raise SystemExit(main())
