"""One batch worker: the ComfyUI host imported into this process once, the workflow converted and checked once,
then one photo after another through the host's own executor (``execution.PromptExecutor``, the way ``main.py``'s
prompt worker runs prompts). The executor's cache keeps the checkpoint, the text encodings and the operator loaded
from one photo to the next: only the nodes downstream of Load Image run again.

Both batch engines use it (``tools/batch.py``): ``local`` in the command's own process, ``ray`` in each actor
(``tools/batch_ray.py``). Nothing here imports Ray, and the host is imported only when a :class:`BatchWorker` is
made, so :func:`check_photo` and the data classes work without one.

A photo arrives as bytes and its outputs leave as bytes: a worker on another machine needs no folder shared with
the driver, which alone writes the output folder. The photo is staged in the host's input folder under a name made
from its batch key (so the prompt the host embeds in a saved PNG is the same whichever worker ran it) and removed
after its run; what the workflow saves goes to a private output folder and is read back and removed there.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import hashlib
import io
import json
import logging
import os
import random
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .host_process import import_host
from .runner import PACK_DIR, PACK_FOLDER_NAME, RunnerError, check_history_entry, format_validation_error
from .workflow import (
    SEED_NAMES,
    UPLOAD_OPTIONS,
    WorkflowError,
    apply_overrides,
    check_prompt,
    defined_inputs,
    is_api_format,
    resolve_node,
    ui_to_api,
)

#: Photo files a folder is searched for (the CLI's train-operator and batch).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class BatchError(RuntimeError):
    """The batch cannot start (no photos, an unusable workflow, no Ray); the message is one line for a person."""


#: the subfolder of the host's input folder where photos wait for their run
STAGING_FOLDER = "comfyui-silo-batch"
#: errors of a kind that may not come back on a second try (a worker that died, memory): a rerun retries them
TRANSIENT = "transient"
#: errors of the photo itself (unreadable, wrong size, NaN) or of the workflow on this photo: a rerun skips them
PERMANENT = "permanent"


class PhotoError(ValueError):
    """A photo that cannot be restored; the message says what is wrong with it and what to do."""


@dataclass(frozen=True)
class WorkerSettings:
    """What every worker of a batch needs: the workflow and its overrides, and where the host is."""

    workflow: dict
    sets: dict = field(default_factory=dict)  # {"NODE.input": text}, as `run --set` takes them
    image_node: str | None = None  # the Load Image node the photos go to (default: the workflow's only one)
    comfyui: str | None = None
    base_directory: str | None = None
    extra_model_paths: tuple = ()
    cpu: bool = False
    threads: int | None = None
    min_side: int = 16
    max_megapixels: float = 100.0
    log_file: str | None = None  # the host's log messages go to this file ...
    log_stderr: bool = False  # ... or to stderr (a Ray worker's log); neither: only critical ones, to stderr


@dataclass(frozen=True)
class PhotoJob:
    """One photo to restore: its batch key, its name (for messages), its bytes and its seed offset."""

    key: str
    name: str
    data: bytes
    suffix: str = ".png"
    seed_offset: int = 0


@dataclass
class PhotoResult:
    """What a worker made of a :class:`PhotoJob`: ``outputs`` are ``(label, suffix, bytes)`` in a fixed order, or
    ``error`` says why there are none (``kind``: :data:`TRANSIENT` or :data:`PERMANENT`)."""

    key: str
    name: str
    outputs: list = field(default_factory=list)
    error: str = ""
    kind: str = ""
    seeds: dict = field(default_factory=dict)
    worker: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.error


def one_line(text) -> str:
    return " ".join(str(text).split())


# ------------------------------------------------------------------------------------------------------------------
# the photo itself

def _all_finite(im) -> bool:
    import numpy as np

    return bool(np.isfinite(np.asarray(im)).all())


def check_photo(data: bytes, min_side: int = 16, max_megapixels: float = 100.0) -> tuple[int, int]:
    """Decode a photo as Load Image will and return its ``(width, height)``; raises :class:`PhotoError` for one
    that cannot be read, is too small or too large, or holds NaN / infinite values (a float TIFF)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > max_megapixels * 1e6:
                raise PhotoError(f"it is {width}x{height} ({width * height / 1e6:.0f} megapixels), over the limit of "
                                 f"{max_megapixels:g}: scale it down first, or raise --max-megapixels")
            im.load()
            finite = im.mode != "F" or _all_finite(im)
    except PhotoError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise PhotoError(f"cannot be read as an image ({one_line(e)}): the file is damaged or not a picture; "
                         "re-export it as PNG or JPEG, or remove it from the folder") from None
    if min(width, height) < min_side:
        raise PhotoError(f"it is {width}x{height}: smaller than {min_side} px on a side (--min-side), too small for "
                         "the VAE; use the original scan, or upscale it first")
    if not finite:
        raise PhotoError("it holds NaN or infinite pixel values (a floating-point image): re-export it as an 8- or "
                         "16-bit PNG")
    return width, height


