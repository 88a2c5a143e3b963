"""Batch tier, Ray engine, on a local Ray cluster of 2 CPUs started by this module: two workers give the local
engine's outputs byte for byte, bad photos fail alone, a worker killed mid-batch still yields every photo
exactly once with no partial file, and a rerun does no work."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
from batch_support import RAY_SKIP, ROOT, batch_command, run_batch_command

ray = pytest.importorskip("ray", reason=f"{RAY_SKIP}: ray is not installed (pip install -e '.[batch]')")

pytestmark = pytest.mark.batch

PHOTOS = [f"p{i}.png" for i in range(6)]


@pytest.fixture(scope="module")
def ray_address():
    """A Ray cluster of 2 CPUs on this machine, for this module only (stopped with ``ray.shutdown``)."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _manifest(out):
    return [json.loads(line) for line in (out / "batch-manifest.jsonl").read_text().splitlines()]


def _same_outputs(out, reference):
    for name in PHOTOS:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), f"{name} differs from the local engine's"


def test_two_ray_workers_give_the_local_engines_outputs(batch_demo, local_run, ray_address, tmp_path):
    args = (batch_demo.workflow, "--inputs", batch_demo.photos, *batch_demo.args(), "--engine", "ray",
            "--ray-address", ray_address)
    run = run_batch_command(*args, out=tmp_path / "out")
    assert run.returncode == 1, run.stderr[-3000:]  # the two bad photos
    assert "starting 2 Ray worker(s)" in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]
    _same_outputs(run.out, local_run.out)
    assert sorted(p.name for p in run.out.glob("*.png")) == PHOTOS and not list(run.out.rglob("*.partial"))
    records = _manifest(run.out)
    failed = {r["photo"]: (r["key"], r["error"]) for r in records if r["status"] == "failed"}
    assert failed == {r["photo"]: (r["key"], r["error"]) for r in _manifest(local_run.out) if r["status"] == "failed"}
    assert sorted(failed) == ["corrupt.png", "wrong_size.png"], "each bad photo fails alone, as in the local engine"
    workers = {r["worker"].split(",")[0] for r in records}
    assert workers == {"worker 1", "worker 2"}, "both workers restored photos"
    assert re.search(r"workers: worker 1: \d+ photos, [\d.]+ s/photo \| worker 2: \d+ photos", run.stderr)

    rerun = run_batch_command(*args, out=run.out)
    assert "0 to restore, 6 done before, 2 failed before" in rerun.stderr, rerun.stderr[-3000:]
    assert "starting" not in rerun.stderr, "no Ray worker may start when there is nothing to do"
    assert len(_manifest(run.out)) == len(records)


def test_a_worker_killed_mid_batch_still_gives_every_photo_exactly_once(batch_demo, local_run, ray_address,
                                                                         tmp_path):
    """SIGKILL the process of the worker that finished the first photo, right after it was handed the next one: Ray
    restarts the actor and runs that photo again; the driver writes each photo once, atomically."""
    out = tmp_path / "out"
    cmd = batch_command(batch_demo.workflow, "--inputs", batch_demo.photos / "p*.png", *batch_demo.args(),
                        "--engine", "ray", "--ray-address", ray_address, "--out", out)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=str(ROOT),
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines, killed = [], None
    try:
        for line in proc.stderr:
            lines.append(line)
            found = re.search(r"^\[1/6\] p\d\.png -> .*pid (\d+) on ", line)
            if found and killed is None:
                time.sleep(0.3)  # the worker is restoring the photo it was handed next
                killed = int(found.group(1))
                os.kill(killed, signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, "".join(lines)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = "".join(lines)
    assert killed is not None, stderr[-3000:]
    assert re.search(rf"worker \d was restarted: now pid \d+ on \S+, before pid {killed} ", stderr), stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted([*PHOTOS, "batch-manifest.jsonl", "batch-summary.json"])
    _same_outputs(out, local_run.out)
    records = _manifest(out)
    assert sorted(r["photo"] for r in records) == PHOTOS and all(r["status"] == "done" for r in records)
    assert json.loads((out / "batch-summary.json").read_text())["restarts"] >= 1
