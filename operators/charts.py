"""Small line charts drawn with Pillow (no plotting library): the pack's one plotting helper.

Pure Python + Pillow (imported when drawing), no ComfyUI and no torch: the nodes (``nodes/plots.py``) turn the
returned ``PIL.Image`` into an IMAGE tensor; the benchmark harness saves its time-per-image plot with it; the workflow
builder draws its thumbnails' captions with :func:`font`. Used for a solver's per-step consistency trace (SILO Trace Plot) and for an operator's training
curve against its two trivial baselines (Train Latent Operator's report).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# distinguishable colours (Okabe-Ito), one per series in order
COLOURS = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233),
           (120, 120, 120), (240, 228, 66)]
BACKGROUND, INK, GRID, FRAME = (255, 255, 255), (20, 20, 20), (228, 228, 228), (90, 90, 90)


def font(size: int, bold: bool = False):
    """DejaVu Sans (bold) at ``size`` px where installed, else Pillow's default font."""
    from PIL import ImageFont

    file = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    for name in (file, f"/usr/share/fonts/truetype/dejavu/{file}"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """About ``count`` round values (1, 2, 5 × 10^k steps) covering [lo, hi]; whole numbers only if ``integer``."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    if integer:
        raw = max(raw, 1.0)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, v = [], first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 values per decade within [lo, hi] (only the powers of ten when the range spans many decades)."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    mults = (1, 2, 5) if len(decades) <= 4 else (1,)
    ticks = [m * 10.0 ** e for e in decades for m in mults if lo <= m * 10.0 ** e <= hi]
    return ticks or [lo, hi]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.0e}"
    return f"{v:g}"


def _canvas(size: tuple[int, int], left: int, s: float, title: str, note: str | None, f_title, f_small):
    """A blank chart: background, the title and the optional note line under it."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, BACKGROUND)
    d = ImageDraw.Draw(img)
    d.text((left, round(10 * s)), title, fill=INK, font=f_title)
    if note:
        d.text((left, round(32 * s)), note, fill=(90, 90, 90), font=f_small)
    return img, d


def _finite_points(series: Mapping[str, Sequence[tuple[float, float]]], log_y: bool | None):
    """The finite points of each series, sorted by x, and whether the y axis is logarithmic (``None``: log when every
    value is positive and they span more than a factor of 20; a log axis drops the non-positive values). Also
    returns every x drawn before that drop, which sets the x range."""
    pts = {k: sorted((float(x), float(y)) for x, y in v if math.isfinite(float(x)) and math.isfinite(float(y)))
           for k, v in series.items()}
    pts = {k: v for k, v in pts.items() if v}
    if not pts:
        raise ValueError("line_chart: no finite values to draw")
    xs = [x for v in pts.values() for x, _ in v]
    ys = [y for v in pts.values() for _, y in v]
    positive = min(ys) > 0
    if log_y is None:
        log_y = positive and max(ys) / min(ys) > 20
    if log_y and not positive:
        pts = {k: [(x, y) for x, y in v if y > 0] for k, v in pts.items()}
        pts = {k: v for k, v in pts.items() if v}
        if not pts:
            raise ValueError("line_chart: a log axis needs positive values")
    return pts, bool(log_y), xs


@dataclass(frozen=True)
class _LineAxes:
    """A line chart's frame (image size, margins, font scale ``s``) and data ranges (``y_lo``/``y_hi`` in log10
    units on a log axis), mapping data to pixels."""

    W: int
    H: int
    s: float
    left: int
    right: int
    top: int
    bottom: int
    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float
    log_y: bool

    @classmethod
    def fit(cls, xs: list[float], ys: list[float], log_y: bool, size: tuple[int, int], note: str) -> _LineAxes:
        """Margins scaled with the image height, and padded ranges covering ``xs`` and ``ys``."""
        W, H = size
        s = H / 400  # scale fonts and margins with the image
        x_lo, x_hi = min(xs), max(xs)
        if x_hi == x_lo:
            x_lo, x_hi = x_lo - 1, x_hi + 1
        if log_y:
            y_lo, y_hi = math.log10(min(ys)), math.log10(max(ys))
            pad = max((y_hi - y_lo) * 0.06, 0.05)
            y_lo, y_hi = y_lo - pad, y_hi + pad
        else:
            y_lo, y_hi = min(ys), max(ys)
            pad = (y_hi - y_lo) * 0.08 or max(abs(y_hi) * 0.1, 1e-6)
            y_lo, y_hi = (0.0 if 0 <= y_lo <= pad * 3 else y_lo - pad), y_hi + pad
        return cls(W, H, s, round(64 * s), round(16 * s), round((58 if note else 42) * s), round(46 * s),
                   x_lo, x_hi, y_lo, y_hi, log_y)

    def px(self, x: float) -> float:
        return self.left + (self.W - self.left - self.right) * (x - self.x_lo) / (self.x_hi - self.x_lo)

    def py(self, y: float) -> float:
        v = math.log10(y) if self.log_y else y
        return self.top + (self.H - self.top - self.bottom) * (1 - (v - self.y_lo) / (self.y_hi - self.y_lo))


def _draw_grid(d, ax: _LineAxes, xlabel: str, ylabel: str, integer_x: bool, f_small) -> None:
    """Grid lines with tick labels on both axes, the frame and the axis titles."""
    W, H, left, right, top, bottom, s = ax.W, ax.H, ax.left, ax.right, ax.top, ax.bottom, ax.s
    y_ticks = log_ticks(10 ** ax.y_lo, 10 ** ax.y_hi) if ax.log_y else nice_ticks(ax.y_lo, ax.y_hi)
    for t in y_ticks:
        y = ax.py(t)
        if top <= y <= H - bottom:
            d.line([(left, y), (W - right, y)], fill=GRID)
            d.text((left - 6, y), _fmt(t), fill=INK, font=f_small, anchor="rm")
    for t in nice_ticks(ax.x_lo, ax.x_hi, 6, integer=integer_x):
        x = ax.px(t)
        if left <= x <= W - right:
            d.line([(x, top), (x, H - bottom)], fill=GRID)
            d.text((x, H - bottom + 5), _fmt(t), fill=INK, font=f_small, anchor="mt")
    d.rectangle([left, top, W - right, H - bottom], outline=FRAME)
    d.text(((left + W - right) / 2, H - round(8 * s)), xlabel, fill=INK, font=f_small, anchor="mb")
    d.text((round(6 * s), top - round(4 * s)), ylabel, fill=INK, font=f_small, anchor="lb")


def _draw_lines(d, ax: _LineAxes, pts: Mapping[str, list[tuple[float, float]]], dashed: set, width: int) -> None:
    """Each series as a line (dashed if named in ``dashed``; markers on short solid lines), or one marker."""
    s = ax.s
    for i, (label, v) in enumerate(pts.items()):
        c = COLOURS[i % len(COLOURS)]
        xy = [(ax.px(x), ax.py(y)) for x, y in v]
        if len(xy) == 1 or label in dashed and len(xy) < 2:
            r = max(3, round(3 * s))
            d.ellipse([xy[0][0] - r, xy[0][1] - r, xy[0][0] + r, xy[0][1] + r], fill=c)
        elif label in dashed:
            _dashed_line(d, xy, c, width, dash=round(8 * s))
        else:
            d.line(xy, fill=c, width=width, joint="curve")
            if len(xy) <= 12:
                r = max(2, round(2.5 * s))
                for x, y in xy:
                    d.ellipse([x - r, y - r, x + r, y + r], fill=c)


def _draw_line_legend(d, ax: _LineAxes, labels: Iterable[str], dashed: set, width: int, f_small) -> None:
    """The legend, top right inside the frame: a line sample (dashed as drawn) and the name of each series."""
    s = ax.s
    ly = ax.top + round(6 * s)
    for i, label in enumerate(labels):
        c = COLOURS[i % len(COLOURS)]
        tw = d.textlength(label, font=f_small)
        x1 = ax.W - ax.right - round(8 * s)
        x0 = x1 - tw - round(26 * s)
        d.rectangle([x0 - 3, ly - 2, x1 + 3, ly + round(14 * s)], fill=BACKGROUND)
        seg = [(x0, ly + round(7 * s)), (x0 + round(18 * s), ly + round(7 * s))]
        if label in dashed:
            _dashed_line(d, seg, c, width, dash=round(5 * s))
        else:
            d.line(seg, fill=c, width=width)
        d.text((x0 + round(24 * s), ly), label, fill=INK, font=f_small)
        ly += round(17 * s)


def line_chart(series: Mapping[str, Sequence[tuple[float, float]]], *, title: str, xlabel: str, ylabel: str,
               size: tuple[int, int] = (640, 400), log_y: bool | None = None,
               dashed: Iterable[str] = (), note: str = "", integer_x: bool = False):
    """Draw ``{label: [(x, y), ...]}`` as lines on one chart and return a ``PIL.Image`` (RGB).

    ``log_y``: None picks a log axis when every value is positive and they span more than a factor of 20.
    Series named in ``dashed`` are drawn dashed (baselines). Non-finite points are skipped; a series with one point
    is drawn as a marker. ``note`` is a small line of text under the title; ``integer_x`` keeps x ticks whole
    (steps). Raises ``ValueError`` when there is
    nothing to draw.
    """
    pts, log_y, xs = _finite_points(series, log_y)
    ax = _LineAxes.fit(xs, [y for v in pts.values() for _, y in v], log_y, size, note)
    s = ax.s
    f_title, f_small = font(max(10, round(16 * s))), font(max(9, round(12 * s)))
    img, d = _canvas((ax.W, ax.H), ax.left, s, title, note, f_title, f_small)
    _draw_grid(d, ax, xlabel, ylabel, integer_x, f_small)
    dashed = set(dashed)
    width = max(2, round(2.5 * s))
    _draw_lines(d, ax, pts, dashed, width)
    _draw_line_legend(d, ax, pts, dashed, width, f_small)
    return img


def bar_chart(groups: Sequence[str], series: Mapping[str, Sequence[float]], *, title: str, ylabel: str,
              size: tuple[int, int] = (900, 480), note: str = "", group_labels: Sequence[str] = ()):
    """Grouped bars: one group per entry of ``groups``, one bar per series (``{label: [value per group]}``), the
    axis starting at the smallest value's round tick below; ``group_labels`` are written above each group."""

    values = [float(v) for vs in series.values() for v in vs if math.isfinite(float(v))]
    if not groups or not values:
        raise ValueError("bar_chart: nothing to draw")
    W, H = size
    s = H / 400
    f_title, f_small = font(max(10, round(16 * s))), font(max(9, round(12 * s)))
    left, right, top, bottom = round(64 * s), round(16 * s), round((58 if note else 42) * s), round(46 * s)
    ticks = nice_ticks(min(values), max(values))
    y_lo = min(ticks[0], min(values)) - (ticks[1] - ticks[0] if len(ticks) > 1 else 1) * 0.5
    y_hi = max(ticks[-1], max(values)) + (ticks[1] - ticks[0] if len(ticks) > 1 else 1) * 0.6

    def py(v: float) -> float:
        return top + (H - top - bottom) * (1 - (v - y_lo) / (y_hi - y_lo))

    img, d = _canvas((W, H), left, s, title, note, f_title, f_small)
    for t in ticks:
        if y_lo <= t <= y_hi:
            d.line([(left, py(t)), (W - right, py(t))], fill=GRID)
            d.text((left - 6, py(t)), _fmt(t), fill=INK, font=f_small, anchor="rm")
    d.rectangle([left, top, W - right, H - bottom], outline=FRAME)
    d.text((round(6 * s), top - round(4 * s)), ylabel, fill=INK, font=f_small, anchor="lb")
    slot = (W - left - right) / len(groups)
    bar = slot * 0.8 / max(1, len(series))
    for g, name in enumerate(groups):
        x0 = left + g * slot + slot * 0.1
        tops = []
        for i, vs in enumerate(series.values()):
            v = float(vs[g])
            if math.isfinite(v):
                d.rectangle([x0 + i * bar, py(v), x0 + (i + 1) * bar - 2, H - bottom], fill=COLOURS[i % len(COLOURS)])
                tops.append(py(v))
        if g < len(group_labels) and group_labels[g] and tops:
            d.text((x0 + slot * 0.4, min(tops) - 4), group_labels[g], fill=INK, font=f_small, anchor="mb")
        d.text((x0 + slot * 0.4, H - bottom + 5), name, fill=INK, font=f_small, anchor="mt")
    ly = top + round(6 * s)
    for i, label in enumerate(series):
        tw = d.textlength(label, font=f_small)
        x1 = W - right - round(8 * s)
        x0 = x1 - tw - round(22 * s)
        d.rectangle([x0 - 3, ly - 2, x1 + 3, ly + round(14 * s)], fill=BACKGROUND)
        d.rectangle([x0, ly + round(2 * s), x0 + round(14 * s), ly + round(12 * s)], fill=COLOURS[i % len(COLOURS)])
        d.text((x0 + round(20 * s), ly), label, fill=INK, font=f_small)
        ly += round(17 * s)
    return img


def _dashed_line(d, xy: list[tuple[float, float]], colour, width: int, dash: int) -> None:
    on, carry = True, 0.0
    for (x0, y0), (x1, y1) in zip(xy, xy[1:], strict=False):
        length = math.hypot(x1 - x0, y1 - y0)
        pos = 0.0
        while pos < length:
            step = min(dash - carry, length - pos)
            if on:
                t0, t1 = pos / length, (pos + step) / length
                d.line([(x0 + (x1 - x0) * t0, y0 + (y1 - y0) * t0), (x0 + (x1 - x0) * t1, y0 + (y1 - y0) * t1)],
                       fill=colour, width=width)
            pos += step
            carry += step
            if carry >= dash:
                carry, on = 0.0, not on


# ---------------------------------------------------------------------------------------------- the pack's charts

def _as_list(v) -> list[float]:
    if isinstance(v, (list, tuple)):
        return [float(a) for a in v]
    return [float(v)]


def trace_chart(trace: Sequence[Mapping], *, title: str = "Measurement consistency per step",
                ylabel: str = "consistency loss", size: tuple[int, int] = (640, 400)):
    """A solver's per-step trace (``[{"step", "loss": [per image]}, ...]``, as SILO / Latent DPS / ReSample
    record it): one line per image of the batch (at most 8), and the batch mean when there are several."""
    steps = [e for e in trace if isinstance(e, Mapping) and "loss" in e and "step" in e]
    if not steps:
        raise ValueError("the trace has no guided steps to plot")
    per_image: dict[str, list[tuple[float, float]]] = {}
    mean: list[tuple[float, float]] = []
    batch = 0
    for e in steps:
        losses = _as_list(e["loss"])
        batch = max(batch, len(losses))
        for i, v in enumerate(losses[:8]):
            per_image.setdefault(f"image {i + 1}", []).append((float(e["step"]), v))
        finite = [v for v in losses if math.isfinite(v)]
        if finite:
            mean.append((float(e["step"]), sum(finite) / len(finite)))
    series = {"consistency": per_image["image 1"]} if batch == 1 else {**per_image, "mean": mean}
    series.update(_reference_lines(steps))
    first, last = mean[0][1] if mean else float("nan"), mean[-1][1] if mean else float("nan")
    note = f"{len(steps)} steps; step {int(steps[0]['step'])}: {first:.4g} → step {int(steps[-1]['step'])}: {last:.4g}"
    return line_chart(series, title=title, xlabel="sampling step", ylabel=ylabel, size=size, note=note,
                      integer_x=True)


def _reference_lines(steps: Sequence[Mapping]) -> dict[str, list[tuple[float, float]]]:
    """The noise floor (the consistency expected at the true image) and, with automatic η, the target it steered
    towards, as batch means per step (only finite values)."""
    out: dict[str, list[tuple[float, float]]] = {}
    for key, label in (("floor", "noise floor"), ("target", "auto η target")):
        points = []
        for e in steps:
            values = [v for v in _as_list(e.get(key, [])) if math.isfinite(v)]
            if values:
                points.append((float(e["step"]), sum(values) / len(values)))
        if points:
            out[label] = points
    return out


def training_curve_chart(report: Mapping, *, size: tuple[int, int] = (640, 400)):
    """Train Latent Operator's report: the operator's held-out latent L1 per evaluation, next to its two trivial
    baselines (identity and the degradation applied to the latent), plus the smoothed training loss."""
    curve = [c for c in (report.get("curve") or []) if isinstance(c, Mapping) and "step" in c]
    if not curve:
        raise ValueError("the training report has no held-out curve (no images were held out)")
    series = {
        "operator (held-out L1)": [(c["step"], c["heldout_l1"]) for c in curve if "heldout_l1" in c],
        "identity (baseline)": [(c["step"], c["identity_l1"]) for c in curve if "identity_l1" in c],
        "degradation on latent (baseline)": [(c["step"], c["naive_l1"]) for c in curve if "naive_l1" in c],
        "train loss (smoothed)": [(c["step"], c["train_loss"]) for c in curve if c.get("train_loss") is not None],
    }
    baselines = ("identity (baseline)", "degradation on latent (baseline)")
    # a baseline does not depend on the step: draw it across the whole run even with one evaluation
    for name in baselines:
        v = series[name]
        if len(v) == 1:
            series[name] = [(0.0, v[0][1]), (v[0][0], v[0][1])]
    last = curve[-1]
    best = min(last.get("identity_l1", math.inf), last.get("naive_l1", math.inf))
    op = last.get("heldout_l1", math.nan)
    verdict = (f"operator {op:.4g} = {op / best:.0%} of the best baseline" if math.isfinite(best) and best > 0
               and op < best else "the operator does not beat the trivial baselines yet")
    fidelity = report.get("fidelity")
    if isinstance(fidelity, Mapping) and isinstance(fidelity.get("verdict"), Mapping):
        verdict = str(fidelity["verdict"].get("text", verdict))
        if len(verdict) > 110:
            verdict = verdict[:107] + "..."
    return line_chart(series, title="Latent operator training: held-out error", xlabel="training step",
                      ylabel="latent L1", size=size, dashed=baselines, note=verdict, integer_x=True)


def message_chart(text: str, size: tuple[int, int] = (640, 400)):
    """A chart-sized image with one message (e.g. "no guided steps") instead of a chart."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, BACKGROUND)
    d = ImageDraw.Draw(img)
    d.rectangle([8, 8, size[0] - 9, size[1] - 9], outline=GRID)
    d.multiline_text((size[0] / 2, size[1] / 2), text, fill=INK, font=font(max(10, round(16 * size[1] / 400))),
                     anchor="mm", align="center")
    return img
