"""The benchmark harness's cpu-smoke preset in the real host: every solver runs and the tables are produced.
(Nothing about time is asserted: timings belong to benchmarks, not tests.)"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.comfy


def test_cpu_smoke_preset_runs_every_solver_and_writes_the_tables(comfy_host, small_checkpoint, tmp_path):
    from benchmarks.run import (
        COMPILED_SOLVERS,
        PRESETS,
        SOLVERS,
        benchmark,
        plot_results,
        render_markdown,
        write_markdown,
    )

    res = benchmark(comfy_host, small_checkpoint.name, "cpu-smoke", log=lambda *a: None)
    p = PRESETS["cpu-smoke"]
    rows = res["sampling"]
    assert len(rows) == len(p["configs"]) * len(p["cfgs"]) * len(SOLVERS)
    for size, batch in p["configs"]:
        for cfg in p["cfgs"]:
            got = {r["solver"]: r for r in rows if (r["size"], r["batch"], r["cfg"]) == (size, batch, cfg)}
            assert set(got) == set(SOLVERS)
            assert got["KSampler"]["x_ksampler"] == 1.0
            assert all(r["s_run"] > 0 and math.isfinite(r["s_run"]) for r in got.values())
            assert all(r["s_image"] == pytest.approx(r["s_run"] / batch) for r in got.values())
    assert res["paper"]["steps"] == p["paper_steps"] and res["paper"]["s_image"] > 0
    comps = [c for c in res["components"] if c["runs"]]
    assert {c["what"] for c in comps} == {"UNet forward", "UNet forward+backward (w.r.t. input)", "VAE encode",
                                          "VAE decode", "VAE decoder forward+backward", "operator forward+backward"}
    assert len(comps) == 6 * len({s for s, _ in p["configs"]}) and all(c["ms"] > 0 for c in comps)
    assert [t["batch"] for t in res["training"]] == p["train"]["batches"]
    assert all(t["steps_per_s"] > 0 and t["images_per_s"] == pytest.approx(t["steps_per_s"] * t["batch"])
               for t in res["training"])
    compiled = res["compiled"]  # eager, then each torch.compile variant of the preset (cpu-smoke: aot_eager)
    assert [(r["solver"], r["backend"]) for r in compiled] == [
        (s, b) for b in ["eager"] + [v[0] for v in p["compile"]] for s in COMPILED_SOLVERS]
    assert all(r["error"] is None and r["s_run"] > 0 and r["first_s"] > 0 for r in compiled), compiled
    aot = [r for r in compiled if r["backend"] == "aot_eager"]
    assert aot[0]["x_ksampler"] == 1.0 and all(math.isfinite(r["x_eager_ksampler"]) for r in aot)
    unet = next(r for r in aot if r["solver"] == "SILO unet")
    assert unet["graphs"] >= 1 and unet["breaks"] == 0, "the guided UNet (SDPA attention) compiles as one graph"
    goals = {g["goal"] for g in res["goals"]}
    assert any(g.startswith("ReSample: 64²") for g in goals)
    assert any(g.startswith("stretch: guided SILO step ≤ 25 ms (32², unet, UNet compiled: aot_eager") for g in goals)
    assert any(g.startswith("stretch: compiled guided SILO step faster") for g in goals)

    res["plot"] = plot_results(res, tmp_path / "plot.png").name
    lines = render_markdown(res)
    doc = tmp_path / "BENCHMARKS.md"
    write_markdown(doc, lines, "cpu-smoke")
    text = doc.read_text(encoding="utf-8")
    for solver in SOLVERS:
        assert f"| {solver} | 64² | 1 | 7.5 |" in text
    assert "| VAE decoder forward+backward | 32² |" in text and "box inpainting" in text
    assert "| SILO unet | aot_eager/default | 32² |" in text
    assert "![time per image vs image size](plot.png)" in text and (tmp_path / "plot.png").stat().st_size > 1000
