"""Charts as IMAGEs: the SILO Trace Plot node and the training-curve image for Train Latent Operator.

The drawing itself is ``operators/charts.py`` (Pillow only, no host); this module turns its ``PIL.Image`` into a
ComfyUI IMAGE tensor and builds the node's preview.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..operators.charts import message_chart, trace_chart, training_curve_chart
from .common import SiloNode, Trace

PLOT_SIZE = (640, 400)


def pil_to_image(img) -> torch.Tensor:
    """``PIL.Image`` -> ComfyUI IMAGE ``[1, H, W, 3]`` float32 in [0, 1] on the CPU."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy())[None]


def trace_image(trace, title: str = "Measurement consistency per step",
                size: tuple[int, int] = PLOT_SIZE) -> torch.Tensor:
    """A solver's SILO_TRACE as an IMAGE; a trace without guided steps gives an image that says so."""
    try:
        return pil_to_image(trace_chart(list(trace or []), title=title, size=size))
    except ValueError as e:
        return pil_to_image(message_chart(f"nothing to plot:\n{e}", size=size))


def training_curve_image(report: Mapping, size: tuple[int, int] = PLOT_SIZE) -> torch.Tensor:
    """Train Latent Operator's report (``report["curve"]``: held-out L1 per evaluation and its two trivial
    baselines) as an IMAGE ``[1, H, W, 3]``; a report without a held-out curve gives an image that says so."""
    try:
        return pil_to_image(training_curve_chart(report, size=size))
    except ValueError as e:
        return pil_to_image(message_chart(f"no training curve:\n{e}", size=size))


def image_and_text_ui(image: torch.Tensor, text: str | None = None, cls=None) -> dict:
    """A node's ``ui`` dict with a preview of ``image`` (shown on the node) and, optionally, its text result (shown
    by the pack's web extension). Use as ``io.NodeOutput(..., ui=image_and_text_ui(img, text, cls))``."""
    out = dict(ui.PreviewImage(image, cls=cls).as_dict())
    if text is not None:
        out["text"] = (text,)
    return out


class TracePlot(SiloNode):
    """Plots a solver's per-step measurement consistency (the trace output of SILO KSampler, Latent DPS / PSLD
    KSampler or ReSample KSampler): a line that falls and levels off means the guidance is working; one that
    rises or stays flat asks for a larger η (or a better operator). Shows the chart on the node and outputs it as
    an IMAGE."""

    NODE_ID, TITLE, SHOWS_IMAGE = "SILOTracePlot", "SILO Trace Plot", True

    @classmethod
    def inputs(cls) -> list:
        return [Trace.Input("trace", tooltip="The trace output of a SILO / Latent DPS / ReSample KSampler.")]

    @classmethod
    def outputs(cls) -> list:
        return [io.Image.Output("IMAGE", display_name="IMAGE", tooltip="The chart (640×400), e.g. for Save Image.")]

    @classmethod
    def execute(cls, trace) -> io.NodeOutput:
        img = trace_image(trace)
        return io.NodeOutput(img, ui=ui.PreviewImage(img, cls=cls))
