"""Random-weight checkpoints for the tests: the builder lives in the pack (``tools/random_checkpoint.py``)."""

from comfyui_silo.tools.random_checkpoint import *  # noqa: F401,F403
from comfyui_silo.tools.random_checkpoint import FAMILIES, main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
