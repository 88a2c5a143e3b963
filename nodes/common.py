"""Shared glue for the nodes: custom socket types, IMAGE/MASK conversion, user-facing errors, node names.

This package (``nodes/``) is the only place that imports ComfyUI; this module only its node API (``comfy_api``),
never ``comfy.*`` (that is ``host.py``'s job).
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
from comfy_api.latest import io

from ..samplers.core import divergence_text

CATEGORY = "image/restoration/SILO"

# Custom socket types carried between our nodes.
Degradation = io.Custom("DEGRADATION")
LatentOperator = io.Custom("LATENT_OPERATOR")
Measurement = io.Custom("MEASUREMENT")
Trace = io.Custom("SILO_TRACE")


class SiloInputError(ValueError):
    """An input a user can fix: says which node, which input, what was expected and what to do."""

    def __init__(self, node: str, input_name: str, problem: str, fix: str = ""):
        msg = f"[comfyui-silo] {node}: input '{input_name}': {problem}"
        if fix:
            msg += f" {fix}"
        super().__init__(msg)


class SiloNode(io.ComfyNode):
    """Base of the pack's nodes: the schema is made from what the class declares, so each node states only what is
    its own. ``NODE_ID`` and ``TITLE`` (the display name), the class docstring (the description shown in the node
    library), ``inputs()`` and ``outputs()``; ``SHOWS_TEXT`` marks the nodes whose text result the web extension
    shows in a box (they are output nodes: the host re-sends a cached output node's result), ``SHOWS_IMAGE`` other
    output nodes. (``OUTPUT_NODE`` is the host's own class property, read by its executor: never assign it.)"""

    NODE_ID: ClassVar[str] = ""
    TITLE: ClassVar[str] = ""
    SHOWS_TEXT: ClassVar[bool] = False
    SHOWS_IMAGE: ClassVar[bool] = False

    @classmethod
    def inputs(cls) -> list:
        return []

    @classmethod
    def outputs(cls) -> list:
        return []

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(node_id=cls.NODE_ID, display_name=cls.TITLE, category=CATEGORY,
                         description=" ".join((cls.__doc__ or "").split()), inputs=cls.inputs(),
                         outputs=cls.outputs(), is_output_node=cls.SHOWS_TEXT or cls.SHOWS_IMAGE)


@functools.cache
def display_name(node_cls: type) -> str:
    """The name a user sees on a node (its schema's ``display_name``): what every error text calls the node."""
    return node_cls.define_schema().display_name


def require_finite(x: torch.Tensor, node: str, input_name: str, what: str = "the image",
                   fix: str = "Check the node that made it (a NaN/inf usually comes from a failed decode or an "
                               "overflowing fp16 model).") -> torch.Tensor:
    """``x`` unchanged, or :class:`SiloInputError` when it holds NaN or inf: a non-finite input gives an all-NaN
    result (a black image) that would otherwise look like success."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise SiloInputError(node, input_name, f"{what} contains {bad} NaN/inf value(s) of {x.numel()}.", fix)
    return x


def _mean(values) -> float:
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    return sum(values) / len(values) if values else float("nan")


def trace_text(trace: list, what: str = "‖w − H(ẑ₀)‖") -> str:
    """A solver's consistency trace in a few lines: first and last loss, the noise floor when known, the η path when
    η was set automatically, and a divergence warning with its fix."""
    if not trace:
        return "no guided steps"
    first, last = trace[0], trace[-1]
    lines = [f"consistency {what}: step 0 {_mean(first['loss']):.3f} → step {last['step']} {_mean(last['loss']):.3f} "
             f"({len(trace)} steps)"]
    if "floor" in last:
        lines.append(f"noise floor (expected at the true image): {_mean(last['floor']):.3f}")
    auto = [e for e in trace if "target" in e]
    if auto:
        etas = [float(e["eta"]) for e in auto]
        lines.append(f"η auto: first {etas[0]:.3g}, last {etas[-1]:.3g}, range {min(etas):.3g}–{max(etas):.3g} "
                     f"({len(auto)} guided steps)")
    diverged = next((e["diverged"] for e in trace if "diverged" in e), None)
    if diverged is not None:
        lines.append("⚠ " + divergence_text(diverged))
    return "\n".join(lines)


def image_to_bchw(image: torch.Tensor, node: str, input_name: str = "image") -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] in [0,1] -> [B,3,H,W] float32 (alpha dropped, grey expanded)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise SiloInputError(node, input_name, f"expected an IMAGE batch [B,H,W,C], got {shape}.")
    if image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
        raise SiloInputError(node, input_name, f"the image is empty (shape {tuple(image.shape)}).",
                             "Connect a loaded or generated image.")
    c = image.shape[-1]
    if c == 1:
        image = image.expand(-1, -1, -1, 3)
    elif c == 4:
        image = image[..., :3]
    elif c != 3:
        raise SiloInputError(node, input_name, f"expected 1, 3 or 4 colour channels, got {c}.")
    return image.movedim(-1, 1).float()


def bchw_to_image(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] -> ComfyUI IMAGE [B,H,W,3] float32 clamped to [0,1], on the CPU (as the host's nodes return)."""
    return x.detach().clamp(0, 1).movedim(1, -1).float().cpu().contiguous()
