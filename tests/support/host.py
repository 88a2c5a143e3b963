"""The test tiers' view of the host harness: it lives in the pack (``tools/host_harness.py``) so that the benchmark
harness uses it through the package, never through the tests."""

from comfyui_silo.tools.host_harness import *  # noqa: F401,F403
from comfyui_silo.tools.host_harness import FAMILY_VARIANTS, REPO_ROOT  # noqa: F401
