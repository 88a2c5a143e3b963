"""Latent-operator files: ``.safetensors`` weights plus string metadata.

Metadata keys (all strings; the JSON ones are JSON-encoded objects):

``format``          ``"comfyui-silo.latent-operator"``
``format_version``  ``"1"`` (LatentOperator, the paper's CNN) or ``"2"`` (PhysicsOperator, which names its
                    degradation spec and the VAE's downscale in its config); files with a version newer than this
                    pack's are refused with a "please update comfyui-silo" message
``architecture``    JSON ``{"class": "PhysicsOperator", "config": {...}}``; ``class`` is a key of :data:`ARCHITECTURES`
``degradation``     JSON spec of the degradation the operator emulates (free-form dict, written by the trainer)
``latent_format``   JSON ``{"name": "SD15", "latent_channels": 4, "scale_factor": 0.18215, "shift_factor": 0.0,
                    "downscale": 8}``: which VAE latent space the operator lives in; ``name`` is the model family
                    (SD15, SDXL, SD3, Flux, …; inferred from the numbers when a writer gives none)
``training``        JSON free-form dict (steps, images, final losses, held-out metrics, date, …)
``created_by``      ``"comfyui-silo <version>"``

Tensors are the module's ``state_dict`` (contiguous, in the module's dtype: float32 for trained operators).
Loading never unpickles anything; ``.pt/.pth/.ckpt/.bin`` files are refused with a pointer to
:func:`.reference.import_reference_operator`. A file is checked from its header before anything is allocated
(:mod:`.files`): the architecture in its metadata is instantiated on the ``meta`` device to get the expected
tensor names and shapes, its size is held to :data:`MAX_OPERATOR_PARAMETERS`, and every header entry must match.
Strings from a file are bounded wherever they are quoted (:func:`.text.bounded`).

Layering: :mod:`.files` (format, no architectures) ← :mod:`.reference` (the paper's CNN and its import) ←
:mod:`.io` (the architecture registry, loading); no module imports one that imports it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from ..config.version import __version__ as _VERSION
from .files import (
    DAMAGED,
    FORMAT,
    FORMAT_VERSION,
    MAX_OPERATOR_PARAMETERS,
    check_tensor_table,
    file_label,
    latent_family,
    read_header,
    write_operator,
)
from .network import LatentOperator, PhysicsOperator
from .reference import SiloReferenceCNN
from .text import bounded

__all__ = [
    "ARCHITECTURES",
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_OPERATOR_PARAMETERS",
    "LoadedOperator",
    "expected_state_shapes",
    "latent_format_compatible",
    "load_operator",
    "read_operator_metadata",
    "save_operator",
]

#: Architecture classes an operator file may name; ``class(**config)`` must rebuild the module.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LatentOperator": LatentOperator,
    "SiloReferenceCNN": SiloReferenceCNN,
    "PhysicsOperator": PhysicsOperator,
}
#: The first format version that knows an architecture (files are written with it, so older packs still read what
#: they can and tell their users to update for the rest).
ARCHITECTURE_VERSIONS: dict[str, int] = {"LatentOperator": 1, "SiloReferenceCNN": 1, "PhysicsOperator": 2}

_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
_JSON_KEYS = ("architecture", "degradation", "latent_format", "training")
_HOW_TO_MAKE = "Operators are made with the Train Latent Operator node or `python -m comfyui_silo train-operator`"


# ---------------------------------------------------------------------- helpers
def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ValueError(
            f"{file_label(path)} is a PyTorch pickle file ({bounded(path.suffix, 20)}); comfyui-silo only loads "
            ".safetensors latent operators and never unpickles files. If it is one of the SILO paper's CNN operators, "
            "convert it once with `comfyui_silo.operators.import_reference_operator(pt_path, out_path, "
            "degradation=..., latent_format=...)` and load the resulting .safetensors file."
        )


def _what_is_it(tensor_keys: list[str]) -> str:
    keys = " ".join(k[:200] for k in tensor_keys[:2000]).lower()
    if "lora" in keys or ".alpha" in keys:
        return " It looks like a LoRA (those belong in models/loras)."
    if "model.diffusion_model." in keys or "first_stage_model." in keys:
        return " It looks like a Stable Diffusion checkpoint (those belong in models/checkpoints)."
    if "encoder.down" in keys and "decoder.up" in keys:
        return " It looks like a VAE (those belong in models/vae)."
    return ""


def _validate_metadata(path: Path, header: dict) -> dict:
    """Check the comfyui-silo metadata of a parsed header and return it decoded.

    Only a file from a newer format version is told to update comfyui-silo; anything malformed (bad JSON, unknown
    architecture in a version this pack reads, a config the architecture rejects) is called damaged.
    """
    meta = header.get("__metadata__") or {}
    name = file_label(path)
    fmt = meta.get("format")
    if fmt is None:
        tensor_keys = [k for k in header if k not in ("__metadata__", "__data_bytes__")]
        raise ValueError(
            f"{name} is not a comfyui-silo latent operator (no 'format' metadata).{_what_is_it(tensor_keys)} "
            f"{_HOW_TO_MAKE}; checkpoints belong in models/checkpoints."
        )
    if fmt != FORMAT:
        raise ValueError(
            f"{name} is not a comfyui-silo latent operator (its 'format' metadata is {bounded(repr(fmt), 80)}, "
            f"expected {FORMAT!r}). {_HOW_TO_MAKE}; checkpoints belong in models/checkpoints."
        )
    raw_version = meta.get("format_version")
    try:
        version = int(str(raw_version)[:20])
    except ValueError:
        raise ValueError(f"{name}: invalid format_version {bounded(repr(raw_version), 40)} in its metadata: "
                         f"{DAMAGED}.") from None
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{name} uses latent-operator format version {version}, but this comfyui-silo ({_VERSION}) supports up "
            f"to version {FORMAT_VERSION}. Update comfyui-silo to load it."
        )
    if version < 1:
        raise ValueError(f"{name}: invalid format_version {version} in its metadata: {DAMAGED}.")
    decoded: dict = {"format": fmt, "format_version": version, "created_by": bounded(meta.get("created_by", ""))}
    for key in _JSON_KEYS:
        raw = meta.get(key)
        if raw is None:
            if key == "training":
                decoded[key] = {}
                continue
            raise ValueError(f"{name} is missing the {key!r} metadata: {DAMAGED}.")
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            raise ValueError(f"{name}: the {key!r} metadata is not valid JSON: {DAMAGED}.") from None
        if not isinstance(value, dict):
            raise ValueError(f"{name}: the {key!r} metadata must be a JSON object: {DAMAGED}.")
        decoded[key] = value
    arch = decoded["architecture"]
    cls_name = arch.get("class")
    if not isinstance(cls_name, str) or cls_name not in ARCHITECTURES:
        raise ValueError(
            f"{name} names operator architecture {bounded(repr(cls_name), 80)}, which this comfyui-silo "
            f"({_VERSION}) does not know (known: {', '.join(sorted(ARCHITECTURES))}): {DAMAGED}."
        )
    if not isinstance(arch.get("config", {}), dict):
        raise ValueError(f"{name}: its architecture config must be a JSON object: {DAMAGED}.")
    return decoded


def expected_state_shapes(architecture: Mapping, label: str = "the operator") -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes of an architecture (``{"class", "config"}``), computed on the ``meta`` device:
    no memory is allocated however large the config says the network is."""
    cls = ARCHITECTURES[architecture["class"]]
    try:
        with torch.device("meta"):
            module = cls(**architecture.get("config", {}))
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise ValueError(
            f"{label}: cannot build {architecture['class']} from the config in its metadata "
            f"({bounded(str(exc), 200)}): {DAMAGED}."
        ) from None
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _checked_header(path: Path) -> tuple[dict, dict, torch.dtype]:
    """(header, decoded metadata, stored dtype), every check that needs no tensor data done."""
    _refuse_pickle(path)
    header = read_header(path)
    info = _validate_metadata(path, header)
    expected = expected_state_shapes(info["architecture"], file_label(path))
    dtype = check_tensor_table(path, header, expected, info["architecture"]["class"])
    info["num_parameters"] = sum(math.prod(s) for s in expected.values())
    return header, info, dtype


