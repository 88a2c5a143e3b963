"""Latent-operator files: ``.safetensors`` weights plus string metadata.

Metadata keys (all strings; the JSON ones are JSON-encoded objects):

``format``          ``"comfyui-silo.latent-operator"``
``format_version``  ``"1"`` (files with a newer version are refused with a "please update" message)
``architecture``    JSON ``{"class": "LatentOperator", "config": {...}}``; ``class`` is a key of :data:`ARCHITECTURES`
``degradation``     JSON spec of the degradation the operator emulates (free-form dict, written by the trainer)
``latent_format``   JSON ``{"name": "SD15", "latent_channels": 4, "scale_factor": 0.18215, "shift_factor": 0.0,
                    "downscale": 8}``: which VAE latent space the operator lives in
``training``        JSON free-form dict (steps, images, final losses, held-out metrics, date, …)
``created_by``      ``"comfyui-silo <version>"``

Tensors are the module's ``state_dict`` (contiguous, in the module's dtype: float32 for trained operators).
Loading never unpickles anything; ``.pt/.pth/.ckpt/.bin`` files are refused with a pointer to
:func:`.reference.import_reference_operator`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .network import LatentOperator
from .reference import SiloReferenceCNN

__all__ = [
    "ARCHITECTURES",
    "FORMAT",
    "FORMAT_VERSION",
    "LoadedOperator",
    "latent_format_compatible",
    "load_operator",
    "read_operator_metadata",
    "save_operator",
]

FORMAT = "comfyui-silo.latent-operator"
FORMAT_VERSION = 1

#: Architecture classes an operator file may name; ``class(**config)`` must rebuild the module.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LatentOperator": LatentOperator,
    "SiloReferenceCNN": SiloReferenceCNN,
}

_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_JSON_KEYS = ("architecture", "degradation", "latent_format", "training")
_HOW_TO_MAKE = "Operators are made with the Train Latent Operator node or `python -m comfyui_silo train-operator`"

try:
    from .. import __version__ as _VERSION
except ImportError:  # pragma: no cover - only when the package is vendored oddly
    _VERSION = "unknown"


# ---------------------------------------------------------------------- helpers
def _name(path: Path) -> str:
    return path.name or str(path)


def _to_json(value, what: str) -> str:
    try:
        return json.dumps(value, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable (plain dict of str/number/bool/list): {exc}") from exc


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ValueError(
            f"{_name(path)} is a PyTorch pickle file ({path.suffix}); comfyui-silo only loads .safetensors latent "
            "operators and never unpickles files. If it is one of the SILO paper's CNN operators, convert it once "
            "with `comfyui_silo.operators.import_reference_operator(pt_path, out_path, degradation=..., "
            "latent_format=...)` and load the resulting .safetensors file."
        )


def _read_header(path: Path) -> dict:
    """Parse the JSON header of a safetensors file (no tensor data is read)."""
    not_st = (
        f"{_name(path)} is not a safetensors file ({{why}}). Latent operators are .safetensors files; {_HOW_TO_MAKE}."
    )
    if not path.is_file():
        raise FileNotFoundError(f"operator file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(not_st.format(why="file too short"))
        n = int.from_bytes(head, "little")
        if n < 2 or n > min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(not_st.format(why="invalid header length"))
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(not_st.format(why="header is not JSON")) from None
    if not isinstance(header, dict):
        raise ValueError(not_st.format(why="header is not a JSON object"))
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError(not_st.format(why="bad __metadata__"))
    return header


def _what_is_it(tensor_keys: list[str]) -> str:
    keys = " ".join(tensor_keys[:2000]).lower()
    if "lora" in keys or ".alpha" in keys:
        return " It looks like a LoRA (those belong in models/loras)."
    if "model.diffusion_model." in keys or "first_stage_model." in keys:
        return " It looks like a Stable Diffusion checkpoint (those belong in models/checkpoints)."
    if "encoder.down" in keys and "decoder.up" in keys:
        return " It looks like a VAE (those belong in models/vae)."
    return ""


def _validate_metadata(path: Path, header: dict) -> dict:
    """Check the comfyui-silo metadata of a parsed header and return it decoded."""
    meta = header.get("__metadata__") or {}
    name = _name(path)
    fmt = meta.get("format")
    if fmt is None:
        tensor_keys = [k for k in header if k != "__metadata__"]
        raise ValueError(
            f"{name} is not a comfyui-silo latent operator (no 'format' metadata).{_what_is_it(tensor_keys)} "
            f"{_HOW_TO_MAKE}; checkpoints belong in models/checkpoints."
        )
    if fmt != FORMAT:
        raise ValueError(
            f"{name} is not a comfyui-silo latent operator (its 'format' metadata is {fmt!r}, expected {FORMAT!r}). "
            f"{_HOW_TO_MAKE}; checkpoints belong in models/checkpoints."
        )
    raw_version = meta.get("format_version")
    try:
        version = int(str(raw_version))
    except ValueError:
        raise ValueError(f"{name}: invalid format_version {raw_version!r} in its metadata (corrupt file?)") from None
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{name} uses latent-operator format version {version}, but this comfyui-silo ({_VERSION}) supports up "
            f"to version {FORMAT_VERSION}. Update comfyui-silo to load it."
        )
    if version < 1:
        raise ValueError(f"{name}: invalid format_version {version} in its metadata (corrupt file?)")
    decoded: dict = {"format": fmt, "format_version": version, "created_by": meta.get("created_by", "")}
    for key in _JSON_KEYS:
        raw = meta.get(key)
        if raw is None:
            if key == "training":
                decoded[key] = {}
                continue
            raise ValueError(f"{name} is missing the {key!r} metadata (corrupt or hand-made operator file)")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            raise ValueError(f"{name}: the {key!r} metadata is not valid JSON (corrupt file?)") from None
        if not isinstance(value, dict):
            raise ValueError(f"{name}: the {key!r} metadata must be a JSON object")
        decoded[key] = value
    arch = decoded["architecture"]
    cls_name = arch.get("class")
    if cls_name not in ARCHITECTURES:
        raise ValueError(
            f"{name} uses operator architecture {cls_name!r}, which this comfyui-silo ({_VERSION}) does not know "
            f"(known: {', '.join(sorted(ARCHITECTURES))}). Update comfyui-silo to load it."
        )
    if not isinstance(arch.get("config", {}), dict):
        raise ValueError(f"{name}: architecture config must be a JSON object")
    return decoded


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
        return Path(self.path).stem if self.path else self.architecture.get("class", "operator")

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
    """Read and validate an operator file's metadata without loading its tensors (for UI listings).

    Returns ``{"format", "format_version", "created_by", "architecture", "degradation", "latent_format",
    "training", "num_parameters", "path"}`` (JSON fields decoded). Raises ``ValueError`` like :func:`load_operator`
    for files that are not (loadable) comfyui-silo operators.
    """
    path = Path(path)
    _refuse_pickle(path)
    header = _read_header(path)
    info = _validate_metadata(path, header)
    n = 0
    for key, entry in header.items():
        if key != "__metadata__" and isinstance(entry, dict):
            n += math.prod(int(d) for d in entry.get("shape", []))
    info["num_parameters"] = n
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

    The file is written to a temporary name in the same folder and renamed, so readers never see a partial file.
    Returns the path.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"operator files must end in .safetensors, got {_name(path)}")
    cls_name = type(operator).__name__
    if ARCHITECTURES.get(cls_name) is not type(operator):
        raise ValueError(
            f"cannot save a {cls_name}: operator files support the architectures {', '.join(sorted(ARCHITECTURES))}"
        )
    if not isinstance(degradation, Mapping):
        raise ValueError("degradation must be a dict describing the degradation")
    if not isinstance(latent_format, Mapping):
        raise ValueError("latent_format must be a dict like {'name': 'SD15', 'latent_channels': 4, ...}")
    for key in ("latent_channels", "scale_factor"):
        if key not in latent_format:
            raise ValueError(f"latent_format needs {key!r} (got keys {sorted(latent_format)})")
    channels = getattr(operator, "latent_channels", None)
    if channels is not None and int(latent_format["latent_channels"]) != int(channels):
        raise ValueError(
            f"latent_format says {latent_format['latent_channels']} latent channels but the operator has {channels}"
        )
    if training is not None and not isinstance(training, Mapping):
        raise ValueError("training must be a dict (or None)")

    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "architecture": _to_json({"class": cls_name, "config": dict(operator.config)}, "architecture config"),
        "degradation": _to_json(dict(degradation), "degradation"),
        "latent_format": _to_json(dict(latent_format), "latent_format"),
        "training": _to_json(dict(training or {}), "training"),
        "created_by": f"comfyui-silo {_VERSION}",
    }
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in operator.state_dict().items()}

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_operator(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> LoadedOperator:
    """Load an operator file strictly (every tensor must match the architecture) into eval mode, frozen.

    ``dtype=None`` keeps the stored dtype. Raises ``ValueError`` with an explanation for pickle files, files that are
    not safetensors, safetensors files that are not comfyui-silo operators (checkpoints, LoRAs, …), files from a
    newer format version or with an unknown architecture, and weight/architecture mismatches.
    """
    path = Path(path)
    _refuse_pickle(path)
    header = _read_header(path)
    info = _validate_metadata(path, header)
    name = _name(path)
    arch = info["architecture"]
    cls = ARCHITECTURES[arch["class"]]
    try:
        module = cls(**arch.get("config", {}))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{name}: cannot build {arch['class']} from the stored config ({exc}); the file may come from a newer "
            "comfyui-silo. Update comfyui-silo."
        ) from exc

    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for truncated data
        raise ValueError(f"{name}: could not read its tensors ({exc}); the file is probably truncated") from exc
    expected = module.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    )
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(
                    f"{label}: " + ", ".join(keys[:10]) + (f", … ({len(keys) - 10} more)" if len(keys) > 10 else "")
                )
        raise ValueError(
            f"{name}: its weights do not match its {arch['class']} architecture (corrupt or edited file): "
            + "; ".join(parts)
        )

    stored = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    module.to(dtype=dtype or stored)
    module.load_state_dict(state, strict=True)
    module.to(device=device)
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
    name = fmt.get("name") or "unnamed"
    return (
        f"{name} ({fmt.get('latent_channels', '?')} channels, scale_factor {fmt.get('scale_factor', '?')}, "
        f"shift_factor {fmt.get('shift_factor', 0.0)})"
    )


def latent_format_compatible(a: Mapping, b: Mapping, tol: float = 1e-6) -> tuple[bool, str]:
    """Whether two latent formats describe the same latent space (channels, scale and shift factors).

    Returns ``(True, "")`` or ``(False, reason)`` where ``reason`` is a sentence for the user. Missing
    ``shift_factor`` counts as 0; a missing ``latent_channels`` or ``scale_factor`` makes the formats incompatible.
    """
    problems = []
    for key in ("latent_channels", "scale_factor"):
        for label, fmt in (("first", a), ("second", b)):
            if fmt.get(key) is None:
                problems.append(f"the {label} latent format has no {key!r}")
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
