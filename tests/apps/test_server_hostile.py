"""The server against hostile clients: malformed and oversized requests, request smuggling, bad encodings, deep
nesting, slow and stalled clients, bursts, and a few hundred generated malformed requests.  Every case asserts a
clean refusal (an HTTP status, a JSON error for what reaches the application) and that the server still answers
afterwards.  Each defect class the stdlib server had (issue 12) has a case here that fails on it."""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.serving import serve_in_thread, tiny_yarn_gguf

from edgerope.apps.asgi import Limits
from edgerope.apps.server import EdgeropeServer, open_server

pytestmark = pytest.mark.llama
MAX_BODY = 64 << 10
LIMITS = Limits(max_body_bytes=MAX_BODY, body_timeout_s=1.0, max_queue=4, send_timeout_s=1.0, max_buffer_bytes=4096)
OK = {"prompt": "The list", "max_tokens": 4}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Iterator[EdgeropeServer]:
    gguf = tiny_yarn_gguf(tmp_path_factory.mktemp("hostile"), tiny_tokenizer_dir)
    srv = open_server(
        gguf,
        port=0,
        use_cache=False,
        n_ctx=4096,
        n_threads=2,
        backend="cpu",
        limits=LIMITS,
        head_timeout_s=1.0,
        keepalive_s=1.0,
        send_buffer_bytes=16 << 10,
        default_max_tokens=8,
    )
    thread = serve_in_thread(srv)
    yield srv
    srv.close()
    thread.join(10)


def raw(server: EdgeropeServer, data: bytes, *, timeout: float = 10.0, read_all: bool = True) -> bytes:
    """Send bytes on a fresh connection; what comes back until the server closes it (or the first response)."""
    sock = socket.create_connection(server.server_address, timeout=timeout)
    try:
        sock.sendall(data)
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
            if not read_all and b"\r\n\r\n" in out:
                break
        return out
    finally:
        sock.close()


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response[9:12])


def body_of(response: bytes) -> Any:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


