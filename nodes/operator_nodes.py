"""Latent operator nodes: load an operator file, train one from images."""

from __future__ import annotations

import os
import re

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..operators.degradations import describe_spec
from ..operators.io import load_operator, read_operator_metadata, save_operator
from ..operators.training import format_report, train_operator
from .common import CATEGORY, Degradation, LatentOperator, SiloInputError, image_to_bchw
from .host import interrupt_check, latent_format_info, make_encoder

FOLDER = "latent_operators"


def register_operator_folder() -> str:
    """``models/latent_operators`` (plus any folders ``extra_model_paths.yaml`` gave under that key)."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    os.makedirs(default, exist_ok=True)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[FOLDER]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | {".safetensors"})
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], {".safetensors"})
    return default


register_operator_folder()


def describe_operator(meta: dict) -> str:
    deg = meta.get("degradation", {})
    lf = meta.get("latent_format", {})
    tr = meta.get("training") or {}
    lines = [f"degradation: {describe_spec(deg) if deg else 'unknown'}",
             f"latent format: {lf.get('name', '?')} ({lf.get('latent_channels', '?')} channels, "
             f"scale {lf.get('scale_factor', '?')})",
             f"architecture: {meta.get('architecture', {}).get('class', '?')}"]
    if tr:
        lines.append(f"trained {tr.get('steps', '?')} steps on {tr.get('images', '?')} images "
                     f"({tr.get('date', '?')})")
        held = tr.get("heldout")
        if held:
            lines.append(f"held-out L1: operator {held['operator']['l1']:.4f}, identity {held['identity']['l1']:.4f}")
    return "\n".join(lines)


class LatentOperatorLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SILOLatentOperatorLoader",
            display_name="Latent Degradation Operator",
            category=CATEGORY,
            description=("Loads a latent degradation operator (.safetensors from models/latent_operators): a small "
                         "network that imitates a degradation inside one VAE's latent space. Use one trained for the "
                         "same degradation and the same model family (latent format) as your checkpoint."),
            inputs=[
                io.Combo.Input("operator_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="Operator file in ComfyUI/models/latent_operators (train one with the Train "
                                       "Latent Operator node or `python -m comfyui_silo train-operator`)."),
            ],
            outputs=[LatentOperator.Output("OPERATOR", display_name="OPERATOR", tooltip="The operator, for SILO KSampler / SILO Sampler.")],
        )

    @classmethod
    def validate_inputs(cls, operator_name) -> bool | str:
        path = folder_paths.get_full_path(FOLDER, operator_name)
        if path is None:
            return f"operator file '{operator_name}' is not in models/{FOLDER}"
        try:
            read_operator_metadata(path)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, operator_name) -> io.NodeOutput:
        path = folder_paths.get_full_path(FOLDER, operator_name)
        if path is None:
            raise SiloInputError("Latent Degradation Operator", "operator_name",
                                 f"'{operator_name}' was not found in models/{FOLDER}.",
                                 "Put the file there (or in a folder listed under latent_operators in "
                                 "extra_model_paths.yaml) and press R to refresh.")
        try:
            op = load_operator(path, device="cpu")
        except ValueError as e:
            raise SiloInputError("Latent Degradation Operator", "operator_name", str(e)) from None
        meta = {"degradation": op.degradation, "latent_format": op.latent_format, "architecture": op.architecture,
                "training": op.training}
        return io.NodeOutput(op, ui=ui.PreviewText(describe_operator(meta)))


def _unique_path(folder: str, name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.\-/]+", "_", name.strip()).strip("/") or "latent_operator"
    stem = stem[: -len(".safetensors")] if stem.endswith(".safetensors") else stem
    if ".." in stem.split("/"):
        raise SiloInputError("Train Latent Operator", "filename", "must stay inside models/latent_operators.")
    path = os.path.join(folder, stem + ".safetensors")
    n = 2
    while os.path.exists(path):
        path = os.path.join(folder, f"{stem}_{n}.safetensors")
        n += 1
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


class TrainLatentOperator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SILOTrainLatentOperator",
            display_name="Train Latent Operator",
            category=CATEGORY,
            description=("Trains a latent degradation operator for your checkpoint's VAE from a batch of clean images "
                         "(photos, or images your own checkpoint generated: KSampler → VAE Decode → here). Saves it "
                         "to models/latent_operators and reports its held-out error next to two trivial baselines."),
            is_output_node=True,
            inputs=[
                io.Image.Input("images", tooltip="Clean training images (at least 2; more and larger is better). "
                                                 "About one in ten is held out to measure fidelity."),
                io.Model.Input("model", tooltip="The checkpoint's MODEL: fixes the latent space (scale/shift) the "
                                                "operator is trained in."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE: its encoder defines the latent space."),
                Degradation.Input("degradation", tooltip="The degradation to emulate (Degradation (SILO) node)."),
                io.Int.Input("steps", default=1000, min=1, max=1_000_000,
                             tooltip="Optimiser steps (the paper trained far longer; 1000-5000 is a useful start)."),
                io.Int.Input("batch_size", default=8, min=1, max=256, tooltip="Crops per step."),
                io.Int.Input("crop_size", default=256, min=64, max=2048, step=64,
                             tooltip="Training crop size in pixels; images must be at least this large."),
                io.Float.Input("learning_rate", default=2e-4, min=1e-6, max=1e-1, step=1e-5,
                               tooltip="AdamW learning rate (cosine schedule)."),
                io.Float.Input("max_noise_sigma", default=0.05, min=0.0, max=0.5, step=0.005,
                               tooltip="Measurement-noise levels drawn during training, up to this std (0-1 scale)."),
                io.Int.Input("pool_size", default=0, min=0, max=100_000,
                             tooltip="0: fresh augmented pairs every step. N: encode N pairs once and reuse them "
                                     "(much faster when the VAE is slow, e.g. on a CPU)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of crops, noise and init."),
                io.String.Input("filename", default="my_operator",
                                tooltip="File name inside models/latent_operators (.safetensors is added; an "
                                        "existing file is never overwritten)."),
            ],
            outputs=[
                LatentOperator.Output("OPERATOR", display_name="OPERATOR", tooltip="The trained operator, ready for SILO KSampler."),
                io.String.Output("report", display_name="report", tooltip="Held-out error of the operator vs. identity and "
                                                   "degradation-on-the-latent baselines."),
            ],
        )

    @classmethod
    def execute(cls, images, model, vae, degradation, steps, batch_size, crop_size, learning_rate, max_noise_sigma,
                pool_size, seed, filename) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils

        node = "Train Latent Operator"
        if images.shape[0] < 2:
            raise SiloInputError(node, "images", f"got {images.shape[0]} image; at least 2 are needed "
                                 "(one is held out for the fidelity report).", "Batch more images (e.g. a KSampler "
                                 "batch_size > 1 or Load Image Batch).")
        h, w = images.shape[1:3]
        if min(h, w) < crop_size:
            raise SiloInputError(node, "crop_size", f"{crop_size} px is larger than the images ({w}x{h}).",
                                 "Lower crop_size or use larger images.")
        out_path = _unique_path(folder_paths.get_folder_paths(FOLDER)[0], filename)
        device = mm.get_torch_device()
        pbar = comfy.utils.ProgressBar(steps)
        with torch.inference_mode(False), torch.enable_grad():
            x = image_to_bchw(images, node).clone()
            try:
                result = train_operator(
                    make_encoder(vae, model), degradation, x, steps=steps, batch_size=batch_size,
                    crop_size=crop_size, lr=learning_rate, sigma_range=(0.0, max_noise_sigma),
                    pool_size=pool_size or None, seed=seed, eval_every=max(1, min(250, steps)),
                    heldout_fraction=0.1, device=device, should_stop=interrupt_check,
                    progress=lambda s, n, info: pbar.update_absolute(s, n))
            except ValueError as e:
                raise SiloInputError(node, "settings", str(e)) from None
        result.report["checkpoint_latent_format"] = latent_format_info(model, vae)["name"]
        save_operator(out_path, result.operator.cpu(), degradation=degradation.spec,
                      latent_format=latent_format_info(model, vae), training=result.report)
        op = load_operator(out_path, device="cpu")
        text = f"saved {os.path.basename(out_path)}\n{format_report(result.report)}"
        return io.NodeOutput(op, text, ui=ui.PreviewText(text))
