"""Importing the ComfyUI host into this process: the one way the command line (``train-operator``), the test tiers'
in-process host (:class:`~comfyui_silo.tools.host_harness.InProcessHost`), the benchmarks and the random-checkpoint
builder do it. (A host in its own process, a server, is :class:`~comfyui_silo.tools.runner.ComfyRunner`.)

Standard library only, and no relative imports: ``tools/random_checkpoint.py`` runs as a script and imports this
module from its own folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["HostNotFoundError", "comfyui_path", "import_host"]


class HostNotFoundError(RuntimeError):
    """No ComfyUI checkout where one was looked for."""


def comfyui_path() -> Path:
    """The ComfyUI checkout to use by default: ``$COMFYUI_PATH``, else ``~/ComfyUI``."""
    return Path(os.environ.get("COMFYUI_PATH") or "~/ComfyUI").expanduser().resolve()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def import_host(comfyui=None, *, cpu: bool = False, base_directory=None) -> Path:
    """Make the ComfyUI checkout ``comfyui`` (default :func:`comfyui_path`) importable and configure it before
    anything reads its settings: its own argument parser stays off, ``--cpu`` is set when ``cpu`` is asked for or no
    CUDA device exists (the host reads it when ``comfy.model_management`` is first imported), and
    ``--base-directory`` is set to ``base_directory`` when one is given (read when ``folder_paths`` is first
    imported). Returns the checkout's resolved path; raises :class:`HostNotFoundError` when it holds no ComfyUI."""
    root = Path(comfyui).expanduser().resolve() if comfyui else comfyui_path()
    if not (root / "comfy").is_dir():
        raise HostNotFoundError(f"no ComfyUI checkout at {root} (pass --comfyui PATH or set COMFYUI_PATH)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options

    comfy.options.args_parsing = False
    import comfy.cli_args

    if cpu or not _cuda_available():
        comfy.cli_args.args.cpu = True
    if base_directory is not None:
        comfy.cli_args.args.base_directory = str(base_directory)
    return root