def answers(server: EdgeropeServer) -> None:
    """The server still answers a normal request."""
    conn = http.client.HTTPConnection(*server.server_address, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps(OK), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert json.loads(resp.read())["usage"]["completion_tokens"] >= 1
    conn.close()


def post_head(length: str | None = None, extra: str = "", path: str = "/v1/completions") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    return (head + extra + "\r\n").encode()


# -- sizes -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", ["-1", "+5", "0x10", "1e3", " 5", "99999999999999999999999999"])
def test_bad_content_length_is_refused_and_closed(server: EdgeropeServer, length: str) -> None:
    t0 = time.monotonic()
    out = raw(server, post_head(length) + b'{"prompt": "x"}' + b"A" * 1000, read_all=False)
    assert status_of(out) in (400, 413) and time.monotonic() - t0 < 5  # not read until the client closes
    answers(server)


def test_huge_content_length_is_413_before_the_body_is_read(server: EdgeropeServer) -> None:
    sock = socket.create_connection(server.server_address, timeout=10)
    sock.sendall(post_head(str(200 << 20)))  # 200 MiB announced, nothing sent
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    sock.close()
    assert status_of(out) == 413 and b"connection: close" in out.lower()
    answers(server)


def test_chunked_body_over_the_limit_is_stopped_while_reading(server: EdgeropeServer) -> None:
    sock = socket.create_connection(server.server_address, timeout=10)
    sock.sendall(post_head(None, "Transfer-Encoding: chunked\r\n"))
    piece = b"x" * 8192
    sent, out = 0, b""
    try:
        while sent < 10 * MAX_BODY:  # keeps sending; the server answers 413 once past the limit
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            sent += len(piece)
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    sock.close()
    assert status_of(out) == 413
    answers(server)


# -- smuggling and framing -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["413", "401", "404", "415"])
def test_an_unread_body_is_never_parsed_as_a_next_request(server: EdgeropeServer, first: str) -> None:
    hidden = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    if first == "413":
        data = post_head(str(MAX_BODY + 1)) + hidden
    elif first == "401":
        data = (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\n"
            + f"Content-Length: {len(hidden)}\r\n\r\n".encode()
            + hidden
        )
    elif first == "404":
        data = post_head(str(len(hidden)), path="/v1/nowhere") + hidden
    else:
        data = post_head(str(len(hidden))).replace(b"application/json", b"text/plain") + hidden
    if first == "401":
        server.app.api_key = "sekret"
    try:
        out = raw(server, data)
    finally:
        server.app.api_key = None
    assert status_of(out) == int(first) and out.count(b"HTTP/1.1 ") == 1, out  # one response, then closed
    assert b'"object": "list"' not in out and b'"object":"list"' not in out
    answers(server)


@pytest.mark.parametrize(
    "head",
    [
        post_head("5", "Transfer-Encoding: chunked\r\n"),  # both framings: a classic smuggling vector
        post_head("5", "Content-Length: 6\r\n"),  # two different lengths
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked, identity\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length : 5\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n Content-Length: 5\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\nHost: x\nContent-Length: 5\n\n",  # bare LF
        b"POST /v1/completions HTTP/1.1\r\nHost: x\x00y\r\n\r\n",
        b"GET /v1/models HTTP/2.0\r\nHost: x\r\n\r\n",
        b"GET /v1/models\r\n\r\n",
        b"\xff\xfe GARBAGE \r\n\r\n",
        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # a request head past the limit
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"b" * 70000 + b"\r\n\r\n",
    ],
)
def test_malformed_framing_is_400_and_closed(server: EdgeropeServer, head: bytes) -> None:
    out = raw(server, head + b'{"a":')
    assert out == b"" or status_of(out) in (400, 413, 431, 505), out[:300]
    assert out.count(b"HTTP/1.1 ") <= 1
    answers(server)


# -- encodings and nesting ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"[" * 30_000 + b"]" * 30_000, "nest"),
        (b'{"prompt": "x", "a": ' + b'{"b": ' * 9_000 + b"1" + b"}" * 9_001, "nest"),
        (b'{"prompt": ' + b"[" * 70 + b"]" * 70 + b"}", "nests"),
        (b'{"prompt": "caf\xe9"}', "UTF-8"),
        (b'{"prompt": "\\ud800"}', "surrogate"),
        (b'{"prompt": "x", "max_tokens": NaN}', "JSON"),
        (b'{"prompt": "x", "temperature": Infinity}', "JSON"),
        (b'["prompt"]', "object"),
        (b"", "JSON"),
        (b'{"prompt": "x", "max_tokens": 1e999}', "max_tokens"),
        (b'{"prompt": "x", "max_tokens": 99999999999999999999999}', "max_tokens"),
        (b'{"prompt": "x", "seed": -1, "temperature": 1}', "seed"),
        (b'{"prompt": "x", "stop": ["' + b"s" * 300 + b'"]}', "stop"),
        (b'{"messages": [{"role": "' + b"r" * 100 + b'", "content": "x"}]}', "role"),
    ],
)
def test_bad_bodies_are_400_json(server: EdgeropeServer, body: bytes, fragment: str) -> None:
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    conn = http.client.HTTPConnection(*server.server_address, timeout=30)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    msg = json.loads(resp.read())["error"]["message"]
    conn.close()
    assert resp.status == 400 and fragment.lower() in msg.lower(), msg
    answers(server)


# -- slow and stalled clients --------------------------------------------------------------------------------------


def test_slow_and_idle_connections_are_closed(server: EdgeropeServer) -> None:
    t0 = time.monotonic()
    socks = []
    for i in range(300):  # half-sent heads, bodies that stop, and connections that never speak
        s = socket.create_connection(server.server_address, timeout=10)
        if i % 3 == 0:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        elif i % 3 == 1:
            s.sendall(post_head("1000") + b'{"prompt": ')
        socks.append(s)
    answers(server)  # meanwhile the server answers others
    closed = 0
    for s in socks:
        s.settimeout(10)
        try:
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            closed += 1
            assert data == b"" or status_of(data) == 408
        except (ConnectionResetError, TimeoutError):
            closed += isinstance(s, socket.socket)
        s.close()
    assert closed == len(socks) and time.monotonic() - t0 < 15
    answers(server)


