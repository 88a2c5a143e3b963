"""Helpers of the batch tier's tests: running ``python -m comfyui_silo batch`` in a subprocess, with or without Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: the reason of a skip for want of Ray (tests/batch/conftest.py counts them in a banner)
RAY_SKIP = "RAY TESTS SKIPPED"
#: runs the command line with Ray made unimportable (``import ray`` raises ImportError)
WITHOUT_RAY = ("import sys; sys.modules['ray'] = None; from comfyui_silo.tools.cli import main; "
               "sys.exit(main(sys.argv[1:]))")


@dataclass
class Run:
    """One finished ``batch`` command: its exit code, its stderr (progress) and stdout (files written)."""

    returncode: int
    stderr: str
    stdout: str
    out: Path


def batch_command(*args, without_ray: bool = False) -> list[str]:
    if without_ray:
        return [sys.executable, "-c", WITHOUT_RAY, "batch", *map(str, args)]
    return [sys.executable, "-m", "comfyui_silo", "batch", *map(str, args)]


def run_batch_command(*args, out: Path, without_ray: bool = False, timeout: float = 600) -> Run:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(batch_command(*args, "--out", out, without_ray=without_ray), capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(ROOT))
    return Run(proc.returncode, proc.stderr, proc.stdout, Path(out))
