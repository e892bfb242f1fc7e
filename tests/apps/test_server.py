"""edgerope.apps.server end to end on the tiny model's GGUF (random weights: the text is meaningless, the mechanics are
tested) with the official ``openai`` client and raw http.client: chat and text completions, streaming equal to
non-streaming (greedy), usage counts against the runtime's tokenizer, stop strings, 400s for malformed JSON, missing
fields, too-long prompts and sampling requests, an API key, and a client disconnecting mid-stream."""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgerope.apps.chat_template import from_gguf
from edgerope.apps.server import EdgeropeServer, open_server

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


def _start(server: EdgeropeServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def server(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeropeServer]:
    cache = tmp_path_factory.mktemp("server-cache")
    srv = open_server(gguf, port=0, model_id="tiny", cache_dir=cache, min_prefix_tokens=32, **OPTS)
    assert srv.server_address[0] == "127.0.0.1"
    thread = _start(srv)
    yield srv
    srv.close()
    thread.join(5)
    assert not thread.is_alive() and srv.engine.runtime.closed


@pytest.fixture(scope="module")
def client(server: EdgeropeServer) -> Any:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _post(server: EdgeropeServer, path: str, body: bytes | dict[str, Any]) -> tuple[int, dict[str, Any]]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out


def test_models(client: Any) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_chat_non_streaming_and_streaming_agree(client: Any, gguf: Path, server: EdgeropeServer) -> None:
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    assert full.choices[0].message.role == "assistant" and full.object == "chat.completion"
    # usage: the prompt is the GGUF's chat template rendered and tokenized as the runtime does it
    template = from_gguf(gguf)
    assert template is not None
    prompt = template.render(MESSAGES)
    assert prompt == "<|system|>\nBe brief.</s>\n<|user|>\nWhat is a list?</s>\n<|assistant|>\n"
    rt = server.engine.runtime
    with server.engine._lock:
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


def test_text_completions_and_stop_strings(client: Any, server: EdgeropeServer) -> None:
    full = client.completions.create(model="tiny", prompt="The list", max_tokens=16)
    text = full.choices[0].text
    assert full.usage.prompt_tokens == len(server.engine.runtime.tokenize("The list"))
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
    cut_stream = "".join(
        c.choices[0].text
        for c in client.completions.create(model="tiny", prompt="The list", max_tokens=16, stop=stop, stream=True)
        if c.choices
    )
    assert cut_stream == cut.choices[0].text


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
    status, body = _post(server, "/v1/chat/completions", b'{"model": "tiny", "messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _post(server, "/v1/chat/completions", {"model": "tiny"})
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = _post(server, "/v1/chat/completions", {"messages": [{"content": "no role"}]})
    assert status == 400 and "role" in body["error"]["message"]
    status, body = _post(server, "/v1/completions", {"prompt": "x", "max_tokens": "5"})
    assert status == 400 and body["error"]["param"] == "max_tokens"
    status, body = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "temperature": -1})
    assert status == 400 and body["error"]["param"] == "temperature"
    status, body = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "temperature": 1, "top_p": 0})
    assert status == 400 and "top_p" in body["error"]["message"]
    status, body = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "n": 2})
    assert status == 400 and body["error"]["param"] == "n"
    status, body = _post(server, "/v1/nothing", {})
    assert status == 404


def test_too_long_prompt_is_400_never_truncated(server: EdgeropeServer, client: Any) -> None:
    long = " ".join(f"word{i}" for i in range(400))
    status, body = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": long}]})
    assert status == 400
    msg = body["error"]["message"]
    assert f"the context is {N_CTX} tokens" in msg and "nothing was truncated" in msg
    status, body = _post(server, "/v1/completions", {"prompt": "hello", "max_tokens": N_CTX})
    assert status == 400 and body["error"]["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": long}], stream=True)
    assert client.models.list().data  # still serving