# ---------------------------------------------------------------------- public API
@dataclass
class LoadedOperator:
    """A loaded latent operator: the module (eval mode, frozen) plus its metadata.

    Call it like the module: ``op(z, sigma_y=None, mask=None)``.
    """

    module: nn.Module
    architecture: dict
    degradation: dict
    latent_format: dict
    training: dict = field(default_factory=dict)
    path: str = ""
    created_by: str = ""
    format_version: int = FORMAT_VERSION

    def __call__(self, z: torch.Tensor, sigma_y=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.module(z, sigma_y=sigma_y, mask=mask)

    @property
    def name(self) -> str:
        return bounded(Path(self.path).stem, 120) if self.path else str(self.architecture.get("class", "operator"))

    @property
    def family(self) -> str:
        """The model family whose latent space the operator lives in (its latent format's name)."""
        return latent_family(self.latent_format)

    @property
    def use_mask(self) -> bool:
        return bool(getattr(self.module, "use_mask", False))

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def to(self, device=None, dtype=None) -> LoadedOperator:
        """Move the module in place; returns ``self``."""
        self.module.to(device=device, dtype=dtype)
        return self


def read_operator_metadata(path: str | os.PathLike) -> dict:
    """Read and validate an operator file's metadata and tensor table without loading its tensors (UI listings).

    Returns ``{"format", "format_version", "created_by", "architecture", "degradation", "latent_format",
    "training", "num_parameters", "path"}`` (JSON fields decoded). Raises ``ValueError`` like :func:`load_operator`
    for files that are not (loadable) comfyui-silo operators, including weights that do not fit the architecture.
    """
    path = Path(path)
    _, info, _ = _checked_header(path)
    info["path"] = str(path)
    return info


def save_operator(
    path: str | os.PathLike,
    operator: nn.Module,
    *,
    degradation: dict,
    latent_format: dict,
    training: dict | None = None,
) -> Path:
    """Write ``operator`` (a :data:`ARCHITECTURES` class with a ``config`` property) to ``path`` (``.safetensors``).

    The file is written to a temporary name in the same folder and renamed, so readers never see a partial file;
    the latent format's family is stored as its ``name``. Returns the path.
    """
    cls_name = type(operator).__name__
    if ARCHITECTURES.get(cls_name) is not type(operator):
        raise ValueError(
            f"cannot save a {cls_name}: operator files support the architectures {', '.join(sorted(ARCHITECTURES))}"
        )
    return write_operator(path, operator, degradation=degradation, latent_format=latent_format, training=training,
                          format_version=ARCHITECTURE_VERSIONS[cls_name])


def load_operator(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> LoadedOperator:
    """Load an operator file strictly into eval mode, frozen.

    Everything that can be checked from the header is checked before any tensor is read or module built (format,
    version, architecture, each tensor's name, dtype, shape and byte range, and the size against
    :data:`MAX_OPERATOR_PARAMETERS`); the module is built on the ``meta`` device and takes the file's tensors
    (no second copy); weights holding NaN or inf are refused. ``dtype=None`` keeps the stored dtype. Raises
    ``ValueError`` with an explanation for pickle files, files that are not safetensors, safetensors files that are
    not comfyui-silo operators (checkpoints, LoRAs, …), files from a newer format version, damaged files and
    weight/architecture mismatches.
    """
    path = Path(path)
    _, info, stored = _checked_header(path)
    name = file_label(path)
    arch = info["architecture"]
    state = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensor = f.get_tensor(key)
                if not bool(torch.isfinite(tensor).all()):
                    bad = int((~torch.isfinite(tensor)).sum())
                    raise ValueError(
                        f"{name}: its weight {bounded(key, 80)!r} holds {bad} NaN or infinite value(s) of "
                        f"{tensor.numel()}; an operator like this would turn every restoration black. {DAMAGED} "
                        "(or its training diverged): retrain it or use another file.")
                state[key] = tensor
    except ValueError:
        raise
    except Exception as exc:  # safetensors raises its own error types for truncated data
        raise ValueError(f"{name}: could not read its tensors ({bounded(str(exc), 200)}): {DAMAGED}.") from None
    with torch.device("meta"):
        module = ARCHITECTURES[arch["class"]](**arch.get("config", {}))
    module.load_state_dict(state, strict=True, assign=True)
    module.to(device=device, dtype=dtype or stored)
    module.eval()
    module.requires_grad_(False)
    return LoadedOperator(
        module=module,
        architecture=arch,
        degradation=info["degradation"],
        latent_format=info["latent_format"],
        training=info["training"],
        path=str(path),
        created_by=info["created_by"],
        format_version=info["format_version"],
    )


def _describe_format(fmt: Mapping) -> str:
    return (
        f"{latent_family(fmt)} ({bounded(fmt.get('latent_channels', '?'), 20)} channels, scale_factor "
        f"{bounded(fmt.get('scale_factor', '?'), 20)}, shift_factor {bounded(fmt.get('shift_factor', 0.0), 20)})"
    )


def latent_format_compatible(a: Mapping, b: Mapping, tol: float = 1e-6) -> tuple[bool, str]:
    """Whether two latent formats describe the same latent space: channels, scale factor AND shift factor.

    Returns ``(True, "")`` or ``(False, reason)`` where ``reason`` is a sentence for the user naming both families
    (SD15, SDXL, SD3, Flux, …) and what differs. Missing ``shift_factor`` counts as 0; a missing or non-numeric
    ``latent_channels`` or ``scale_factor`` makes the formats incompatible. Names alone never decide: two formats
    with the same numbers are the same space.
    """
    problems = []
    for key in ("latent_channels", "scale_factor"):
        for label, fmt in (("first", a), ("second", b)):
            value = fmt.get(key)
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.append(f"the {label} latent format has no numeric {key!r}")
    for label, fmt in (("first", a), ("second", b)):
        shift = fmt.get("shift_factor")
        if shift is not None and (isinstance(shift, bool) or not isinstance(shift, (int, float))):
            problems.append(f"the {label} latent format's 'shift_factor' is not a number")
    if problems:
        return False, "; ".join(problems)
    if int(a["latent_channels"]) != int(b["latent_channels"]):
        problems.append(f"{a['latent_channels']} vs {b['latent_channels']} latent channels")
    if abs(float(a["scale_factor"]) - float(b["scale_factor"])) > tol:
        problems.append(f"scale_factor {a['scale_factor']} vs {b['scale_factor']}")
    shift_a, shift_b = float(a.get("shift_factor") or 0.0), float(b.get("shift_factor") or 0.0)
    if abs(shift_a - shift_b) > tol:
        problems.append(f"shift_factor {shift_a} vs {shift_b}")
    if problems:
        return False, (
            f"latent formats differ: {_describe_format(a)} vs {_describe_format(b)} ({'; '.join(problems)}). "
            "An operator only works with models that share the latent space it was trained in."
        )
    return True, ""
