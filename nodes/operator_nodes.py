"""Latent operator nodes: load an operator file, train one from images."""

from __future__ import annotations

import math
import os

import torch
from comfy_api.latest import io, ui

from ..config import SettingError
from ..operators.degradations import describe_spec
from ..operators.fidelity import stored_errors, stored_verdict
from ..operators.files import latent_family, operator_file_name
from ..operators.io import load_operator, read_operator_metadata, save_operator
from ..operators.text import bounded
from ..operators.training import TrainingDataError, TrainSettings, format_report, train_operator
from .common import Degradation, LatentOperator, SiloInputError, SiloNode, display_name, image_to_bchw
from .host import (
    OPERATOR_FOLDER,
    compute_device,
    interrupt_check,
    latent_format_info,
    make_decoder,
    make_encoder,
    operator_file_names,
    operator_file_path,
    operator_save_folder,
    progress_bar,
    progress_text,
    register_operator_folder,
)
from .plots import training_curve_image
from .widgets import settings_from_widgets, widget_inputs

FOLDER = OPERATOR_FOLDER
register_operator_folder()


def quality_lines(training: dict) -> list[str]:
    """What a file says about its operator's quality: held-out errors next to both trivial baselines, decoded
    fidelity next to the VAE's floor when it was measured, and the verdict (computed from the numbers for files
    written before verdicts were stored), so a useless operator is flagged wherever it is loaded."""
    lines = []
    errors = stored_errors(training)
    if errors is not None:
        metric, (op, ident, naive) = errors
        if metric == "rel_l2":
            lines.append(f"held-out latent error: operator {op:.3f} | identity {ident:.3f} | "
                         f"degradation-on-latent {naive:.3f} (relative L2, lower is better)")
        else:
            lines.append(f"held-out L1: operator {op:.4f} | identity {ident:.4f} | degradation-on-latent {naive:.4f}")
    fid = training.get("fidelity") if isinstance(training.get("fidelity"), dict) else {}
    dec = fid.get("decoded") if isinstance(fid.get("decoded"), dict) else {}
    psnr = [dec.get(k, {}).get("psnr") if isinstance(dec.get(k), dict) else None
            for k in ("operator", "floor", "identity")]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in psnr):
        gap = dec.get("gap_closed")
        lines.append(f"decoded PSNR: operator {psnr[0]:.1f} dB | VAE floor {psnr[1]:.1f} dB | identity "
                     f"{psnr[2]:.1f} dB" + (f" | gap closed {gap:.0%}" if isinstance(gap, (int, float))
                                            and math.isfinite(gap) else ""))
    judged = stored_verdict(training)
    if judged is not None:
        lines.append(judged["text"])
    return lines


def training_progress(steps: int, pool_size: int | None):
    """The training node's ``progress(step, total, info)``: one bar over encoding the pool (``pool_size`` pairs,
    none with fresh pairs) and then the ``steps`` optimiser steps, so the bar moves from the start and never back;
    the node's text line says which phase runs."""
    pool_size = pool_size or 0  # None: fresh pairs every step, no encoding phase
    bar = progress_bar(pool_size + steps)
    phase = [None]

    def progress(step: int, total: int, info: dict) -> None:
        encoding = info.get("phase") == "encoding"
        if encoding != phase[0]:
            phase[0] = encoding
            progress_text(f"encoding {pool_size} training pairs" if encoding else f"training {total} steps")
        done = int(info.get("encoded", 0)) if encoding else pool_size + int(step)
        bar(min(done, pool_size + total), pool_size + total)

    return progress


def describe_operator(meta: dict) -> str:
    """The loader's text: what the operator emulates, for which family, how it was trained and how good it is.
    Every value comes from the file, so each is bounded (a 30 MB string in the metadata must not become 30 MB of UI
    text)."""
    deg = meta.get("degradation", {})
    lf = meta.get("latent_format", {})
    tr = meta.get("training") or {}
    lines = [f"degradation: {describe_spec(deg) if deg else 'unknown'}",
             f"latent format: {latent_family(lf)} ({bounded(lf.get('latent_channels', '?'), 20)} channels, "
             f"scale {bounded(lf.get('scale_factor', '?'), 20)}, shift {bounded(lf.get('shift_factor', 0.0), 20)})",
             f"architecture: {bounded(meta.get('architecture', {}).get('class', '?'), 60)}"]
    if isinstance(tr, dict) and tr:
        lines.append(f"trained {bounded(tr.get('steps', '?'), 20)} steps on {bounded(tr.get('images', '?'), 20)} "
                     f"images ({bounded(tr.get('date', '?'), 40)})")
        lines += quality_lines(tr)
    return "\n".join(lines)


