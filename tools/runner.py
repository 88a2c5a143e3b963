"""Run ComfyUI headless: start a server process, queue prompts over HTTP, follow them, fetch the results.

Only the standard library talks to the server (``urllib``, and a minimal websocket client for the progress messages
the frontend also gets); the host is never imported here, it runs in its own process (``python main.py`` of a
ComfyUI checkout, with the interpreter running this code).
"""

from __future__ import annotations

import base64
import contextlib
import json
import mimetypes
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
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
    """Whether a server could listen on ``port``: tried by binding, as the server will (aiohttp sets SO_REUSEADDR on
    POSIX, so connections of an earlier server still in TIME-WAIT do not make the port busy; a listener does)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        if os.name == "posix":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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

    While a prompt runs, the runner prints (``progress``: to stderr by default) which node runs, its steps with an
    ETA and the text each node reports, from the same websocket messages the frontend uses. Images given to
    :meth:`upload_image` are sent only when a prompt that uses them has passed the checks that need no upload
    (:func:`~comfyui_silo.tools.workflow.check_prompt`), into a subfolder of the input folder of their own that is
    removed again when the runner stops.
    """

    def __init__(self, comfyui_path, base_directory=None, port: int | None = None, cpu: bool = False,
                 extra_model_paths=None, pack_dir=PACK_DIR, log_path=None, boot_timeout: float = 300.0,
                 require_pack: bool = True, extra_args=(), progress=None):
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
        # progress lines: None prints them to stderr, False turns them off, a callable receives each line
        self.progress = (lambda line: print(line, file=sys.stderr, flush=True)) if progress is None else progress
        self.client_id = f"{CLIENT_ID}-{uuid.uuid4().hex[:12]}"
        self._listener: _ProgressListener | None = None
        # images handed to upload_image wait here until a prompt using them passed the checks (see queue())
        self.upload_subfolder = f"comfyui-silo-run-{uuid.uuid4().hex[:12]}"
        self._pending_uploads: dict[str, Path] = {}
        self._uploaded: set[str] = set()

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
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        self._remove_uploads()
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

    def upload_image(self, path, subfolder: str | None = None, overwrite: bool = False, defer: bool = True) -> str:
        """The name to put in a LoadImage node for the local file ``path``.

        By default (``defer``) nothing is sent yet: the file goes to the server's input folder, in this runner's own
        subfolder (:attr:`upload_subfolder`, removed when the runner stops), when a prompt that names it is queued
        and has passed the checks that need no upload. ``defer=False`` uploads at once (into ``subfolder``, default
        the input folder itself, renamed by the server if the name is taken unless ``overwrite``).
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise RunnerError(f"image {path} does not exist")
        if not defer:
            return self._upload(path, subfolder or "", overwrite)
        stem, suffix = Path(path.name.replace('"', "_")).stem, Path(path.name).suffix
        name, n = f"{subfolder or self.upload_subfolder}/{stem}{suffix}", 2
        while name in self._pending_uploads and self._pending_uploads[name] != path.resolve():
            name, n = f"{subfolder or self.upload_subfolder}/{stem}_{n}{suffix}", n + 1
        self._pending_uploads[name] = path.resolve()
        return name

    def _upload(self, path: Path, subfolder: str, overwrite: bool) -> str:
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

    def _send_pending_uploads(self, api_prompt: dict) -> None:
        used = {v for e in api_prompt.values() for v in (e.get("inputs") or {}).values() if isinstance(v, str)}
        for name, path in list(self._pending_uploads.items()):
            if name in used and name not in self._uploaded:
                subfolder, _, filename = name.rpartition("/")
                if Path(filename).name != path.name.replace('"', "_"):  # renamed to keep two files apart
                    tmp = Path(tempfile.mkdtemp(prefix="comfyui-silo-upload-")) / filename
                    tmp.write_bytes(path.read_bytes())
                    try:
                        self._upload(tmp, subfolder, overwrite=True)
                    finally:
                        shutil.rmtree(tmp.parent, ignore_errors=True)
                else:
                    self._upload(path, subfolder, overwrite=True)
                self._uploaded.add(name)

    def _remove_uploads(self) -> None:
        """Delete this runner's upload subfolder from the input folder (when the server runs on this machine)."""
        if self._uploaded:
            folder = self.base / "input" / self.upload_subfolder
            if folder.is_dir() and folder.name.startswith("comfyui-silo-run-"):
                shutil.rmtree(folder, ignore_errors=True)
            self._uploaded.clear()

    # -- prompts ---------------------------------------------------------------------------------------------------
    def queue(self, api_prompt: dict) -> str:
        """POST /prompt; returns the prompt id. Validation errors raise a readable :class:`RunnerError`.

        First the prompt is checked against ``/object_info`` (:func:`check_prompt`), so a prompt the server would
        refuse is refused before any image is uploaded; then the images it names are uploaded and the progress of
        the run is followed (see :class:`ProgressPrinter`)."""
        from .workflow import check_prompt

        problems = check_prompt(api_prompt, self.object_info(), uploads=set(self._pending_uploads))
        if problems:
            raise RunnerError("the workflow cannot run (checked before uploading anything): " + " | ".join(problems),
                              "\n".join(problems))
        self._send_pending_uploads(api_prompt)
        self._follow()
        try:
            reply = self.post_json("/prompt", {"prompt": api_prompt, "client_id": self.client_id})
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
        if self._listener is not None and self.progress:
            self._listener.follow(str(reply["prompt_id"]), ProgressPrinter(self.progress, api_prompt))
        return reply["prompt_id"]

    def _follow(self) -> None:
        """Connect to the server's websocket (once) so progress messages of the prompts queued next arrive."""
        if self._listener is not None or not self.progress:
            return
        try:
            self._listener = _ProgressListener("127.0.0.1", int(self.port), self.client_id)
        except (OSError, ConnectionError) as e:
            self.warnings.append(f"no progress shown: the server's websocket did not answer ({e})")
            return
        self._listener.start()

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
                printer = self._listener.printers.get(prompt_id) if self._listener is not None else None
                if printer is not None:  # let the last progress lines come out before the result
                    printer.finished.wait(timeout=2.0)
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
# progress from the server's websocket (what the frontend draws its progress bar from)