def test_client_disconnect_mid_stream_stops_generation(server: EdgeropeServer, client: Any) -> None:
    body = {"prompt": "The list", "max_tokens": 200, "stream": True}
    full = client.completions.create(model="tiny", prompt="The list", max_tokens=200)
    rt = server.engine.runtime
    before = rt.n_evaluated
    host, port = server.server_address[:2]
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
    n_full = full.usage.prompt_tokens + full.usage.completion_tokens
    assert full.usage.completion_tokens == 200  # the seeded tiny model runs to max_tokens here
    n_cut = rt.n_evaluated - before - n_full  # what the disconnected request evaluated
    assert n_cut < n_full - 20, (n_cut, n_full)  # it stopped generating well before its end


def test_bounded_queue_answers_429_and_requests_are_serialised(server: EdgeropeServer, client: Any) -> None:
    engine = server.engine
    want = client.completions.create(model="tiny", prompt="The list", max_tokens=8).choices[0].text
    results: list[Any] = []
    old = engine.max_queue
    engine.max_queue = 0  # one request may wait while another runs
    try:
        with engine._lock:  # a running request holds the runtime
            waiter = threading.Thread(
                target=lambda: results.append(client.completions.create(model="tiny", prompt="The list", max_tokens=8))
            )
            waiter.start()
            for _ in range(500):
                if engine._waiting == 1:
                    break
                threading.Event().wait(0.01)
            assert engine._waiting == 1
            status, body = _post(server, "/v1/completions", {"prompt": "The list", "max_tokens": 8})
            assert status == 429 and "busy" in body["error"]["message"]
            stream = {"prompt": "The list", "max_tokens": 8, "stream": True}
            status, body = _post(server, "/v1/completions", stream)  # refused before any event is sent
            assert status == 429 and "busy" in body["error"]["message"]
            assert not results  # the waiting request has not run
        waiter.join(30)
    finally:
        engine.max_queue = old
    assert results[0].choices[0].text == want and engine._waiting == 0


def test_long_system_message_state_comes_from_the_document_cache(server: EdgeropeServer, client: Any) -> None:
    doc = "The red box holds seven keys and the blue box holds three coins. " * 6
    rt = server.engine.runtime
    cache = server.engine.cache
    assert cache is not None
    files = set(cache.entries())

    def ask(question: str) -> tuple[Any, int]:
        before = rt.n_evaluated
        messages = [{"role": "system", "content": doc}, {"role": "user", "content": question}]
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8)
        return r, rt.n_evaluated - before

    miss, n_miss = ask("What is in the red box?")
    hit, n_hit = ask("What is in the red box?")
    other, n_other = ask("And the blue one?")
    n_prefix = hit.usage.prompt_tokens_details.cached_tokens
    assert miss.usage.prompt_tokens_details.cached_tokens == 0 and n_prefix > 32
    assert other.usage.prompt_tokens_details.cached_tokens == n_prefix
    assert hit.choices[0].message.content == miss.choices[0].message.content
    assert hit.usage.prompt_tokens == miss.usage.prompt_tokens
    decodes = hit.usage.completion_tokens - (hit.choices[0].finish_reason == "length")  # the last pick is not run
    assert n_miss == miss.usage.prompt_tokens + decodes
    assert n_hit == hit.usage.prompt_tokens - n_prefix + decodes  # the system message was restored, not evaluated
    assert n_other < other.usage.prompt_tokens
    assert len(set(cache.entries()) - files) == 1
    # a short system message is not cached
    short = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert short.usage.prompt_tokens_details.cached_tokens == 0


def test_api_key(gguf: Path) -> None:
    srv = open_server(gguf, port=0, api_key="sekret", use_cache=False, **OPTS)
    thread = _start(srv)
    try:
        base = srv.url + "/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=base, api_key="sekret", max_retries=0)
        assert ok.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2).usage.completion_tokens <= 2
    finally:
        srv.close()
        thread.join(5)
    assert srv.engine.runtime.closed


def test_runtime_request_is_validated_before_binding(gguf: Path) -> None:
    from edgerope.errors import RuntimeConfigError

    with pytest.raises(RuntimeConfigError):
        open_server(gguf, port=0, n_ctx=10**7, backend="cpu")


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
        assert proc.wait(timeout=20) == 0
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
