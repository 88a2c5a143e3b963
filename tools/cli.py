"""The command line: train an operator from a folder of images, import the paper's operators, run workflows, restore
a folder of photos (`batch`, tools/batch.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..config.fields import add_cli_arguments
from ..operators.degradations import STANDARD_DEGRADATIONS, build_degradation
from ..operators.training import TrainSettings
from .batch_worker import IMAGE_SUFFIXES
from .host_process import HostNotFoundError, comfyui_path, import_host
from .random_checkpoint import SD15_LATENT_FORMAT


def default_comfyui_path() -> str:
    return str(comfyui_path())


def bootstrap_host(comfyui: str, cpu: bool = False) -> Path:
    """Import ComfyUI from a checkout (:func:`~comfyui_silo.tools.host_process.import_host`); a missing checkout is
    a command-line error."""
    try:
        return import_host(comfyui, cpu=cpu)
    except HostNotFoundError as e:
        raise SystemExit(f"error: {e}") from None


def parse_degradation(text: str) -> dict:
    if text in STANDARD_DEGRADATIONS:
        return dict(STANDARD_DEGRADATIONS[text])
    try:
        spec = json.loads(text)
    except json.JSONDecodeError:
        names = ", ".join(STANDARD_DEGRADATIONS)
        raise SystemExit(f"error: --degradation must be one of {names} or a JSON spec, got {text!r}") from None
    build_degradation(spec)  # validates, with a message naming the field
    return spec


def load_image_folder(folder: str, limit: int | None = None) -> list[torch.Tensor]:
    from PIL import Image, ImageOps

    paths = sorted(p for p in Path(folder).expanduser().rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"error: no images ({', '.join(IMAGE_SUFFIXES)}) found in {folder}")
    images = []
    for p in paths[:limit]:
        with Image.open(p) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3)
            images.append(t.permute(2, 0, 1).float() / 255.0)
    return images


def training_settings(args):
    """The :class:`TrainSettings` the command line asked for, checked before anything is loaded."""
    from ..config import SettingError
    from ..operators.training import TrainSettings

    try:
        return TrainSettings.from_cli(args)
    except SettingError as e:
        raise SystemExit(f"error: --{e.field.replace('_', '-')}: {e}") from None


def cmd_train_operator(args) -> int:
    from ..operators.files import check_output_path

    settings = training_settings(args)
    spec = parse_degradation(args.degradation)
    try:
        out = check_output_path(args.out)
    except ValueError as e:
        raise SystemExit(f"error: --out: {e}") from None
    images = load_image_folder(args.images, args.max_images)
    bootstrap_host(args.comfyui, cpu=args.cpu)
    import comfy.sd

    from ..nodes.host import latent_format_info, make_decoder, make_encoder
    from ..operators.io import save_operator
    from ..operators.training import TrainingDataError, format_report, train_operator

    print(f"{len(images)} images from {args.images}; degradation {json.dumps(spec)}")
    out_ckpt = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=False,
                                                     embedding_directory=None)
    model, vae = out_ckpt[0], out_ckpt[2]
    if vae is None:
        raise SystemExit(f"error: {args.checkpoint} has no VAE")
    encode = make_encoder(vae, model)
    latent_format = latent_format_info(model, vae)

    from tqdm.auto import tqdm

    bar = tqdm(total=settings.steps, desc="training", unit="step")

    def progress(step, total, info):
        if info.get("phase") == "encoding":
            bar.set_postfix_str(f"encoding pairs {info['encoded']}/{info['pool_size']}")
            return
        bar.n = step
        bar.set_postfix_str(f"loss {info['smoothed']:.4f}")
        bar.refresh()

    try:
        result = train_operator(encode, spec, images, config=settings, resume=args.resume, state_path=args.state,
                                progress=progress, decode=make_decoder(vae, model))
    except TrainingDataError as e:
        raise SystemExit(f"error: --images: {e}") from None
    bar.close()
    result.report["checkpoint"] = Path(args.checkpoint).name
    save_operator(out, result.operator, degradation=build_degradation(spec).spec, latent_format=latent_format,
                  training=result.report)
    print(format_report(result.report))
    print(f"wrote {out}")
    return 0


def cmd_import_reference(args) -> int:
    from ..operators.reference import import_reference_operator

    latent = dict(SD15_LATENT_FORMAT)
    if args.latent_format:
        latent = json.loads(args.latent_format)
    import_reference_operator(args.pt, args.out, degradation=parse_degradation(args.degradation),
                              latent_format=latent)
    print(f"wrote {args.out}")
    return 0


def _accelerator_available() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return True
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def cmd_run(args) -> int:
    import copy

    from .runner import ComfyRunner, RunnerError
    from .workflow import WorkflowError, apply_overrides, is_api_format, parse_assignments, ui_to_api

    def fail(message: str, details: str = "") -> int:
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
        if details and args.verbose:
            print(details, file=sys.stderr)
        return 1

    path = Path(args.workflow).expanduser()
    try:
        workflow = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        return fail(f"cannot read {path}: {e.strerror or e}")
    except ValueError as e:
        return fail(f"{path} is not JSON: {e}")
    try:
        images = parse_assignments(args.image, "image")
        sets = parse_assignments(args.sets, "set")
    except WorkflowError as e:
        return fail(str(e))
    for node, file in images.items():
        if not Path(file).expanduser().is_file():
            return fail(f"--image {node}={file}: no such file")
    cpu = args.cpu or not _accelerator_available()
    try:
        with ComfyRunner(args.comfyui, base_directory=args.base_directory, port=args.port, cpu=cpu,
                         extra_model_paths=args.extra_model_paths, log_path=args.log) as runner:
            info = runner.object_info()
            api = workflow if is_api_format(workflow) else ui_to_api(workflow, info)
            # check the node references before uploading anything
            apply_overrides(copy.deepcopy(api), {node: Path(file).name for node, file in images.items()}, sets,
                            object_info=info)
            uploaded = {node: runner.upload_image(file) for node, file in images.items()}
            apply_overrides(api, uploaded, sets, object_info=info)
            if args.save_api:
                Path(args.save_api).write_text(json.dumps(api, indent=2))
            entry = runner.run(api, timeout=args.timeout)
            files = runner.download_outputs(entry, args.out)
            for warning in runner.warnings:
                print(f"warning: {warning}", file=sys.stderr)
    except (WorkflowError, RunnerError) as e:
        return fail(str(e), getattr(e, "details", ""))
    except KeyboardInterrupt:
        return fail("interrupted")
    for f in files:
        print(f)
    return 0


# -- batch: restore a folder (tools/batch.py) -------------------------------------------------------------------------
def cmd_batch(args) -> int:
    from .batch import BatchError, options_from_args, run_batch
    from .workflow import WorkflowError

    try:
        summary = run_batch(options_from_args(args))
    except (BatchError, WorkflowError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: what was finished is in the manifest; run the same command again to go on",
              file=sys.stderr)
        return 130
    return 1 if summary["failed"] or summary["failed_before"] else 0


def add_batch_parser(sub) -> None:
    b = sub.add_parser("batch", help="restore every photo of a folder with a workflow, on this machine or a Ray "
                                     "cluster; resumable")
    b.add_argument("workflow", help="workflow .json (UI or API format); its Load Image node gets each photo")
    b.add_argument("--inputs", required=True, metavar="DIR_OR_GLOB",
                   help="a folder of photos (searched recursively) or a glob pattern such as 'scans/*.jpg'")
    b.add_argument("--out", required=True, help="folder for the restored photos, batch-manifest.jsonl and "
                                                "batch-summary.json")
    b.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: one worker in this process; ray: one worker per GPU (or CPU slot) on a Ray cluster "
                        "(needs pip install 'comfyui-silo[batch]')")
    b.add_argument("--set", action="append", default=[], dest="sets", metavar="NODE.INPUT=VALUE",
                   help="set an input for every photo, as `run --set` does; repeatable")
    b.add_argument("--image-node", default=None, metavar="NODE",
                   help="the Load Image node the photos go to (id, title or class; default: the only one)")
    b.add_argument("--seed", choices=("workflow", "per-photo"), default="workflow",
                   help="workflow: every photo gets the workflow's seed (as `run` would); per-photo: the seed plus a "
                        "number from the photo's content. Either way, never from the worker")
    b.add_argument("--retry-failed", action="store_true",
                   help="also retry photos that failed in an earlier run because of the photo or the workflow")
    b.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster to join (auto, or HOST:PORT; default: $RAY_ADDRESS, else a local one)")
    b.add_argument("--workers", type=int, default=None, help="ray: number of workers (default: as many as fit)")
    b.add_argument("--gpus-per-worker", type=float, default=None, metavar="N",
                   help="ray: GPUs per worker (default 1 when the cluster has GPUs, else 0: CPU workers)")
    b.add_argument("--cpus-per-worker", type=int, default=1, metavar="N",
                   help="CPU threads of each worker, also what a Ray worker reserves (default 1; outputs are "
                        "bit-identical across engines and workers for the same value)")
    b.add_argument("--retries", type=int, default=2,
                   help="ray: times a photo is run again when its worker dies (default 2)")
    b.add_argument("--min-side", type=int, default=16,
                   help="refuse photos smaller than this on a side (default 16; lower it for tiny super-resolution "
                        "inputs)")
    b.add_argument("--max-megapixels", type=float, default=100.0,
                   help="refuse photos larger than this (default 100)")
    b.add_argument("--comfyui", default=default_comfyui_path(), help="ComfyUI checkout (default $COMFYUI_PATH)")
    b.add_argument("--base-directory", default=None,
                   help="ComfyUI base directory (models, custom_nodes, input); default: the checkout")
    b.add_argument("--extra-model-paths", action="append", default=[], metavar="YAML",
                   help="an extra_model_paths.yaml to load; repeatable")
    b.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    b.add_argument("-v", "--verbose", action="store_true", help="ray: show the workers' own log lines")
    b.set_defaults(func=cmd_batch)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m comfyui_silo", description="comfyui-silo command line")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-operator", help="train a latent degradation operator for a checkpoint's VAE")
    t.add_argument("--checkpoint", required=True, help="checkpoint file (.safetensors) whose VAE/latent space to use")
    t.add_argument("--images", required=True, help="folder of training photos (searched recursively)")
    t.add_argument("--degradation", default="gaussian_blur",
                   help=f"one of {', '.join(STANDARD_DEGRADATIONS)} or a JSON spec")
    t.add_argument("--out", required=True, help="operator file to write (.safetensors), e.g. "
                                                "ComfyUI/models/latent_operators/blur_sd15.safetensors")
    # every training setting, from its one declaration (TrainSettings): --steps, --batch-size, --learning-rate, ...
    add_cli_arguments(t, TrainSettings)
    t.add_argument("--max-images", type=int, default=None, help="use at most this many images of the folder")
    t.add_argument("--state", default=None, help="save a resumable training state here")
    t.add_argument("--resume", default=None, help="resume from a state saved with --state")
    t.add_argument("--comfyui", default=default_comfyui_path(), help="ComfyUI checkout (default $COMFYUI_PATH)")
    t.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    t.set_defaults(func=cmd_train_operator)

    r = sub.add_parser("import-reference", help="convert an operator .pt of the SILO paper's code to our format")
    r.add_argument("pt", help="the paper's CNN operator state dict (.pt), loaded with weights_only=True")
    r.add_argument("--out", required=True)
    r.add_argument("--degradation", required=True, help="what the operator was trained for (preset or JSON)")
    r.add_argument("--latent-format", default=None, help="JSON latent format (default SD1.5)")
    r.set_defaults(func=cmd_import_reference)

    w = sub.add_parser("run", help="run a workflow (UI or API format .json) on a headless ComfyUI server and save "
                                   "its outputs")
    w.add_argument("workflow", help="workflow .json as saved by ComfyUI (UI format) or exported in API format")
    w.add_argument("--comfyui", default=default_comfyui_path(), help="ComfyUI checkout (default $COMFYUI_PATH)")
    w.add_argument("--image", action="append", default=[], metavar="NODE=FILE",
                   help="upload FILE and load it in the LoadImage node NODE (id, title or class); repeatable")
    w.add_argument("--set", action="append", default=[], dest="sets", metavar="NODE.INPUT=VALUE",
                   help="set an input, e.g. 3.steps=10 or KSampler.seed=7 (VALUE parsed as JSON if it can be); "
                        "repeatable")
    w.add_argument("--out", required=True, help="folder for the output files and outputs.json")
    w.add_argument("--cpu", action="store_true", help="run on the CPU (default when no GPU is found)")
    w.add_argument("--port", type=int, default=None, help="server port (default: a free one)")
    w.add_argument("--base-directory", default=None,
                   help="ComfyUI base directory (models, custom_nodes, input, output); default: the checkout")
    w.add_argument("--extra-model-paths", default=None, metavar="YAML", help="an extra_model_paths.yaml to load")
    w.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the workflow (default 3600)")
    w.add_argument("--log", default=None, help="keep the server log in this file")
    w.add_argument("--save-api", default=None, metavar="FILE", help="also write the API-format prompt that ran")
    w.add_argument("-v", "--verbose", action="store_true", help="print server log tails and tracebacks on errors")
    w.set_defaults(func=cmd_run)
    add_batch_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
