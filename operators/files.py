"""Latent-operator files on disk, below any architecture: format constants, header checks, atomic writes, names.

This module knows the file format but no network class, so both :mod:`.io` (the architecture registry, loading)
and :mod:`.reference` (importing the paper's operators) build on it without importing each other.

Everything here runs before any large allocation: the header is read with a bounded length and checked entry by
entry (names, dtypes, shapes, byte ranges, parameter count) against what the architecture in the metadata
expects, and file names are checked before a training run rather than when its result is saved.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config.version import __version__
from .text import bounded

__all__ = [
    "DAMAGED",
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_FILE_NAME_CHARS",
    "MAX_HEADER_BYTES",
    "MAX_OPERATOR_PARAMETERS",
    "check_output_path",
    "check_tensor_table",
    "file_label",
    "latent_family",
    "operator_file_name",
    "read_header",
    "write_operator",
]

FORMAT = "comfyui-silo.latent-operator"
#: Newest format version this pack reads and writes. 1: LatentOperator and the paper's CNN; 2: adds the
#: PhysicsOperator architecture (an older pack refuses a version-2 file with "update comfyui-silo" instead of
#: calling it damaged). A file is written with the lowest version that can read it (``format_version`` argument).
FORMAT_VERSION = 2

#: Largest operator this pack loads (parameters and buffers together). Ours has ~1 M, the paper's CNN ~3.5 M.
MAX_OPERATOR_PARAMETERS = 64_000_000
#: Largest safetensors header read (names, shapes and metadata; an operator's is a few tens of kB).
MAX_HEADER_BYTES = 16 * 1024 * 1024
#: Longest file name (one path component, without ``.safetensors``) a training run will write.
MAX_FILE_NAME_CHARS = 100

#: The advice for a file that is not what it claims to be (as opposed to one from a newer comfyui-silo).
DAMAGED = "this file is damaged or not an operator file"
_HOW_TO_MAKE = "Operators are made with the Train Latent Operator node or `python -m comfyui_silo train-operator`"

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}

#: Latent spaces the host knows, (channels, scale_factor, shift_factor) -> family name (ComfyUI's latent formats).
_FAMILIES = {(4, 0.18215, 0.0): "SD15", (4, 0.13025, 0.0): "SDXL", (16, 1.5305, 0.0609): "SD3",
             (16, 0.3611, 0.1159): "Flux"}


def file_label(path: Path) -> str:
    """A file's name as messages show it (bounded: a name is user data too)."""
    return bounded(path.name or str(path), 120)


def version_label() -> str:
    return f"comfyui-silo {__version__}"


def latent_family(fmt: Mapping) -> str:
    """The family a latent format names (``name``), else the one its numbers match, else ``"unknown"``."""
    name = fmt.get("name")
    if isinstance(name, str) and name.strip() and name != "unknown":
        return bounded(name, 60)
    try:
        key = (int(fmt["latent_channels"]), float(fmt["scale_factor"]), float(fmt.get("shift_factor") or 0.0))
    except (KeyError, TypeError, ValueError):
        return "unknown"
    for (c, s, sh), family in _FAMILIES.items():
        if key[0] == c and abs(key[1] - s) < 1e-6 and abs(key[2] - sh) < 1e-6:
            return family
    return "unknown"