# ------------------------------------------------------------------------------------------------------------------
# the workflow

def node_definitions(nodes_module) -> dict:
    """What the server's ``/object_info`` says about every registered node, built the way ``server.py`` builds it
    (the parts the workflow tools read)."""
    out = {}
    for name, cls in nodes_module.NODE_CLASS_MAPPINGS.items():
        with contextlib.suppress(Exception):  # the server skips a node whose definition fails, so do we
            if hasattr(cls, "GET_NODE_INFO_V1"):
                out[name] = cls.GET_NODE_INFO_V1()
                continue
            inputs = cls.INPUT_TYPES()
            out[name] = {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
                         "output": cls.RETURN_TYPES, "output_name": getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES),
                         "output_is_list": getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES)),
                         "name": name, "display_name": nodes_module.NODE_DISPLAY_NAME_MAPPINGS.get(name, name),
                         "output_node": getattr(cls, "OUTPUT_NODE", False) is True,
                         "category": getattr(cls, "CATEGORY", "sd")}
    return out


def _is_image_loader(entry: dict, object_info: dict) -> bool:
    value = (entry.get("inputs") or {}).get("image")
    if not isinstance(value, str):
        return False
    specs = {n: s for n, s, _ in defined_inputs(object_info.get(entry.get("class_type")) or {})}
    spec = specs.get("image")
    opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    return entry.get("class_type") == "LoadImage" or any(opts.get(k) for k in UPLOAD_OPTIONS)


def find_image_node(api: dict, object_info: dict, ref: str | None = None) -> str:
    """The node the photos are loaded by: ``ref`` (id, title or class, as ``--image`` takes it), else the one image
    loader of the workflow. Raises :class:`WorkflowError` naming the candidates."""
    loaders = [nid for nid, e in api.items() if _is_image_loader(e, object_info)]
    if ref:
        nid = resolve_node(api, ref)
        if nid not in loaders:
            raise WorkflowError(f"--image-node {ref}: node {nid} ({api[nid].get('class_type')}) does not load an "
                                f"image file; image loaders: {', '.join(loaders) or 'none'}")
        return nid
    if len(loaders) == 1:
        return loaders[0]
    if not loaders:
        raise WorkflowError("the workflow has no Load Image node to put the photos in")
    shown = ", ".join(f"{n} ({api[n].get('class_type')}, {(api[n].get('_meta') or {}).get('title')!r})"
                      for n in loaders)
    raise WorkflowError(f"the workflow loads several images ({shown}): say which one takes the photos with "
                        "--image-node NODE")


def prepare_prompt(settings: WorkerSettings, object_info: dict) -> tuple[dict, str]:
    """The API prompt every photo runs (UI format converted, ``--set`` applied, checked without the photo) and the
    id of the node the photos go to. Raises :class:`WorkflowError` with one line per problem."""
    wf = settings.workflow
    # {a|b} choices in prompts are drawn once, the same way by every worker, so that results do not depend on it
    api = copy.deepcopy(wf) if is_api_format(wf) else ui_to_api(wf, object_info, rng=random.Random(0))
    apply_overrides(api, sets=settings.sets, object_info=object_info)
    image_node = find_image_node(api, object_info, settings.image_node)
    problems = check_prompt(api, object_info)
    if problems:
        raise WorkflowError("the workflow cannot run: " + " | ".join(problems))
    if not any((object_info.get(e.get("class_type")) or {}).get("output_node") for e in api.values()):
        raise WorkflowError("the workflow saves nothing: add a Save Image node")
    return api, image_node