class _WebSocket:
    """The client side of RFC 6455, just enough for ComfyUI's ``/ws`` (text and binary messages, ping, close)."""

    def __init__(self, host: str, port: int, path: str, timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the server closed the websocket handshake")
            buf += chunk
        head, self._buf = buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0] + b" ":
            raise ConnectionError(f"websocket handshake refused: {head.splitlines()[0]!r}")
        self._fragments: list[bytes] = []
        self._opcode = 0

    def _frame(self):
        """One complete frame from the buffer, or None when more bytes are needed."""
        b = self._buf
        if len(b) < 2:
            return None
        n, i = b[1] & 0x7F, 2
        if n == 126:
            if len(b) < 4:
                return None
            n, i = struct.unpack(">H", b[2:4])[0], 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, i = struct.unpack(">Q", b[2:10])[0], 10
        mask = None
        if b[1] & 0x80:
            mask, i = b[i:i + 4], i + 4
        if len(b) < i + n:
            return None
        data = b[i:i + n]
        if mask:
            data = bytes(c ^ mask[k % 4] for k, c in enumerate(data))
        self._buf = b[i + n:]
        return bool(b[0] & 0x80), b[0] & 0x0F, data

    def receive(self, timeout: float) -> tuple[int, bytes] | None:
        """The next whole message ``(opcode, payload)`` (1 text, 2 binary), None if none came within ``timeout``.
        Raises ``ConnectionError`` when the server closed the connection."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._frame()
            if frame is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.sock.settimeout(left)
                try:
                    chunk = self.sock.recv(65536)
                except TimeoutError:
                    return None
                if not chunk:
                    raise ConnectionError("the server closed the websocket")
                self._buf += chunk
                continue
            fin, op, data = frame
            if op == 8:
                raise ConnectionError("the server closed the websocket")
            if op == 9:
                self._send(10, data)
                continue
            if op == 10:
                continue
            if op in (1, 2):
                self._opcode, self._fragments = op, [data]
            else:
                self._fragments.append(data)
            if fin:
                return self._opcode, b"".join(self._fragments)

    def _send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        head += bytes([0x80 | n]) if n < 126 else (bytes([0x80 | 126]) + struct.pack(">H", n))
        self.sock.sendall(head + mask + bytes(c ^ mask[k % 4] for k, c in enumerate(payload)))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send(8, struct.pack(">H", 1000))
        with contextlib.suppress(OSError):
            self.sock.close()


def duration_text(seconds: float) -> str:
    """``12 s``, ``3 min 04 s``, ``1 h 05 min``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds // 60 % 60:02d} min"


