"""Restoring a folder: photos/s of ``python -m comfyui_silo batch`` with 1 and 2 workers on this machine.

Each configuration restores the same folder of synthetic photos (``tools/batch_demo.py``: the small random-weight
SD1.5 checkpoint, an untrained operator, the shipped Gaussian-deblur workflow at a few SILO steps, gradient at x̂₀)
into a fresh output folder, as a command in its own process, exactly as a user runs it::

    python -m benchmarks.batch --photos 24 --steps 4 --work benchmarks/_out/batch

Configurations: the ``local`` engine (one worker in the command's process), and the ``ray`` engine with 1 and 2
workers on a local Ray cluster this script starts (``num_cpus`` = this machine's cores; it stops it at the end).
Every worker uses one CPU thread (``--cpus-per-worker 1``), so the outputs are byte-identical across the
configurations; the script checks that, and that every photo was restored.

Columns: ``photos/s`` over the batch (restored photos / seconds from the first photo handed out to the last one
written: it includes each worker's first photo, which loads the checkpoint); ``s/photo`` the median time a worker
spent on one photo (the host's executor, the first photo excluded); ``startup s`` the slowest worker's start (import
and configure the host, load the nodes); ``wall s`` the whole command (Python and torch imports, Ray connection,
workers' start, the batch). Timings are of this machine as it was (its load is printed); never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(demo, args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "comfyui_silo", "batch", str(demo.workflow), "--inputs", str(demo.photos),
           "--out", str(out), *args]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), env=dict(os.environ,
                                                                                      PYTHONUNBUFFERED="1"))
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "batch-summary.json").read_text())
    records = [json.loads(line) for line in (out / "batch-manifest.jsonl").read_text().splitlines()]
    firsts, per_photo = set(), []
    for r in records:  # the manifest is in the order photos finished: a worker's first line is its first photo
        worker = r["worker"].split(",")[0]
        if worker in firsts:
            per_photo.append(r["seconds"])
        firsts.add(worker)
    return {"wall": wall, "photos_per_second": summary["photos_per_second"], "restored": summary["restored"],
            "startup": max(w["startup_seconds"] for w in summary["workers"]), "workers": len(summary["workers"]),
            "s_per_photo": statistics.median(per_photo) if per_photo else float("nan")}


def _same_outputs(outs: list[Path], photos: int) -> bool:
    names = [f"p{i}.png" for i in range(photos)]
    return all((o / n).read_bytes() == (outs[0] / n).read_bytes() for o in outs for n in names)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=int, default=24, help="photos in the folder (default 24)")
    p.add_argument("--size", type=int, default=64, help="photo side in pixels (default 64)")
    p.add_argument("--steps", type=int, default=4, help="SILO KSampler steps (default 4)")
    p.add_argument("--work", default=str(ROOT / "benchmarks" / "_out" / "batch"), help="working folder")
    p.add_argument("--no-ray", action="store_true", help="only the local engine")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from comfyui_silo.tools.batch_demo import make_batch_demo

    work = Path(args.work).resolve()
    demo = make_batch_demo(work / f"demo_{args.size}", photos=args.photos, size=args.size)
    common = [*demo.args(steps=args.steps), "--cpus-per-worker", "1"]
    configs = [("local", "local, 1 worker", ["--engine", "local"])]
    cluster = None
    if not args.no_ray:
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        cluster = ray.get_runtime_context().gcs_address
        configs += [(f"ray{n}", f"ray, {n} worker{'s' * (n > 1)}", ["--engine", "ray", "--ray-address", cluster,
                                                                    "--workers", str(n)]) for n in (1, 2)]
    rows, outs = [], []
    try:
        for tag, label, extra in configs:
            out = work / f"out_{tag}_{int(time.time())}"
            print(f"running {label} ...", file=sys.stderr, flush=True)
            rows.append((label, _run(demo, [*common, *extra], out)))
            outs.append(out)
    finally:
        if cluster is not None:
            ray.shutdown()
    _print_table(args, rows, _same_outputs(outs, args.photos))
    return 0


def _print_table(args, rows, same: bool) -> None:
    import torch

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{args.photos} photos {args.size}x{args.size}, shipped Gaussian-deblur workflow, small random SD1.5 "
          f"checkpoint, SILO {args.steps} steps (gradient x0), CPU, 1 thread per worker; {platform.machine()}, "
          f"{os.cpu_count()} cores, load average {load} at the end; torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| engine | workers | photos/s | s/photo (median, after the first) | startup s | wall s |")
    print("|---|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label.split(',')[0]} | {r['workers']} | {r['photos_per_second']:.2f} | {r['s_per_photo']:.2f} | "
              f"{r['startup']:.1f} | {r['wall']:.1f} |")
    print(f"\noutputs byte-identical across the {len(rows)} runs: {'yes' if same else 'NO'}; every run restored "
          f"{'all' if all(r['restored'] == args.photos for _, r in rows) else 'NOT all'} {args.photos} photos")


if __name__ == "__main__":
    raise SystemExit(main())