def apply_seed_offset(api: dict, object_info: dict, offset: int) -> dict:
    """Add ``offset`` to every literal seed (inputs named ``seed`` / ``noise_seed``), wrapping at the input's
    maximum; returns ``{"node.input": seed}`` as used."""
    seeds = {}
    for nid, entry in api.items():
        specs = {n: s for n, s, _ in defined_inputs(object_info.get(entry.get("class_type")) or {})}
        for name in SEED_NAMES:
            value = (entry.get("inputs") or {}).get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                spec = specs.get(name)
                opts = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 else {}
                top = int(opts.get("max", 2**32 - 1)) if isinstance(opts, dict) else 2**32 - 1
                entry["inputs"][name] = (value + offset) % (top + 1) if offset else value
                seeds[f"{nid}.{name}"] = entry["inputs"][name]
    return seeds


# ------------------------------------------------------------------------------------------------------------------
# the host

class _QuietServer:
    """What the host's executor and nodes expect of ``server.PromptServer.instance``, with nobody listening."""

    client_id = None
    last_node_id = None
    last_prompt_id = None
    sockets_metadata: dict = {}

    def send_sync(self, event, data, sid=None):
        pass

    def send_progress_text(self, text, node_id, sid=None):
        pass

    def queue_updated(self):
        pass


def _pack_loaded_by(folder_paths) -> bool:
    for folder in folder_paths.get_folder_paths("custom_nodes"):
        with contextlib.suppress(OSError):
            for p in Path(folder).iterdir():
                if p.is_dir() and (p.resolve() == PACK_DIR.resolve()
                                   or (p.name in (PACK_FOLDER_NAME, "comfyui_silo") and (p / "__init__.py").is_file())):
                    return True
    return False


