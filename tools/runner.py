"""Run ComfyUI headless: start a server process, queue prompts over HTTP, fetch the results.

Only the standard library talks to the server (``urllib``); the host is never imported here, it runs in its own
process (``python main.py`` of a ComfyUI checkout, with the interpreter running this code).
"""

from __future__ import annotations

import contextlib
import json
import mimetypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[1]
PACK_FOLDER_NAME = "comfyui-silo"
CLIENT_ID = "comfyui-silo-runner"


class RunnerError(RuntimeError):
    """A failure of the server or of a prompt. ``str()`` is one readable line; ``details`` has the rest."""

    def __init__(self, message: str, details: str = "", keep_log: bool = False):
        super().__init__(" ".join(str(message).split()))
        self.details = details
        self.keep_log = keep_log  # the server itself failed: its log is worth keeping


def free_port(host: str = "127.0.0.1") -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _is_this_pack(folder: Path, pack_dir: Path) -> bool:
    try:
        if folder.resolve() == pack_dir.resolve():
            return True
    except OSError:
        return False
    return folder.name in (PACK_FOLDER_NAME, "comfyui_silo") and (folder / "__init__.py").is_file()


def _file_outputs(value) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(v, dict) and "filename" in v for v in value))


def _safe_part(text: str) -> str:
    parts = [p for p in Path(str(text).replace("\\", "/")).parts if p not in ("", ".", "..", "/")]
    return "/".join(parts)