# ---------------------------------------------------------------------- reading
def read_header(path: Path) -> dict:
    """Parse the JSON header of a safetensors file (no tensor data is read; at most :data:`MAX_HEADER_BYTES`)."""
    not_st = (f"{file_label(path)} is not a safetensors file ({{why}}): {DAMAGED}. Latent operators are "
              f".safetensors files; {_HOW_TO_MAKE}.")
    if not path.is_file():
        raise FileNotFoundError(f"operator file not found: {bounded(str(path), 300)}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(not_st.format(why="file too short"))
        n = int.from_bytes(head, "little")
        if MAX_HEADER_BYTES < n <= size - 8:
            raise ValueError(f"{file_label(path)}: its safetensors header is {n:,} bytes; operator headers are at "
                             f"most {MAX_HEADER_BYTES // 2**20} MiB, so it was not read ({DAMAGED}).")
        if n < 2 or n > size - 8:
            raise ValueError(not_st.format(why="invalid header length"))
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(not_st.format(why="header is not JSON")) from None
    if not isinstance(header, dict):
        raise ValueError(not_st.format(why="header is not a JSON object"))
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(not_st.format(why="bad __metadata__"))
    header["__data_bytes__"] = size - 8 - n
    return header


def _listing(label: str, items: list[str], limit: int = 8) -> str:
    shown = ", ".join(bounded(k, 80) for k in items[:limit])
    more = f", … ({len(items) - limit} more)" if len(items) > limit else ""
    return f"{label}: {shown}{more}"


def check_tensor_table(path: Path, header: dict, expected: Mapping[str, tuple[int, ...]], arch: str) -> torch.dtype:
    """Check a header's tensor table against the shapes an architecture expects, before any tensor is read.

    ``expected`` maps state-dict names to shapes (computed without allocating, e.g. on the ``meta`` device). Checks,
    in order: the expected size against :data:`MAX_OPERATOR_PARAMETERS`; every entry is well formed with a float
    dtype (one dtype for the file) and a byte range inside the file that fits its shape; names (missing,
    unexpected) and shapes. Returns the file's dtype. Messages name the file and are bounded in length.
    """
    name = file_label(path)
    n_expected = sum(math.prod(s) for s in expected.values())
    if n_expected > MAX_OPERATOR_PARAMETERS:
        raise ValueError(
            f"{name}: the {bounded(arch, 60)} architecture in its metadata has {n_expected:,} parameters; "
            f"comfyui-silo loads operators of at most {MAX_OPERATOR_PARAMETERS // 1_000_000} M parameters "
            f"({DAMAGED}, or a network far larger than a latent operator). Nothing was allocated.")
    table = {k: v for k, v in header.items() if k not in ("__metadata__", "__data_bytes__")}
    data_bytes = int(header.get("__data_bytes__", 0))
    dtypes: set[str] = set()
    stored: dict[str, tuple[int, ...]] = {}
    for key, entry in table.items():
        ok = (isinstance(entry, dict) and isinstance(entry.get("shape"), list) and len(entry["shape"]) <= 8
              and all(isinstance(d, int) and 0 <= d < 2**40 for d in entry["shape"])
              and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
              and all(isinstance(o, int) for o in entry["data_offsets"]))
        if not ok:
            raise ValueError(f"{name}: tensor {bounded(key, 80)!r} has a malformed header entry: {DAMAGED}.")
        dtype = entry.get("dtype")
        if dtype not in _DTYPES:
            raise ValueError(f"{name}: tensor {bounded(key, 80)!r} is stored as {bounded(dtype, 20)}; operator "
                             f"weights are float32, float16 or bfloat16 ({DAMAGED}).")
        shape = tuple(entry["shape"])
        start, end = entry["data_offsets"]
        if not 0 <= start <= end <= data_bytes or end - start != math.prod(shape) * _ITEMSIZE[dtype]:
            raise ValueError(f"{name}: the bytes of tensor {bounded(key, 80)!r} lie outside the file or do not "
                             f"fit its shape (truncated?): {DAMAGED}.")
        dtypes.add(dtype)
        stored[key] = shape
    if len(dtypes) > 1:
        raise ValueError(f"{name}: its tensors mix dtypes ({', '.join(sorted(dtypes))}): {DAMAGED}.")
    missing = sorted(k for k in expected if k not in stored)
    unexpected = sorted(k for k in stored if k not in expected)
    wrong = sorted(f"{k} {stored[k]} (expected {tuple(expected[k])})"
                   for k in expected if k in stored and stored[k] != tuple(expected[k]))
    if missing or unexpected or wrong:
        parts = [_listing(label, keys) for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise ValueError(f"{name}: its weights do not match its {bounded(arch, 60)} architecture ({DAMAGED}): "
                         + "; ".join(parts))
    return _DTYPES[dtypes.pop()] if dtypes else torch.float32


# ---------------------------------------------------------------------- writing
def _to_json(value, what: str) -> str:
    try:
        return json.dumps(value, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable (plain dict of str/number/bool/list): {exc}") from exc


def write_operator(path: str | os.PathLike, operator: torch.nn.Module, *, degradation: Mapping,
                   latent_format: Mapping, training: Mapping | None = None, format_version: int = 1) -> Path:
    """Write ``operator`` (a module with a JSON ``config`` property) with the format's metadata to ``path``.

    The latent format's family is stored as its ``name`` (inferred from the numbers when missing). The file is
    written to a temporary name in the same folder and renamed, so readers never see a partial file.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"operator files must end in .safetensors, got {file_label(path)}")
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
    latent_format = {**latent_format, "name": latent_family(latent_format)}
    metadata = {
        "format": FORMAT,
        "format_version": str(int(format_version)),
        "architecture": _to_json({"class": type(operator).__name__, "config": dict(operator.config)},
                                 "architecture config"),
        "degradation": _to_json(dict(degradation), "degradation"),
        "latent_format": _to_json(latent_format, "latent_format"),
        "training": _to_json(dict(training or {}), "training"),
        "created_by": version_label(),
    }
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in operator.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:40]}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        # mkstemp creates the file 0600; an operator file is shared like any model file: the mode open() would give
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# ---------------------------------------------------------------------- file names
_WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def _check_component(part: str, what: str) -> None:
    if part in ("", ".", ".."):
        raise ValueError(f"{what} has an empty, '.' or '..' part ({bounded(part, 20)!r}); give a plain name "
                         "such as 'blur_sd15'")
    if part.startswith("."):
        raise ValueError(f"{what} part {bounded(part, 60)!r} starts with '.', which makes a hidden file the "
                         "operator list never shows; drop the dot")
    if len(part) > MAX_FILE_NAME_CHARS:
        raise ValueError(f"{what} part '{bounded(part, 40)}' is {len(part)} characters long; at most "
                         f"{MAX_FILE_NAME_CHARS} are allowed")
    if part.split(".")[0].lower() in _WINDOWS_DEVICES:
        raise ValueError(f"{what} {part!r} is a reserved device name on Windows; choose another name")


def operator_file_name(name: str) -> str:
    """The relative path (``"sub/name.safetensors"``) a training run writes inside the operators folder, checked
    before any training.

    Characters other than letters, digits, ``_``, ``-`` and ``.`` become ``_`` (as they always did); ``/``
    separates subfolders. Refused, with a sentence saying why: an empty name, a part longer than
    :data:`MAX_FILE_NAME_CHARS` characters, ``.``/``..``/hidden (leading-dot) parts, absolute paths and ``\\``
    separators, Windows device names (``CON``, ``NUL``, …).
    """
    if not isinstance(name, str):
        raise ValueError(f"the file name must be text, got {type(name).__name__}")
    text = name.strip()
    if not text:
        raise ValueError("the file name is empty; give a name such as 'blur_sd15'")
    if "\\" in text or text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        raise ValueError(f"the file name {bounded(text, 60)!r} is a path; give a name (use '/' only for a "
                         "subfolder inside models/latent_operators)")
    if text.lower().endswith(".safetensors"):
        text = text[: -len(".safetensors")]
    parts = [re.sub(r"[^A-Za-z0-9_.\-]+", "_", p) for p in text.split("/")]
    for part in parts:
        _check_component(part, "the file name")
    return "/".join(parts) + ".safetensors"


def check_output_path(path: str | os.PathLike) -> Path:
    """An operator file path given on the command line, checked before training: ``.safetensors``, a usable file
    name (see :func:`operator_file_name`), and a folder that exists (or can be made) and is writable."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"the output file must end in .safetensors, got {file_label(path)}")
    _check_component(path.stem, "the output file name")
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the folder {bounded(str(folder), 200)} ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"the folder {bounded(str(folder), 200)} is not writable")
    return path
