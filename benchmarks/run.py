"""Speed, memory and scaling of every solver side by side, in one process: the benchmark harness of issue 6.

GPU (full-size random-weight SD1.5; writes the tables into BENCHMARKS.md and the plot next to it)::

    python -m benchmarks.run --preset gpu --markdown BENCHMARKS.md --plot BENCHMARKS-time-per-image.png

CPU smoke (the small random checkpoint, tiny images; CI runs it through tests/comfy/test_benchmark_harness.py)::

    python -m benchmarks.run --preset cpu-smoke --out benchmarks/_out

What one run measures, all against the same checkpoint, measurement (Gaussian blur + noise 0.01 of a smooth
synthetic photo) and step count, each node called exactly as ComfyUI's executor calls it:

* **Sampling**: plain KSampler (ddpm: the floor, no guidance), SILO KSampler with ``gradient="unet"`` and ``"x0"``,
  Latent-DPS, PSLD and ReSample, for every (size, batch) of the preset and CFG 1 and 7.5; s/image, s/step, peak
  VRAM and the ratio to plain KSampler measured in the same run; plus the paper's setting once (SILO, 999 DDPM
  steps, eta 0.5, CFG 1, batch 1, the first size).
* **Components**: UNet forward, UNet forward+backward w.r.t. its input, VAE encode, VAE decode, VAE decoder
  forward+backward and operator forward+backward, so the solvers' overheads can be explained.
* **Operator training**: steps/s and images/s per batch size, and the time until the held-out error beats the
  identity baseline by the preset's margin (box inpainting: a random VAE leaves blur nothing to learn).
* **Compiled UNet** (the stretch goal): plain KSampler and SILO (both modes) with the UNet compiled by the host's
  TorchCompileModel mechanism, for each torch.compile variant of the preset (gpu: inductor with CUDA graphs
  ``reduce-overhead``, inductor default, the ``cudagraphs`` backend), next to the same three eager; first-run time
  (compilation), s/step, peak VRAM and torch.compile's graph / graph-break / CUDA-graph-skip counters. A variant
  that fails is reported with its error.
* **Goals** of issue 6, each with its measured value and by how much it is met or missed.

Timing: a warm-up of every solver first (model loading, kernel selection), then synchronised ``perf_counter``
timers around each call (``torch.cuda.synchronize`` on both sides), the median of the repeats; a configuration
stops repeating once it has used ``--max-config-seconds`` (at least one timed run each). Peak VRAM is
``torch.cuda.max_memory_allocated`` over one call, reset before it; it includes the resident weights. Weights are
random (speed does not depend on their values), the operator is an untrained one of the shipped architecture.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import smooth_photo

ROOT = Path(__file__).resolve().parents[1]
SD15 = {"name": "SD15", "latent_channels": 4, "scale_factor": 0.18215, "shift_factor": 0.0, "downscale": 8}
DEG_WIDGETS = dict(type="gaussian_blur", blur_kernel_size=61, blur_sigma=3.0, sr_factor=4, box_top=0, box_left=0,
                   box_height=8, box_width=8, random_box_size=16, random_box_seed=0, jpeg_quality=10)

PRESETS: dict[str, dict] = {
    "gpu": dict(
        variant="full", configs=[(512, 1), (512, 4), (1024, 1)], cfgs=[1.0, 7.5], steps=50, repeats=3,
        max_config_seconds=20.0, paper_steps=999, blur=(61, 3.0), component_repeats=20,
        resample=dict(consistency_every=10, latent_steps=100, lr=5e-3, optimization="auto", pixel_steps=200,
                      tolerance=1e-3),
        train=dict(size=512, batches=[8, 16], steps=200, eval_every=25, margin=0.9),
        compile=[("inductor", "reduce-overhead"), ("inductor", None), ("cudagraphs", None)]),
    "cpu-smoke": dict(
        variant="small", configs=[(32, 1), (32, 2), (64, 1)], cfgs=[1.0, 7.5], steps=2, repeats=1,
        max_config_seconds=0.0, paper_steps=3, blur=(9, 2.0), component_repeats=1,
        resample=dict(consistency_every=1, latent_steps=3, lr=5e-3, optimization="auto", pixel_steps=3,
                      tolerance=1e-3),
        train=dict(size=32, batches=[2, 4], steps=3, eval_every=1, margin=0.9),
        compile=[("aot_eager", None)]),
}
SOLVERS = ["KSampler", "SILO unet", "SILO x0", "Latent-DPS", "PSLD", "ReSample"]
COMPILED_SOLVERS = ["KSampler", "SILO unet", "SILO x0"]
SECTIONS = ("sampling", "paper", "components", "training", "compiled")
PIXEL_SOLVERS = ("Latent-DPS", "PSLD", "ReSample")
MARK = "<!-- benchmarks.run {preset} -->"


# ------------------------------------------------------------------------------------------------------ timing
class Timer:
    """Synchronised wall-clock timing and peak memory of one call on the host's device."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn):
        """``(seconds, peak GiB or NaN, result)`` of ``fn()``."""
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        sec = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else float("nan")
        return sec, peak, out

    def repeat(self, fn, repeats: int, budget_s: float = 0.0):
        """Median seconds and max peak of up to ``repeats`` timed calls (stops once ``budget_s`` is used)."""
        secs, peaks = [], []
        for _ in range(max(1, repeats)):
            s, p, _ = self(fn)
            secs.append(s)
            peaks.append(p)
            if budget_s and sum(secs) >= budget_s:
                break
        return statistics.median(secs), max(peaks), len(secs)