class ComfyRunner:
    """A ComfyUI server process for this pack, as a context manager::

        with ComfyRunner("~/ComfyUI", cpu=True) as runner:
            api = ui_to_api(workflow, runner.object_info())
            entry = runner.run(api, timeout=600)
            files = runner.download_outputs(entry, "out/")

    The server runs ``python main.py --listen 127.0.0.1 --port N`` in the ComfyUI checkout (``cwd``), in its own
    process group, stopped with SIGTERM (then SIGKILL) on exit. If the base directory's ``custom_nodes`` does not
    hold this pack, a generated ``--extra-model-paths-config`` adds a folder that links to it, so the host's own
    models, inputs and outputs stay in use. The server log is kept in ``log_path`` (a temporary file, removed on a
    clean exit, when none is given) and its tail is part of every server error.
    """

    def __init__(self, comfyui_path, base_directory=None, port: int | None = None, cpu: bool = False,
                 extra_model_paths=None, pack_dir=PACK_DIR, log_path=None, boot_timeout: float = 300.0,
                 require_pack: bool = True, extra_args=()):
        self.comfyui_path = Path(comfyui_path).expanduser().resolve()
        self.base_directory = Path(base_directory).expanduser().resolve() if base_directory else None
        self.port = port
        self.cpu = cpu
        self.extra_model_paths = [Path(p).expanduser().resolve() for p in
                                  ([extra_model_paths] if isinstance(extra_model_paths, (str, Path))
                                   else (extra_model_paths or []))]
        self.pack_dir = Path(pack_dir).resolve() if pack_dir else None
        self.log_path = Path(log_path) if log_path else None
        self._own_log = log_path is None
        self.boot_timeout = boot_timeout
        self.require_pack = require_pack
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.warnings: list[str] = []
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._log_file = None
        self._object_info: dict | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def __enter__(self) -> ComfyRunner:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # keep a temporary log only when the server itself may be to blame
        keep = exc is not None and (getattr(exc, "keep_log", False) or not isinstance(exc, (ValueError, RunnerError)))
        self.stop(keep_log=keep)

    @property
    def base(self) -> Path:
        """The server's base directory (models, custom_nodes, input, output)."""
        return self.base_directory or self.comfyui_path

    def _pack_present(self) -> bool:
        folder = self.base / "custom_nodes"
        if not folder.is_dir() or self.pack_dir is None:
            return self.pack_dir is None
        return any(_is_this_pack(p, self.pack_dir) for p in folder.iterdir() if p.is_dir())

    def command(self) -> list[str]:
        cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch"]
        if self.cpu:
            cmd.append("--cpu")
        if self.base_directory:
            cmd += ["--base-directory", str(self.base_directory)]
        configs = [str(p) for p in self.extra_model_paths]
        if self._tmp is not None:
            configs.append(str(Path(self._tmp.name) / "extra_model_paths.yaml"))
        if configs:
            cmd += ["--extra-model-paths-config", *configs]
        return cmd + self.extra_args

    def start(self) -> ComfyRunner:
        if not (self.comfyui_path / "main.py").is_file():
            raise RunnerError(f"no ComfyUI checkout at {self.comfyui_path} (main.py missing); "
                              "pass --comfyui PATH or set COMFYUI_PATH")
        for p in self.extra_model_paths:
            if not p.is_file():
                raise RunnerError(f"extra model paths file {p} does not exist")
        if self.base_directory is not None and not self.base_directory.is_dir():
            raise RunnerError(f"base directory {self.base_directory} does not exist")
        if self.port is None:
            self.port = free_port()
        elif not _port_is_free(self.port):
            raise RunnerError(f"port {self.port} is already in use (another ComfyUI?); choose another --port")
        if self.pack_dir is not None and not self._pack_present():
            self._tmp = tempfile.TemporaryDirectory(prefix="comfyui-silo-run-")
            nodes_dir = Path(self._tmp.name) / "custom_nodes"
            nodes_dir.mkdir()
            (nodes_dir / PACK_FOLDER_NAME).symlink_to(self.pack_dir, target_is_directory=True)
            (Path(self._tmp.name) / "extra_model_paths.yaml").write_text(
                "comfyui_silo_runner:\n"
                f"  custom_nodes: {json.dumps(str(nodes_dir))}\n")
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="comfyui-silo-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "w")  # closed in stop()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        popen_kw = {"start_new_session": True} if os.name == "posix" else {
            "creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
        self.proc = subprocess.Popen(self.command(), cwd=str(self.comfyui_path), stdout=self._log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, **popen_kw)
        try:
            self._wait_ready()
            if self.require_pack and self.pack_dir is not None:
                self._check_pack_loaded()
        except BaseException:
            self.stop(keep_log=True)
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.boot_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RunnerError(f"ComfyUI exited while starting (exit code {self.proc.returncode}); "
                                  f"server log: {self.log_path}", self.log_tail(), keep_log=True)
            try:
                self.get_json("/system_stats", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                time.sleep(0.3)
        raise RunnerError(f"ComfyUI did not answer within {self.boot_timeout:.0f} s; server log: {self.log_path}",
                          self.log_tail(), keep_log=True)

    def _check_pack_loaded(self) -> None:
        node_list = self.pack_dir / "node_list.json"
        try:
            expected = list(json.loads(node_list.read_text()))
        except (OSError, ValueError):
            return
        info = self.object_info()
        missing = [n for n in expected if n not in info]
        if missing:
            raise RunnerError(f"the comfyui-silo nodes did not load ({', '.join(missing[:5])} missing); the pack "
                              f"probably failed to import, see the server log {self.log_path}", self.log_tail(),
                              keep_log=True)

    def stop(self, keep_log: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._signal(proc, getattr(signal, "SIGKILL", signal.SIGTERM))
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        if self._own_log and not keep_log and self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()

    @staticmethod
    def _signal(proc: subprocess.Popen, sig) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
            if os.name == "posix":
                os.killpg(proc.pid, sig)
            else:  # pragma: no cover - Windows
                proc.terminate() if sig == signal.SIGTERM else proc.kill()

    def log_tail(self, lines: int = 40) -> str:
        if self._log_file is not None:
            with contextlib.suppress(ValueError, OSError):
                self._log_file.flush()
        try:
            text = Path(self.log_path).read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- HTTP ------------------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, data: bytes | None = None, headers=None, timeout: float = 60):
        if not self.url:
            raise RunnerError("the ComfyUI server is not running (use ComfyRunner as a context manager)")
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {}, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()

    def get_json(self, path: str, timeout: float = 60):
        return json.loads(self._request("GET", path, timeout=timeout).decode())

    def post_json(self, path: str, payload: dict, timeout: float = 60):
        body = json.dumps(payload).encode()
        return json.loads(self._request("POST", path, body, {"Content-Type": "application/json"}, timeout).decode())

    def object_info(self, refresh: bool = False) -> dict:
        if self._object_info is None or refresh:
            self._object_info = self.get_json("/object_info", timeout=120)
        return self._object_info

    def upload_image(self, path, subfolder: str = "", overwrite: bool = False) -> str:
        """Upload a file into the server's input folder; returns the name to put in a LoadImage node."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise RunnerError(f"image {path} does not exist")
        boundary = f"----comfyui-silo-{uuid.uuid4().hex}"
        fields = {"type": "input", "subfolder": subfolder, "overwrite": "true" if overwrite else "false"}
        parts = []
        for key, value in fields.items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        safe_name = path.name.replace('"', "_")
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{safe_name}"\r\n'
                     f"Content-Type: {ctype}\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        try:
            raw = self._request("POST", "/upload/image", b"".join(parts),
                                {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        except urllib.error.HTTPError as e:
            raise RunnerError(f"uploading {path} failed: HTTP {e.code} {e.read().decode(errors='replace')[:200]}",
                              self.log_tail()) from None
        reply = json.loads(raw.decode())
        name = reply["name"]
        return f"{reply['subfolder']}/{name}" if reply.get("subfolder") else name

    # -- prompts ---------------------------------------------------------------------------------------------------
    def queue(self, api_prompt: dict) -> str:
        """POST /prompt; returns the prompt id. Validation errors raise a readable :class:`RunnerError`."""
        try:
            reply = self.post_json("/prompt", {"prompt": api_prompt, "client_id": CLIENT_ID})
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            try:
                data = json.loads(body)
            except ValueError:
                raise RunnerError(f"the server refused the prompt: HTTP {e.code} {body[:300]}",
                                  self.log_tail()) from None
            raise RunnerError(format_validation_error(data, api_prompt), json.dumps(data, indent=1)) from None
        if reply.get("node_errors"):
            self.warnings.append("some outputs were skipped: " + format_node_errors(reply["node_errors"], api_prompt))
        return reply["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600, poll: float = 0.25) -> dict:
        """Wait for a queued prompt's history entry; raises :class:`RunnerError` if it failed."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                history = self.get_json(f"/history/{urllib.parse.quote(prompt_id)}")
            except (urllib.error.URLError, OSError) as e:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RunnerError(f"ComfyUI exited (code {self.proc.returncode}) while running the prompt; "
                                      f"server log: {self.log_path}", self.log_tail(), keep_log=True) from None
                history = {}
                if time.monotonic() > deadline:
                    raise RunnerError(f"lost the server while waiting for the prompt: {e}; server log: {self.log_path}",
                                      self.log_tail(), keep_log=True) from None
            if prompt_id in history:
                entry = history[prompt_id]
                check_history_entry(entry)
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RunnerError(f"ComfyUI exited (code {self.proc.returncode}) while running the prompt; "
                                  f"server log: {self.log_path}", self.log_tail(), keep_log=True)
            if time.monotonic() > deadline:
                with contextlib.suppress(Exception):
                    self.post_json("/interrupt", {})
                raise RunnerError(f"the prompt did not finish within {timeout:.0f} s (interrupted); server log: "
                                  f"{self.log_path}", self.log_tail(), keep_log=True)
            time.sleep(poll)

    def run(self, api_prompt: dict, timeout: float = 600) -> dict:
        """Queue an API-format prompt and wait for it; returns its ``/history`` entry."""
        return self.wait(self.queue(api_prompt), timeout)

    def download_outputs(self, history_entry: dict, out_dir) -> list[Path]:
        """Fetch every file output (images, and any other ``{filename, subfolder, type}`` list) into ``out_dir``.

        Files of type ``output`` keep their subfolder under ``out_dir``; previews (``temp``) and other types go to
        ``out_dir/<type>/``. Also writes ``out_dir/outputs.json``: per node, the saved files and every non-file UI
        output (text and the like). Returns the files written (``outputs.json`` last).
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        summary: dict[str, dict] = {}
        prompt = (history_entry.get("prompt") or [None, None, {}])
        api = prompt[2] if isinstance(prompt, (list, tuple)) and len(prompt) > 2 else {}
        for node_id, outputs in (history_entry.get("outputs") or {}).items():
            record: dict = {}
            if isinstance(api, dict) and node_id in api:
                record["class_type"] = api[node_id].get("class_type")
            for key, value in (outputs or {}).items():
                if not _file_outputs(value):
                    record[key] = value
                    continue
                files = record.setdefault("files", [])
                for item in value:
                    kind = str(item.get("type") or "output")
                    sub = _safe_part(item.get("subfolder") or "")
                    name = _safe_part(item["filename"]).replace("/", "_")
                    rel = Path(sub) / name if kind == "output" else Path(kind) / sub / name
                    target = out_dir / rel
                    query = urllib.parse.urlencode({"filename": item["filename"],
                                                    "subfolder": item.get("subfolder") or "", "type": kind})
                    try:
                        data = self._request("GET", f"/view?{query}", timeout=300)
                    except urllib.error.HTTPError as e:
                        raise RunnerError(f"downloading {item['filename']} ({kind}) of node {node_id} failed: "
                                          f"HTTP {e.code}", self.log_tail()) from None
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                    written.append(target)
                    files.append(rel.as_posix())
            summary[node_id] = record
        summary_path = out_dir / "outputs.json"
        summary_path.write_text(json.dumps(summary, indent=2, default=str))
        written.append(summary_path)
        return written


# ------------------------------------------------------------------------------------------------------------------
# readable errors

def _node_label(node_id, api: dict | None, class_type=None) -> str:
    entry = (api or {}).get(str(node_id)) or {}
    cls = class_type or entry.get("class_type") or "?"
    title = (entry.get("_meta") or {}).get("title")
    return f"node {node_id} ({cls}{f' {title!r}' if title and title != cls else ''})"


def format_node_errors(node_errors: dict, api: dict | None = None) -> str:
    parts = []
    for node_id, info in (node_errors or {}).items():
        msgs = []
        for err in info.get("errors") or []:
            text = str(err.get("message") or err.get("type") or "error")
            details = str(err.get("details") or "").strip()
            msgs.append(f"{text}: {details}" if details and details not in text else text)
        parts.append(f"{_node_label(node_id, api, info.get('class_type'))}: {'; '.join(msgs) or 'invalid'}")
    return " | ".join(parts)


def format_validation_error(reply: dict, api: dict | None = None) -> str:
    """One line from a ``/prompt`` 400 reply: the error and, per node, its class and messages."""
    error = reply.get("error") or {}
    message = error.get("message") if isinstance(error, dict) else str(error)
    details = error.get("details") if isinstance(error, dict) else ""
    head = f"the server rejected the workflow: {message or 'invalid prompt'}"
    if details and details not in (message or ""):
        head += f" ({str(details).strip()})"
    nodes = format_node_errors(reply.get("node_errors") or {}, api)
    return f"{head}: {nodes}" if nodes else head


def check_history_entry(entry: dict) -> None:
    """Raise a readable :class:`RunnerError` for a history entry whose execution failed."""
    status = entry.get("status") or {}
    if status.get("status_str") != "error" and status.get("completed", True):
        return
    messages = status.get("messages") or []
    prompt = entry.get("prompt")
    api = prompt[2] if isinstance(prompt, (list, tuple)) and len(prompt) > 2 and isinstance(prompt[2], dict) else None
    for kind, data in messages:
        if kind == "execution_error":
            exc = f"{data.get('exception_type') or 'error'}: {str(data.get('exception_message') or '').strip()}"
            where = _node_label(data.get("node_id"), api, data.get("node_type"))
            trace = "".join(data.get("traceback") or [])
            raise RunnerError(f"{where} failed: {exc}", f"{trace}{exc}\n")
        if kind == "execution_interrupted":
            raise RunnerError(f"the prompt was interrupted at node {data.get('node_id')} ({data.get('node_type')})")
    raise RunnerError(f"the prompt did not complete ({status.get('status_str') or 'unknown status'})",
                      json.dumps(messages, indent=1, default=str)[:4000])
