"""The harness's PNG chart (time per image vs. image size per solver), drawn with the pack's one chart helper."""

from __future__ import annotations

from pathlib import Path

from comfyui_silo.operators.charts import COLOURS, line_chart

__all__ = ["COLOURS", "line_plot"]


def line_plot(series: dict[str, list[tuple[float, float]]], path: str | Path, *, title: str, xlabel: str,
              ylabel: str, size: tuple[int, int] = (900, 560)) -> Path:
    """Draw ``{label: [(x, y), ...]}`` on a log-scale y axis and save a PNG; points with y <= 0 or NaN are skipped.
    Returns the path."""
    pts = {k: [(float(x), float(y)) for x, y in v if y == y and y > 0] for k, v in series.items()}
    pts = {k: sorted(v) for k, v in pts.items() if v}
    if not pts:
        raise ValueError("line_plot: no positive values to plot")
    img = line_chart(pts, title=title, xlabel=xlabel, ylabel=ylabel, size=size, log_y=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
