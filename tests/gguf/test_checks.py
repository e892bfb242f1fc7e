"""Values llama.cpp aborts on or silently computes garbage from are refused before any native call, and ``inspect``
reports them as errors.

Each case writes the tiny llama GGUF with one metadata value changed.  The expectation comes from running each
file in llama.cpp itself (docs in ``edgerope.gguf.checks``): a GGML_ASSERT abort (NaN/negative epsilon), NaN or
degenerate logits (bad rope base, factor, attention factor, YaRN original context), or no layers at all.  A
subprocess test shows the request is refused cleanly where the process used to die.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
from gguf import GGUFValueType as T
from helpers.tiny_gguf import write_tiny_gguf

from edgerope.errors import GGUFError
from edgerope.gguf.checks import check_runnable, value_problems
from edgerope.gguf.reader import open_gguf

CASES = {
    "eps NaN": ("llama.attention.layer_norm_rms_epsilon", math.nan, "epsilon"),
    "eps negative": ("llama.attention.layer_norm_rms_epsilon", -1e-6, "epsilon"),
    "eps infinite": ("llama.attention.layer_norm_rms_epsilon", math.inf, "epsilon"),
    "freq_base NaN": ("llama.rope.freq_base", math.nan, "rope.freq_base"),
    "freq_base 0": ("llama.rope.freq_base", 0.0, "rope.freq_base"),
    "freq_base negative": ("llama.rope.freq_base", -1e4, "rope.freq_base"),
    "scaling factor NaN": ("llama.rope.scaling.factor", math.nan, "rope.scaling.factor"),
    "scaling factor negative": ("llama.rope.scaling.factor", -2.0, "rope.scaling.factor"),
    "attn_factor NaN": ("llama.rope.scaling.attn_factor", math.nan, "attn_factor"),
    "no layers": ("llama.block_count", 0, "block_count"),
    "2^31 layers": ("llama.block_count", 2**31, "block_count"),
    "zero heads": ("llama.attention.head_count", 0, "head counts"),
    "context 0": ("llama.context_length", 0, "context_length"),
    "odd rotary dims": ("llama.rope.dimension_count", 31, "dimension_count"),
    "2^31 rotary dims": ("llama.rope.dimension_count", 2**31, "dimension_count"),
}
OPTIONAL = {"llama.rope.scaling.factor", "llama.rope.scaling.attn_factor"}  # not written by default


def with_value(path: Path, key: str, value, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny GGUF with ``key`` set to ``value`` (the writer's value replaced as it is added)."""
    real = gguf.GGUFWriter.add_key_value

    def add(self, k, v, vtype, *a, **kw):
        return real(self, k, value if k == key else v, vtype, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "add_key_value", add)
        extra = {key: (value, T.FLOAT32 if isinstance(value, float) else T.UINT32)} if key in OPTIONAL else None
        return write_tiny_gguf(path, extra_kv=extra)


@pytest.mark.parametrize("case", CASES)
def test_refused_before_llama_cpp(case, tmp_path, monkeypatch):
    key, value, words = CASES[case]
    path = with_value(tmp_path / "bad.gguf", key, value, monkeypatch)
    with open_gguf(path) as f:
        problems = value_problems(f)
        assert any(words in p for p in problems), problems
        with pytest.raises(GGUFError, match="values llama.cpp cannot run"):
            check_runnable(f)


def test_a_good_file_has_no_problems(tmp_path):
    with open_gguf(write_tiny_gguf(tmp_path / "good.gguf")) as f:
        assert value_problems(f) == []
        assert check_runnable(f) == "llama"


def test_inspect_reports_them_as_errors(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from edgerope.cli import cli

    path = with_value(tmp_path / "bad.gguf", "llama.rope.freq_base", 0.0, monkeypatch)
    r = CliRunner().invoke(cli, ["inspect", str(path), "--json"])
    findings = json.loads(r.output)["findings"]
    assert any(f["code"] == "bad_value" and f["severity"] == "error" and "freq_base" in f["message"] for f in findings)


@pytest.mark.llama
def test_ask_refuses_where_llama_cpp_aborted(tmp_path, monkeypatch):
    """A NaN epsilon made the first decode abort the process (GGML_ASSERT, SIGABRT); now: exit 2 and a message."""
    path = with_value(tmp_path / "nan-eps.gguf", "llama.attention.layer_norm_rms_epsilon", math.nan, monkeypatch)
    doc = tmp_path / "doc.txt"
    doc.write_text("a b c")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEROPE_")}
    r = subprocess.run(
        [sys.executable, "-m", "edgerope", "ask", str(path), "--doc", str(doc), "-q", "what?", "--no-cache"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "epsilon" in r.stderr and "Traceback" not in r.stderr and "GGML_ASSERT(" not in r.stderr
