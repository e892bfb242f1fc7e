"""edgerope.chat_template: Hugging Face style templates render to the expected text; the sandbox and the limits
stop hostile templates; errors are TemplateError with the template line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgerope.chat_template import ChatTemplate, TemplateError, from_gguf, plain_prompt
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
    assert "limit" in info.value.what or "exceeds" in info.value.what
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
    with pytest.raises(TemplateError, match="recursed"):
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
    from edgerope.export import convert
    from edgerope.tiny import CHAT_TEMPLATE

    path = convert(make_tiny(), tmp_path / "t.gguf", outtype="f32").path
    t = from_gguf(path)
    assert t is not None and t.source == CHAT_TEMPLATE
    assert (t.bos_token, t.eos_token) == ("<s>", "</s>")
    assert t.render(MESSAGES[1:2]) == "<|user|>\nHi <b>&</b></s>\n<|assistant|>\n"
