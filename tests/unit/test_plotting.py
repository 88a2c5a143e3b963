"""operators/charts.py: the Pillow charts behind SILO Trace Plot and the training-curve image."""

from __future__ import annotations

import math

import pytest

from comfyui_silo.operators.charts import COLOURS, line_chart, nice_ticks, trace_chart, training_curve_chart

pytestmark = pytest.mark.unit


def _rows_with(img, colour, tol=40):
    """Per column, the mean row of the pixels close to ``colour`` (None where there are none)."""
    w, h = img.size
    px = img.load()
    out = []
    for x in range(w):
        rows = [y for y in range(h) if sum(abs(a - b) for a, b in zip(px[x, y], colour, strict=True)) < tol]
        out.append(sum(rows) / len(rows) if rows else None)
    return out


def test_a_falling_trace_is_drawn_falling_with_its_summary():
    trace = [{"step": i, "sigma": 1.0, "loss": [50 * math.exp(-i / 10) + 1]} for i in range(40)]
    img = trace_chart(trace, size=(640, 400))
    assert img.size == (640, 400) and img.mode == "RGB"
    rows = [r for r in _rows_with(img, COLOURS[0])[70:560] if r is not None]
    assert len(rows) > 300, "the line spans the plot"
    assert rows[0] < rows[-1] - 150, "high loss at the left is drawn near the top, low loss at the right near the bottom"


def test_a_batch_gets_one_line_per_image_and_their_mean():
    trace = [{"step": i, "loss": [10.0 - i, 5.0 + i]} for i in range(6)]
    img = trace_chart(trace)
    for colour in COLOURS[:3]:  # image 1, image 2, mean
        assert sum(r is not None for r in _rows_with(img, colour)) > 100


def test_empty_or_non_finite_input_is_refused():
    with pytest.raises(ValueError):
        trace_chart([])
    with pytest.raises(ValueError):
        line_chart({"a": [(0, float("nan"))]}, title="t", xlabel="x", ylabel="y")


def test_training_curve_shows_the_operator_against_both_baselines():
    curve = [{"step": s, "train_loss": 0.3 / s ** 0.3, "heldout_l1": 0.5 / s ** 0.4, "identity_l1": 0.3,
              "naive_l1": 0.2} for s in (10, 20, 40, 80)]
    img = training_curve_chart({"curve": curve})
    # the baselines are flat (dashed) lines: one row each over the plot
    for colour in (COLOURS[1], COLOURS[2]):
        rows = {round(r) for r in _rows_with(img, colour)[80:360] if r is not None}  # left of the legend
        assert rows and max(rows) - min(rows) <= 3, rows
    with pytest.raises(ValueError, match="held-out"):
        training_curve_chart({"curve": []})


def test_nice_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0, 1) == [0, 0.25, 0.5, 0.75, 1.0]
    assert nice_ticks(0, 3, integer=True) == [0, 1, 2, 3]
    ticks = nice_ticks(3.2, 247.0)
    assert ticks[0] >= 3.2 and ticks[-1] <= 247 and all(t % 50 == 0 for t in ticks)
