"""The headless runner's parts that need no server: the port check, the prompt check before uploading, the progress
lines and the websocket frames (tools/runner.py, tools/workflow.py)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

import pytest

from comfyui_silo.tools.runner import ProgressPrinter, _port_is_free, _WebSocket
from comfyui_silo.tools.workflow import check_prompt

pytestmark = pytest.mark.unit

OBJECT_INFO = {
    "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}},
                               "output": ["MODEL", "CLIP", "VAE"]},
    "KSampler": {"input": {"required": {"model": ["MODEL"], "steps": ["INT", {"default": 20, "min": 1, "max": 100}]}},
                 "output": ["LATENT"]},
    "LoadImage": {"input": {"required": {"image": [["x.png"], {"image_upload": True}]}}, "output": ["IMAGE", "MASK"]},
    "SaveImage": {"input": {"required": {"images": ["IMAGE"]}}, "output": [], "output_node": True},
    "PreviewAny": {"input": {"required": {"source": ["*"]}}, "output": [], "output_node": True},
}


def test_a_port_with_only_time_wait_connections_is_free_and_a_listening_one_is_not():
    with contextlib.closing(socket.socket()) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        assert not _port_is_free(port), "a server listens there"
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        conn.close()  # the server side closes first: its end of the connection stays in TIME-WAIT
        client.close()
    assert _port_is_free(port), "TIME-WAIT connections of a stopped server do not keep a new server out"


def test_check_prompt_finds_what_the_server_would_refuse_on_the_nodes_it_would_run():
    api = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "missing.safetensors"}},
        "2": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "steps": 500}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "comfyui-silo-run-1/photo.png"}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0]}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["9", 0], "steps": 1000}},  # runs nowhere: not checked
    }
    problems = check_prompt(api, OBJECT_INFO)
    assert any("node 1 (CheckpointLoaderSimple): ckpt_name 'missing.safetensors' is not one of" in p
               for p in problems), problems
    assert any("node 2 (KSampler): steps = 500 is outside [1, 100]" in p for p in problems), problems
    assert not any("node 4" in p or "node 6" in p for p in problems), "file inputs and unused nodes are left alone"
    assert len(problems) == 2
    api["1"]["inputs"]["ckpt_name"] = "a.safetensors"
    api["2"]["inputs"]["steps"] = 10
    assert check_prompt(api, OBJECT_INFO) == []
    del api["2"]["inputs"]["model"]
    api["7"] = {"class_type": "Mystery", "inputs": {}}
    problems = check_prompt(api, OBJECT_INFO)
    assert "unknown node type(s): node 7 (Mystery)" in problems
    assert "node 2 (KSampler): required input 'model' is missing" in problems


def test_progress_lines_name_the_node_its_steps_an_eta_and_its_text():
    lines: list[str] = []
    api = {"8": {"class_type": "SILOKSampler", "_meta": {"title": "SILO KSampler"}},
           "9": {"class_type": "SILORestorationMetrics", "_meta": {"title": "Consistency"}}}
    p = ProgressPrinter(lines.append, api, every=3600)
    p.handle("executing", {"node": "8"})
    for v in range(1, 11):
        p.handle("progress", {"node": "8", "value": v, "max": 10})
    p.handle("executed", {"node": "9", "output": {"text": ["consistency: RMSE 0.01\nWARNING: results may be off"]}})
    assert not p.finished.is_set()
    p.handle("executing", {"node": None})
    assert p.finished.is_set()
    assert lines[0] == "running node 8 'SILO KSampler' (SILOKSampler)"
    steps = [line for line in lines if "step" in line]
    assert len(steps) == 2, "first and last step (the rest within `every` seconds are skipped)"
    assert "step 1/10 (10%" in steps[0] and "left)" in steps[0] and "step 10/10 (100%" in steps[1]
    assert lines[-2:] == ["  node 9 'Consistency' (SILORestorationMetrics): consistency: RMSE 0.01",
                          "  node 9 'Consistency' (SILORestorationMetrics): WARNING: results may be off"]



def test_eta_is_measured_from_the_first_step_not_from_slow_preparation(monkeypatch):
    """A training node that encodes its pool for 100 s before step 1, then runs 1 s per step, must not report an ETA
    inflated by the preparation (100 s/step at step 1 would promise hours)."""
    clock = [0.0]
    monkeypatch.setattr("comfyui_silo.tools.runner.time.monotonic", lambda: clock[0])
    lines: list[str] = []
    p = ProgressPrinter(lines.append, {}, every=0)
    p.handle("executing", {"node": "3"})
    p.handle("progress", {"node": "3", "value": 0, "max": 1000})  # the pool is being encoded
    clock[0] = 100.0
    p.handle("progress", {"node": "3", "value": 1, "max": 1000})
    for v in range(2, 12):
        clock[0] += 1.0
        p.handle("progress", {"node": "3", "value": v, "max": 1000})
    last = [line for line in lines if "step 11/1000" in line][0]
    assert "1.00 s/step" in last and "16 min" in last, last


def test_progress_of_a_prompt_that_started_before_its_printer_was_registered_is_not_lost(monkeypatch):
    """The server may run a prompt's first nodes before the reply to POST /prompt names it: those messages wait."""
    from comfyui_silo.tools import runner

    monkeypatch.setattr(runner, "_WebSocket", lambda *a, **k: None)
    listener = runner._ProgressListener("127.0.0.1", 0, "c")
    lines: list[str] = []
    api = {"21": {"class_type": "PreviewAny"}, "3": {"class_type": "KSampler"}}
    listener._dispatch("executing", {"node": "21", "prompt_id": "p"})
    listener._dispatch("executed", {"node": "21", "output": {"text": ["hello"]}, "prompt_id": "p"})
    listener._dispatch("executing", {"node": "9", "prompt_id": "someone else's"})
    listener._dispatch("status", {"status": {}})  # no prompt: never kept
    assert lines == [] and set(listener._early) == {"p", "someone else's"}
    listener.follow("p", ProgressPrinter(lines.append, api))
    listener._dispatch("executing", {"node": "3", "prompt_id": "p"})
    assert lines == ["running node 21 (PreviewAny)", "  node 21 (PreviewAny): hello", "running node 3 (KSampler)"]
    for i in range(20):
        listener._dispatch("executing", {"node": "1", "prompt_id": f"other {i}"})
    assert len(listener._early) == listener.EARLY_PROMPTS, "messages of prompts nobody follows stay bounded"


def _frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    head += bytes([n]) if n < 126 else bytes([126]) + struct.pack(">H", n) if n < 65536 else \
        bytes([127]) + struct.pack(">Q", n)
    return head + payload


def test_websocket_client_reads_fragmented_long_and_ping_frames():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    got_pong = threading.Event()

    def serve():
        conn, _ = server.accept()
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        assert request.startswith(b"GET /ws?clientId=x HTTP/1.1")
        big = b"y" * 70000
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                     + _frame(9, b"hi") + _frame(1, b'{"type": "pro', fin=False) + _frame(0, b'gress"}')
                     + _frame(2, big))
        data = conn.recv(64)
        if data and data[0] & 0x0F == 10:
            got_pong.set()
        conn.recv(64)  # the client's close frame
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    ws = _WebSocket("127.0.0.1", port, "/ws?clientId=x")
    try:
        assert ws.receive(timeout=5) == (1, b'{"type": "progress"}')
        op, data = ws.receive(timeout=5)
        assert op == 2 and len(data) == 70000
        assert got_pong.wait(5), "a ping is answered with a pong"
        assert ws.receive(timeout=0.2) is None
    finally:
        ws.close()
        t.join(5)
        server.close()
