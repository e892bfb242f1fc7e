"""edgerope.apps.supervisor under fire: the model worker killed (SIGSEGV, SIGKILL, SIGABRT) while it answers; the
request in flight gets a 500 JSON error (or an error event in its stream) naming the death, the listening socket
stays up, /health says what happened, a request waiting in the queue is answered by the restarted worker, and the
next request gets the same answer as before the crash."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.serving import serve_in_thread, tiny_yarn_gguf

from edgerope.apps.server import EdgeropeServer, open_server

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Iterator[EdgeropeServer]:
    gguf = tiny_yarn_gguf(tmp_path_factory.mktemp("supervised"), tiny_tokenizer_dir)
    srv = open_server(
        gguf,
        port=0,
        use_cache=False,
        n_ctx=4096,
        n_threads=2,
        backend="cpu",
        supervisor_options={"backoff_s": 0.05, "stable_s": 0.0},
    )
    thread = serve_in_thread(srv)
    yield srv
    srv.close()
    thread.join(10)


def request(server: EdgeropeServer, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    host, port = server.server_address
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request(
        method, path, body=None if body is None else json.dumps(body), headers={"Content-Type": "application/json"}
    )
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data)


def wait_ready(server: EdgeropeServer, old_pid: int | None) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, health = request(server, "GET", "/health")
        if status == 200 and health["worker"]["pid"] != old_pid:
            return health
        assert status == 503 and health["status"] == "unavailable"
        time.sleep(0.05)
    raise AssertionError("the worker did not come back")


LONG = {"prompt": "Python", "max_tokens": 3000}  # runs to max_tokens on this model


def started_stream(server: EdgeropeServer) -> socket.socket:
    """A streaming request whose generation is running (its first text event has arrived)."""
    host, port = server.server_address
    sock = socket.create_connection((host, port), timeout=60)
    data = json.dumps({**LONG, "stream": True}).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    got = b""
    while got.count(b"data: ") < 1:
        got += sock.recv(65536)
    return sock


def read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    sock.close()
    return out


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL, signal.SIGABRT])
def test_worker_killed_under_load(server: EdgeropeServer, sig: signal.Signals) -> None:
    short = {"prompt": "The list", "max_tokens": 12}
    status, before = request(server, "POST", "/v1/completions", short)
    assert status == 200
    restarts = server.supervisor.restarts
    pid = server.supervisor.pid
    assert pid is not None

    stream = started_stream(server)  # in flight: streaming
    results: dict[str, Any] = {}
    waiting = threading.Thread(target=lambda: results.update(queued=request(server, "POST", "/v1/completions", short)))
    waiting.start()  # queued behind it
    time.sleep(0.3)
    os.kill(pid, sig)

    events = read_all(stream).decode()
    assert (
        f"killed by {sig.name}" in events
        and '"code": 500' in events
        and "data: [DONE]" in events.rsplit('"code": 500', 1)[1]
    )
    waiting.join(60)
    status, queued = results["queued"]
    assert status == 200 and queued["choices"][0]["text"] == before["choices"][0]["text"]  # answered after the restart

    health = wait_ready(server, pid)
    assert health["worker"]["restarts"] == restarts + 1 and health["worker"]["last_exit"] == f"killed by {sig.name}"
    status, after = request(server, "POST", "/v1/completions", short)
    assert status == 200 and after["choices"][0]["text"] == before["choices"][0]["text"]


def test_non_streaming_request_in_flight_gets_a_500_json_error(server: EdgeropeServer) -> None:
    pid = server.supervisor.pid
    assert pid is not None
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(r=request(server, "POST", "/v1/completions", LONG)))
    t.start()
    while not server.supervisor.health()["busy"]:
        time.sleep(0.005)
    time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    t.join(60)
    status, body = out["r"]
    assert status == 500 and "killed by SIGKILL" in body["error"]["message"] and body["error"]["type"] == "server_error"
    wait_ready(server, pid)
    assert request(server, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200
