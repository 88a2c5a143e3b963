"""Restore a whole folder: ``python -m comfyui_silo batch WORKFLOW --inputs DIR_OR_GLOB --out DIR``.

The driver side of a batch, whichever engine runs it: find the photos, key each one (content hash + workflow +
overrides + seed policy), skip what the manifest says is done, hand the rest to an engine as
:class:`~comfyui_silo.tools.batch_worker.PhotoJob`\\ s, write what comes back atomically (a temporary name, then
``os.replace``), record it in the manifest, and report progress over the whole batch on stderr.

Engines (both run :class:`~comfyui_silo.tools.batch_worker.BatchWorker`, the host in-process, loaded once per
worker):

- ``local``: one worker in this process (:class:`LocalEngine`); never imports Ray.
- ``ray``: one actor per GPU (or per CPU slot) on a Ray cluster (``tools/batch_ray.py``): Ray places the actors,
  restarts one that dies and retries its photo, and the driver keeps one photo in flight per actor.

Only this process writes the output folder, so a worker that dies leaves nothing behind; a driver that dies leaves
at most a ``.NAME.*.partial`` file, removed by the next run. The manifest ``batch-manifest.jsonl`` gets one line per
photo finished (restored or failed), appended after its outputs are in place; the latest line of a key counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .batch_worker import IMAGE_SUFFIXES, PERMANENT, BatchError, BatchWorker, PhotoJob, PhotoResult, WorkerSettings
from .runner import duration_text as _duration

MANIFEST_NAME = "batch-manifest.jsonl"
SUMMARY_NAME = "batch-summary.json"
LOG_FOLDER = "batch-logs"
SEED_POLICIES = ("workflow", "per-photo")
PROGRESS_EVERY = 30.0  # seconds between the per-worker lines


@dataclass
class Photo:
    """A photo of the batch: where it is, the name shown for it, the stem of its outputs, its content hash."""

    path: Path
    name: str
    stem: str
    sha256: str = ""
    key: str = ""


@dataclass
class BatchOptions:
    """Everything ``batch`` was asked: the command-line options, one field each."""

    workflow: Path
    inputs: str
    out: Path
    engine: str = "local"
    sets: dict = field(default_factory=dict)
    image_node: str | None = None
    seed: str = "workflow"
    retry_failed: bool = False
    comfyui: str | None = None
    base_directory: str | None = None
    extra_model_paths: tuple = ()
    cpu: bool = False
    cpus_per_worker: int = 1
    gpus_per_worker: float | None = None
    workers: int | None = None
    ray_address: str | None = None
    retries: int = 2
    min_side: int = 16
    max_megapixels: float = 100.0
    verbose: bool = False


# ------------------------------------------------------------------------------------------------------------------
# photos and keys

def find_photos(inputs: str, out: Path) -> list[Photo]:
    """The photos of ``inputs`` (a folder, searched recursively, or a glob pattern), sorted, leaving out anything
    inside the output folder; names are relative to the folder (or to the pattern's common folder)."""
    spec = Path(os.path.expanduser(inputs))
    if spec.is_dir():
        root, paths = spec, [p for p in spec.rglob("*") if p.is_file()]
    else:
        paths = [Path(p) for p in glob.glob(str(spec), recursive=True) if Path(p).is_file()]
        root = Path(os.path.commonpath([p.parent.resolve() for p in paths])) if paths else spec.parent
    out = out.resolve()
    paths = sorted(p for p in paths if p.suffix.lower() in IMAGE_SUFFIXES and out not in p.resolve().parents)
    if not paths:
        raise BatchError(f"no photos ({', '.join(IMAGE_SUFFIXES)}) found in {inputs}")
    photos = []
    for p in paths:
        rel = p.resolve().relative_to(root.resolve()) if p.resolve().is_relative_to(root.resolve()) else Path(p.name)
        photos.append(Photo(p, rel.as_posix(), rel.with_suffix("").as_posix()))
    stems: dict[str, int] = {}
    for photo in photos:
        stems[photo.stem] = stems.get(photo.stem, 0) + 1
    for photo in photos:  # a.png and a.jpg: a_png.*, a_jpg.*
        if stems[photo.stem] > 1:
            photo.stem = f"{photo.stem}_{photo.path.suffix.lower().lstrip('.')}"
    return photos


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: what a UI-format workflow stores about the canvas only; moving a node must not make the batch run again
_LAYOUT_KEYS = ("pos", "size", "flags", "order", "color", "bgcolor", "selected")


def workflow_sha256(workflow: dict) -> str:
    """The workflow's hash for the manifest: its canonical JSON, without the canvas layout of a UI-format file."""
    wf = json.loads(json.dumps(workflow))
    if isinstance(wf.get("nodes"), list):
        for node in (n for n in wf["nodes"] if isinstance(n, dict)):
            for key in _LAYOUT_KEYS:
                node.pop(key, None)
        (wf.get("extra") or {}).pop("ds", None)
        wf.pop("groups", None)
    return hashlib.sha256(json.dumps(wf, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def batch_key(photo_sha: str, workflow_sha: str, overrides: dict, seed: str) -> str:
    """The manifest key of one restoration: photo content + workflow + overrides (``--set``, the image node) + the
    seed policy (with ``per-photo`` the seed offset is a function of the photo's content)."""
    text = json.dumps({"photo": photo_sha, "workflow": workflow_sha, "overrides": overrides, "seed": seed},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def seed_offset(photo_sha: str, seed: str) -> int:
    """0 (every photo gets the workflow's seed, as ``run`` would) or, for ``per-photo``, a number from the photo's
    content: the same photo gets the same seed whichever worker runs it."""
    return int(photo_sha[:8], 16) if seed == "per-photo" else 0


# ------------------------------------------------------------------------------------------------------------------
# the output folder

def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` under a temporary name in the same folder, then rename it into place: a reader
    (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def remove_partials(out: Path) -> int:
    """Remove the temporary files a driver that was killed while writing left behind; returns how many."""
    n = 0
    for p in out.rglob(".*.partial") if out.is_dir() else []:
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n


def output_names(photo: Photo, result: PhotoResult) -> list[str]:
    """``stem.png`` for a workflow that saves one file per photo; ``stem.<node>.png`` for each file otherwise."""
    if len(result.outputs) == 1:
        return [f"{photo.stem}{result.outputs[0][1]}"]
    return [f"{photo.stem}.{label}{suffix}" for label, suffix, _ in result.outputs]


class Manifest:
    """``batch-manifest.jsonl`` in the output folder: one JSON line per photo finished, the latest per key counts.
    A line cut short by a crash is ignored."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out / MANIFEST_NAME
        self.records: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    record = json.loads(line)
                    self.records[record["key"]] = record

    def done(self, key: str) -> dict | None:
        """The record of a restoration whose outputs are all still there, else None."""
        record = self.records.get(key)
        if record and record.get("status") == "done" and all((self.out / o).is_file() for o in record["outputs"]):
            return record
        return None

    def failed(self, key: str) -> dict | None:
        record = self.records.get(key)
        return record if record and record.get("status") == "failed" else None

    def append(self, record: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[record["key"]] = record


# ------------------------------------------------------------------------------------------------------------------
# progress

class Progress:
    """Lines for a person on stderr: each photo as it finishes with the throughput and an ETA over the whole batch,
    each worker's share now and then, and the summary."""

    def __init__(self, total: int, write: Callable[[str], None], clock=time.monotonic):
        self.total, self.write, self.clock = total, write, clock
        self.finished = 0
        self.started = clock()
        self.workers: dict[str, list[float]] = {}  # worker -> seconds of each photo it finished
        self.processes: dict[str, str] = {}  # worker -> the process it ran in last ("pid N on HOST")
        self.restarts = 0
        self._last_workers_line = self.started

    def rate(self) -> float:
        elapsed = self.clock() - self.started
        return self.finished / elapsed if elapsed > 0 and self.finished else 0.0

    def photo(self, photo: Photo, result: PhotoResult, written: list[str]) -> None:
        self.finished += 1
        worker, _, process = result.worker.partition(", ")
        self.workers.setdefault(worker, []).append(result.seconds)
        if process and self.processes.setdefault(worker, process) != process:
            self.restarts += 1
            self.write(f"{worker} was restarted: now {process}, before {self.processes[worker]}")
            self.processes[worker] = process
        head = f"[{self.finished}/{self.total}]"
        where = f"({result.worker}, {result.seconds:.1f} s)"
        if result.ok:
            line = f"{head} {photo.name} -> {', '.join(written)} {where}"
        else:
            line = f"{head} FAILED {photo.name} {where}: {result.error}"
        rate = self.rate() if self.clock() - self.started >= 1.0 else 0.0
        line += f" | {rate:.2f} photos/s" if rate else ""
        if self.finished < self.total and rate > 0:
            line += f" | about {_duration((self.total - self.finished) / rate)} left"
        self.write(line)
        if self.clock() - self._last_workers_line >= PROGRESS_EVERY and self.finished < self.total:
            self.workers_line()

    def workers_line(self) -> None:
        self._last_workers_line = self.clock()
        parts = [f"{w}: {len(s)} photos, {sum(s) / len(s):.1f} s/photo" for w, s in sorted(self.workers.items())]
        if parts:
            self.write("workers: " + " | ".join(parts))

    def waiting(self, in_flight: int) -> None:
        self.write(f"... {in_flight} photo(s) in progress, {self.finished}/{self.total} finished, "
                   f"{_duration(self.clock() - self.started)} so far")


# ------------------------------------------------------------------------------------------------------------------
# engines

class LocalEngine:
    """One :class:`~comfyui_silo.tools.batch_worker.BatchWorker` in this process, one photo after another."""

    name = "local"

    def __init__(self, settings: WorkerSettings, write: Callable[[str], None]):
        self.settings, self.write = settings, write
        self.worker: BatchWorker | None = None

    def start(self, todo: int) -> list[dict]:
        from .host_process import HostNotFoundError
        from .workflow import WorkflowError

        try:
            self.worker = BatchWorker(self.settings)
        except (WorkflowError, HostNotFoundError) as e:
            raise BatchError(str(e)) from None
        except Exception as e:  # a host or custom node that fails to import: one line, the rest in the log
            raise BatchError(f"the ComfyUI host could not start in this process ({type(e).__name__}: {e}); its log: "
                             f"{self.settings.log_file}") from None
        info = self.worker.describe()
        self.write(f"worker 1 ready: {info['identity']}, {info['device']}, started in {info['startup_seconds']:.1f} s")
        return [info]

    def results(self, jobs: Iterable[PhotoJob], progress: Progress) -> Iterator[PhotoResult]:
        for job in jobs:
            result = self.worker.restore(job)
            result.worker = f"worker 1, {result.worker}"
            yield result

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None


def make_engine(options: BatchOptions, settings: WorkerSettings, write: Callable[[str], None]):
    if options.engine == "local":
        return LocalEngine(settings, write)
    try:
        from .batch_ray import RayEngine
    except ImportError as e:
        raise BatchError(f"the ray engine needs Ray ({e}): pip install 'comfyui-silo[batch]' (or "
                         "pip install 'ray>=2.9') into the environment that runs this command") from None
    return RayEngine(settings, write, address=options.ray_address, workers=options.workers,
                     cpus_per_worker=options.cpus_per_worker, gpus_per_worker=options.gpus_per_worker,
                     retries=options.retries, verbose=options.verbose)


# ------------------------------------------------------------------------------------------------------------------
# the batch

@dataclass
class Plan:
    """What a run will do: the photos to restore, and those it skips, each with why."""

    todo: list[Photo] = field(default_factory=list)
    done: list[Photo] = field(default_factory=list)
    duplicates: list[tuple[Photo, Photo]] = field(default_factory=list)  # (photo, the one with the same content)
    failed_before: list[tuple[Photo, str]] = field(default_factory=list)
    workflow_sha: str = ""
    overrides: dict = field(default_factory=dict)


def make_plan(options: BatchOptions, workflow: dict, photos: list[Photo], manifest: Manifest) -> Plan:
    plan = Plan(workflow_sha=workflow_sha256(workflow),
                overrides={"set": dict(sorted(options.sets.items())), "image_node": options.image_node})
    first: dict[str, Photo] = {}
    for photo in photos:
        photo.sha256 = file_sha256(photo.path)
        photo.key = batch_key(photo.sha256, plan.workflow_sha, plan.overrides, options.seed)
        if photo.key in first:
            plan.duplicates.append((photo, first[photo.key]))
            continue
        first[photo.key] = photo
        failed = manifest.failed(photo.key)
        if manifest.done(photo.key):
            plan.done.append(photo)
        elif failed and failed.get("kind") == PERMANENT and not options.retry_failed:
            plan.failed_before.append((photo, failed.get("error", "")))
        else:
            plan.todo.append(photo)
    return plan


def _jobs(photos: list[Photo], seed: str) -> Iterator[PhotoJob]:
    """The photos as jobs, each read only when an engine asks for it (at most one per worker waits in memory)."""
    for photo in photos:
        yield PhotoJob(photo.key, photo.name, photo.path.read_bytes(), photo.path.suffix.lower(),
                       seed_offset(photo.sha256, seed))


def _record(options: BatchOptions, plan: Plan, photo: Photo, result: PhotoResult, outputs: list[str]) -> dict:
    return {"key": photo.key, "photo": photo.name, "photo_sha256": photo.sha256, "workflow": str(options.workflow),
            "workflow_sha256": plan.workflow_sha, "overrides": plan.overrides, "seed_policy": options.seed,
            "seeds": result.seeds, "status": "done" if result.ok else "failed", "outputs": outputs,
            "error": result.error, "kind": result.kind, "worker": result.worker,
            "seconds": round(result.seconds, 3), "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def worker_settings(options: BatchOptions, workflow: dict) -> WorkerSettings:
    return WorkerSettings(workflow=workflow, sets=dict(options.sets), image_node=options.image_node,
                          comfyui=options.comfyui, base_directory=options.base_directory,
                          extra_model_paths=tuple(options.extra_model_paths), cpu=options.cpu,
                          threads=options.cpus_per_worker, min_side=options.min_side,
                          max_megapixels=options.max_megapixels,
                          log_file=None if options.engine != "local" else str(options.out / LOG_FOLDER / "local.log"))


def _read_workflow(path: Path) -> dict:
    try:
        workflow = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except OSError as e:
        raise BatchError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise BatchError(f"{path} is not JSON: {e}") from None
    if not isinstance(workflow, dict):
        raise BatchError(f"{path} is not a ComfyUI workflow")
    return workflow


def print_err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_batch(options: BatchOptions, write: Callable[[str], None] = print_err) -> dict:
    """Run a batch; returns its summary (also written to ``batch-summary.json`` in the output folder). Raises
    :class:`BatchError` when it cannot start; a photo that fails is in the summary, never an exception."""
    if options.seed not in SEED_POLICIES:
        raise BatchError(f"--seed must be one of {', '.join(SEED_POLICIES)}")
    started = time.monotonic()
    workflow = _read_workflow(options.workflow)
    out = Path(options.out).expanduser()
    options = dataclasses.replace(options, out=out)
    photos = find_photos(options.inputs, out)
    if remove_partials(out):
        write("removed unfinished files of an interrupted run")
    manifest = Manifest(out)
    plan = make_plan(options, workflow, photos, manifest)
    before = f", {len(plan.failed_before)} failed before (--retry-failed retries them)" if plan.failed_before else ""
    twins = f", {len(plan.duplicates)} with the same content as another (skipped)" if plan.duplicates else ""
    write(f"batch: {len(photos)} photos in {options.inputs} -> {out}: {len(plan.todo)} to restore, "
          f"{len(plan.done)} done before{before}{twins}; engine {options.engine}")
    progress = Progress(len(plan.todo), write)
    summary = {"engine": options.engine, "photos": len(photos), "restored": 0, "failed": [], "workers": [],
               "skipped": len(plan.done) + len(plan.duplicates),
               "duplicates": [{"photo": p.name, "same_as": q.name} for p, q in plan.duplicates],
               "failed_before": [{"photo": p.name, "error": e} for p, e in plan.failed_before]}
    if plan.todo:
        _restore(options, workflow, plan, manifest, progress, summary, write)
    summary["seconds"] = round(time.monotonic() - started, 2)
    summary["per_worker"] = {w: len(s) for w, s in sorted(progress.workers.items())}
    summary["restarts"] = progress.restarts
    _finish(out, summary, write)
    return summary


def _restore(options, workflow, plan, manifest, progress, summary, write) -> None:
    """Start the engine, feed it the photos, write and record what comes back."""
    photos = {p.key: p for p in plan.todo}
    engine = make_engine(options, worker_settings(options, workflow), write)
    try:
        summary["workers"] = engine.start(len(plan.todo))
        progress.started = time.monotonic()
        for result in engine.results(_jobs(plan.todo, options.seed), progress):
            photo = photos[result.key]
            written = []
            if result.ok:
                names = output_names(photo, result)
                for name, (_, _, data) in zip(names, result.outputs, strict=True):
                    atomic_write(manifest.out / name, data)
                    print(manifest.out / name, flush=True)
                written, summary["restored"] = names, summary["restored"] + 1
            else:
                summary["failed"].append({"photo": photo.name, "error": result.error})
            manifest.append(_record(options, plan, photo, result, written))
            progress.photo(photo, result, written)
        dispatch = time.monotonic() - progress.started
        summary["dispatch_seconds"] = round(dispatch, 2)
        summary["photos_per_second"] = round(progress.finished / dispatch, 4) if dispatch > 0 else None
        progress.workers_line()
    finally:
        engine.close()


def _finish(out: Path, summary: dict, write: Callable[[str], None]) -> None:
    failed = len(summary["failed"]) + len(summary["failed_before"])
    line = (f"batch finished in {_duration(summary['seconds'])}: {summary['restored']} restored, "
            f"{summary['skipped']} skipped (done before, or duplicates), {failed} failed")
    if summary.get("photos_per_second"):
        line += f"; {summary['photos_per_second']:.2f} photos/s over {len(summary['workers'])} worker(s)"
    write(line)
    for item in summary["failed"]:
        write(f"  FAILED {item['photo']}: {item['error']}")
    for item in summary["failed_before"]:
        write(f"  FAILED (in an earlier run, not retried) {item['photo']}: {item['error']}")
    if summary["photos"]:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / SUMMARY_NAME, json.dumps(summary, indent=2, default=str).encode())
        write(f"manifest: {out / MANIFEST_NAME}")
    if summary["failed"] and summary["engine"] == "local":
        write(f"the host's log (with the failing nodes' tracebacks): {out / LOG_FOLDER / 'local.log'}")
    elif summary["failed"]:
        write("the workers' logs (with the failing nodes' tracebacks): the Ray session's log folder on each machine "
              "(/tmp/ray/session_latest/logs)")


def options_from_args(args) -> BatchOptions:
    """:class:`BatchOptions` from the parsed command line (``tools/cli.py``'s ``batch`` subcommand)."""
    from .workflow import parse_assignments

    return BatchOptions(workflow=Path(args.workflow), inputs=args.inputs, out=Path(args.out), engine=args.engine,
                        sets=parse_assignments(args.sets, "set"), image_node=args.image_node, seed=args.seed,
                        retry_failed=args.retry_failed, comfyui=args.comfyui, base_directory=args.base_directory,
                        extra_model_paths=tuple(args.extra_model_paths or ()), cpu=args.cpu,
                        cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                        workers=args.workers, ray_address=args.ray_address, retries=args.retries,
                        min_side=args.min_side, max_megapixels=args.max_megapixels, verbose=args.verbose)
