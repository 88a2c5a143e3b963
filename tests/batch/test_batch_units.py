"""The batch's driver and photo checks without a host: photos found and named, keys, the manifest, atomic writes,
bad photos refused with a clear message, seeds, progress lines, and the local path never importing Ray."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from batch_support import ROOT, WITHOUT_RAY

from comfyui_silo.tools.batch import (
    Manifest,
    Progress,
    atomic_write,
    batch_key,
    find_photos,
    remove_partials,
    workflow_sha256,
)
from comfyui_silo.tools.batch_worker import (
    PhotoError,
    PhotoResult,
    apply_seed_offset,
    check_photo,
    find_image_node,
)
from comfyui_silo.tools.workflow import WorkflowError

pytestmark = pytest.mark.unit


def _png(size=(16, 16), mode="RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, 128 if mode != "RGB" else (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_photos_are_found_in_a_folder_or_a_glob_and_named_after_their_path(tmp_path):
    for rel in ("a.png", "sub/b.jpg", "c.PNG", "notes.txt", "same.png", "same.jpg", "out/old.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    photos = find_photos(str(tmp_path), tmp_path / "out")
    assert [p.name for p in photos] == ["a.png", "c.PNG", "same.jpg", "same.png", "sub/b.jpg"], "out/ is left out"
    assert [p.stem for p in photos] == ["a", "c", "same_jpg", "same_png", "sub/b"]
    globbed = find_photos(str(tmp_path / "sub" / "*.jpg"), tmp_path / "out")
    assert [(p.name, p.stem) for p in globbed] == [("b.jpg", "b")]
    with pytest.raises(Exception, match="no photos"):
        find_photos(str(tmp_path / "*.gif"), tmp_path / "out")


def test_the_key_changes_with_the_photo_the_workflow_the_overrides_and_the_seed_policy():
    base = batch_key("a" * 64, "w", {"set": {"3.steps": "2"}}, "workflow")
    assert base == batch_key("a" * 64, "w", {"set": {"3.steps": "2"}}, "workflow")
    assert len({base, batch_key("b" * 64, "w", {"set": {"3.steps": "2"}}, "workflow"),
                batch_key("a" * 64, "v", {"set": {"3.steps": "2"}}, "workflow"),
                batch_key("a" * 64, "w", {"set": {"3.steps": "3"}}, "workflow"),
                batch_key("a" * 64, "w", {"set": {"3.steps": "2"}}, "per-photo")}) == 5


def test_moving_a_node_on_the_canvas_does_not_change_the_workflow_hash():
    wf = {"nodes": [{"id": 1, "type": "LoadImage", "pos": [0, 0], "size": [1, 1], "widgets_values": ["a.png"]}],
          "links": [], "extra": {"ds": {"scale": 1}}}
    moved = json.loads(json.dumps(wf))
    moved["nodes"][0]["pos"], moved["extra"]["ds"]["scale"] = [300, 40], 2
    changed = json.loads(json.dumps(wf))
    changed["nodes"][0]["widgets_values"] = ["b.png"]
    assert workflow_sha256(wf) == workflow_sha256(moved) != workflow_sha256(changed)


def test_the_manifest_counts_a_photo_done_only_while_its_outputs_exist_and_survives_a_torn_line(tmp_path):
    m = Manifest(tmp_path)
    m.append({"key": "k1", "status": "done", "outputs": ["a.png"]})
    m.append({"key": "k2", "status": "failed", "outputs": [], "error": "bad", "kind": "permanent"})
    (tmp_path / "a.png").write_bytes(b"png")
    with open(m.path, "a") as f:
        f.write('{"key": "k3", "status": "do')  # a crash in the middle of a line
    again = Manifest(tmp_path)
    assert again.done("k1") and not again.done("k2") and again.failed("k2")["error"] == "bad"
    assert "k3" not in again.records
    (tmp_path / "a.png").unlink()
    assert not again.done("k1"), "a deleted output is restored again"


def test_outputs_are_written_atomically_and_leftovers_of_a_killed_driver_are_removed(tmp_path):
    atomic_write(tmp_path / "sub" / "a.png", b"data")
    assert (tmp_path / "sub" / "a.png").read_bytes() == b"data"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.png"]
    (tmp_path / "sub" / ".b.png.0123.partial").write_bytes(b"half")
    assert remove_partials(tmp_path) == 1 and sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.png"]


@pytest.mark.parametrize(("data", "message"), [
    (b"not an image at all", "cannot be read as an image"),
    (_png()[:60], "cannot be read as an image"),
    (_png((4, 64)), r"smaller than 8 px on a side \(--min-side\)"),
    (_png((200, 200)), "over the limit of 0.01"),
])
def test_a_bad_photo_is_refused_with_what_is_wrong_and_what_to_do(data, message):
    with pytest.raises(PhotoError, match=message) as err:
        check_photo(data, min_side=8, max_megapixels=0.01)
    assert "\n" not in str(err.value) and any(w in str(err.value) for w in ("re-export", "use the", "scale it"))


def test_a_floating_point_photo_with_nan_is_refused():
    import numpy as np
    from PIL import Image

    arr = np.full((16, 16), 0.5, dtype=np.float32)
    arr[3, 4] = np.nan
    buf = io.BytesIO()
    Image.fromarray(arr, "F").save(buf, format="TIFF")
    with pytest.raises(PhotoError, match="NaN or infinite"):
        check_photo(buf.getvalue())
    arr[3, 4] = 0.25
    buf = io.BytesIO()
    Image.fromarray(arr, "F").save(buf, format="TIFF")
    assert check_photo(buf.getvalue()) == (16, 16)


INFO = {"LoadImage": {"input": {"required": {"image": [["a.png"], {"image_upload": True}]}}, "output_node": False},
        "KSampler": {"input": {"required": {"seed": ["INT", {"min": 0, "max": 99}], "steps": ["INT", {}]}}},
        "SaveImage": {"input": {"required": {"images": ["IMAGE", {}]}}, "output_node": True}}


def test_the_photo_goes_to_the_only_image_loader_or_the_one_named():
    api = {"1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}, "_meta": {"title": "Photo"}},
           "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}
    assert find_image_node(api, INFO) == "1"
    api["3"] = {"class_type": "LoadImage", "inputs": {"image": "mask.png"}, "_meta": {"title": "Mask"}}
    with pytest.raises(WorkflowError, match="several images.*--image-node"):
        find_image_node(api, INFO)
    assert find_image_node(api, INFO, "Photo") == "1"
    with pytest.raises(WorkflowError, match="does not load an image"):
        find_image_node(api, INFO, "2")


def test_seeds_come_from_the_workflow_plus_an_offset_that_wraps_at_the_inputs_maximum():
    api = {"5": {"class_type": "KSampler", "inputs": {"seed": 90, "steps": 3}}}
    assert apply_seed_offset(json.loads(json.dumps(api)), INFO, 0) == {"5.seed": 90}
    assert apply_seed_offset(api, INFO, 15) == {"5.seed": 5} and api["5"]["inputs"]["seed"] == 5


def test_progress_reports_throughput_eta_and_each_workers_share():
    now = [0.0]
    lines: list[str] = []
    progress = Progress(4, lines.append, clock=lambda: now[0])
    photo = type("P", (), {"name": "a.png"})()
    for t, worker in ((2.0, "worker 1, pid 7 on h"), (4.0, "worker 2, pid 8 on h"), (6.0, "worker 1, pid 9 on h")):
        now[0] = t
        progress.photo(photo, PhotoResult("k", "a.png", outputs=[1], worker=worker, seconds=2.0), ["a.png"])
    now[0] = 8.0
    progress.photo(photo, PhotoResult("k", "a.png", error="boom", worker="worker 2, pid 8 on h", seconds=1.0), [])
    assert lines[0] == "[1/4] a.png -> a.png (worker 1, pid 7 on h, 2.0 s) | 0.50 photos/s | about 6 s left"
    assert "worker 1 was restarted: now pid 9 on h, before pid 7 on h" in lines
    assert lines[-1].startswith("[4/4] FAILED a.png (worker 2, pid 8 on h, 1.0 s): boom | 0.50 photos/s")
    progress.workers_line()
    assert lines[-1] == "workers: worker 1: 2 photos, 2.0 s/photo | worker 2: 2 photos, 1.5 s/photo"
    assert progress.restarts == 1


def _command(*args, without_ray=True):
    cmd = [sys.executable, "-c", WITHOUT_RAY] if without_ray else [sys.executable, "-m", "comfyui_silo"]
    return subprocess.run([*cmd, "batch", *map(str, args)], capture_output=True, text=True, timeout=300,
                          cwd=str(ROOT))


def test_without_ray_the_local_modules_import_and_the_ray_engine_says_how_to_install_it(tmp_path):
    code = ("import sys; sys.modules['ray'] = None; import comfyui_silo.tools.batch, comfyui_silo.tools.batch_worker, "
            "comfyui_silo.tools.batch_demo; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(_png())
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps({"1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}}}))
    run = _command(wf, "--inputs", tmp_path / "photos", "--out", tmp_path / "out", "--engine", "ray")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "the ray engine needs Ray" in run.stderr and "pip install 'comfyui-silo[batch]'" in run.stderr


def test_the_command_refuses_an_empty_folder_and_a_workflow_that_is_not_json(tmp_path):
    (tmp_path / "empty").mkdir()
    wf = tmp_path / "wf.json"
    wf.write_text("{")
    run = _command(wf, "--inputs", tmp_path / "empty", "--out", tmp_path / "out")
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {wf} is not JSON: "), lines
    wf.write_text("{}")
    run = _command(wf, "--inputs", tmp_path / "empty", "--out", tmp_path / "out")
    assert run.returncode == 2 and "no photos" in run.stderr and "Traceback" not in run.stderr


def test_an_image_that_went_through_nan_is_refused_not_saved_black():
    """Save Image turns NaN into black pixels without a word: the worker checks what the saving nodes received."""
    from types import SimpleNamespace

    import torch

    from comfyui_silo.tools.batch_worker import BatchWorker

    cache = {"8": [[torch.zeros(1, 8, 8, 3)]], "9": [[torch.full((1, 8, 8, 3), float("nan"))]]}
    worker = BatchWorker.__new__(BatchWorker)  # no host: only the check
    worker.executor = SimpleNamespace(caches=SimpleNamespace(outputs=SimpleNamespace(get=cache.get)))
    api = {"10": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "x"}}}
    worker._check_finite(api, {"10": {"images": []}})  # finite: fine
    api["10"]["inputs"]["images"] = ["9", 0]
    with pytest.raises(PhotoError, match=r"node 10 \(SaveImage\) got NaN or infinite values in 'images'"):
        worker._check_finite(api, {"10": {"images": []}})


def test_the_plan_skips_done_photos_duplicates_and_permanent_failures_but_retries_a_dead_worker(tmp_path):
    from comfyui_silo.tools.batch import BatchOptions, make_plan

    for name, content in (("a.png", b"A"), ("b.png", b"B"), ("c.png", b"C"), ("d.png", b"D"), ("a_copy.png", b"A")):
        (tmp_path / "in" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(content)
    options = BatchOptions(workflow=tmp_path / "wf.json", inputs=str(tmp_path / "in"), out=tmp_path / "out")
    photos = find_photos(options.inputs, options.out)
    manifest = Manifest(options.out)
    keys = {p.name: p for p in photos}
    make_plan(options, {}, photos, manifest)  # fills in the keys
    manifest.append({"key": keys["a.png"].key, "status": "done", "outputs": ["a.png"]})
    (options.out / "a.png").write_bytes(b"restored")
    manifest.append({"key": keys["b.png"].key, "status": "failed", "kind": "permanent", "error": "unreadable"})
    manifest.append({"key": keys["c.png"].key, "status": "failed", "kind": "transient", "error": "worker died"})
    plan = make_plan(options, {}, find_photos(options.inputs, options.out), manifest)
    assert [p.name for p in plan.todo] == ["c.png", "d.png"]
    assert [p.name for p in plan.done] == ["a.png"]
    assert [(p.name, q.name) for p, q in plan.duplicates] == [("a_copy.png", "a.png")]
    assert [(p.name, e) for p, e in plan.failed_before] == [("b.png", "unreadable")]
    options.retry_failed = True
    assert [p.name for p in make_plan(options, {}, find_photos(options.inputs, options.out), manifest).todo] == [
        "b.png", "c.png", "d.png"]


def test_a_photo_whose_ray_worker_died_too_often_comes_back_as_a_failure_naming_it():
    pytest.importorskip("ray", reason="RAY TESTS SKIPPED: ray is not installed (pip install -e '.[batch]')")
    from ray.exceptions import RayActorError

    from comfyui_silo.tools.batch_ray import RayEngine
    from comfyui_silo.tools.batch_worker import PhotoJob, WorkerSettings

    engine = RayEngine(WorkerSettings(workflow={}), print, retries=2)
    a, b = PhotoJob("ka", "a.png", b""), PhotoJob("kb", "b.png", b"")
    running, errors = {"ka": (a, "actor-1"), "kb": (b, "actor-2")}, []
    result = engine._lost(running, RayActorError("actor-2", "The actor died unexpectedly"), errors)
    assert result.key == "kb" and result.kind == "transient" and not result.ok
    assert "died 3 time(s)" in result.error and "rerun the batch" in result.error
    assert list(running) == ["ka"] and errors == []
    assert engine._lost(running, RayActorError(None, "lost"), errors) is None and errors == ["lost"]
