"""edgerope.apps.server end to end on the tiny model's GGUF (random weights: the text is meaningless, the mechanics are
tested) with the official ``openai`` client and raw http.client: chat and text completions, streaming equal to
non-streaming (greedy) and to the runtime run directly, usage counts, stop strings (the request's and the plain
format's), the default max_tokens, 400s for malformed JSON, missing fields, too-long prompts, an API key, a client
disconnecting mid-stream, the bounded queue, /health, the CLI with JSON logs and SIGTERM."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.serving import serve_in_thread

from edgerope.apps.chat_template import PLAIN_STOPS, from_gguf
from edgerope.apps.server import EdgeropeServer, open_server
from edgerope.runtime.runtime import Runtime

openai = pytest.importorskip("openai", reason="the openai client is a dev dependency")

pytestmark = pytest.mark.llama
N_CTX = 256
OPTS: dict[str, Any] = {"n_ctx": N_CTX, "n_threads": 2, "backend": "cpu"}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    from edgerope.convert.export import convert
    from edgerope.models.tiny_random import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("server")
    ckpt = make_tiny_checkpoint(root / "tiny", tokenizer_dir=tiny_tokenizer_dir)
    return convert(ckpt, root / "tiny.gguf", outtype="f32").path


@pytest.fixture(scope="module")
def server(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeropeServer]:
    cache = tmp_path_factory.mktemp("server-cache")
    srv = open_server(
        gguf, port=0, model_id="tiny", cache_dir=cache, min_prefix_tokens=32, default_max_tokens=40, **OPTS
    )
    assert srv.server_address[0] == "127.0.0.1"
    thread = serve_in_thread(srv)
    yield srv
    srv.close()
    thread.join(10)
    assert not thread.is_alive() and srv.supervisor.state == "stopped"


@pytest.fixture(scope="module")
def rt(gguf: Path) -> Iterator[Runtime]:
    """The same model in this process: the reference for what the worker generates."""
    with Runtime.open(gguf, **OPTS) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def client(server: EdgeropeServer) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(server: EdgeropeServer, path: str, body: bytes | dict[str, Any]) -> tuple[int, dict[str, Any]]:
    host, port = server.server_address
    conn = http.client.HTTPConnection(host, port, timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out


def test_models_and_health(client: Any, server: EdgeropeServer) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    host, port = server.server_address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", "/health")
    resp = conn.getresponse()
    health = json.loads(resp.read())
    assert resp.status == 200 and health["status"] == "ok"
    assert health["worker"]["state"] == "ready" and health["worker"]["pid"] == server.supervisor.pid


def test_chat_non_streaming_and_streaming_agree(client: Any, gguf: Path, rt: Runtime) -> None:
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    assert full.choices[0].message.role == "assistant" and full.object == "chat.completion"
    # usage: the prompt is the GGUF's chat template rendered and tokenized as the runtime does it
    template = from_gguf(gguf)
    assert template is not None
    prompt = template.render(MESSAGES)
    assert prompt == "<|system|>\nBe brief.</s>\n<|user|>\nWhat is a list?</s>\n<|assistant|>\n"
    n_prompt = len(rt.tokenize(prompt, special=True))
    expected = rt.generate(rt.tokenize(prompt, special=True), max_tokens=24)
    assert full.usage.prompt_tokens == n_prompt
    assert full.usage.completion_tokens == len(expected.tokens)
    assert full.usage.total_tokens == n_prompt + len(expected.tokens)
    assert text == expected.text
    assert full.choices[0].finish_reason == ("length" if len(expected.tokens) == 24 else "stop")

    pieces, finish, usage = [], None, None
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, stream=True)
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                pieces.append(ch.delta.content)
            finish = ch.finish_reason or finish
    assert "".join(pieces) == text and len(pieces) > 1
    assert finish == full.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


def test_text_completions_and_stop_strings(client: Any, rt: Runtime) -> None:
    full = client.completions.create(model="tiny", prompt="The list", max_tokens=16)
    text = full.choices[0].text
    assert full.usage.prompt_tokens == len(rt.tokenize("The list"))
    assert text == rt.generate(rt.tokenize("The list"), max_tokens=16).text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model="tiny", prompt="The list", max_tokens=16, stream=True)
        if c.choices
    )
    assert streamed == text
    assert len(text) > 4, text
    stop = text[2:4]
    cut = client.completions.create(model="tiny", prompt="The list", max_tokens=16, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < full.usage.completion_tokens  # generation stopped, not just the text
    cut_stream = "".join(
        c.choices[0].text
        for c in client.completions.create(model="tiny", prompt="The list", max_tokens=16, stop=stop, stream=True)
        if c.choices
    )
    assert cut_stream == cut.choices[0].text


def test_default_max_tokens_is_bounded_not_the_rest_of_the_context(client: Any) -> None:
    r = client.completions.create(model="tiny", prompt="The list")  # no max_tokens: the server's default (40 here)
    assert r.usage.completion_tokens <= 40
    assert r.choices[0].finish_reason == "length" or r.usage.completion_tokens < 40


def test_sampling_seeded_and_top_p_tiny_is_greedy(client: Any) -> None:
    def text(**kw: Any) -> str:
        r = client.completions.create(model="tiny", prompt="The list", max_tokens=16, **kw)
        return r.choices[0].text

    greedy = text()
    a, b, c = text(temperature=1.5, seed=7), text(temperature=1.5, seed=7), text(temperature=1.5, seed=8)
    assert a == b and a != c and a != greedy  # same seed same text; the draw is random, not argmax
    assert text(temperature=1.5, top_p=1e-6, seed=9) == greedy  # top-p keeps only the most likely token
    streamed = "".join(
        ch.choices[0].text
        for ch in client.completions.create(
            model="tiny", prompt="The list", max_tokens=16, temperature=1.5, seed=7, stream=True
        )
        if ch.choices
    )
    assert streamed == a


def test_bad_requests_are_400_json(server: EdgeropeServer) -> None:
    status, body = post(server, "/v1/chat/completions", b'{"model": "tiny", "messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post(server, "/v1/chat/completions", {"model": "tiny"})
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = post(server, "/v1/chat/completions", {"messages": [{"content": "no role"}]})
    assert status == 400 and "role" in body["error"]["message"]
    status, body = post(server, "/v1/completions", {"prompt": "x", "max_tokens": "5"})
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, body = post(server, "/v1/chat/completions", {"messages": MESSAGES, "temperature": -1})
    assert status == 400 and body["error"]["param"] == "temperature"
    status, body = post(server, "/v1/chat/completions", {"messages": MESSAGES, "temperature": 1, "top_p": 0})
    assert status == 400 and "top_p" in body["error"]["message"]
    status, body = post(server, "/v1/chat/completions", {"messages": MESSAGES, "n": 2})
    assert status == 400 and body["error"]["param"] == "n"
    status, body = post(server, "/v1/nothing", {})
    assert status == 404


def test_too_long_prompt_is_400_never_truncated(server: EdgeropeServer, client: Any) -> None:
    long = " ".join(f"word{i}" for i in range(400))
    status, body = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": long}]})
    assert status == 400
    msg = body["error"]["message"]
    assert f"the context is {N_CTX} tokens" in msg and "truncated" in msg
    status, body = post(server, "/v1/completions", {"prompt": "hello", "max_tokens": N_CTX})
    assert status == 400 and body["error"]["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": long}], stream=True)
    assert client.models.list().data  # still serving


def test_client_disconnect_mid_stream_stops_generation(server: EdgeropeServer, client: Any) -> None:
    body = {"prompt": "The list", "max_tokens": 200, "stream": True}
    full = client.completions.create(model="tiny", prompt="The list", max_tokens=200)
    assert full.usage.completion_tokens == 200  # the seeded tiny model runs to max_tokens here
    host, port = server.server_address
    sock = socket.create_connection((host, port), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    got = b""
    while b"data: " not in got:  # the headers, then the first event
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, not a clean close
    sock.close()
    again = client.completions.create(model="tiny", prompt="The list", max_tokens=200)
    assert again.choices[0].text == full.choices[0].text  # the server still answers, unchanged


def hold_the_model(server: EdgeropeServer) -> Any:
    """Take the worker's turn from the test (as a running request would); returns a release function."""
    sup = server.supervisor
    assert sup._loop is not None and sup._turn is not None
    asyncio.run_coroutine_threadsafe(sup._turn.acquire(), sup._loop).result(10)
    return lambda: sup._loop.call_soon_threadsafe(sup._turn.release)


