"""The ``ray`` engine of ``batch``: one actor per GPU (or per CPU slot) across a Ray cluster, each actor a
:class:`~comfyui_silo.tools.batch_worker.BatchWorker` that loads the host and the checkpoint once.

Ray does the distributed part. It places the actors where their resources are (``num_gpus`` / ``num_cpus`` per
worker), ships each photo's bytes to an actor and the outputs back through its object store, restarts an actor whose
process dies (``max_restarts``) and runs the photo it was restoring again on the restarted actor
(``max_task_retries``), on another machine when the first one is gone. :class:`ray.util.ActorPool` hands the photos
to idle actors; the driver submits the next photo only when one comes back, so at most one photo per actor is in
flight or in memory (back-pressure). A photo whose actor died more often than ``retries`` allow is recorded as
failed (a rerun retries it); the pool then leaves that actor out.

Only ``tools/batch.py`` imports this module, and only for ``--engine ray``: the ``local`` engine never imports Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator

import ray
from ray.util.actor_pool import ActorPool

from .batch_worker import TRANSIENT, BatchError, BatchWorker, PhotoJob, PhotoResult, WorkerSettings, one_line

#: how long the actors may take to start (import the host, load the nodes) before the batch gives up
READY_TIMEOUT = 900.0
WAIT_LINE_EVERY = 30.0


class BatchActor:
    """The body of one Ray actor: a :class:`BatchWorker`, numbered for the progress lines. A worker that cannot
    start (an unusable workflow, a missing model) says why through :meth:`ready` instead of failing the actor, so
    the driver can print one clear line."""

    def __init__(self, settings: WorkerSettings, index: int):
        self.index = index
        self.error = ""
        self.worker: BatchWorker | None = None
        try:
            self.worker = BatchWorker(settings)
        except Exception as e:  # reported by ready(); the driver stops the batch with it
            self.error = one_line(e)

    def ready(self) -> dict:
        info = self.worker.describe() if self.worker else {"identity": f"pid {os.getpid()} on {socket.gethostname()}"}
        info.update(index=self.index, error=self.error, actor_id=ray.get_runtime_context().get_actor_id())
        return info

    def restore(self, job: PhotoJob) -> PhotoResult:
        if self.worker is None:
            return PhotoResult(job.key, job.name, error=self.error, kind=TRANSIENT, worker=f"worker {self.index}")
        result = self.worker.restore(job)
        result.worker = f"worker {self.index}, {result.worker}"
        return result


class RayEngine:
    """Runs a batch's photos on a Ray cluster (``address``: ``None`` starts or finds one on this machine as
    ``ray.init`` does, ``auto`` or ``HOST:PORT`` joins one). ``workers`` defaults to as many as the cluster has room
    for: one per ``gpus_per_worker`` GPUs when it has GPUs, else one per ``cpus_per_worker`` CPUs."""

    name = "ray"

    def __init__(self, settings: WorkerSettings, write: Callable[[str], None], *, address: str | None = None,
                 workers: int | None = None, cpus_per_worker: int = 1, gpus_per_worker: float | None = None,
                 retries: int = 2, verbose: bool = False):
        self.settings, self.write, self.address = settings, write, address
        self.workers, self.cpus, self.gpus = workers, cpus_per_worker, gpus_per_worker
        self.retries, self.verbose = retries, verbose
        self.actors: list = []
        self.actor_ids: dict[int, str] = {}  # id(handle) -> Ray actor id
        self._connected = False

    # -- starting ------------------------------------------------------------------------------------------------
    def _connect(self) -> None:
        if ray.is_initialized():
            return
        ray.init(address=self.address, include_dashboard=False, log_to_driver=self.verbose,
                 logging_level=logging.INFO if self.verbose else logging.WARNING)
        self._connected = True

    def _size(self, todo: int) -> tuple[int, float]:
        """(number of actors, GPUs per actor) from what the cluster has and what was asked."""
        resources = ray.cluster_resources()
        total_gpus, total_cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
        gpus = self.gpus if self.gpus is not None else (1.0 if total_gpus >= 1 else 0.0)
        if gpus > total_gpus:
            raise RuntimeError(f"--gpus-per-worker {gpus:g}: the Ray cluster has {total_gpus:g} GPU(s)")
        room = int(total_gpus // gpus) if gpus > 0 else int(total_cpus // max(self.cpus, 1))
        if room < 1:
            raise RuntimeError(f"the Ray cluster has no room for one worker ({total_cpus:g} CPUs, "
                               f"{total_gpus:g} GPUs; a worker needs {self.cpus} CPU(s) and {gpus:g} GPU(s))")
        n = self.workers or room
        if n > room:
            raise RuntimeError(f"--workers {n}: the Ray cluster has room for {room} at once ({total_cpus:g} CPUs, "
                               f"{total_gpus:g} GPUs)")
        return max(1, min(n, todo)), gpus

    def start(self, todo: int) -> list[dict]:
        """Start the actors and wait until each has loaded the host; returns what each says about itself."""
        try:
            self._connect()
            n, gpus = self._size(todo)
        except (RuntimeError, ValueError, ConnectionError) as e:
            raise BatchError(f"Ray: {one_line(e)}") from None
        settings = dataclasses.replace(self.settings, cpu=self.settings.cpu or gpus == 0, log_file=None,
                                       log_stderr=True)
        actor_class = ray.remote(BatchActor).options(num_cpus=self.cpus, num_gpus=gpus, max_restarts=-1,
                                                     max_task_retries=self.retries)
        self.actors = [actor_class.remote(settings, i + 1) for i in range(n)]
        self.write(f"starting {n} Ray worker(s) ({self.cpus} CPU, {gpus:g} GPU each) on "
                   f"{ray.get_runtime_context().gcs_address}")
        infos = self._wait_ready()
        problems = sorted({i["error"] for i in infos if i.get("error")})
        if problems:
            raise BatchError(problems[0])
        if len({i["prompt_sha256"] for i in infos}) > 1:
            raise BatchError("the workers prepared different prompts from the same workflow: the machines of the "
                             "Ray cluster do not have the same ComfyUI and custom nodes")
        return infos

    def _wait_ready(self) -> list[dict]:
        pending = {a.ready.remote(): a for a in self.actors}
        infos, started, last_line = [], time.monotonic(), time.monotonic()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
            for ref in done:
                actor = pending.pop(ref)
                try:
                    info = ray.get(ref)
                except ray.exceptions.RayError as e:
                    raise BatchError(f"a Ray worker could not start: {one_line(e)[:500]}") from None
                self.actor_ids[id(actor)] = info["actor_id"]
                infos.append(info)
                if not info.get("error"):
                    self.write(f"worker {info['index']} ready: {info['identity']}, {info['device']}, started in "
                               f"{info['startup_seconds']:.1f} s")
            now = time.monotonic()
            if pending and now - started > READY_TIMEOUT:
                raise BatchError(f"{len(pending)} Ray worker(s) did not start within {READY_TIMEOUT:.0f} s (is the "
                                 "cluster busy, or short of the resources a worker asks for?)")
            if pending and now - last_line > WAIT_LINE_EVERY:
                self.write(f"... waiting for {len(pending)} Ray worker(s) to start")
                last_line = now
        return sorted(infos, key=lambda i: i["index"])

    # -- running -------------------------------------------------------------------------------------------------
    def results(self, jobs: Iterable[PhotoJob], progress) -> Iterator[PhotoResult]:
        """The result of every job, in the order they finish; a job whose worker died for good comes back as a
        failed result naming that."""
        jobs = iter(jobs)
        pool = ActorPool(list(self.actors))
        running: dict[str, tuple[PhotoJob, str]] = {}  # job key -> (job, actor id)
        errors: list[str] = []

        def submit(actor, job):
            running[job.key] = (job, self.actor_ids.get(id(actor), ""))
            return actor.restore.remote(job)

        def feed():
            while pool.has_free() and (job := next(jobs, None)) is not None:
                pool.submit(submit, job)

        feed()
        while pool.has_next():
            try:
                result = pool.get_next_unordered(timeout=WAIT_LINE_EVERY)
            except TimeoutError:
                progress.waiting(len(running))
                continue
            except ray.exceptions.RayError as e:
                result = self._lost(running, e, errors)
            else:
                running.pop(result.key, None)
            if result is not None:
                yield result
            feed()
        for job, _ in list(running.values()):  # failures no actor id could be matched to
            yield self._died(job, errors[0] if errors else "no result came back")
        for job in jobs:  # every actor died for good
            yield self._died(job, "no worker was left to restore it")

    def _lost(self, running: dict, error, errors: list[str]) -> PhotoResult | None:
        """The job whose actor died more often than its retries allow (matched by actor id), as a failed result."""
        reason = one_line(error)[:300]
        actor_id = getattr(error, "actor_id", None)
        for key, (job, owner) in list(running.items()):
            if actor_id and owner == actor_id:
                del running[key]
                return self._died(job, reason)
        errors.append(reason)
        return None

    def _died(self, job: PhotoJob, reason: str) -> PhotoResult:
        return PhotoResult(job.key, job.name, kind=TRANSIENT, worker="a Ray worker",
                           error=f"the worker restoring it died {self.retries + 1} time(s) ({reason}); the photo was "
                                 "not restored: rerun the batch to try it again (if it fails the same way, the photo "
                                 "may need more memory than a worker has)")

    def close(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                continue
        self.actors = []
        if self._connected:
            ray.shutdown()
            self._connected = False