# ---------------------------------------------------------------------------------------------------- the run
class Bench:
    """Everything one harness run needs from the host: checkpoint, prompts, per-size measurements."""

    def __init__(self, host, ckpt_name: str, preset: dict):
        import comfy.utils

        comfy.utils.PROGRESS_BAR_ENABLED = False
        self.host, self.p = host, preset
        self.device = host.mm.get_torch_device()
        self.timer = Timer(self.device)
        self.model, self.clip, self.vae = host.run_node("CheckpointLoaderSimple", ckpt_name=ckpt_name)[:3]
        (self.positive,) = host.run_node("CLIPTextEncode", text="a high quality photo", clip=self.clip)
        (self.negative,) = host.run_node("CLIPTextEncode", text="", clip=self.clip)
        k, s = preset["blur"]
        (self.deg,) = host.run_node("SILODegradation", **dict(DEG_WIDGETS, blur_kernel_size=k, blur_sigma=s))
        op_dir = Path(host.folder_paths.models_dir) / "latent_operators"
        op_dir.mkdir(parents=True, exist_ok=True)
        from comfyui_silo.operators.io import save_operator
        from comfyui_silo.operators.network import LatentOperator

        name = f"bench_untrained_{os.getpid()}.safetensors"
        save_operator(op_dir / name, LatentOperator(), degradation=dict(self.deg.spec), latent_format=SD15)
        (self.operator,) = host.run_node("SILOLatentOperatorLoader", operator_name=name)
        (op_dir / name).unlink()
        self._meas: dict[int, tuple] = {}

    def measurement(self, size: int):
        if size not in self._meas:
            measured, _ = self.host.run_node("SILOApplyDegradation", image=smooth_photo(size), degradation=self.deg,
                                             noise_sigma=0.01, seed=0)
            self._meas[size] = self.host.run_node("SILOEncodeMeasurement", image=measured, vae=self.vae,
                                                  degradation=self.deg, noise_sigma=0.01)[:2]
        return self._meas[size]

    def solver_call(self, solver: str, size: int, batch: int, cfg: float, steps: int, eta: float | None = None,
                    model=None):
        meas, latent = self.measurement(size)
        latent = dict(latent, samples=latent["samples"].repeat(batch, 1, 1, 1))
        common = dict(model=self.model if model is None else model, seed=0, steps=steps, cfg=cfg, scheduler="normal",
                      positive=self.positive, negative=self.negative, latent_image=latent, denoise=1.0)
        if solver == "KSampler":
            node, extra = "KSampler", dict(sampler_name="ddpm")
        elif solver.startswith("SILO"):
            node = "SILOKSampler"
            extra = dict(measurement=meas, operator=self.operator, eta=0.5 if eta is None else eta, update="ddpm",
                         gradient=solver.split()[-1], grad_clamp=1.0, early_stop=-1)
        elif solver in ("Latent-DPS", "PSLD"):
            node = "SILOLatentDPSKSampler"
            extra = dict(measurement=meas, vae=self.vae, eta=1.0, gluing=0.1 if solver == "PSLD" else 0.0,
                         gluing_norm="squared", update="ddpm", gradient="unet", grad_clamp=0.0, early_stop=-1)
        elif solver == "ReSample":
            node = "SILOReSampleKSampler"
            extra = dict(measurement=meas, vae=self.vae, gamma=40.0, variance="paper", dps_eta=0.0, early_stop=-1,
                         **self.p["resample"])
        else:
            raise ValueError(f"unknown solver {solver!r}")

        def call():
            out = self.host.run_node(node, **common, **extra)
            return out[0]["samples"]

        return call

    def cleanup(self) -> None:
        gc.collect()
        with contextlib.suppress(Exception):
            self.host.mm.soft_empty_cache()


def run_sampling(b: Bench, log) -> list[dict]:
    p = b.p
    size0 = p["configs"][0][0]
    log("warm-up: every solver once")
    for solver in SOLVERS:
        b.solver_call(solver, size0, 1, 1.0, min(2, p["steps"]))()
    rows = []
    for size, batch in p["configs"]:
        for cfg in p["cfgs"]:
            for solver in SOLVERS:
                sec, peak, n = b.timer.repeat(b.solver_call(solver, size, batch, cfg, p["steps"]), p["repeats"],
                                              p["max_config_seconds"])
                rows.append(dict(solver=solver, size=size, batch=batch, cfg=cfg, steps=p["steps"], s_run=sec,
                                 s_image=sec / batch, s_step=sec / p["steps"], peak_gib=peak, runs=n))
                log(f"{solver:10s} {size}² b{batch} cfg {cfg}: {sec:.3f} s ({n} run(s)), peak {peak:.2f} GiB")
                b.cleanup()
    for r in rows:  # ratio to plain KSampler of the same size, batch and CFG, measured in this run
        base = next(q for q in rows if q["solver"] == "KSampler" and (q["size"], q["batch"], q["cfg"]) ==
                    (r["size"], r["batch"], r["cfg"]))
        r["x_ksampler"] = r["s_run"] / base["s_run"]
    return rows


def run_paper(b: Bench, log) -> dict:
    p = b.p
    size = p["configs"][0][0]
    sec, peak, _ = b.timer(b.solver_call("SILO unet", size, 1, 1.0, p["paper_steps"], eta=0.5))
    log(f"paper setting: SILO unet {p['paper_steps']} DDPM steps: {sec:.2f} s")
    b.cleanup()
    return dict(size=size, steps=p["paper_steps"], s_image=sec, s_step=sec / p["paper_steps"], peak_gib=peak)