def _configure_logging(settings: WorkerSettings) -> None:
    """The host logs through :mod:`logging`, tracebacks of failed nodes included: they go to the batch's log file
    (local engine) or to the worker's own stderr (a Ray worker's log), never among the batch's progress lines."""
    root = logging.getLogger()
    if settings.log_file:
        Path(settings.log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(settings.log_file, encoding="utf-8")
    elif settings.log_stderr:
        handler = logging.StreamHandler()
    else:
        root.setLevel(logging.CRITICAL)
        return
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def start_host(settings: WorkerSettings, private: Path):
    """Import and configure the host in this process as ``main.py`` would (extra model paths, custom nodes with this
    pack among them), with the output and temp folders in ``private``; returns ``(nodes, execution,
    folder_paths)``."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, read when CUDA starts
    _configure_logging(settings)
    root = import_host(settings.comfyui, cpu=settings.cpu, base_directory=settings.base_directory)
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    with contextlib.suppress(ImportError):  # see InProcessHost: `utils` must be the host's package, not comfy/utils
        import utils.install_util  # noqa: F401
    import folder_paths
    import utils.extra_config

    for config in [root / "extra_model_paths.yaml", *map(Path, settings.extra_model_paths)]:
        if config.is_file():
            utils.extra_config.load_extra_path_config(str(config))
    for kind in ("checkpoints", "clip", "vae", "diffusion_models", "loras"):
        folder_paths.add_model_folder_path(kind, os.path.join(folder_paths.get_output_directory(), kind))
    if not _pack_loaded_by(folder_paths):
        (private / "custom_nodes").mkdir(parents=True, exist_ok=True)
        (private / "custom_nodes" / PACK_FOLDER_NAME).symlink_to(PACK_DIR, target_is_directory=True)
        folder_paths.add_model_folder_path("custom_nodes", str(private / "custom_nodes"))
    for kind, setter in (("output", folder_paths.set_output_directory), ("temp", folder_paths.set_temp_directory)):
        (private / kind).mkdir(parents=True, exist_ok=True)
        setter(str(private / kind))
    import comfy.utils

    import nodes

    comfy.utils.PROGRESS_BAR_ENABLED = False  # the samplers' tqdm bars; the batch shows its own progress
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    import execution
    import server

    if getattr(server.PromptServer, "instance", None) is None:
        server.PromptServer.instance = _QuietServer()
    return nodes, execution, folder_paths


def _file_items(value) -> list[dict]:
    if isinstance(value, list) and value and all(isinstance(v, dict) and "filename" in v for v in value):
        return value
    return []


class BatchWorker:
    """The host, the prepared prompt and an executor, made once; :meth:`restore` runs one photo.

    ``restore`` never raises for a photo: whatever goes wrong becomes the result's one-line ``error``, so one bad
    photo never stops the batch. Making the worker raises :class:`WorkflowError` when the workflow cannot run at all
    (unknown nodes, a missing model, no image loader)."""

    def __init__(self, settings: WorkerSettings):
        started = time.monotonic()
        self.settings = settings
        self._private = Path(tempfile.mkdtemp(prefix="comfyui-silo-batch-"))
        self.nodes, self.execution, self.folder_paths = start_host(settings, self._private)
        self.object_info = node_definitions(self.nodes)
        self.api, self.image_node = prepare_prompt(settings, self.object_info)
        self.executor = self.execution.PromptExecutor(_QuietServer(), cache_type=self.execution.CacheType.CLASSIC,
                                                      cache_size=0)
        self.staging = Path(self.folder_paths.get_input_directory()) / STAGING_FOLDER
        self.identity = f"pid {os.getpid()} on {socket.gethostname()}"
        self.device = "cpu" if settings.cpu else str(self._device())
        self.startup_seconds = time.monotonic() - started
        self._last_gc = time.monotonic()

    def _device(self):
        import comfy.model_management

        return comfy.model_management.get_torch_device()

    def restore(self, job: PhotoJob) -> PhotoResult:
        """Restore one photo; the outputs in the order of their nodes, or the reason there are none."""
        started = time.monotonic()
        result = PhotoResult(job.key, job.name, worker=self.identity)
        size = None
        try:
            size = check_photo(job.data, self.settings.min_side, self.settings.max_megapixels)
            result.outputs, result.seeds = self._run(job)
        except PhotoError as e:
            result.error, result.kind = str(e), PERMANENT
        except (WorkflowError, RunnerError) as e:  # a node failed on this photo: it would fail the same way again
            result.error = f"{one_line(e)} (the photo is {size[0]}x{size[1]})" if size else one_line(e)
            result.kind = TRANSIENT if "OutOfMemory" in result.error else PERMANENT
        except MemoryError:
            result.error, result.kind = "out of memory (try fewer workers per machine, or a smaller photo)", TRANSIENT
        except Exception as e:  # anything else is reported for this photo; the batch goes on
            result.error, result.kind = f"{type(e).__name__}: {one_line(e)}", TRANSIENT
        finally:
            self._collect_garbage()
        result.seconds = time.monotonic() - started
        return result

    def _stage(self, job: PhotoJob) -> str:
        """Put the photo where Load Image reads it, atomically (two workers of one machine may share the folder)."""
        self.staging.mkdir(parents=True, exist_ok=True)
        target = self.staging / f"{job.key[:32]}{job.suffix.lower()}"
        tmp = self.staging / f".{target.name}.{uuid.uuid4().hex}.partial"
        tmp.write_bytes(job.data)
        os.replace(tmp, target)
        return f"{STAGING_FOLDER}/{target.name}"

    def _run(self, job: PhotoJob) -> tuple[list, dict]:
        name = self._stage(job)
        try:
            api = copy.deepcopy(self.api)
            api[self.image_node]["inputs"]["image"] = name
            seeds = apply_seed_offset(api, self.object_info, job.seed_offset)
            prompt_id = f"batch-{job.key[:16]}"
            valid = asyncio.run(self.execution.validate_prompt(prompt_id, api, None))
            if not valid[0]:
                raise PhotoError(format_validation_error({"error": valid[1], "node_errors": valid[3]}, api))
            self.executor.execute(api, prompt_id, {}, valid[2])
            messages = [(kind, dict(data, exception_type=str(data.get("exception_type") or "").rsplit(".", 1)[-1])
                         if kind == "execution_error" else data) for kind, data in self.executor.status_messages]
            entry = {"status": {"status_str": "success" if self.executor.success else "error",
                                "completed": self.executor.success, "messages": messages},
                     "prompt": [0, prompt_id, api]}
            outputs = self.executor.history_result.get("outputs") or {}
            try:
                check_history_entry(entry)  # one readable line naming the node that failed, no traceback
                self._check_finite(api, outputs)
                return self._read_outputs(outputs), seeds
            finally:
                self._remove_outputs(outputs)
        finally:
            with contextlib.suppress(OSError):
                (self.staging / name.split("/", 1)[1]).unlink()

    def _check_finite(self, api: dict, outputs: dict) -> None:
        """A saved image that went through NaN is black, not an error: check the tensors the saving nodes got."""
        for nid in outputs:
            for name, link in ((api.get(nid) or {}).get("inputs") or {}).items():
                if isinstance(link, list) and len(link) == 2 and isinstance(link[0], str) and self._nonfinite(link):
                    raise PhotoError(f"node {nid} ({api[nid].get('class_type')}) got NaN or infinite values in "
                                     f"{name!r}: the restoration diverged on this photo; try a smaller guidance "
                                     "strength (eta) or more steps")

    def _nonfinite(self, link: list) -> bool:
        import torch

        try:  # the cache's layout is the host's business: best effort
            values = self.executor.caches.outputs.get(link[0])[link[1]]
        except Exception:
            return False
        return any(torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())
                   for v in (values if isinstance(values, (list, tuple)) else [values]))

    def _read_outputs(self, outputs: dict) -> list:
        out_dir = Path(self.folder_paths.get_output_directory())
        files = []
        for nid in sorted(outputs, key=lambda n: (len(n), n)):
            saved = [item for value in outputs[nid].values() for item in _file_items(value)
                     if (item.get("type") or "output") == "output"]
            for i, item in enumerate(saved):
                path = out_dir / (item.get("subfolder") or "") / item["filename"]
                label = nid if len(saved) == 1 else f"{nid}_{i}"
                files.append((label.replace(":", "_"), path.suffix, path.read_bytes()))
        if not files:
            raise PhotoError("the workflow saved no file for this photo (its Save Image node did not run)")
        return files

    def _remove_outputs(self, outputs: dict) -> None:
        folders = {"output": self.folder_paths.get_output_directory(), "temp": self.folder_paths.get_temp_directory()}
        for ui in outputs.values():
            for value in ui.values():
                for item in _file_items(value):
                    folder = folders.get(item.get("type") or "output")
                    if folder is not None:
                        with contextlib.suppress(OSError):
                            (Path(folder) / (item.get("subfolder") or "") / item["filename"]).unlink()

    def _collect_garbage(self) -> None:
        """What ``main.py``'s prompt worker does between prompts, at most every 10 s."""
        if time.monotonic() - self._last_gc < 10.0:
            return
        gc.collect()
        import comfy.model_management

        comfy.model_management.soft_empty_cache()
        self._last_gc = time.monotonic()

    def describe(self) -> dict:
        """Who this worker is and which prompt it runs (its hash: every worker of a batch must run the same)."""
        prompt = hashlib.sha256(json.dumps(self.api, sort_keys=True).encode()).hexdigest()
        return {"identity": self.identity, "device": self.device, "startup_seconds": round(self.startup_seconds, 2),
                "image_node": self.image_node, "prompt_sha256": prompt}

    def close(self) -> None:
        shutil.rmtree(self._private, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.staging.rmdir()  # only when empty: another worker may still use it
