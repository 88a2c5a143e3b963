"""A small PNG line chart drawn with Pillow (no plotting library needed): time per image vs. image size per solver."""

from __future__ import annotations

import math
from pathlib import Path

# distinguishable colours (Okabe-Ito), one per series in order
COLOURS = [(0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233),
           (120, 120, 120), (240, 228, 66)]


def _font(size: int):
    from PIL import ImageFont

    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def _nice_log_ticks(lo: float, hi: float) -> list[float]:
    ticks = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10.0**e
            if lo <= v <= hi:
                ticks.append(v)
    return ticks or [lo, hi]


def line_plot(series: dict[str, list[tuple[float, float]]], path: str | Path, *, title: str, xlabel: str,
              ylabel: str, size: tuple[int, int] = (900, 560)) -> Path:
    """Draw ``{label: [(x, y), ...]}`` with a log-scale y axis (x: the given values, evenly spaced by their rank
    when there are few) and save a PNG. Points with y <= 0 or NaN are skipped. Returns the path."""
    from PIL import Image, ImageDraw

    pts = {k: [(float(x), float(y)) for x, y in v if y == y and y > 0] for k, v in series.items()}
    pts = {k: sorted(v) for k, v in pts.items() if v}
    if not pts:
        raise ValueError("line_plot: no positive values to plot")
    W, H = size
    left, right, top, bottom = 90, 230, 50, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xs = sorted({x for v in pts.values() for x, _ in v})
    ys = [y for v in pts.values() for _, y in v]
    lo, hi = min(ys), max(ys)
    if hi / lo < 10:  # at least one decade, centred on the data
        mid = math.sqrt(lo * hi)
        lo, hi = mid / math.sqrt(10), mid * math.sqrt(10)
    lo, hi = lo / 1.2, hi * 1.2

    def px(x: float) -> float:
        i = xs.index(x)
        return left + (W - left - right) * (0.5 if len(xs) == 1 else i / (len(xs) - 1))

    def py(y: float) -> float:
        return top + (H - top - bottom) * (1 - (math.log10(y) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)))

    f, fs = _font(14), _font(12)
    d.text((left, 15), title, fill="black", font=_font(16))
    d.rectangle([left, top, W - right, H - bottom], outline=(80, 80, 80))
    for t in _nice_log_ticks(lo, hi):
        y = py(t)
        d.line([(left, y), (W - right, y)], fill=(225, 225, 225))
        d.text((left - 8, y), f"{t:g}", fill="black", font=fs, anchor="rm")
    for x in xs:
        d.line([(px(x), top), (px(x), H - bottom)], fill=(235, 235, 235))
        d.text((px(x), H - bottom + 8), f"{x:g}", fill="black", font=fs, anchor="mt")
    d.text(((left + W - right) / 2, H - 22), xlabel, fill="black", font=f, anchor="mm")
    d.text((12, top - 20), ylabel, fill="black", font=f)
    for i, (label, v) in enumerate(pts.items()):
        c = COLOURS[i % len(COLOURS)]
        xy = [(px(x), py(y)) for x, y in v]
        if len(xy) > 1:
            d.line(xy, fill=c, width=3)
        for x, y in xy:
            d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=c)
        ly = top + 10 + 24 * i
        d.line([(W - right + 15, ly), (W - right + 45, ly)], fill=c, width=3)
        d.text((W - right + 52, ly), label, fill="black", font=fs, anchor="lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