class LatentOperatorLoader(SiloNode):
    """Loads a latent degradation operator (.safetensors from models/latent_operators): a small network that
    imitates a degradation inside one VAE's latent space. Use one trained for the same degradation and the same
    model family (latent format) as your checkpoint."""

    NODE_ID, TITLE, SHOWS_TEXT = "SILOLatentOperatorLoader", "Latent Degradation Operator", True

    @classmethod
    def inputs(cls) -> list:
        return [io.Combo.Input("operator_name", options=operator_file_names(),
                               tooltip="Operator file in ComfyUI/models/latent_operators (train one with the Train "
                                       "Latent Operator node or `python -m comfyui_silo train-operator`).")]

    @classmethod
    def outputs(cls) -> list:
        return [LatentOperator.Output("OPERATOR", display_name="OPERATOR",
                                      tooltip="The operator, for SILO KSampler / SILO Sampler.")]

    @classmethod
    def validate_inputs(cls, operator_name) -> bool | str:
        path = operator_file_path(operator_name)
        if path is None:
            return (f"{display_name(cls)}: operator file '{bounded(operator_name, 120)}' is not in models/{FOLDER}. "
                    "Train one: open the "
                    "workflow 'silo_train_operator_from_generated_images' (Workflow > Browse Templates > SILO "
                    "restoration) or run `python -m comfyui_silo train-operator`; files added by hand appear after "
                    "Refresh Node Definitions (R)")
        try:
            read_operator_metadata(path)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, operator_name) -> io.NodeOutput:
        path = operator_file_path(operator_name)
        if path is None:
            raise SiloInputError(display_name(cls), "operator_name",
                                 f"'{bounded(operator_name, 120)}' was not found in models/{FOLDER}.",
                                 "Train one with the workflow 'silo_train_operator_from_generated_images' or "
                                 "`python -m comfyui_silo train-operator`, or put the file there (or in a folder "
                                 "listed under latent_operators in extra_model_paths.yaml) and press R to refresh.")
        try:
            op = load_operator(path, device="cpu")
        except ValueError as e:
            raise SiloInputError(display_name(cls), "operator_name", str(e)) from None
        meta = {"degradation": op.degradation, "latent_format": op.latent_format, "architecture": op.architecture,
                "training": op.training}
        return io.NodeOutput(op, ui=ui.PreviewText(describe_operator(meta)))


def _unique_path(folder: str, name: str) -> str:
    """A free path for ``name`` (checked by the core's file-name rules) inside ``folder``; ``_2``, ``_3``… when
    taken. Runs before training, so a bad name fails at once."""
    relative = operator_file_name(name)
    stem = relative[: -len(".safetensors")]
    path = os.path.join(folder, relative)
    n = 2
    while os.path.exists(path):
        path = os.path.join(folder, f"{stem}_{n}.safetensors")
        n += 1
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


class TrainLatentOperator(SiloNode):
    """Trains a latent degradation operator for your checkpoint's VAE from a batch of clean images (photos, or
    images your own checkpoint generated: KSampler → VAE Decode → here). Saves it to models/latent_operators and
    reports its held-out error next to two trivial baselines."""

    NODE_ID, TITLE, SHOWS_TEXT = "SILOTrainLatentOperator", "Train Latent Operator", True

    @classmethod
    def inputs(cls) -> list:
        return [io.Image.Input("images", tooltip="Clean training images (at least 2; more and larger is better). "
                                                 "About one in ten is held out to measure fidelity."),
                io.Model.Input("model", tooltip="The checkpoint's MODEL: fixes the latent space (scale/shift) the "
                                                "operator is trained in."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE: its encoder defines the latent space."),
                Degradation.Input("degradation", tooltip="The degradation to emulate (Degradation (SILO) node)."),
                # steps, batch_size, crop_size, learning_rate, max_noise_sigma, pool_size, seed: declared once in
                # the core (TrainSettings), ranges included
                *widget_inputs(TrainSettings),
                io.String.Input("filename", default="my_operator",
                                tooltip="File name inside models/latent_operators (.safetensors is added; an "
                                        "existing file is never overwritten).")]

    @classmethod
    def outputs(cls) -> list:
        return [LatentOperator.Output("OPERATOR", display_name="OPERATOR",
                                      tooltip="The trained operator, ready for SILO KSampler."),
                io.String.Output("report", display_name="report",
                                 tooltip="Held-out error of the operator vs. identity and degradation-on-the-latent "
                                         "baselines."),
                io.Image.Output("curve", display_name="curve",
                                tooltip="The held-out error during training against its two trivial baselines, as a "
                                        "chart (e.g. for Preview Image): the operator's line should end below both.")]

    @classmethod
    def execute(cls, images, model, vae, degradation, filename, **widgets) -> io.NodeOutput:
        node = display_name(cls)
        settings = settings_from_widgets(TrainSettings, node, **widgets)
        if images.shape[0] < 2:
            raise SiloInputError(node, "images", f"got {images.shape[0]} image; at least 2 are needed "
                                 "(one is held out for the fidelity report).", "Batch more images (e.g. a KSampler "
                                 "batch_size > 1 or Load Image Batch).")
        h, w = images.shape[1:3]
        if min(h, w) < settings.crop_size:
            raise SiloInputError(node, "crop_size", f"{settings.crop_size} px is larger than the images ({w}x{h}).",
                                 "Lower crop_size or use larger images.")
        try:
            out_path = _unique_path(operator_save_folder(), filename)
        except ValueError as e:
            raise SiloInputError(node, "filename", f"{e}.", "Change the file name; it is checked before training.") \
                from None
        settings = settings.replace(eval_every=max(1, min(250, settings.steps)), heldout_fraction=0.1)
        device = compute_device()
        progress = training_progress(settings.steps, settings.pool_size)
        with torch.inference_mode(False), torch.enable_grad():
            x = image_to_bchw(images, node).clone()
            try:
                result = train_operator(make_encoder(vae, model), degradation, x, config=settings, device=device,
                                        decode=make_decoder(vae, model),
                                        should_stop=interrupt_check,
                                        progress=progress)
            except (SettingError, TrainingDataError) as e:
                raise SiloInputError(node, e.field, f"{e}.") from None
            except ValueError as e:
                raise SiloInputError(node, "degradation", f"{e}.") from None
        latent_format = latent_format_info(model, vae)
        result.report["checkpoint_latent_format"] = latent_format["name"]
        save_operator(out_path, result.operator.cpu(), degradation=degradation.spec, latent_format=latent_format,
                      training=result.report)
        op = load_operator(out_path, device="cpu")
        text = f"saved {os.path.basename(out_path)}\n{format_report(result.report)}"
        return io.NodeOutput(op, text, training_curve_image(result.report), ui=ui.PreviewText(text))
