"""edgerope.runtime.native against the real llama.cpp runtime, on tiny GGUFs written here with gguf.GGUFWriter."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFValueType
from helpers.tiny_gguf import BOS, EOS, F32, tiny_vocab, write_tiny_gguf

from edgerope.errors import GGUFError, RuntimeConfigError
from edgerope.runtime.native import (
    LOGGER_NAME,
    ContextParams,
    FlashAttn,
    NativeContext,
    NativeModel,
    NativeSampler,
    RopeOverrides,
    ftype_id,
)

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("native") / "tiny.gguf")


@pytest.fixture(scope="module")
def model(tiny_gguf: Path):
    with NativeModel(tiny_gguf, cpu_only=True) as m:
        yield m


def params(**kw: Any) -> ContextParams:
    base: dict[str, Any] = dict(n_ctx=256, n_batch=256, n_threads=1, type_k=F32, type_v=F32, flash_attn=FlashAttn.OFF)
    return ContextParams(**{**base, **kw})


def random_tokens(n: int, n_vocab: int, seed: int = 0) -> list[int]:
    return [BOS] + np.random.default_rng(seed).integers(3, n_vocab, n - 1).tolist()


def test_import_is_cheap_and_lazy():
    code = "import sys, edgerope.runtime.native; print('llama_cpp' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_tokenize_spm_vocab_and_byte_fallback(model):
    """llama.cpp's SPM tokenizer on our vocab: '▁'-prefixed words, letters, byte pieces for the rest."""
    tokens, _, _ = tiny_vocab()
    index = {t: i for i, t in enumerate(tokens)}
    got = model.tokenize("hello wé", add_special=True)
    # expected from the vocab itself: BOS, ▁h e l l o, ▁w, then é as its two UTF-8 bytes
    want = [BOS] + [index[p] for p in ["\u2581h", "e", "l", "l", "o", "\u2581w", "<0xC3>", "<0xA9>"]]
    assert got == want
    assert model.tokenize("hello wé", add_special=False) == want[1:]
    assert model.detokenize(want[1:]) == "hello wé"
    assert model.n_vocab == len(tokens) and model.bos == BOS and model.eos == EOS and model.add_bos
    assert model.is_eog(EOS) and not model.is_eog(BOS)
    assert model.meta("general.name") == "edgerope-test-tiny"


def test_logits_all_positions_independent_of_batch_split(model):
    """One batch of 200 tokens vs chunks of 64, 7 and 1: same logits (f32 KV, no flash attention)."""
    ids = random_tokens(200, model.n_vocab)
    with NativeContext(model, params()) as ctx:
        ref = ctx.logits(ids)
        assert ctx.n_past == 200
    assert ref.shape == (200, model.n_vocab) and ref.dtype == np.float32 and np.isfinite(ref).all()
    assert np.abs(ref[1:] - ref[:-1]).max() > 0.1  # positions really differ
    for n_batch in (64, 7, 1):
        with NativeContext(model, params(n_batch=n_batch)) as ctx:
            got = ctx.logits(ids)
        err = float(np.abs(got - ref).max())
        assert err <= 1e-5, f"n_batch {n_batch}: max |d| {err:.2e}"


def test_appending_continues_the_sequence(model):
    """logits(a) then logits(b) on one context == the tail of logits(a + b); clear() restarts at 0."""
    ids = random_tokens(40, model.n_vocab, seed=1)
    with NativeContext(model, params()) as ctx:
        full = ctx.logits(ids)
        ctx.clear()
        assert ctx.n_past == 0
        head = ctx.logits(ids[:25])
        tail = ctx.logits(ids[25:])
    assert np.abs(np.concatenate([head, tail]) - full).max() <= 1e-5


def test_greedy_sampler_follows_argmax_and_is_deterministic(model):
    """llama.cpp's greedy chain picks the argmax of the logits at every step (checked by re-evaluation)."""
    prompt = random_tokens(12, model.n_vocab, seed=2)

    def run() -> list[int]:
        with NativeContext(model, params()) as ctx, NativeSampler.greedy() as sampler:
            ctx.decode(prompt)
            out = []
            for _ in range(16):
                out.append(sampler.sample(ctx))
                ctx.decode([out[-1]])
            return out

    first = run()
    assert run() == first
    with NativeContext(model, params()) as ctx:
        logits = ctx.logits(prompt + first)  # (12 + 16, V): row t predicts token t + 1
    want = logits[len(prompt) - 1 : -1].argmax(axis=1).tolist()
    assert first == want