class ProgressPrinter:
    """Turns the server's ``executing`` / ``progress`` / ``executed`` messages into lines for a person: which node
    runs, its steps with the time per step and an ETA (at most every ``every`` seconds, first and last step always),
    and the text each node reports (metrics, training reports, warnings)."""

    def __init__(self, write, api: dict | None = None, every: float = 5.0):
        self.write = write
        self.api = api or {}
        self.every = every
        self._node_start: dict[str, float] = {}
        self._first_step: dict[str, tuple[float, int]] = {}  # (time, value) of a node's first step report
        self._last_print: dict[str, float] = {}
        self.finished = threading.Event()  # set by the server's last message about the prompt

    def label(self, node_id) -> str:
        entry = self.api.get(str(node_id)) or {}
        cls = entry.get("class_type") or "?"
        title = (entry.get("_meta") or {}).get("title")
        return f"node {node_id} {title!r} ({cls})" if title and title != cls else f"node {node_id} ({cls})"

    def handle(self, kind: str, data: dict) -> None:
        now = time.monotonic()
        if kind in ("execution_success", "execution_error", "execution_interrupted") or (
                kind == "executing" and data.get("node") is None):
            self.finished.set()
        elif kind == "execution_cached" and data.get("nodes"):
            self.write(f"cached (unchanged since the last run): {len(data['nodes'])} node(s)")
        elif kind == "executing" and data.get("node") is not None:
            self._node_start[str(data["node"])] = now
            self.write(f"running {self.label(data['node'])}")
        elif kind == "progress":
            node, value, total = str(data.get("node")), int(data.get("value") or 0), int(data.get("max") or 0)
            start = self._node_start.setdefault(node, now)
            last = self._last_print.get(node)
            if value not in (1, total) and last is not None and now - last < self.every:
                return
            self._last_print[node] = now
            line = f"  {self.label(node)}: step {value}/{total}"
            if value > 0:
                first = self._first_step.setdefault(node, (now, value))
            if value > 0 and total > 0:
                # the rate since the first step report, not since the node started: loading a model or encoding a
                # training pool before step 1 would otherwise inflate every estimate (first report: since the start)
                t0, v0 = first if value > first[1] else (start, 0)
                per = (now - t0) / (value - v0)
                line += f" ({value / total:.0%}, {per:.2f} s/step"
                line += f", about {duration_text(per * (total - value))} left)" if value < total else ")"
            self.write(line)
        elif kind == "executed":
            text = (data.get("output") or {}).get("text")
            if text:
                lines = "\n".join(str(t) for t in (text if isinstance(text, (list, tuple)) else [text]))
                for line in lines.splitlines():
                    if line.strip():
                        self.write(f"  {self.label(data.get('node'))}: {line}")


class _ProgressListener(threading.Thread):
    """Reads the server's websocket for one client id in the background and hands the messages of the prompts
    being followed to a :class:`ProgressPrinter`. Losing the websocket never fails a run (it is only progress).

    The server may start a prompt (and its first nodes may finish) before the reply to ``POST /prompt`` names it:
    messages of a prompt no printer follows yet are kept (a few prompts, a bounded number each) and handed to its
    printer, in order, when :meth:`follow` registers one."""

    EARLY_PROMPTS, EARLY_MESSAGES = 8, 2000

    def __init__(self, host: str, port: int, client_id: str):
        super().__init__(daemon=True, name="comfyui-silo-progress")
        self.ws = _WebSocket(host, port, f"/ws?clientId={urllib.parse.quote(client_id)}")
        self.printers: dict[str, ProgressPrinter] = {}
        self._early: dict[str, list[tuple[str, dict]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def follow(self, prompt_id: str, printer: ProgressPrinter) -> None:
        """Hand the messages of ``prompt_id`` to ``printer``, those that came before this call first."""
        with self._lock:
            self.printers[prompt_id] = printer
            for kind, payload in self._early.pop(prompt_id, []):
                with contextlib.suppress(Exception):
                    printer.handle(kind, payload)

    def _dispatch(self, kind: str, payload: dict) -> None:
        prompt_id = payload.get("prompt_id")
        if prompt_id is None:
            return
        with self._lock:
            printer = self.printers.get(str(prompt_id))
            if printer is not None:
                with contextlib.suppress(Exception):
                    printer.handle(kind, payload)
                return
            early = self._early.setdefault(str(prompt_id), [])
            if len(early) < self.EARLY_MESSAGES:
                early.append((kind, payload))
            while len(self._early) > self.EARLY_PROMPTS:
                self._early.pop(next(iter(self._early)))

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.ws.receive(timeout=0.5)
            except (ConnectionError, OSError):
                return
            if msg is None or msg[0] != 1:
                continue  # no message yet, or a binary preview image
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                data = json.loads(msg[1].decode("utf-8", errors="replace"))
                self._dispatch(str(data.get("type")), data.get("data") or {})

    def stop(self) -> None:
        self._stop.set()
        self.ws.close()


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