def _component_calls(base_model, decode, encode, op, cond, to, x, img, sigma) -> list:
    """``[(name, zero-argument call)]`` of the component costs at one size (batch 1)."""

    def unet_fwd():
        with torch.no_grad():
            return base_model.apply_model(x, sigma, c_crossattn=cond, transformer_options=to)

    def unet_fwd_bwd():
        with torch.enable_grad():
            xi = x.clone().requires_grad_(True)
            out = base_model.apply_model(xi, sigma, c_crossattn=cond, transformer_options=to)
            return torch.autograd.grad(out.float().sum(), xi)[0]

    def vae_encode():
        with torch.no_grad():
            return encode(img)

    def vae_decode():
        with torch.no_grad():
            return decode(x)

    def vae_dec_fwd_bwd():
        with torch.enable_grad():
            z = x.clone().requires_grad_(True)
            return torch.autograd.grad(decode(z).sum(), z)[0]

    def op_fwd_bwd():
        with torch.enable_grad():
            z = x.clone().requires_grad_(True)
            return torch.autograd.grad(op(z, sigma_y=0.01).sum(), z)[0]

    return [("UNet forward", unet_fwd), ("UNet forward+backward (w.r.t. input)", unet_fwd_bwd),
            ("VAE encode", vae_encode), ("VAE decode", vae_decode), ("VAE decoder forward+backward", vae_dec_fwd_bwd),
            ("operator forward+backward", op_fwd_bwd)]


