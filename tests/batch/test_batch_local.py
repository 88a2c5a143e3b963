"""Batch tier, local engine: a folder restored in one process without Ray, a corrupt photo and one of the wrong size
failing alone with their messages, a workflow that cannot run stopping the batch with one line, and a rerun that does
no work."""

from __future__ import annotations

import json

import pytest
from batch_support import run_batch_command

pytestmark = pytest.mark.batch

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PHOTOS = [f"p{i}" for i in range(6)]


def _manifest(out):
    return [json.loads(line) for line in (out / "batch-manifest.jsonl").read_text().splitlines()]


def test_the_local_engine_restores_the_folder_without_ray(local_run):
    from PIL import Image

    assert local_run.returncode == 1, local_run.stderr[-3000:]  # two photos failed: the exit code says so
    assert "Traceback" not in local_run.stderr, local_run.stderr[-3000:]
    for stem in PHOTOS:
        data = (local_run.out / f"{stem}.png").read_bytes()
        assert data.startswith(PNG_MAGIC)
        with Image.open(local_run.out / f"{stem}.png") as im:
            assert im.size == (64, 64)
    assert sorted(p.name for p in local_run.out.glob("*.png")) == [f"{s}.png" for s in PHOTOS]
    assert not list(local_run.out.rglob("*.partial"))
    assert sorted(local_run.stdout.split()) == sorted(str(local_run.out / f"{s}.png") for s in PHOTOS)
    records = _manifest(local_run.out)
    assert sorted(r["photo"] for r in records if r["status"] == "done") == [f"{s}.png" for s in PHOTOS]
    assert all(r["seeds"] and r["outputs"] == [r["photo"]] for r in records if r["status"] == "done")
    assert len({r["key"] for r in records}) == 8
    progress = [line for line in local_run.stderr.splitlines() if line.startswith("[")]
    assert len(progress) == 8 and progress[-1].startswith("[8/8]") and "photos/s" in progress[-1], progress
    assert "worker 1: 8 photos" in local_run.stderr
    # the host and the checkpoint were loaded once for the 8 photos (the host logs each checkpoint it loads)
    log = (local_run.out / "batch-logs" / "local.log").read_text()
    assert log.count("model_type ") == 1 and log.count("Requested to load BaseModel") == 1, log[-3000:]


def test_bad_photos_fail_alone_with_a_clear_message(local_run):
    failed = {r["photo"]: r["error"] for r in _manifest(local_run.out) if r["status"] == "failed"}
    assert sorted(failed) == ["corrupt.png", "wrong_size.png"]
    assert "cannot be read as an image" in failed["corrupt.png"] and "re-export it" in failed["corrupt.png"]
    # a node that refuses the photo: its own message, one line, with the photo's size; the traceback is in the log
    wrong = failed["wrong_size.png"]
    assert wrong.startswith("node ") and " failed: " in wrong and wrong.endswith("(the photo is 60x64)"), wrong
    for name, error in failed.items():
        assert f"FAILED {name} (worker 1, pid " in local_run.stderr and error in local_run.stderr
    log = (local_run.out / "batch-logs" / "local.log").read_text()
    assert "Traceback" not in local_run.stderr and "Traceback (most recent" in log.split("Exception during processing")[1]
    summary = json.loads((local_run.out / "batch-summary.json").read_text())
    assert summary["restored"] == 6 and sorted(f["photo"] for f in summary["failed"]) == sorted(failed)


def test_a_workflow_that_cannot_run_stops_the_batch_with_one_line(batch_demo, tmp_path):
    run = run_batch_command(batch_demo.workflow, "--inputs", batch_demo.photos / "p0.png", *batch_demo.args(),
                            "--set", "CheckpointLoaderSimple.ckpt_name=missing.safetensors", out=tmp_path / "out",
                            without_ray=True)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert len(errors) == 1 and "CheckpointLoaderSimple" in errors[0] and "missing.safetensors" in errors[0], errors
    assert not list((tmp_path / "out").glob("*.png"))


def test_a_rerun_does_no_work(local_run, batch_demo):
    before = {p.name: p.stat().st_mtime_ns for p in local_run.out.glob("*.png")}
    lines = len(_manifest(local_run.out))
    rerun = run_batch_command(batch_demo.workflow, "--inputs", batch_demo.photos, *batch_demo.args(),
                              out=local_run.out, without_ray=True)
    assert "0 to restore, 6 done before, 2 failed before" in rerun.stderr, rerun.stderr[-3000:]
    assert "ready" not in rerun.stderr, "no worker (no host) may start when there is nothing to do"
    assert {p.name: p.stat().st_mtime_ns for p in local_run.out.glob("*.png")} == before
    assert len(_manifest(local_run.out)) == lines
    assert rerun.returncode == 1 and "FAILED (in an earlier run, not retried) corrupt.png" in rerun.stderr


def test_per_photo_seeds_come_from_the_photos_content(local_run, batch_demo, tmp_path):
    run = run_batch_command(batch_demo.workflow, "--inputs", batch_demo.photos / "p[01].png", *batch_demo.args(),
                            "--seed", "per-photo", out=tmp_path / "out", without_ray=True)
    assert run.returncode == 0, run.stderr[-3000:]
    records = {r["photo"]: r for r in _manifest(run.out)}
    reference = {r["photo"]: r for r in _manifest(local_run.out)}
    seeds = [next(iter(records[p]["seeds"].values())) for p in ("p0.png", "p1.png")]
    assert seeds[0] != seeds[1] and all(s != next(iter(reference["p0.png"]["seeds"].values())) for s in seeds)
    for photo in ("p0.png", "p1.png"):
        assert records[photo]["key"] != reference[photo]["key"], "the seed policy is part of the key"
        assert records[photo]["photo_sha256"] == reference[photo]["photo_sha256"]
        assert (run.out / photo).read_bytes() != (local_run.out / photo).read_bytes()
