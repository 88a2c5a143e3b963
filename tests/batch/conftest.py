"""The batch tier: ``python -m comfyui_silo batch`` end to end on the tiny random checkpoint, 64x64 photos.

The host-needing tests ask for ``small_checkpoint`` (tests/conftest.py), so they are skipped with the loud host
banner when no ComfyUI checkout is found. The Ray tests (test_batch_ray.py) are skipped when Ray is not installed
(``pip install -e '.[batch]'``; scripts/setup_env.sh installs it), with a banner of their own at the end of the run.
Every batch runs as a command in a subprocess: the local engine imports the host into its process, and the pytest
process may hold another in-process host (the comfy tier) already.
"""

from __future__ import annotations

import pytest
from batch_support import RAY_SKIP, Run, run_batch_command


@pytest.fixture(scope="session")
def batch_demo(tmp_path_factory, small_checkpoint):
    """The demo batch (tools/batch_demo.py): 6 photos p0..p5.png plus two bad ones: ``corrupt.png`` (a PNG cut after
    300 bytes) and ``wrong_size.png`` (60x64: the workflow's Encode Measurement needs sides that are multiples of 8)."""
    from PIL import Image

    from comfyui_silo.tools.batch_demo import make_batch_demo

    demo = make_batch_demo(tmp_path_factory.mktemp("batch_demo"), photos=6, size=64)
    (demo.photos / "corrupt.png").write_bytes((demo.photos / "p0.png").read_bytes()[:300])
    with Image.open(demo.photos / "p1.png") as im:
        im.crop((0, 0, 60, 64)).save(demo.photos / "wrong_size.png")
    return demo


@pytest.fixture(scope="session")
def local_run(batch_demo, tmp_path_factory) -> Run:
    """The local engine over the whole folder, with Ray unimportable: the reference outputs."""
    return run_batch_command(batch_demo.workflow, "--inputs", batch_demo.photos, *batch_demo.args(),
                             out=tmp_path_factory.mktemp("local") / "out", without_ray=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if RAY_SKIP in str(r.longrepr)]
    if skipped:
        terminalreporter.write_sep("!", f"{len(skipped)} Ray batch tests were SKIPPED", red=True, bold=True)
        terminalreporter.write_line("reason: ray is not installed; pip install -e '.[batch]' (scripts/setup_env.sh "
                                    "does) to run them")