def run_components(b: Bench, log) -> list[dict]:
    import comfy.model_management as mm

    from comfyui_silo.nodes.host import (
        differentiable_vae,
        diffusion_model,
        make_weights_differentiable,
        sdpa_attention_override,
    )
    from comfyui_silo.operators.network import LatentOperator

    rows = []
    sizes = sorted({s for s, _ in b.p["configs"]})
    with torch.inference_mode(False):
        mm.load_models_gpu([b.model], force_full_load=True)
        base_model = b.model.model
        make_weights_differentiable(diffusion_model(b.model))
        decode, encode = differentiable_vae(b.vae, b.model)
        dev = b.device
        cond = b.positive[0][0].to(dev)
        to = {"optimized_attention_override": sdpa_attention_override}
        op = LatentOperator().to(dev)
        op.requires_grad_(False)
        for size in sizes:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(1, 4, size // 8, size // 8, generator=g).to(dev)
            img = smooth_photo(size).permute(0, 3, 1, 2).to(dev)
            fns = _component_calls(base_model, decode, encode, op, cond, to, x, img, torch.tensor([1.0], device=dev))
            for what, fn in fns:
                fn()  # warm-up
                sec, peak, n = b.timer.repeat(fn, b.p["component_repeats"])
                rows.append(dict(what=what, size=size, ms=sec * 1e3, peak_gib=peak, runs=n))
                log(f"{what} {size}²: {sec * 1e3:.1f} ms")
            b.cleanup()
    return rows


def run_training(b: Bench, log) -> list[dict]:
    from benchmarks.common import photos
    from comfyui_silo.nodes.host import make_encoder
    from comfyui_silo.operators.training import train_operator

    t = b.p["train"]
    size = t["size"]
    spec = {"type": "box_inpaint", "top": size // 4, "left": size // 4, "height": size // 2, "width": size // 2}
    imgs = [torch.nn.functional.interpolate(im[None], scale_factor=max(1.0, size / min(im.shape[-2:])),
                                            mode="bicubic").clamp(0, 1)[0] for im in photos()]
    encode = make_encoder(b.vae, b.model)
    rows = []
    for batch in t["batches"]:
        stamps = []

        def progress(step, total, info, stamps=stamps):
            if info.get("phase") == "encoding":
                return
            b.timer.sync()
            stamps.append(time.perf_counter())

        b.timer.sync()
        if b.timer.cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        # fresh pairs every step (pool_size 0): the throughput of a GPU training run, VAE encodes included
        res = train_operator(encode, spec, imgs, steps=t["steps"], batch_size=batch, crop_size=size,
                             eval_every=t["eval_every"], heldout_fraction=0.25, seed=0, device=b.device,
                             progress=progress, pool_size=0)
        total = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if b.timer.cuda else float("nan")
        steady = stamps[len(stamps) // 5:]
        sps = (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 2 else t["steps"] / total
        reach = None
        for c in res.report["curve"]:
            if c["heldout_l1"] <= t["margin"] * c["identity_l1"]:
                reach = dict(step=c["step"], seconds=stamps[min(c["step"], len(stamps)) - 1] - t0)
                break
        last = res.report["curve"][-1]
        rows.append(dict(size=size, batch=batch, steps=t["steps"], steps_per_s=sps, images_per_s=sps * batch,
                         peak_gib=peak, total_s=total, reach=reach, margin=t["margin"],
                         heldout_l1=last["heldout_l1"], identity_l1=last["identity_l1"]))
        log(f"training batch {batch}: {sps:.2f} steps/s, target {'reached' if reach else 'not reached'}")
        b.cleanup()
    return rows


def _compile_counters() -> dict:
    from torch._dynamo.utils import counters

    reasons = sorted(counters["graph_break"].items(), key=lambda kv: -kv[1])
    return dict(graphs=int(counters["stats"]["unique_graphs"]), breaks=int(sum(counters["graph_break"].values())),
                break_reasons=[f"{n}× {r.splitlines()[0][:200]}" for r, n in reasons[:5]],
                cudagraph_skips=int(counters["inductor"]["cudagraph_skips"]))


def run_compiled(b: Bench, log) -> list[dict]:
    """The stretch goal: plain KSampler and SILO (both modes) with the UNet compiled by the host's own mechanism
    (``set_torch_compile_wrapper``, what its TorchCompileModel node does, here with a ``mode`` too), next to the
    same three eager, at the first size, batch 1, CFG 1. A variant that fails is reported with its error, and the
    next one still runs."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from torch._dynamo.utils import counters

    p = b.p
    size, steps = p["configs"][0][0], p["steps"]
    for solver in COMPILED_SOLVERS:  # warm-up (a no-op cost when the sampling section ran first)
        b.solver_call(solver, size, 1, 1.0, min(2, steps))()
    rows = []

    def add(solver, backend, mode, call):
        row = dict(solver=solver, backend=backend, mode=mode, size=size, steps=steps, error=None)
        counters.clear()  # torch.compile's counters of this solver's runs (graphs it added, breaks it met)
        try:
            first, _, _ = b.timer(call)  # compilation and CUDA-graph capture happen here
            sec, peak, n = b.timer.repeat(call, p["repeats"], p["max_config_seconds"])
            row.update(first_s=first, s_run=sec, s_image=sec, s_step=sec / steps, peak_gib=peak, runs=n)
            log(f"{solver:10s} {backend}/{mode or 'default'}: first {first:.2f} s, {sec:.3f} s, peak {peak:.2f} GiB")
        except Exception as e:  # reported in the table; the other variants still run
            row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
            log(f"{solver:10s} {backend}/{mode or 'default'}: FAILED {row['error']}")
        if backend != "eager":
            row.update(_compile_counters())
        rows.append(row)
        b.cleanup()

    for solver in COMPILED_SOLVERS:
        add(solver, "eager", None, b.solver_call(solver, size, 1, 1.0, steps))
    for backend, mode in p["compile"]:
        torch._dynamo.reset()
        model = b.model.clone()
        set_torch_compile_wrapper(model=model, backend=backend, mode=mode)
        for solver in COMPILED_SOLVERS:
            add(solver, backend, mode, b.solver_call(solver, size, 1, 1.0, steps, model=model))
        del model
        torch._dynamo.reset()
        b.cleanup()
    for r in rows:  # ratios to the eager and to the same-variant plain KSampler, measured in this section
        for key, backend in (("x_eager_ksampler", "eager"), ("x_ksampler", r["backend"])):
            base = next(q for q in rows if q["solver"] == "KSampler" and q["backend"] == backend
                        and q["mode"] == (r["mode"] if backend == r["backend"] else None))
            ok = r["error"] is None and base["error"] is None
            r[key] = r["s_run"] / base["s_run"] if ok else float("nan")
    return rows


# ---------------------------------------------------------------------------------------------------- goals
def _sampling_row(rows: list[dict], solver: str, size: int, batch: int = 1, cfg: float = 1.0) -> dict | None:
    """The sampling row of one configuration, or None."""
    return next((r for r in rows if (r["solver"], r["size"], r["batch"], r["cfg"]) == (solver, size, batch, cfg)),
                None)


def _component(comps: list[dict], what: str, size: int, key: str = "ms") -> float | None:
    """A component's measurement at ``size``: seconds (``key="ms"``) or another field as stored, or None."""
    c = next((c for c in comps if c["what"] == what and c["size"] == size), None)
    if c is None:
        return None
    return c["ms"] / 1e3 if key == "ms" else c[key]


def _goal(goal: str, measured: str, target: str, met: bool | None, note: str = "") -> dict:
    return dict(goal=goal, measured=measured, target=target, met=met, note=note)


def _time_goals(rows: list[dict], comps: list[dict], base: int) -> list[dict]:
    """SILO's overhead over the plain KSampler: x0 mode ≤ 1.15×; unet mode ≤ 1.1× of the plain run with every UNet
    forward replaced by a forward+backward (what the gradient must cost)."""
    plain, x0, unet = (_sampling_row(rows, s, base) for s in ("KSampler", "SILO x0", "SILO unet"))
    goals = [_goal(f"SILO x0 time ≤ 1.15× plain KSampler ({base}², cfg 1)", f"{x0['x_ksampler']:.2f}×", "≤ 1.15×",
                   x0["x_ksampler"] <= 1.15, _by(x0["x_ksampler"], 1.15))]
    fwd, fb = _component(comps, "UNet forward", base), _component(comps, "UNet forward+backward (w.r.t. input)", base)
    if fwd is not None and fb is not None:
        expected = plain["s_run"] + plain["steps"] * (fb - fwd)
        ratio = unet["s_run"] / expected
        goals.append(_goal(f"SILO unet time ≤ 1.1× (KSampler + steps × (UNet fwd+bwd − fwd)) ({base}², cfg 1)",
                           f"{ratio:.2f}× ({unet['s_run']:.2f} s vs {expected:.2f} s)", "≤ 1.10×", ratio <= 1.10,
                           _by(ratio, 1.10)))
    return goals


def _speedup_goals(rows: list[dict], sizes: list[int]) -> list[dict]:
    """Both SILO modes ≥ 3× faster than Latent-DPS and PSLD, at every size."""
    goals = []
    for size in sizes:
        for solver in ("Latent-DPS", "PSLD"):
            for mode in ("SILO unet", "SILO x0"):
                s, d = _sampling_row(rows, mode, size), _sampling_row(rows, solver, size)
                if s and d:
                    speedup = d["s_run"] / s["s_run"]
                    goals.append(_goal(f"{mode} ≥ 3× faster than {solver} ({size}², cfg 1)", f"{speedup:.2f}×",
                                       "≥ 3×", speedup >= 3.0, _by(3.0, speedup)))
    return goals


def _vram_goals(rows: list[dict], comps: list[dict], base: int) -> list[dict]:
    """Peak VRAM over the plain KSampler: x0 mode within 0.5 GiB; unet mode within the UNet's activations (+0.25 GiB
    slack). Measured on CUDA only."""
    plain, x0, unet = (_sampling_row(rows, s, base) for s in ("KSampler", "SILO x0", "SILO unet"))
    if plain["peak_gib"] != plain["peak_gib"]:  # NaN: not measured (no CUDA)
        return [_goal("peak VRAM goals", "n/a", "CUDA only", None, "no CUDA device in this run")]
    d = x0["peak_gib"] - plain["peak_gib"]
    goals = [_goal(f"SILO x0 peak VRAM within 0.5 GiB of plain ({base}²)", f"+{d:.2f} GiB", "≤ +0.50 GiB", d <= 0.5,
                   _by(d, 0.5))]
    act = next((c["peak_gib"] for c in comps if c["what"].startswith("UNet forward+backward") and c["size"] == base),
               None)
    fwd_peak = _component(comps, "UNet forward", base, key="peak_gib")
    if act is not None and fwd_peak is not None:
        budget = act - fwd_peak + 0.25
        d = unet["peak_gib"] - plain["peak_gib"]
        goals.append(_goal(f"SILO unet peak VRAM ≤ plain + UNet activations (+0.25 GiB slack) ({base}²)",
                           f"+{d:.2f} GiB", f"≤ +{budget:.2f} GiB", d <= budget, _by(d, budget)))
    return goals


def _scaling_goals(rows: list[dict], base: int, large: int) -> list[dict]:
    """Time per image linear in pixels: the large size ≤ 1.125× its pixel ratio of the base size's time."""
    pixels = (large / base) ** 2
    limit = 1.125 * pixels  # issue 6: 1024² ≤ 4.5× of 512² (4× the pixels)
    goals = []
    for solver in SOLVERS:
        a, c = _sampling_row(rows, solver, base), _sampling_row(rows, solver, large)
        if a and c:
            r = c["s_image"] / a["s_image"]
            goals.append(_goal(f"{solver}: {large}² ≤ {limit:.2g}× the time of {base}² (linear in pixels)",
                               f"{r:.2f}×", f"≤ {limit:.2g}×", r <= limit, _by(r, limit)))
    return goals


def evaluate_goals(res: dict) -> list[dict]:
    """Issue 6's goals against this run's numbers: ``{goal, measured, target, met, note}``."""
    rows = res.get("sampling") or []
    comps = res.get("components") or []
    if not rows:
        return _compiled_goals(res.get("compiled") or [], None)
    sizes = sorted({r["size"] for r in rows})
    base, large = sizes[0], sizes[-1]
    goals = _time_goals(rows, comps, base) + _speedup_goals(rows, sizes) + _vram_goals(rows, comps, base)
    if large != base:
        goals += _scaling_goals(rows, base, large)
    return goals + _compiled_goals(res.get("compiled") or [], _sampling_row(rows, "SILO unet", base))


def _compiled_goals(compiled: list[dict], eager_unet: dict | None) -> list[dict]:
    """The stretch goal: a guided SILO step (gradient through the UNet) ≤ 25 ms, and faster than the host's eager
    unguided KSampler step — judged on the fastest compiled variant that ran, else on the eager run."""
    ok = [r for r in compiled if r["error"] is None and r["backend"] != "eager"]
    best = min((r for r in ok if r["solver"] == "SILO unet"), key=lambda r: r["s_step"], default=None)
    goals = []
    if best is not None:
        how = f"UNet compiled: {best['backend']}/{best['mode'] or 'default'}"
        step, size = best["s_step"], best["size"]
    elif eager_unet is not None:
        how, step, size = "eager", eager_unet["s_step"], eager_unet["size"]
    else:
        return goals
    goals.append(dict(goal=f"stretch: guided SILO step ≤ 25 ms ({size}², unet, {how})",
                      measured=f"{step * 1e3:.1f} ms", target="≤ 25 ms", met=step <= 0.025, note=_by(step, 0.025)))
    plain = next((r for r in compiled if r["solver"] == "KSampler" and r["backend"] == "eager"
                  and r["error"] is None), None)
    if best is not None and plain is not None:
        ratio = best["s_step"] / plain["s_step"]
        goals.append(dict(goal=f"stretch: compiled guided SILO step faster than the host's eager unguided KSampler "
                               f"step ({size}², {how})", measured=f"{ratio:.2f}× ({step * 1e3:.1f} vs "
                          f"{plain['s_step'] * 1e3:.1f} ms)", target="< 1×", met=ratio < 1.0,
                      note="" if ratio < 1.0 else f"missed by {100 * (ratio - 1):.0f}%"))
    failed = [r for r in compiled if r["error"] is not None]
    if failed:
        goals.append(dict(goal="every compiled variant runs", measured=f"{len(failed)} failed", target="0 failed",
                          met=False, note="; ".join(f"{r['solver']} {r['backend']}/{r['mode'] or 'default'}: "
                                                    f"{r['error']}" for r in failed)[:400]))
    return goals


def _by(value: float, limit: float) -> str:
    """'' when ``value <= limit``, else by how much it exceeds it (for a minimum goal pass (target, measured))."""
    if value <= limit:
        return ""
    return f"missed by {100 * (value / limit - 1):.0f}%" if limit > 0 else "missed"


# ---------------------------------------------------------------------------------------------------- output
def _md_header(m: dict) -> list[str]:
    """The block's start marker, title and the run's setting (device, versions, measurement, solvers)."""
    return [MARK.format(preset=m["preset"]),
            f"### Solver benchmark — preset `{m['preset']}` ({m['variant']} random-weight SD1.5)",
            "",
            f"{m['device']}, torch {m['torch']}, ComfyUI {m['comfyui']}, UNet {m['unet_dtype']}, VAE {m['vae_dtype']}, "
            f"{m['date']}, commit {m['commit']}. Produced by "
            + "; ".join(f"`{c}`" for c in m.get("commands") or [m["command"]]) + ".",
            "",
            f"Gaussian blur {m['blur'][0]}×{m['blur'][0]} σ={m['blur'][1]} + noise 0.01, scheduler normal, "
            f"{m['steps']} steps; SILO η 0.5 ddpm clamp 1 (untrained operator); Latent-DPS η 1; PSLD η 1 γ 0.1; "
            f"ReSample consistency every {m['resample']['consistency_every']} steps "
            f"({m['resample'].get('optimization', 'auto')}: ≤{m['resample'].get('pixel_steps', 2000)} pixel-space / "
            f"≤{m['resample']['latent_steps']} latent-space Adam steps each), γ 40. Median of up to {m['repeats']} "
            "timed run(s) after a warm-up.",
            ""]


def _md_sampling(rows: list[dict]) -> list[str]:
    lines = ["| solver | size | batch | cfg | s/image | s/step | × KSampler | peak VRAM GiB | runs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['solver']} | {r['size']}² | {r['batch']} | {r['cfg']:g} | {r['s_image']:.3f} | "
                     f"{r['s_step']:.4f} | {r['x_ksampler']:.2f} | {_gib(r['peak_gib'])} | {r['runs']} |")
    return [*lines, ""]


def _md_paper(q: dict) -> list[str]:
    return [f"Paper setting (SILO, gradient through the UNet, {q['steps']} DDPM steps, η 0.5, CFG 1, "
            f"{q['size']}²): {q['s_image']:.2f} s/image, {q['s_step'] * 1e3:.1f} ms/step, peak "
            f"{_gib(q['peak_gib'])} GiB.", ""]


def _md_components(comps: list[dict]) -> list[str]:
    lines = ["| component (batch 1) | size | ms | peak GiB |", "|---|---|---|---|"]
    lines += [f"| {c['what']} | {c['size']}² | {c['ms']:.1f} | {_gib(c['peak_gib'])} |" for c in comps if c["runs"]]
    return [*lines, ""]


def _md_training(training: list[dict]) -> list[str]:
    lines = ["| operator training (box inpainting) | steps/s | images/s | peak GiB | held-out ≤ "
             f"{training[0]['margin']:g}× identity reached after | final held-out / identity L1 |",
             "|---|---|---|---|---|---|"]
    for t in training:
        reach = (f"{t['reach']['seconds']:.1f} s (step {t['reach']['step']})" if t["reach"]
                 else f"not within {t['steps']} steps")
        lines.append(f"| {t['size']}², batch {t['batch']} | {t['steps_per_s']:.2f} | {t['images_per_s']:.1f} | "
                     f"{_gib(t['peak_gib'])} | {reach} | {t['heldout_l1']:.4f} / {t['identity_l1']:.4f} |")
    return [*lines, ""]


def _md_compiled(compiled: list[dict]) -> list[str]:
    """The compiled-UNet table (failed variants with their error) and the graph-break reasons."""
    lines = ["Stretch: the UNet compiled with the host's `set_torch_compile_wrapper` (its TorchCompileModel "
             "node's mechanism; `mode` added), batch 1, CFG 1. The first run includes compilation and CUDA-graph "
             "capture; graphs / graph breaks / CUDA-graph skips are torch.compile's own counters during that "
             "solver's runs (graphs it added to the variant's cache; the solvers run in the order shown).",
             "",
             "| solver | UNet | size | first run s | s/image | s/step | × eager KSampler | × KSampler same UNet | "
             "peak GiB | graphs / breaks / cudagraph skips |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in compiled:
        unet = "eager" if r["backend"] == "eager" else f"{r['backend']}/{r['mode'] or 'default'}"
        if r["error"] is not None:
            err = r["error"].replace("|", "\\|")
            lines.append(f"| {r['solver']} | {unet} | {r['size']}² | failed: {err} | | | | | | |")
            continue
        counts = (f"{r['graphs']} / {r['breaks']} / {r['cudagraph_skips']}" if "graphs" in r else "—")
        lines.append(f"| {r['solver']} | {unet} | {r['size']}² | {r['first_s']:.2f} | {r['s_image']:.3f} | "
                     f"{r['s_step']:.4f} | {r['x_eager_ksampler']:.2f} | {r['x_ksampler']:.2f} | "
                     f"{_gib(r['peak_gib'])} | {counts} |")
    lines.append("")
    reasons = [(r, why) for r in compiled for why in r.get("break_reasons") or []]
    if reasons:
        lines += ["Graph breaks (count× first line of torch.compile's reason):", ""]
        lines += [f"- {r['solver']}, {r['backend']}/{r['mode'] or 'default'}: {why}" for r, why in reasons]
        lines.append("")
    return lines


def _md_goals(goals: list[dict]) -> list[str]:
    lines = ["| goal (issue 6) | measured | target | met |", "|---|---|---|---|"]
    for g in goals:
        met = "—" if g["met"] is None else ("yes" if g["met"] else f"**no** ({g['note']})")
        lines.append(f"| {g['goal']} | {g['measured']} | {g['target']} | {met} |")
    return [*lines, ""]


#: the report's sections in order: the results key and how it is rendered (sections without results are left out)
_MD_SECTIONS = (("sampling", _md_sampling), ("paper", _md_paper), ("components", _md_components),
                ("training", _md_training), ("compiled", _md_compiled), ("goals", _md_goals))


def render_markdown(res: dict) -> list[str]:
    """The results as markdown lines between this preset's markers (see :func:`write_markdown`)."""
    m = res["meta"]
    lines = _md_header(m)
    for key, render in _MD_SECTIONS:
        if res.get(key):
            lines += render(res[key])
    if res.get("plot"):
        lines += [f"![time per image vs image size]({res['plot']})", ""]
    lines.append(MARK.format(preset=m["preset"]).replace("-->", "end -->"))
    return lines


def _gib(v: float) -> str:
    return "n/a" if v != v else f"{v:.2f}"


def write_markdown(path: Path, lines: list[str], preset: str) -> None:
    """Replace this preset's block in ``path`` (between its markers) or append it."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    begin, end = MARK.format(preset=preset), MARK.format(preset=preset).replace("-->", "end -->")
    block = "\n".join(lines)
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def plot_results(res: dict, path: Path) -> Path:
    from benchmarks.plot import line_plot

    series: dict[str, list] = {}
    for r in res["sampling"]:
        if r["batch"] == 1 and r["cfg"] == 1.0:
            series.setdefault(r["solver"], []).append((r["size"], r["s_image"]))
    m = res["meta"]
    return line_plot(series, path, title=f"Time per image, {m['steps']} steps, CFG 1, batch 1 — {m['device']}",
                     xlabel="image side (pixels)", ylabel="seconds per image (log)")


def benchmark(host, ckpt_name: str, preset_name: str, sections=SECTIONS, log=print, **overrides) -> dict:
    """Run the harness on an already started in-process host; returns the results dict (see module docstring)."""
    p = dict(PRESETS[preset_name], **overrides)
    b = Bench(host, ckpt_name, p)
    cuda = b.timer.cuda
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip() or "unknown"
    try:
        import comfyui_version

        comfy_version = comfyui_version.__version__
    except ImportError:
        comfy_version = "unknown"
    res: dict = {"meta": dict(
        preset=preset_name, variant=p["variant"], steps=p["steps"], repeats=p["repeats"], blur=list(p["blur"]),
        resample=p["resample"], device=torch.cuda.get_device_name(b.device) if cuda else
        (platform.processor() or platform.machine() or "CPU") + f" ({os.cpu_count()} cores)",
        torch=torch.__version__, comfyui=comfy_version,
        unet_dtype=str(b.model.model_dtype()).removeprefix("torch."),
        vae_dtype=str(b.vae.vae_dtype).removeprefix("torch."), date=str(dt.date.today()), commit=commit,
        command=f"python -m benchmarks.run --preset {preset_name}")}
    if "sampling" in sections:
        res["sampling"] = run_sampling(b, log)
    if "paper" in sections:
        res["paper"] = run_paper(b, log)
    if "components" in sections:
        res["components"] = run_components(b, log)
    if "training" in sections:
        res["training"] = run_training(b, log)
    if "compiled" in sections:
        res["compiled"] = run_compiled(b, log)
    res["goals"] = evaluate_goals(res)
    return res


#: how the rows of each section are identified when the results of several calls are merged
MERGE_KEYS = {"sampling": ("solver", "size", "batch", "cfg"), "components": ("what", "size"),
              "training": ("size", "batch"), "compiled": ("solver", "backend", "mode", "size")}


def merge_results(old: dict, new: dict) -> dict:
    """The results of an earlier call (``old``) with this call's (``new``) laid over them, for a GPU run split into
    several calls: rows of the same configuration are replaced, others kept; the paper row is replaced when this call
    has one; the goals are judged again on the merged numbers. Each row keeps the ratios measured in its own call.
    Results from another device, preset or checkpoint variant are refused: their timings do not compare."""
    for key in ("device", "preset", "variant", "steps"):
        if old["meta"].get(key) != new["meta"].get(key):
            raise ValueError(f"cannot merge: the earlier results have {key} {old['meta'].get(key)!r}, this run "
                             f"{new['meta'].get(key)!r}; use another --out folder (or leave out --merge)")
    res = {"meta": dict(new["meta"])}
    res["meta"]["commands"] = [*(old["meta"].get("commands") or [old["meta"]["command"]]), new["meta"]["command"]]
    for section, keys in MERGE_KEYS.items():
        rows = {tuple(r[k] for k in keys): r for r in old.get(section) or []}
        rows.update({tuple(r[k] for k in keys): r for r in new.get(section) or []})
        if rows:
            res[section] = list(rows.values())
    if new.get("paper") or old.get("paper"):
        res["paper"] = new.get("paper") or old["paper"]
    res["goals"] = evaluate_goals(res)
    return res


def parse_compile_variant(text: str) -> tuple[str, str | None]:
    """``"inductor:reduce-overhead"`` -> ``("inductor", "reduce-overhead")``; ``"cudagraphs"`` -> ``("cudagraphs",
    None)`` (torch.compile's default mode)."""
    backend, _, mode = text.strip().partition(":")
    if not backend or ":" in mode:
        raise ValueError(text)
    return backend, (mode or None) if mode != "default" else None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--markdown", default=None, help="write (replace) this preset's tables in this markdown file")
    ap.add_argument("--plot", default=None, help="PNG path for the time-per-image plot")
    ap.add_argument("--out", default=None, help="folder for results.json, results.md and the plot")
    ap.add_argument("--merge", action="store_true",
                    help="merge with the results.json already in --out (a GPU run split into several calls): the "
                         "tables and goals then cover every call")
    ap.add_argument("--repeats", type=int, default=None, help="override the preset's timed repeats")
    ap.add_argument("--max-config-seconds", type=float, default=None,
                    help="stop repeating a configuration after this many seconds (0 = always all repeats)")
    ap.add_argument("--configs", default=None,
                    help="override the preset's SIZExBATCH list, e.g. 512x1,1024x1 (the first size is the base)")
    ap.add_argument("--cfgs", default=None, help="override the preset's CFG list, e.g. 1,7.5")
    ap.add_argument("--compile", default=None,
                    help="override the preset's torch.compile variants for the compiled section: BACKEND[:MODE] "
                         "items, e.g. inductor:reduce-overhead,cudagraphs")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or os.path.expanduser("~/ComfyUI"))
    return ap


def _preset_overrides(ap: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The preset values the command line overrides (repeats, time limit, configurations, CFGs, compile variants)."""
    overrides = {k: v for k, v in (("repeats", args.repeats), ("max_config_seconds", args.max_config_seconds))
                 if v is not None}
    try:
        if args.configs:
            overrides["configs"] = [tuple(int(v) for v in c.lower().split("x")) for c in args.configs.split(",")]
            if any(len(c) != 2 or c[0] % 8 or min(c) < 1 for c in overrides["configs"]):
                raise ValueError
        if args.cfgs:
            overrides["cfgs"] = [float(v) for v in args.cfgs.split(",")]
        if args.compile:
            overrides["compile"] = [parse_compile_variant(v) for v in args.compile.split(",") if v.strip()]
    except ValueError:
        ap.error("--configs takes SIZExBATCH items (size a multiple of 8), e.g. 512x1,512x4; --cfgs numbers, e.g. "
                 "1,7.5; --compile BACKEND[:MODE] items, e.g. inductor:reduce-overhead,cudagraphs")
    return overrides


def _previous_results(ap: argparse.ArgumentParser, args: argparse.Namespace) -> dict | None:
    """With ``--merge``: the earlier call's results.json in ``--out`` (None when there is none yet)."""
    if not args.merge:
        return None
    if not args.out:
        ap.error("--merge needs --out: the folder that holds the earlier call's results.json")
    if not (Path(args.out) / "results.json").exists():
        return None
    previous = json.loads((Path(args.out) / "results.json").read_text(encoding="utf-8"))
    if previous["meta"].get("preset") != args.preset:
        ap.error(f"--merge: {args.out}/results.json holds preset {previous['meta'].get('preset')!r}, not "
                 f"{args.preset!r}; use another --out folder")
    return previous


def _run_in_host(args: argparse.Namespace, sections: list[str], overrides: dict) -> dict:
    """Start ComfyUI in this process with the preset's checkpoint and run the harness on it."""
    from comfyui_silo.tools.cli import bootstrap_host
    from comfyui_silo.tools.host_harness import InProcessHost, ensure_checkpoint, make_base_directory

    os.environ["COMFYUI_PATH"] = args.comfyui
    preset = PRESETS[args.preset]
    ckpt = ensure_checkpoint(preset["variant"])
    bootstrap_host(args.comfyui, cpu=args.cpu)
    import comfy.model_management  # noqa: F401  (before InProcessHost, which sets --cpu for its own tests)

    with tempfile.TemporaryDirectory(prefix="silo-bench-") as tmp:
        host = InProcessHost(make_base_directory(Path(tmp), [ckpt]))
        return benchmark(host, ckpt.name, args.preset, sections, **overrides)


def _write_outputs(res: dict, args: argparse.Namespace, out: Path | None) -> None:
    """The plot, the markdown printed and written (results.md, ``--markdown``) and results.json."""
    plot = Path(args.plot) if args.plot else (out / "time_per_image.png" if out else None)
    if plot and res.get("sampling"):
        plot_results(res, plot)
        res["plot"] = os.path.relpath(plot, Path(args.markdown).parent if args.markdown else (out or Path.cwd()))
    lines = render_markdown(res)
    print("\n".join(lines))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(res, indent=2, default=str), encoding="utf-8")
        (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if args.markdown:
        write_markdown(Path(args.markdown), lines, args.preset)


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}")
    overrides = _preset_overrides(ap, args)
    previous = _previous_results(ap, args)
    res = _run_in_host(args, sections, overrides)
    res["meta"]["command"] = "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out) if args.out else None
    if previous is not None:
        try:
            res = merge_results(previous, res)
        except ValueError as e:  # keep this call's numbers, then say why they were not merged
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.unmerged.json").write_text(json.dumps(res, indent=2, default=str), encoding="utf-8")
            print(f"benchmarks.run: {e}; this call's results are in {out / 'results.unmerged.json'}", file=sys.stderr)
            return 2
    _write_outputs(res, args, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
