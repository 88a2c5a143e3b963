"""Operator quality in a real latent space: how well trained operators emulate each degradation.

Trains one operator per degradation with the pack's own ``train_operator`` (its defaults unless ``--set`` says
otherwise) in the latent space of a real autoencoder, then measures it on held-out photos it never saw: latent
relative error (operator / identity / degradation-on-latent), decoded PSNR and SSIM against the degraded photo
(operator / the autoencoder's own floor D(E(A x)) / identity D(E x)), the share of the identity → floor gap the
operator closes, the verdict, and the cost (wall time, optimiser steps/s, encodes/s). Prints a markdown table,
writes ``operator_quality.json`` and ``operator_quality.png`` to ``--out``.

taef2 (FLUX.2's tiny autoencoder, 32 channels, 8x; MIT, github.com/madebyollin/taesd) on the host's workflow-
template thumbnails, this machine's CPU (the table in BENCHMARKS.md)::

    python -m benchmarks.operator_quality --taesd ~/taef2 --out benchmarks/_out/quality --markdown BENCHMARKS.md

How far any operator can go in that latent space (no training; the autoencoder itself in the loop)::

    python -m benchmarks.operator_quality --taesd ~/taef2 --bounds

A ComfyUI VAE file instead (the host must be importable; name its latent format)::

    python -m benchmarks.operator_quality --vae ~/ComfyUI/models/vae/ae.safetensors --latent-format Flux

Never a timed test: the test tiers run :func:`run` on a tiny random autoencoder (unit) and, when
``SILO_TAEF2_DIR`` points at the taef2 weights, a short version on taef2 (tier ``realvae``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from benchmarks.autoencoders import Autoencoder, comfy_vae, taesd_pair
from benchmarks.common import emit
from comfyui_silo.operators.charts import bar_chart
from comfyui_silo.operators.fidelity import GOOD_GAP
from comfyui_silo.operators.training import train_operator

__all__ = ["DEGRADATION_PRESETS", "autoencoder_bounds", "bounds_lines", "load_images", "preset_spec", "run",
           "split_by_template", "table_lines"]

#: Named degradations at a crop of ``c`` pixels (the papers' settings; inpainting boxes scaled from 512 px images).
DEGRADATION_PRESETS: dict[str, Callable[[int], dict]] = {
    "blur": lambda c: {"type": "gaussian_blur", "kernel_size": 61, "sigma": 3.0},
    "sr4": lambda c: {"type": "super_resolution", "factor": 4},
    "sr8": lambda c: {"type": "super_resolution", "factor": 8},
    "box": lambda c: {"type": "box_inpaint", "top": c // 4, "left": c // 4, "height": c // 2, "width": c // 2},
    "random_box": lambda c: {"type": "random_box_inpaint", "size": c // 2, "margin": max(1, c // 32)},
    "jpeg": lambda c: {"type": "jpeg", "quality": 10},
}


def preset_spec(name: str, crop: int) -> dict:
    """A preset's spec at ``crop`` px, or a JSON spec given as text."""
    if name in DEGRADATION_PRESETS:
        return DEGRADATION_PRESETS[name](crop)
    if name.lstrip().startswith("{"):
        return json.loads(name)
    raise SystemExit(f"unknown degradation {name!r}: use {', '.join(DEGRADATION_PRESETS)} or a JSON spec")


def _read_image(path: str) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        im.seek(0)  # animated thumbnails: the first frame
        arr = np.asarray(im.convert("RGB")).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0


def template_thumbnails() -> list[str]:
    """The host's workflow-template thumbnails (package ``comfyui_workflow_templates``, installed with ComfyUI)."""
    try:
        import comfyui_workflow_templates
    except ImportError:
        raise SystemExit("no --images given and the comfyui_workflow_templates package (installed with ComfyUI's "
                         "requirements) is missing: pass --images DIR_OR_GLOB") from None
    return sorted(glob.glob(os.path.join(os.path.dirname(comfyui_workflow_templates.__file__), "templates", "*.webp")))


