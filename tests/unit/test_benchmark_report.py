"""The benchmark harness's reporting (benchmarks/run.py, benchmarks/plot.py) on made-up numbers: goals, markdown
blocks that a rerun replaces, and the PNG plot. The harness itself runs in tests/comfy/test_benchmark_harness.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.run import SOLVERS, evaluate_goals, render_markdown, write_markdown  # noqa: E402

pytestmark = pytest.mark.unit

# seconds per run at 512² and 1024², batch 1, CFG 1 (a made-up but plausible GPU run)
TIMES = {"KSampler": (2.0, 7.0), "SILO unet": (4.4, 16.0), "SILO x0": (2.2, 7.9), "Latent-DPS": (12.0, 60.0),
         "PSLD": (15.0, 70.0), "ReSample": (20.0, 95.0)}
PEAKS = {"KSampler": 2.2, "SILO unet": 3.0, "SILO x0": 2.9, "Latent-DPS": 5.9, "PSLD": 7.3, "ReSample": 5.0}


def _results(steps=50):
    rows = []
    for solver in SOLVERS:
        for size, sec in zip((512, 1024), TIMES[solver], strict=True):
            rows.append(dict(solver=solver, size=size, batch=1, cfg=1.0, steps=steps, s_run=sec, s_image=sec,
                             s_step=sec / steps, peak_gib=PEAKS[solver], runs=3,
                             x_ksampler=sec / TIMES["KSampler"][size == 1024]))
    comps = [dict(what="UNet forward", size=512, ms=30.0, peak_gib=2.1, runs=20),
             dict(what="UNet forward+backward (w.r.t. input)", size=512, ms=75.0, peak_gib=2.8, runs=20)]
    meta = dict(preset="gpu", variant="full", steps=steps, repeats=3, blur=[61, 3.0],
                resample=dict(consistency_every=10, latent_steps=100), device="NVIDIA H100", torch="2.x",
                comfyui="0.3.64", unet_dtype="float16", vae_dtype="bfloat16", date="2026-11-22", commit="abc1234",
                command="python -m benchmarks.run --preset gpu")
    return {"meta": meta, "sampling": rows, "components": comps}


def _goal(goals, start):
    (g,) = [g for g in goals if g["goal"].startswith(start)]
    return g


def test_goals_are_judged_from_the_numbers():
    goals = evaluate_goals(_results())
    x0 = _goal(goals, "SILO x0 time ≤ 1.15×")
    assert x0["met"] and x0["measured"] == "1.10×"
    # SILO unet: 4.4 s against the plain run with 50 forwards made forward+backward: 2.0 + 50 × 0.045 = 4.25 s
    unet = _goal(goals, "SILO unet time ≤ 1.1×")
    assert unet["met"] and unet["measured"].startswith("1.04×")
    # speed-up over the pixel-space solvers: 12 / 4.4 = 2.7× misses the 3× goal by 10 %
    miss = _goal(goals, "SILO unet ≥ 3× faster than Latent-DPS (512²")
    assert miss["met"] is False and miss["note"] == "missed by 10%"
    assert _goal(goals, "SILO x0 ≥ 3× faster than Latent-DPS (512²")["met"]
    # VRAM: x0 +0.7 GiB misses 0.5 GiB; unet +0.8 GiB is within the UNet's activations (0.7) + slack 0.25
    assert _goal(goals, "SILO x0 peak VRAM")["met"] is False
    assert _goal(goals, "SILO unet peak VRAM")["met"]
    # linear in pixels: ReSample 95/20 = 4.75× > 4.5× misses; KSampler 3.5× meets
    assert _goal(goals, "ReSample: 1024²")["met"] is False and _goal(goals, "KSampler: 1024²")["met"]
    assert _goal(goals, "stretch")["measured"] == "88.0 ms"


def test_goals_without_cuda_say_vram_was_not_measured():
    res = _results()
    for r in res["sampling"]:
        r["peak_gib"] = float("nan")
    g = _goal(evaluate_goals(res), "peak VRAM goals")
    assert g["met"] is None and "no CUDA" in g["note"]


def test_markdown_block_is_replaced_on_rerun(tmp_path):
    res = _results()
    res["goals"] = evaluate_goals(res)
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\nintro\n", encoding="utf-8")
    write_markdown(doc, render_markdown(res), "gpu")
    first = doc.read_text(encoding="utf-8")
    assert first.startswith("# Benchmarks\n\nintro\n") and "| ReSample | 1024² | 1 | 1 | 95.000 |" in first
    assert "**no** (missed by 10%)" in first
    res["meta"]["commit"] = "def5678"
    write_markdown(doc, render_markdown(res), "gpu")
    second = doc.read_text(encoding="utf-8")
    assert second.count("### Solver benchmark") == 1 and "def5678" in second and "abc1234" not in second
    # another preset gets its own block
    res["meta"]["preset"] = "cpu-smoke"
    write_markdown(doc, render_markdown(res), "cpu-smoke")
    assert doc.read_text(encoding="utf-8").count("### Solver benchmark") == 2


def test_plot_draws_one_coloured_line_per_solver(tmp_path):
    import numpy as np
    from PIL import Image

    from benchmarks.plot import COLOURS, line_plot

    series = {s: [(512, TIMES[s][0]), (1024, TIMES[s][1])] for s in SOLVERS}
    path = line_plot(series, tmp_path / "p.png", title="t", xlabel="x", ylabel="y")
    with Image.open(path) as im:
        assert im.size == (900, 560)
        colours = set(map(tuple, np.asarray(im.convert("RGB")).reshape(-1, 3).tolist()))
    for c in COLOURS[: len(SOLVERS)]:
        assert c in colours
    with pytest.raises(ValueError, match="no positive values"):
        line_plot({"a": [(1, float("nan"))]}, tmp_path / "q.png", title="t", xlabel="x", ylabel="y")
