"""edgerope.apps.chat_template: Hugging Face style templates render to the expected text; the sandbox and the limits
stop hostile templates; errors are TemplateError with the template line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgerope.apps.chat_template import ChatTemplate, TemplateError, from_gguf, plain_prompt
from edgerope.errors import EdgeropeError

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi <b>&</b>"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
]

# A Llama-2 style template (system folded into the first user turn), written for this test.
LLAMA2 = """{% if messages[0]['role'] == 'system' %}
{% set system = messages[0]['content'] %}{% set rest = messages[1:] %}
{% else %}{% set system = none %}{% set rest = messages %}{% endif %}
{% for m in rest %}
{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('roles must alternate user/assistant') }}{% endif %}
{% if m['role'] == 'user' %}
{% if loop.first and system %}{{ bos_token + '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + m['content'] + ' [/INST]' }}{% else %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}{% endif %}
{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}
{% endfor %}"""

LLAMA2_EXPECTED = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi <b>&</b> [/INST] Hello. </s><s>[INST] Bye [/INST]"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}\n{% if add_generation_prompt %}\n{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CHATML_EXPECTED = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi <b>&</b><|im_end|>\n"
    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
)


def test_llama2_style_template() -> None:
    t = ChatTemplate(LLAMA2, bos_token="<s>", eos_token="</s>")
    assert t.render(MESSAGES) == LLAMA2_EXPECTED


def test_chatml_style_template_with_and_without_generation_prompt() -> None:
    t = ChatTemplate(CHATML)
    assert t.render(MESSAGES) == CHATML_EXPECTED
    assert t.render(MESSAGES, add_generation_prompt=False) == CHATML_EXPECTED.removesuffix("<|im_start|>assistant\n")


def test_tojson_strftime_namespace_and_loopcontrols() -> None:
    src = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'assistant' %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}|{{ tools | tojson }}|{{ strftime_now('%Y') }}"
    )
    out = ChatTemplate(src).render(MESSAGES, tools=[{"name": "f", "q": "<&é>"}])
    assert out == f'3|[{{"name": "f", "q": "<&é>"}}]|{time.strftime("%Y")}'


def test_raise_exception_is_a_template_error_with_the_line() -> None:
    t = ChatTemplate(LLAMA2, bos_token="<s>")
    with pytest.raises(TemplateError) as info:
        t.render([{"role": "assistant", "content": "x"}])
    assert "roles must alternate" in info.value.what
    assert info.value.where == "<template> line 5"  # the raise_exception line
    assert isinstance(info.value, EdgeropeError)


@pytest.mark.parametrize(
    "source,line",
    [("{% if %}", 1), ("ok\n{% for m in messages %}\n{{ m }", 3), ("{% endfor %}", 1)],
)
def test_syntax_errors(source: str, line: int) -> None:
    with pytest.raises(TemplateError) as info:
        ChatTemplate(source)
    assert "does not compile" in info.value.what and info.value.where == f"<template> line {line}"


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.__class__.__mro__[1].__subclasses__() }}",
        "{{ raise_exception.__globals__['os'] }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ lipsum.__globals__['os'].listdir('/') }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ messages.append(1) }}",
        "{{ open('/etc/passwd').read() }}",
        "{% include '/etc/passwd' %}",
        "{% import 'os' as os %}{{ os.listdir('/') }}",
        "{% from 'os' import system %}{{ system('id') }}",
    ],
)
def test_sandbox_blocks_files_imports_and_dunders(source: str) -> None:
    with pytest.raises(TemplateError) as info:
        ChatTemplate(source).render(MESSAGES)
    assert "root" not in info.value.what and "uid=" not in info.value.what


def test_dunder_attribute_is_undefined_not_the_object() -> None:
    assert ChatTemplate("[{{ ''.__class__ }}][{{ messages.__class__ }}]").render([]) == "[][]"


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'a' * 100000000 }}",
        "{{ 'a' | center(100000000) }}",
        "{{ 'ab' | indent(100000000, true) }}",
        "{% for i in range(99999) %}{{ 'xxxxxxxxxxxxxxxxxxxx' }}{% endfor %}",
        "{{ 2 ** 1000 ** 1000 }}",
        "{% set s = 'x' * 1000 %}{{ [s] * 100000 }}",
    ],
)
def test_oversize_output_stopped(source: str) -> None:
    t = ChatTemplate(source, max_output_chars=100_000)
    t0 = time.perf_counter()
    with pytest.raises(TemplateError) as info:
        t.render([])
    assert any(w in info.value.what for w in ("limit", "exceeds", "memory budget")), info.value.what
    assert time.perf_counter() - t0 < 2.0


def test_runaway_loop_and_recursion_stopped() -> None:
    loop = ChatTemplate(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", timeout_s=0.3
    )
    t0 = time.perf_counter()
    with pytest.raises(TemplateError, match="longer than 0.3 s"):
        loop.render([])
    assert time.perf_counter() - t0 < 1.5
    rec = ChatTemplate("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")
    with pytest.raises(TemplateError, match="recurses too deeply"):
        rec.render([])
    assert ChatTemplate(CHATML).render(MESSAGES) == CHATML_EXPECTED  # the tracer is gone afterwards


def test_template_size_limit_and_empty() -> None:
    with pytest.raises(TemplateError, match="above the limit"):
        ChatTemplate("x" * 1001, max_template_chars=1000)
    with pytest.raises(TemplateError, match="empty"):
        ChatTemplate("  ")


def test_plain_fallback() -> None:
    assert plain_prompt(MESSAGES[:2]) == "System: Be brief.\n\nUser: Hi <b>&</b>\n\nAssistant:"
    assert plain_prompt([{"role": "tool", "content": "1"}], add_generation_prompt=False) == "Tool: 1\n\n"


def test_from_gguf_reads_the_template_and_special_tokens(make_tiny, tmp_path: Path) -> None:
    from edgerope.convert.export import convert
    from edgerope.models.tiny_random import CHAT_TEMPLATE

    path = convert(make_tiny(), tmp_path / "t.gguf", outtype="f32").path
    t = from_gguf(path)
    assert t is not None and t.source == CHAT_TEMPLATE
    assert (t.bos_token, t.eos_token) == ("<s>", "</s>")
    assert t.render(MESSAGES[1:2]) == "<|user|>\nHi <b>&</b></s>\n<|assistant|>\n"


# ask() with the chat template (edgerope.apps.ask)


@pytest.fixture
def ask_models(make_tiny, tmp_path: Path) -> dict[str, Path]:
    """The tiny Llama as GGUF with its chat template, and without one."""
    import json

    from edgerope.convert.export import convert

    with_t = make_tiny()
    without = make_tiny()
    cfg = json.loads((without / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (without / "tokenizer_config.json").write_text(json.dumps(cfg))
    return {
        "chat": convert(with_t, tmp_path / "chat.gguf", outtype="f32").path,
        "plain": convert(without, tmp_path / "plain.gguf", outtype="f32").path,
    }


@pytest.mark.llama
def test_ask_uses_the_chat_template_and_caches_it(ask_models: dict[str, Path], tmp_path: Path) -> None:
    from edgerope.apps.ask import ask
    from edgerope.models.tiny_random import EOS_ID
    from edgerope.prompts import DOC_TEMPLATE, PLAIN_QA_FORMAT, QUESTION_TEMPLATE
    from edgerope.runtime.runtime import Runtime

    doc, question = "The red box holds seven keys. " * 8, "What does the red box hold?"
    model = ask_models["chat"]
    with Runtime.open(model, n_ctx=256, n_threads=2, backend="cpu") as rt:
        a = ask(model, doc, question, runtime=rt, cache_dir=tmp_path / "c", max_tokens=6)
        b = ask(model, doc, question, runtime=rt, cache_dir=tmp_path / "c", max_tokens=6)
        plain = ask(model, doc, question, runtime=rt, use_cache=False, max_tokens=6, prompt_format="plain")
        # the independent reference: the template rendered by hand for one user message, split at the question
        user = DOC_TEMPLATE.format(document=doc) + QUESTION_TEMPLATE.format(question=question)
        want = f"<|user|>\n{user}</s>\n<|assistant|>\n"
        prefix = want[: want.index("\nQuestion:")]
        doc_ids = rt.tokenize(prefix, special=True)
        q_ids = rt.tokenize(want[len(prefix) :], add_bos=False, special=True)
        ref = rt.generate(doc_ids + q_ids, max_tokens=6)
        as_text = rt.tokenize(want[len(prefix) :], add_bos=False)  # "</s>" as characters, not the EOS token
    assert EOS_ID in q_ids and len(q_ids) < len(as_text)
    assert a.prompt_format.startswith("chat-") and a.prompt_format == b.prompt_format
    assert plain.prompt_format == PLAIN_QA_FORMAT
    assert (a.document_tokens, a.question_tokens) == (len(doc_ids), len(q_ids))
    assert a.tokens == ref.tokens == b.tokens and not a.cached and b.cached
    assert plain.document_tokens != a.document_tokens


@pytest.mark.llama
def test_ask_without_a_template(ask_models: dict[str, Path]) -> None:
    from edgerope.apps.ask import ask
    from edgerope.errors import RuntimeConfigError
    from edgerope.prompts import PLAIN_QA_FORMAT

    opts = {"n_ctx": 256, "n_threads": 2, "backend": "cpu", "use_cache": False, "max_tokens": 2}
    assert ask(ask_models["plain"], "Some text.", "Which?", **opts).prompt_format == PLAIN_QA_FORMAT
    with pytest.raises(RuntimeConfigError, match="needs a chat template"):
        ask(ask_models["plain"], "Some text.", "Which?", prompt_format="chat", **opts)
    with pytest.raises(RuntimeConfigError, match="unknown prompt_format"):
        ask(ask_models["chat"], "Some text.", "Which?", prompt_format="jinja", **opts)


@pytest.mark.llama
def test_ask_cli_prompt_format(ask_models: dict[str, Path], tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from edgerope.cli import cli

    doc = tmp_path / "d.txt"
    doc.write_text("Some text about boxes.")
    args = ["ask", str(ask_models["chat"]), "--doc", str(doc), "-q", "Which?", "--ctx", "256", "--no-cache"]
    args += ["--threads", "2", "--max-tokens", "2", "--json"]
    formats = []
    for fmt in ("auto", "plain"):
        r = CliRunner().invoke(cli, [*args, "--prompt-format", fmt])
        assert r.exit_code == 0, r.output
        formats.append(json.loads(r.output)["prompt_format"])
    assert formats[0].startswith("chat-") and formats[1] == "plain-v1"


# hostile templates: memory, overflow, nesting (issue 12)

HOSTILE = [
    # memory that grows inside one render
    "{% set ns = namespace(s='xxxxxxxxxxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    "{% set ns = namespace(s='xxxxxxxxxxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "{{ '%0300000000d' % 1 }}",
    "{{ '%-300000000s' % 'x' }}",
    "{{ '%*d' % (300000000, 1) }}",
    "{{ '%0300000000d'|format(1) }}",
    "{{ '{:>300000000}'.format('x') }}",
    "{{ '{:0300000000d}'.format(1) }}",
    "{{ 'x'.ljust(300000000) }}",
    "{{ 'x'.center(300000000) }}",
    "{{ 'x'.zfill(300000000) }}",
    "{% set s = 'x' * 100000 %}{{ s.replace('x', s) }}",
    "{% set s = 'x' * 100000 %}{{ s|replace('x', s) }}",
    "{% set s = 'x' * 100000 %}{{ (s * 1)|join(s) }}",
    "{% set s = 'x' * 100000 %}{{ s.join([s] * 1000) }}",
    "{% set s = 'x' * 100000 %}{{ [s] * 1000|join }}",
    "{% set s = '\\n' * 100000 %}{{ s|indent(100000) }}",
    "{{ messages|tojson(indent=100000000) }}",
    "{{ lipsum(n=100000000) }}",
    # overflow and exceptions a template can provoke
    "{{ range(10**9)|list }}",
    "{% for i in range(10**9) %}{% endfor %}",
    "{{ 10**100000 }}",
    "{{ (10**4000)|string }}",
    "{{ 1/0 }}",
    "{{ {}['missing'] }}",
    "{{ [][5] }}",
    "{{ 'abc'|int(base=99) }}",
    "{{ 'x'|float + [] }}",
    "{{ messages|map('upper')|list }}",
    "{{ 1e308 * 1e308 * 0 }}",
]


@pytest.mark.parametrize("source", HOSTILE)
def test_hostile_templates_are_clean_refusals_within_budget(source: str) -> None:
    import resource

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    try:
        out = ChatTemplate(source).render(MESSAGES)
    except TemplateError as exc:
        assert exc.where and exc.where.startswith("<template>") and exc.fix, exc.message
    else:
        assert len(out) <= 4 << 20  # a render that succeeds stays within the output bound
    assert time.perf_counter() - t0 < 10
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024  # Linux: KiB
    assert grown_mib < 400, f"peak memory grew by {grown_mib:.0f} MiB"


def test_the_memory_budget_is_enforced_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Growth that no single operation shows (many moderate strings kept alive) still hits the budget, by the
    operating system's limit and by tracemalloc where that is not available."""
    from edgerope.apps import chat_template as module

    src = (
        "{% set ns = namespace(a='', b='', c='', d='', e='', f='', g='', h='') %}{% set s = 'x' * 1000000 %}"
        "{% for i in range(100) %}{% set ns.a = ns.a ~ s %}{% set ns.b = ns.b ~ s %}{% endfor %}{{ ns.a|length }}"
    )
    t = ChatTemplate(src, memory_bytes=32 << 20, max_output_chars=1 << 30)
    with pytest.raises(TemplateError, match="memory budget"):
        t.render([])
    monkeypatch.setattr(module, "_vm_data_bytes", lambda: None)  # no OS limit: tracemalloc measures
    with pytest.raises(TemplateError, match="memory budget"):
        t.render([])
    assert ChatTemplate(CHATML).render(MESSAGES) == CHATML_EXPECTED  # the limits are gone afterwards


@pytest.mark.parametrize(
    "source",
    [
        "{% if true %}" * 3000 + "x" + "{% endif %}" * 3000,
        "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
        "{% for a in messages %}" * 25 + "x" + "{% endfor %}" * 25,  # Python's static block limit
        "{{ " + "[" * 3000 + "]" * 3000 + " }}",
    ],
)
def test_deeply_nested_templates_fail_to_compile_cleanly(source: str) -> None:
    with pytest.raises(TemplateError) as info:
        ChatTemplate(source)
    assert "Traceback" not in info.value.message and info.value.where.startswith("<template>")


@pytest.mark.llama
def test_serve_refuses_a_bad_template_at_start_up_and_answers_400_for_a_failing_render(
    make_tiny, tmp_path: Path
) -> None:
    import json
    import threading

    import httpx
    from click.testing import CliRunner

    from edgerope.apps.server import open_server
    from edgerope.cli import cli
    from edgerope.convert.export import convert

    def model(template: str, name: str) -> Path:
        ckpt = make_tiny()
        cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
        cfg["chat_template"] = template
        (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
        return convert(ckpt, tmp_path / f"{name}.gguf", outtype="f32").path

    nested = model("{% if true %}" * 3000 + "x" + "{% endif %}" * 3000, "nested")
    r = CliRunner().invoke(cli, ["serve", str(nested), "--port", "0", "--no-cache"])
    assert r.exit_code == 2 and "template" in r.output and "Traceback" not in r.output, r.output
    broken = model("{{ 1/0 }}", "broken")  # compiles, cannot render anything
    r = CliRunner().invoke(cli, ["serve", str(broken), "--port", "0", "--no-cache"])
    assert r.exit_code == 2 and "ZeroDivisionError" in r.output and "Traceback" not in r.output, r.output
    # renders a probe conversation, fails on some messages: a 400 for those, the server goes on
    picky = model(
        "{% for m in messages %}{% if m.content == 'boom' %}{{ range(10**9)|list }}{% endif %}{{ m.content }}{% endfor %}",
        "picky",
    )
    srv = open_server(picky, port=0, use_cache=False, n_ctx=256, n_threads=2, backend="cpu")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            for _ in range(100):
                if c.get("/health").status_code == 200:
                    break
                time.sleep(0.05)
            bad = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "boom"}]})
            assert bad.status_code == 400 and "template" in bad.json()["error"]["message"]
            ok = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert ok.status_code == 200
    finally:
        srv.close()
        thread.join(10)