def _paths(spec: str) -> list[str]:
    p = Path(spec).expanduser()
    if p.is_dir():
        return sorted(str(f) for f in p.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    return sorted(glob.glob(os.path.expanduser(spec)))


def split_by_template(paths: Sequence[str], every: int = 8, offset: int = 3) -> tuple[list[str], list[str]]:
    """(training, held-out) paths: every ``every``-th *group* of files held out, a group being the files whose names
    differ only in a trailing ``-N`` (a template's several thumbnails), so no held-out picture has a sibling in
    training."""
    def group(p: str) -> str:
        return re.sub(r"-\d+$", "", Path(p).stem)

    names = sorted({group(p) for p in paths})
    held = set(names[offset::every])
    return [p for p in paths if group(p) not in held], [p for p in paths if group(p) in held]


def load_images(paths: Sequence[str], max_side: int = 1024) -> list[torch.Tensor]:
    """Images as [3,H,W] in [0,1]; larger ones scaled down to ``max_side`` (the crops are small anyway)."""
    out = []
    for p in paths:
        im = _read_image(p)
        side = max(im.shape[-2:])
        if side > max_side:
            size = [max(1, round(s * max_side / side)) for s in im.shape[-2:]]
            im = torch.nn.functional.interpolate(im[None], size=size, mode="bicubic", antialias=True,
                                                 align_corners=False).clamp(0, 1)[0]
        out.append(im)
    return out


def run(ae: Autoencoder, train_images: list, heldout_images: list, degradations: Sequence[str], *,
        crop: int = 256, settings: dict | None = None, device: str = "cpu", log: Callable[[str], None] = print) -> list:
    """Train and measure one operator per degradation; one row (a dict) per degradation."""
    rows = []
    for name in degradations:
        spec = preset_spec(name, crop)
        log(f"[quality] {name}: training ({spec})")
        t0 = time.perf_counter()
        last = [t0]

        def progress(step, total, info, name=name, last=last, t0=t0):
            if time.perf_counter() - last[0] > 30:
                last[0] = time.perf_counter()
                what = f"encoding {info['encoded']}/{info['pool_size']}" if info.get("phase") == "encoding" \
                    else f"step {step}/{total}"
                log(f"[quality] {name}: {what} ({time.perf_counter() - t0:.0f} s)")

        options = {"fidelity_crops": 0, **(settings or {})}  # decode every held-out crop, not the node's 16
        res = train_operator(ae.encode, spec, train_images, heldout_images=heldout_images, decode=ae.decode,
                             crop_size=crop, device=device, progress=progress, **options)
        wall = time.perf_counter() - t0
        rep = res.report
        rows.append({"degradation": name, "spec": spec, "wall_seconds": round(wall, 1),
                     "steps_per_second": rep["steps_per_second"], "encodes_per_second": rep["encodes_per_second"],
                     "encodes": rep["encodes"], "fidelity": rep["fidelity"], "curve": rep["curve"],
                     "settings": rep["config"], "architecture": rep["architecture"],
                     "autoencoder_dtype": rep["autoencoder_dtype"]})
        log(f"[quality] {name}: {rep['fidelity']['verdict']['text']} ({wall:.0f} s)")
    return rows


def autoencoder_bounds(ae: Autoencoder, heldout_images: list, degradations: Sequence[str], *, crop: int = 256,
                       batch: int = 8) -> list[dict]:
    """How far any operator can go in ``ae``'s latent space, per degradation, on one centre crop of every held-out
    picture (mean of per-picture PSNR, dB, against A x): the floor D(E(A x)), identity D(E x), the best pixel-space
    guess from the latent A(D(E x)) before re-encoding, and the "oracle" operator D(E(A(D(E x)))) (the autoencoder
    itself in the loop) with its share of the identity → floor gap. No training."""
    from comfyui_silo.operators.degradations import build_degradation
    from comfyui_silo.operators.training import center_crops

    x = center_crops(heldout_images, crop)

    def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
        mse = (a - b).pow(2).flatten(1).mean(1).clamp(min=1e-12)
        return float((10 * torch.log10(1.0 / mse)).mean())

    def roundtrip(t: torch.Tensor) -> torch.Tensor:  # D(E(t)), a few crops at a time
        return torch.cat([ae.decode(ae.encode(t[i:i + batch])) for i in range(0, len(t), batch)])

    rows = []
    with torch.no_grad():
        recon = roundtrip(x)
        for name in degradations:
            deg = build_degradation(preset_spec(name, crop))
            degrade = lambda t, deg=deg: deg.lift(deg(t), size=t.shape[-2:]).clamp(0.0, 1.0)  # noqa: E731
            ax, guess = degrade(x), degrade(recon)
            floor, identity, oracle = psnr(roundtrip(ax), ax), psnr(recon, ax), psnr(roundtrip(guess), ax)
            span = floor - identity
            rows.append({"degradation": name, "floor": floor, "identity": identity, "guess": psnr(guess, ax),
                         "oracle": oracle, "oracle_gap": (oracle - identity) / span if span > 0 else None})
    return rows


def bounds_lines(rows: Sequence[dict], facts: str) -> list[str]:
    """The markdown table of :func:`autoencoder_bounds`."""
    lines = [facts, "", "| degradation | floor D(E(A x)) | identity D(E x) | A(D(E x)) vs A x, before re-encoding | "
             "oracle D(E(A(D(E x)))) | oracle's share of the gap |", "|---|---|---|---|---|---|"]
    for r in rows:
        share = "–" if r["oracle_gap"] is None else f"{r['oracle_gap']:.0%}"
        lines.append(f"| {r['degradation']} | {r['floor']:.2f} | {r['identity']:.2f} | {r['guess']:.2f} | "
                     f"{r['oracle']:.2f} | {share} |")
    return lines


def table_lines(rows: Sequence[dict], title: str, facts: str) -> list[str]:
    """The markdown table of :func:`run`'s rows."""
    lines = [f"### {title}", "", facts, "",
             "| degradation | latent rel. error: operator / identity / naive | PSNR dB: operator / floor / identity "
             "| SSIM: operator / floor / identity | gap closed | verdict | wall s | steps/s | encodes/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat, dec = r["fidelity"]["latent"], r["fidelity"]["decoded"]
        gap = dec.get("gap_closed")
        lines.append(
            f"| {r['degradation']} | {lat['operator']['rel_l2']:.3f} / {lat['identity']['rel_l2']:.3f} / "
            f"{lat['naive_latent']['rel_l2']:.3f} | {dec['operator']['psnr']:.1f} / {dec['floor']['psnr']:.1f} / "
            f"{dec['identity']['psnr']:.1f} | {dec['operator']['ssim']:.3f} / {dec['floor']['ssim']:.3f} / "
            f"{dec['identity']['ssim']:.3f} | {'–' if gap is None else f'{gap:.0%}'} | "
            f"{r['fidelity']['verdict']['level']} | {r['wall_seconds']:.0f} | {r['steps_per_second'] or 0:.2f} | "
            f"{r['encodes_per_second'] or 0:.1f} |")
    return lines


def chart(rows: Sequence[dict], path: Path, title: str) -> Path:
    groups = [r["degradation"] for r in rows]
    series = {k: [r["fidelity"]["decoded"][key]["psnr"] for r in rows]
              for k, key in (("identity D(E x)", "identity"), ("operator D(H(E x))", "operator"),
                             ("VAE floor D(E(A x))", "floor"))}
    labels = [f"{r['fidelity']['decoded']['gap_closed']:.0%}" if r["fidelity"]["decoded"].get("gap_closed")
              is not None else "" for r in rows]
    img = bar_chart(groups, series, title=title, ylabel="decoded PSNR vs A(x), dB",
                    note=f"label: share of the identity → floor gap closed (good from {GOOD_GAP:.0%})",
                    group_labels=labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _autoencoder(args) -> Autoencoder:
    if args.taesd:  # float32 weights; train_operator's autoencoder_precision sets the arithmetic
        return taesd_pair(args.taesd, args.taesd_decoder)
    from comfyui_silo.tools.cli import bootstrap_host

    bootstrap_host(os.environ.get("COMFYUI_PATH") or os.path.expanduser("~/ComfyUI"))
    return comfy_vae(args.vae, args.latent_format)


def _settings(pairs: Sequence[str], steps: int | None) -> dict:
    out = {}
    for item in pairs:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    if steps is not None:
        out["steps"] = steps
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--taesd", help="TAESD-format encoder .pth, or a folder with one *_encoder.pth/*_decoder.pth")
    src.add_argument("--vae", help="a ComfyUI VAE file (.safetensors)")
    p.add_argument("--taesd-decoder", default=None, help="the decoder .pth when not beside the encoder")
    p.add_argument("--latent-format", default="SD15", help="with --vae: SD15, SDXL, SD3, Flux, ...")
    p.add_argument("--encode-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="autoencoder arithmetic while training and measuring (train_operator's "
                        "autoencoder_precision; auto = bfloat16 on CPUs with AMX, about 2.6x the encodes/s at the "
                        "same operator quality)")
    p.add_argument("--images", default=None, help="training images: a folder or a glob (default: the host's "
                                                  "workflow-template thumbnails, held-out templates split off)")
    p.add_argument("--heldout-images", default=None, help="held-out images (default: split off --images by name)")
    p.add_argument("--degradations", default=",".join(DEGRADATION_PRESETS),
                   help=f"comma-separated: {', '.join(DEGRADATION_PRESETS)} (or ';'-separated JSON specs)")
    p.add_argument("--crop-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: train_operator's default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any train_operator setting, e.g. --set pool_size=256 --set learning_rate=5e-4")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="benchmarks/_out/quality")
    p.add_argument("--markdown", default=None, help="append the table to this markdown file")
    p.add_argument("--bounds", action="store_true",
                   help="no training: how far any operator can go in this latent space (the autoencoder's floor, "
                        "identity, A(D(E x)) and the autoencoder itself in the loop) on the held-out crops")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    paths = _paths(args.images) if args.images else template_thumbnails()
    if args.heldout_images:
        train_paths, held_paths = paths, _paths(args.heldout_images)
    else:
        train_paths, held_paths = split_by_template(paths)
    if not train_paths or not held_paths:
        raise SystemExit(f"need training and held-out images; got {len(train_paths)} and {len(held_paths)}")
    ae = _autoencoder(args)
    sep = ";" if args.degradations.lstrip().startswith("{") else ","
    names = [d.strip() for d in args.degradations.split(sep) if d.strip()]
    if args.bounds:
        facts = (f"{ae.name} ({ae.latent_channels} channels, {ae.downscale}x, autoencoder float32); {len(held_paths)} "
                 f"held-out images, crops {args.crop_size} px; mean of per-picture PSNR (dB) against A x")
        emit(bounds_lines(autoencoder_bounds(ae, load_images(held_paths), names, crop=args.crop_size), facts),
             args.markdown)
        return 0
    settings = {"autoencoder_precision": args.encode_dtype, **_settings(args.set, args.steps)}
    rows = run(ae, load_images(train_paths), load_images(held_paths), names, crop=args.crop_size,
               settings=settings, device=args.device)
    used = rows[0]["autoencoder_dtype"] if rows else args.encode_dtype
    facts = (f"{ae.name} ({ae.latent_channels} channels, {ae.downscale}x, autoencoder {used}); "
             f"{len(train_paths)} training / {len(held_paths)} held-out images, crops {args.crop_size} px; "
             f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}, {dt.date.today()}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "operator_quality.json").write_text(json.dumps({"facts": facts, "rows": rows}, indent=1))
    chart(rows, out / "operator_quality.png", f"Operator quality in {ae.name}'s latent space (held-out photos)")
    emit(table_lines(rows, f"Operator quality: {ae.name}", facts), args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