def test_a_stalled_stream_reader_is_dropped_and_does_not_hold_the_model(
    server: EdgeropeServer, caplog: pytest.LogCaptureFixture
) -> None:
    conn = http.client.HTTPConnection(*server.server_address, timeout=120)
    t = time.monotonic()
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "Python", "max_tokens": 400, "stream": True}))
    resp = conn.getresponse()
    assert resp.status == 200 and b"[DONE]" in resp.read()  # a client that reads
    full_s = (time.monotonic() - t) * 3800 / 400  # how long the whole 3800-token stream takes on this machine now
    conn.close()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    sock.connect(server.server_address)
    body = json.dumps({"prompt": "Python", "max_tokens": 3800, "stream": True}).encode()
    sock.sendall(post_head(str(len(body))) + body)
    t0 = time.monotonic()
    while not server.supervisor.health()["busy"]:
        time.sleep(0.01)
    while server.supervisor.health()["busy"] and time.monotonic() - t0 < 60:  # never reads
        time.sleep(0.05)
    dropped_after = time.monotonic() - t0
    sock.settimeout(10)
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(1 << 16):  # what was already in the buffers, then the connection is closed
            got += chunk
    sock.close()
    assert b"data: [DONE]" not in got and len(got) < 200_000
    t1 = time.monotonic()
    answers(server)
    assert time.monotonic() - t1 < 5
    # cancelled before the answer would have ended: not generated for a socket no one reads
    assert dropped_after < full_s, (dropped_after, full_s)
    assert "dropped a streaming client that stopped reading" in caplog.text


def test_a_burst_of_clients_gets_answers_not_resets(server: EdgeropeServer) -> None:
    def one(_: int) -> int:
        conn = http.client.HTTPConnection(*server.server_address, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps(OK), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 200 or (resp.status == 429 and "busy" in body["error"]["message"])
        conn.close()
        return resp.status

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(one, range(50)))
    assert set(statuses) <= {200, 429} and statuses.count(200) >= LIMITS.max_queue + 1
    answers(server)


# -- generated cases -----------------------------------------------------------------------------------------------

VALUES: list[Any] = [None, True, -1, 0, 2**70, 1.5, -1e308, "", "x", "\u202e\U0001f600", [], [1], {}, {"a": {}}]
FIELDS = [
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "n",
    "stop",
    "stream",
    "max_completion_tokens",
]


def mutated(rng: random.Random) -> tuple[str, str, bytes, dict[str, str]]:
    """A request that is wrong in one or more ways (method, path, headers, body)."""
    path = rng.choice(
        ["/v1/completions"] * 4 + ["/v1/chat/completions"] * 4 + ["/v1/models", "/health", "/v1/../etc", "/%00"]
    )
    method = "POST" if rng.random() < 0.8 else rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
    body: dict[str, Any] = (
        {"prompt": "The list"} if "chat" not in path else {"messages": [{"role": "user", "content": "hi"}]}
    )
    for _ in range(rng.randint(1, 3)):
        field = rng.choice(FIELDS)
        body[field] = (
            rng.choice(VALUES) if rng.random() < 0.8 else [{"role": rng.choice(VALUES), "content": rng.choice(VALUES)}]
        )
    data = json.dumps(body).encode()
    kind = rng.random()
    if kind < 0.15:
        data = data[: rng.randint(0, len(data))]  # cut short JSON
    elif kind < 0.25:
        data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    types = ["application/json"] * 6 + [
        "application/json; charset=utf-8",
        "text/plain",
        "application/x-www-form-urlencoded",
    ]
    headers = {"Content-Type": rng.choice(types)}
    return method, path, data, headers


def test_generated_malformed_requests(server: EdgeropeServer) -> None:
    rng = random.Random(12)
    t0 = time.monotonic()
    seen: dict[int, int] = {}
    conn = http.client.HTTPConnection(*server.server_address, timeout=30)
    for i in range(300):
        method, path, data, headers = mutated(rng)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
        except (http.client.HTTPException, ConnectionError):
            conn.close()
            conn = http.client.HTTPConnection(*server.server_address, timeout=30)
            continue
        seen[resp.status] = seen.get(resp.status, 0) + 1
        assert resp.status < 500, (method, path, data[:200], payload[:300])
        if resp.status >= 400 and resp.getheader("content-type", "").startswith("application/json"):
            assert "message" in json.loads(payload)["error"]
        if resp.getheader("connection", "") == "close":
            conn.close()
            conn = http.client.HTTPConnection(*server.server_address, timeout=30)
        if i % 50 == 0:
            answers(server)
    conn.close()
    assert len(seen) >= 4 and seen.get(400, 0) > 50, seen
    assert time.monotonic() - t0 < 120
    answers(server)
