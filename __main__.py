"""``python -m comfyui_silo ...``: the pack's command line (see ``tools/cli.py``)."""

from __future__ import annotations

import sys

if __package__ in (None, ""):  # run as a file, not as a package
    raise SystemExit("run it as a module: python -m comfyui_silo --help (after `pip install -e .`)")

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