def test_bounded_queue_answers_429_and_requests_are_served_in_turn(server: EdgeropeServer, client: Any) -> None:
    app = server.app
    want = client.completions.create(model="tiny", prompt="The list", max_tokens=8).choices[0].text
    results: list[Any] = []
    old = app.limits
    app.limits = type(old)(**{**old.__dict__, "max_queue": 0})  # one request may be admitted
    release = hold_the_model(server)
    try:
        waiter = threading.Thread(
            target=lambda: results.append(client.completions.create(model="tiny", prompt="The list", max_tokens=8))
        )
        waiter.start()
        for _ in range(500):
            if app.waiting == 1:
                break
            threading.Event().wait(0.01)
        assert app.waiting == 1
        status, body = post(server, "/v1/completions", {"prompt": "The list", "max_tokens": 8})
        assert status == 429 and "busy" in body["error"]["message"]
        stream = {"prompt": "The list", "max_tokens": 8, "stream": True}
        status, body = post(server, "/v1/completions", stream)  # refused before any event is sent
        assert status == 429 and "busy" in body["error"]["message"]
        assert not results  # the waiting request has not run
    finally:
        release()
        app.limits = old
    waiter.join(30)
    assert results[0].choices[0].text == want and app.waiting == 0


def test_long_system_message_state_comes_from_the_document_cache(server: EdgeropeServer, client: Any) -> None:
    doc = "The red box holds seven keys and the blue box holds three coins. " * 6
    cache = Path(server.supervisor.config.cache_dir or "")
    files = set(cache.glob("*.erdoc"))

    def ask(question: str) -> Any:
        messages = [{"role": "system", "content": doc}, {"role": "user", "content": question}]
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=8)

    miss = ask("What is in the red box?")
    hit = ask("What is in the red box?")
    other = ask("And the blue one?")
    n_prefix = hit.usage.prompt_tokens_details.cached_tokens
    assert miss.usage.prompt_tokens_details.cached_tokens == 0 and n_prefix > 32
    assert other.usage.prompt_tokens_details.cached_tokens == n_prefix
    assert hit.choices[0].message.content == miss.choices[0].message.content
    assert hit.usage.prompt_tokens == miss.usage.prompt_tokens
    assert len(set(cache.glob("*.erdoc")) - files) == 1
    short = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert short.usage.prompt_tokens_details.cached_tokens == 0  # a short system message is not cached