def test_flash_attention_resolution_is_reported(model):
    with NativeContext(model, params(flash_attn=FlashAttn.ON)) as ctx:
        assert ctx.flash_attn
    with NativeContext(model, params()) as ctx:
        assert not ctx.flash_attn
    with NativeContext(model, params(flash_attn=FlashAttn.AUTO)) as ctx:
        assert ctx.flash_attn  # the CPU backend supports it, so AUTO turns it on


def test_context_overflow_and_bad_tokens_are_refused(model):
    with NativeContext(model, params(n_ctx=256)) as ctx:
        with pytest.raises(RuntimeConfigError, match="exceed the context"):
            ctx.logits(random_tokens(257, model.n_vocab))
        with pytest.raises(RuntimeConfigError, match="token ids must lie"):
            ctx.logits([BOS, model.n_vocab])
        assert ctx.n_past == 0


def test_close_is_idempotent_and_closed_handles_refuse(tiny_gguf):
    m = NativeModel(tiny_gguf, cpu_only=True)
    ctx = NativeContext(m, params())
    sampler = NativeSampler.greedy()
    m.close()  # closes the context made from it first
    assert ctx.closed and m.closed
    m.close()
    ctx.close()
    sampler.close()
    sampler.close()
    with pytest.raises(RuntimeConfigError, match="context has been closed"):
        ctx.logits([BOS])
    with pytest.raises(RuntimeConfigError, match="model has been closed"):
        m.tokenize("a", add_special=True)
    with pytest.raises(RuntimeConfigError, match="sampler has been closed"):
        sampler.reset()


def test_load_failure_is_a_typed_error_with_llama_cpp_reason(tmp_path):
    """A GGUF llama.cpp refuses (but does not abort on): wrong value type for a key."""
    bad = write_tiny_gguf(tmp_path / "bad.gguf", extra_kv={"llama.rope.freq_base": ("x", GGUFValueType.STRING)})
    with pytest.raises(GGUFError, match="could not load") as info:
        NativeModel(bad, cpu_only=True)
    assert "freq_base" in info.value.what  # llama.cpp's own reason is carried over


def test_logs_go_to_python_logging_not_stderr(model, caplog, capfd):
    """Nothing native reaches fd 2 at the default level; with DEBUG enabled, llama.cpp's lines are records."""
    capfd.readouterr()
    with NativeContext(model, params()) as ctx:
        ctx.logits([BOS, 5, 6])
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    with caplog.at_level(logging.DEBUG, logger=LOGGER_NAME):
        with NativeContext(model, params(n_ctx=512)):
            pass
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER_NAME]
    assert any(line.startswith("llama_context: n_ctx") and "512" in line for line in lines)
    assert all("\n" not in line for line in lines)  # fragments were joined into lines


def test_no_stderr_output_in_a_fresh_process(tiny_gguf):
    """Without any logging configuration a whole load/eval/free cycle prints nothing at all."""
    code = (
        "from edgerope.runtime.native import ContextParams, NativeContext, NativeModel\n"
        f"m = NativeModel({str(tiny_gguf)!r}, cpu_only=True)\n"
        "c = NativeContext(m, ContextParams(n_ctx=256, n_threads=1))\n"
        "print(c.logits([1, 5, 6]).shape)\n"
        "m.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stderr == ""
    assert out.stdout.strip() == "(3, 312)"


def test_ftype_names_map_to_binding_constants():
    import llama_cpp

    assert ftype_id("q4_k_m") == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M == 15
    assert ftype_id("Q8_0") == 7 and ftype_id("F32") == 0 and ftype_id("BF16") == 32
    with pytest.raises(RuntimeConfigError, match="Q4_K_M"):
        ftype_id("Q7_K")


def test_rope_overrides_reject_unknown_fields():
    with pytest.raises(RuntimeConfigError, match="yarn_beta_fats"):
        RopeOverrides.from_mapping({"yarn_beta_fats": 8})
    with pytest.raises(RuntimeConfigError, match="rope_scaling_type"):
        RopeOverrides.from_mapping({"rope_scaling_type": 7})
    ro = RopeOverrides.from_mapping({"yarn_beta_fast": 8, "yarn_orig_ctx": 256})
    assert ro.explicit() == {"yarn_beta_fast": 8.0, "yarn_orig_ctx": 256}
    assert RopeOverrides().explicit() == {}