def test_api_key(gguf: Path) -> None:
    srv = open_server(gguf, port=0, api_key="sekret", use_cache=False, **OPTS)
    thread = serve_in_thread(srv)
    try:
        base = srv.url + "/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=base, api_key="sekret", max_retries=0)
        assert ok.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2).usage.completion_tokens <= 2
    finally:
        srv.close()
        thread.join(10)


def test_runtime_request_is_validated_before_binding(gguf: Path) -> None:
    from edgerope.errors import RuntimeConfigError

    with pytest.raises(RuntimeConfigError):
        open_server(gguf, port=0, n_ctx=10**7, backend="cpu", use_cache=False)


def test_plain_chat_format_stops_at_the_next_role_marker(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    """A GGUF without a chat template gets the plain format; the reply ends where the model starts the next block."""
    from edgerope.convert.export import convert
    from edgerope.models.tiny_random import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "plain", tokenizer_dir=tiny_tokenizer_dir)
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    model = convert(ckpt, tmp_path / "plain.gguf", outtype="f32").path
    srv = open_server(model, port=0, use_cache=False, **OPTS)
    thread = serve_in_thread(srv)
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        # the reply as the raw continuation of the plain prompt, stopped only by the role markers
        prompt = "System: Be brief.\n\nUser: What is a list?\n\nAssistant:"
        raw = c.completions.create(model="m", prompt=prompt, max_tokens=120).choices[0].text
        chat = c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=120)
        reply = chat.choices[0].message.content
        marks = [raw.find(s) for s in PLAIN_STOPS if s in raw]
        assert reply == (raw[: min(marks)] if marks else raw)
        assert all(s not in reply for s in PLAIN_STOPS)
        forced = c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=120, stop=[raw[3:5]])
        assert (
            forced.choices[0].message.content == raw[: raw.find(raw[3:5])] and forced.choices[0].finish_reason == "stop"
        )
    finally:
        srv.close()
        thread.join(10)


def test_cli_serve_json_logs_and_sigterm(gguf: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    cmd = [sys.executable, "-c", "from edgerope.cli import main; main()", "serve", str(gguf), "--port", "0"]
    cmd += ["--ctx", str(N_CTX), "--threads", "2", "--backend", "cpu", "--json-logs", "--model-id", "cli"]
    cmd += ["--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stderr is not None
        first = json.loads(proc.stderr.readline())
        assert first["event"] == "listening" and first["url"].startswith("http://127.0.0.1:")
        client = openai.OpenAI(base_url=first["url"] + "/v1", api_key="x", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == ["cli"]
        client.completions.create(model="cli", prompt="Hi", max_tokens=3)
        logged = [json.loads(proc.stderr.readline()) for _ in range(2)]
        assert [(r["method"], r["path"], r["status"]) for r in logged] == [
            ("GET", "/v1/models", 200),
            ("POST", "/v1/completions", 200),
        ]
        assert logged[-1]["usage"]["completion_tokens"] <= 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert json.loads(proc.stderr.readlines()[-1])["event"] == "stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_bad_model_exit_2(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgerope.cli import cli

    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all")
    result = CliRunner().invoke(cli, ["serve", str(bad), "--port", "0"])
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output
