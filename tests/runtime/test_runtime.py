"""edgerope.runtime.runtime: preflight refusals before any native call, and the real llama.cpp runtime's mechanics.

Models: the project's tiny checkpoint converted by edgerope.convert.export (real SentencePiece vocab), and tiny
GGUFs written directly with gguf.GGUFWriter (test_native.write_tiny_gguf) for files the converter would
never produce.  Logits parity with PyTorch is tested elsewhere (tests of edgerope.evaluation.parity).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFValueType
from helpers.tiny_gguf import write_tiny_gguf

from edgerope.errors import GGUFError, RuntimeConfigError
from edgerope.runtime.native import supports_gpu_offload
from edgerope.runtime.plan import plan_memory
from edgerope.runtime.runtime import Runtime, plan_runtime

pytestmark = pytest.mark.llama

YARN_BETAS = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 256,
    "beta_fast": 16.0,
    "beta_slow": 2.0,
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> dict[str, Path]:
    """The tiny Llama (plain rope, context 256) and a YaRN x4 one with non-default betas, as f32 GGUFs."""
    from edgerope.convert.export import convert
    from edgerope.models.tiny_random import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("runtime")
    out = {}
    plain = make_tiny_checkpoint(root / "plain", tokenizer_dir=tiny_tokenizer_dir)
    out["plain"] = convert(plain, root / "plain.gguf", outtype="f32").path
    yarn = make_tiny_checkpoint(
        root / "yarn", tokenizer_dir=tiny_tokenizer_dir, rope_parameters=YARN_BETAS, max_position_embeddings=1024
    )
    out["yarn"] = convert(yarn, root / "yarn.gguf", outtype="f32", allow_runtime_rope=True).path
    out["tokenizer"] = tiny_tokenizer_dir / "tokenizer.model"
    return out


def open_rt(path: Path, **kw: Any) -> Runtime:
    kw.setdefault("n_threads", 1)
    kw.setdefault("backend", "cpu")
    return Runtime.open(path, **kw)


def random_tokens(n: int, n_vocab: int, seed: int = 0) -> list[int]:
    return [1] + np.random.default_rng(seed).integers(3, n_vocab, n - 1).tolist()


def rel_l2(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


# ---------------------------------------------------------------------------------------------------- preflight


@pytest.fixture(scope="module")
def refusal_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, dict[str, Any], str, str]]:
    """name -> (path, Runtime.open kwargs, error class name, message fragment); every one would reach llama.cpp."""
    d = tmp_path_factory.mktemp("refusals")
    good = write_tiny_gguf(d / "good.gguf", context_length=256)
    (d / "notes.txt").write_text("these are not the weights you are looking for\n")
    truncated = d / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: int(good.stat().st_size * 0.6)])
    head24 = write_tiny_gguf(d / "head24.gguf", hidden=48, n_head=2)  # head_dim 24
    f16_freqs = write_tiny_gguf(d / "f16freqs.gguf", extra_tensors={"rope_freqs.weight": np.ones(16, dtype=np.float16)})
    no_bytes = write_tiny_gguf(d / "nobytes.gguf", byte_pieces=False)
    dynamic = write_tiny_gguf(
        d / "dynamic.gguf", extra_kv={"llama.rope.scaling.type": ("dynamic", GGUFValueType.STRING)}
    )
    s = str
    return {
        "missing file": (s(d / "absent.gguf"), {}, "GGUFError", "no such file"),
        "not a GGUF": (s(d / "notes.txt"), {}, "GGUFError", "not a GGUF"),
        "truncated": (s(truncated), {}, "GGUFError", "truncated"),
        "n_ctx beyond context_length": (s(good), {"n_ctx": 512}, "RuntimeConfigError", "context_length 256"),
        "unknown cache type": (s(good), {"type_k": "q3_k"}, "RuntimeConfigError", "q8_0"),
        "quantized V without flash attention": (
            s(good),
            {"type_v": "q8_0", "flash_attn": "off"},
            "RuntimeConfigError",
            "needs flash attention",
        ),
        "head_dim 24 with q8_0 K": (s(head24), {"type_k": "q8_0"}, "RuntimeConfigError", "multiple of 32"),
        "head_dim 24 with q4_0 V": (s(head24), {"type_v": "q4_0"}, "RuntimeConfigError", "head size is 24"),
        "F16 rope_freqs": (s(f16_freqs), {}, "GGUFError", "rope_freqs.weight is F16"),
        "SentencePiece without byte pieces": (s(no_bytes), {}, "GGUFError", "byte pieces"),
        "unknown rope scaling type": (s(dynamic), {}, "GGUFError", "dynamic"),
        "unknown flash_attn": (s(good), {"flash_attn": "maybe"}, "RuntimeConfigError", "auto, on, off"),
        "unknown backend": (s(good), {"backend": "tpu"}, "RuntimeConfigError", "auto, cpu, gpu"),
        "unknown rope override": (s(good), {"rope_overrides": {"yarn_beta": 2}}, "RuntimeConfigError", "yarn_beta"),
        "n_ctx over the memory budget": (s(good), {"memory_budget": "1MiB"}, "RuntimeConfigError", "memory budget"),
    }


CASES = [
    "missing file", "not a GGUF", "truncated", "n_ctx beyond context_length", "unknown cache type",
    "quantized V without flash attention", "head_dim 24 with q8_0 K", "head_dim 24 with q4_0 V", "F16 rope_freqs",
    "SentencePiece without byte pieces", "unknown rope scaling type", "unknown flash_attn", "unknown backend",
    "unknown rope override", "n_ctx over the memory budget",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_preflight_refuses_with_typed_error(refusal_cases, case):
    path, kwargs, error, fragment = refusal_cases[case]
    kwargs = {"backend": "cpu", **kwargs}
    with pytest.raises((GGUFError, RuntimeConfigError)) as info:
        Runtime.open(path, **kwargs)
    assert type(info.value).__name__ == error
    assert fragment in info.value.message
    assert info.value.fix  # every refusal says what to do


def test_refusals_happen_before_llama_cpp_is_even_imported(refusal_cases):
    """In a fresh process every refusal is raised, the process survives, and llama_cpp was never loaded."""
    assert set(refusal_cases) == set(CASES)
    script = (
        "import json, sys\n"
        "from edgerope.runtime.runtime import Runtime\n"
        "from edgerope.errors import EdgeropeError\n"
        "cases = json.loads(sys.argv[1])\n"
        "seen = {}\n"
        "for name, (path, kwargs, _, _) in cases.items():\n"
        "    try:\n"
        "        Runtime.open(path, **{'backend': 'cpu', **kwargs})\n"
        "        seen[name] = 'opened'\n"
        "    except EdgeropeError as exc:\n"
        "        seen[name] = type(exc).__name__\n"
        "print(json.dumps({'seen': seen, 'llama_cpp': 'llama_cpp' in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(refusal_cases)], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout)
    assert result["seen"] == {name: case[2] for name, case in refusal_cases.items()}
    assert result["llama_cpp"] is False
    assert out.stderr == ""


def test_default_n_ctx_is_the_largest_that_fits_the_memory_budget(tmp_path):
    long = write_tiny_gguf(tmp_path / "long.gguf", context_length=8192)
    roomy = plan_runtime(long, backend="cpu", memory_budget="64GiB")
    assert roomy.n_ctx == 8192 and "context_length 8192" in roomy.n_ctx_source  # capped by the model
    budget = plan_memory(long, n_ctx=2048, memory_budget="64GiB").total_bytes  # exactly what 2048 needs
    tight = plan_runtime(long, backend="cpu", memory_budget=budget)
    assert tight.n_ctx == 2048 and "largest that fits" in tight.n_ctx_source
    assert tight.memory_plan is not None and tight.memory_plan.fits
    assert plan_runtime(long, backend="cpu", memory_budget=budget - 1).n_ctx == 1792
    q8 = plan_runtime(long, backend="cpu", memory_budget=budget, type_k="q8_0", type_v="q8_0")
    assert q8.n_ctx > 2048  # a smaller cache reaches further in the same budget
    short = write_tiny_gguf(tmp_path / "short.gguf", context_length=300)
    assert plan_runtime(short, backend="cpu").n_ctx == 300
    assert plan_runtime(short, backend="cpu", n_ctx=900, allow_extrapolation=True).n_ctx == 900


def test_requested_n_ctx_over_the_memory_budget_is_refused_with_the_planners_suggestion(tmp_path):
    long = write_tiny_gguf(tmp_path / "long.gguf", context_length=8192)
    budget = plan_memory(long, n_ctx=2048, memory_budget="64GiB").total_bytes
    largest = plan_memory(long, memory_budget=budget).largest_ctx
    with pytest.raises(RuntimeConfigError, match="over the memory budget") as info:
        plan_runtime(long, backend="cpu", n_ctx=4096, memory_budget=budget)
    fix = info.value.fix
    assert "n_ctx <= 2048 with the f16 cache" in fix
    assert f"q8_0 cache: n_ctx <= {largest['q8_0']['n_ctx']}" in fix
    assert f"q4_0 cache: n_ctx <= {largest['q4_0']['n_ctx']}" in fix
    assert plan_runtime(long, backend="cpu", n_ctx=2048, memory_budget=budget).n_ctx == 2048
    with pytest.raises(RuntimeConfigError, match="the smallest"):  # not even 256 fits: refused, not opened
        plan_runtime(long, backend="cpu", memory_budget="1MiB")


def test_gpu_backend_on_cpu_only_build_is_refused(converted):
    if supports_gpu_offload():
        pytest.skip("this llama.cpp build supports GPU offload")
    with pytest.raises(RuntimeConfigError, match="no GPU support"):
        Runtime.open(converted["plain"], backend="gpu")
    with open_rt(converted["plain"], backend="auto") as rt:
        assert rt.info.backend == "cpu" and not rt.info.gpu_offload_supported and rt.info.n_gpu_layers == 0


def test_longrope_beyond_original_context_warns(tmp_path, caplog):
    """llama.cpp picks LongRoPE's factor set from the allocated n_ctx, not the prompt (docs/llama_cpp.md pitfall 8)."""
    kv = {
        "llama.rope.scaling.type": ("longrope", GGUFValueType.STRING),
        "llama.rope.scaling.original_context_length": (256, GGUFValueType.UINT32),
        "llama.rope.scaling.attn_factor": (1.1, GGUFValueType.FLOAT32),
    }
    tensors = {
        "rope_factors_long.weight": np.linspace(1, 4, 16, dtype=np.float32),
        "rope_factors_short.weight": np.ones(16, dtype=np.float32),
    }
    path = write_tiny_gguf(tmp_path / "longrope.gguf", context_length=1024, extra_kv=kv, extra_tensors=tensors)
    with caplog.at_level(logging.WARNING, logger="edgerope.runtime.preflight"):
        inside = plan_runtime(path, backend="cpu", n_ctx=256)
    assert not caplog.records and not inside.notes
    assert inside.rope_function.freq_factors == tuple(np.ones(16))
    with caplog.at_level(logging.WARNING, logger="edgerope.runtime.preflight"):
        beyond = plan_runtime(path, backend="cpu", n_ctx=257)  # allocated as 512 (docs/llama_cpp.md pitfall 17)
    assert any("n_ctx 257 (allocated 512)" in r.getMessage() for r in caplog.records)
    assert any("docs/llama_cpp.md pitfall 8" in note for note in beyond.notes)
    assert beyond.rope_function.freq_factors == tuple(tensors["rope_factors_long.weight"].astype(float))


# ---------------------------------------------------------------------------------------------------- runtime


def test_info_describes_what_runs(converted):
    with open_rt(converted["plain"]) as rt:
        info = rt.info
    assert info.backend == "cpu" and info.architecture == "llama"
    assert info.n_ctx == info.n_ctx_train == 256 and info.n_ctx_allocated == 256
    assert (info.type_k, info.type_v) == ("f16", "f16")
    assert info.rope.startswith("plain rope, base 10000")
    assert info.kv_shift_exact and info.rope_overrides == {}
    assert "context_length 256" in info.n_ctx_source  # the default: the model's length fits the memory
    assert info.memory_planned_bytes is not None and info.memory_planned_bytes <= info.memory_budget_bytes
    assert info.kv_cache_bytes == 2 * 256 * (64 * 2 + 64 * 2)  # 2 layers x 256 cells x (K + V) of 1 head x 64, f16
    assert json.loads(json.dumps(info.to_dict()))["n_vocab"] == 1000


def test_tokenize_matches_sentencepiece(converted):
    """llama.cpp's tokenizer on the converted vocab gives exactly SentencePiece's ids, and decodes back."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(converted["tokenizer"]))
    probes = [
        "def f(x):\n    return x  # comment",
        "Two  spaces,\ttab and\nnewline",
        "accents: café naïve, CJK: 日本語, emoji: 🦙",
        "",
        "x" * 300,
    ]
    with open_rt(converted["plain"]) as rt:
        for text in probes:
            ids = rt.tokenize(text)
            assert ids == [sp.bos_id()] + sp.encode(text), text
            assert rt.tokenize(text, add_bos=False) == sp.encode(text)
            assert rt.detokenize(ids) == sp.decode(sp.encode(text))


def test_logits_same_in_one_batch_and_in_chunks(converted):
    ids = random_tokens(200, 1000)
    with open_rt(converted["plain"], type_k="f32", type_v="f32") as rt:
        assert not rt.info.flash_attn  # auto turns it off for f32 caches (it would compute in f16)
        ref = rt.logits(ids)
        again = rt.logits(ids)  # every call starts from an empty cache
    with open_rt(converted["plain"], type_k="f32", type_v="f32", n_batch=16) as rt:
        chunked = rt.logits(ids)
    assert ref.shape == (200, 1000) and np.isfinite(ref).all()
    assert np.array_equal(ref, again)
    assert np.abs(chunked - ref).max() <= 1e-5


def test_generate_is_greedy_deterministic_and_stops(converted):
    prompt = random_tokens(10, 1000, seed=3)
    with open_rt(converted["plain"], type_k="f32", type_v="f32") as rt:
        first = rt.generate(prompt, 12)
        assert rt.generate(prompt, 12) == first
        assert first.stop_reason == "length" and len(first.tokens) == 12
        assert first.text == rt.detokenize(first.tokens)
        logits = rt.logits(prompt + first.tokens)
        assert first.tokens == logits[len(prompt) - 1 : -1].argmax(axis=1).tolist()
        cut = rt.generate(prompt, 12, stop=[first.tokens[4]])
        k = first.tokens.index(first.tokens[4])
        assert cut.tokens == first.tokens[:k] and cut.stop_reason == "stop" and cut.stop_token == first.tokens[4]
        assert rt.generate(prompt, 0).tokens == []
        with pytest.raises(RuntimeConfigError, match="n_ctx 256"):
            rt.generate(random_tokens(300, 1000), 4)


def test_closed_runtime_refuses_and_close_is_idempotent(converted):
    rt = open_rt(converted["plain"])
    rt.close()
    rt.close()
    assert rt.closed and "closed" in repr(rt)
    for call in (lambda: rt.logits([1, 2]), lambda: rt.tokenize("a"), lambda: rt.info, lambda: rt.generate([1], 2)):
        with pytest.raises(RuntimeConfigError, match="has been closed"):
            call()


@pytest.mark.parametrize(("type_k", "type_v", "tolerance"), [("q8_0", "q8_0", 3e-2), ("bf16", "bf16", 2e-2)])
def test_quantized_and_bf16_caches_run(converted, type_k, type_v, tolerance):
    """q8_0 K+V (flash attention turned on by 'auto') and bf16 (ggml type 30) against the f32 cache."""
    ids = random_tokens(150, 1000, seed=4)
    with open_rt(converted["plain"], type_k="f32", type_v="f32") as rt:
        ref = rt.logits(ids)
    with open_rt(converted["plain"], type_k=type_k, type_v=type_v) as rt:
        assert rt.plan.type_k.id == {"q8_0": 8, "bf16": 30}[type_k]
        assert (rt.info.type_k, rt.info.type_v) == (type_k, type_v)
        if type_v == "q8_0":
            assert rt.info.flash_attn and any("V cache" in n for n in rt.info.notes)
        got = rt.logits(ids)
    err = rel_l2(got, ref)
    assert 0 < err < tolerance, f"{type_k}/{type_v}: rel L2 {err:.2e}"


def test_allow_extrapolation_opens_past_context_length(converted):
    with open_rt(converted["plain"], n_ctx=512, allow_extrapolation=True, type_k="f32", type_v="f32") as rt:
        assert rt.info.n_ctx == 512 and rt.info.n_ctx_train == 256
        assert np.isfinite(rt.logits(random_tokens(400, 1000))).all()


def test_yarn_betas_recorded_in_gguf_are_applied_at_run_time(converted):
    """llama.cpp ignores yarn_beta_* keys on llama (docs/llama_cpp.md pitfall 2): the runtime passes them, and it matters."""
    ids = random_tokens(600, 1000, seed=5)
    kw = dict(type_k="f32", type_v="f32", n_ctx=1024)
    with open_rt(converted["yarn"], **kw) as rt:
        assert rt.info.rope_overrides == {"yarn_beta_fast": 16.0, "yarn_beta_slow": 2.0}
        assert any("yarn_beta_fast=16" in n for n in rt.info.notes)
        assert rt.info.rope.startswith("yarn rope") and "betas 16/2" in rt.info.rope
        assert not rt.info.kv_shift_exact  # YaRN magnitude != 1 (docs/llama_cpp.md pitfall 15)
        auto = rt.logits(ids)
    with open_rt(converted["yarn"], rope_overrides={"yarn_beta_fast": 16, "yarn_beta_slow": 2}, **kw) as rt:
        explicit = rt.logits(ids)
    with open_rt(converted["yarn"], rope_overrides={"yarn_beta_fast": 32, "yarn_beta_slow": 1}, **kw) as rt:
        assert rt.info.rope_overrides == {"yarn_beta_fast": 32.0, "yarn_beta_slow": 1.0}  # the caller wins
        default_betas = rt.logits(ids)
    assert np.array_equal(auto, explicit)
    assert np.abs(default_betas - auto).max() > 1e-2  # the betas change the function


def test_shift_equals_reevaluation_on_linear_rope(tmp_path):
    """Magnitude 1 (linear x4): dropping cached positions and moving the rest down gives the logits of
    evaluating the kept tokens again (f32 KV).  One layer, so that the kept keys never saw the dropped
    tokens (in deeper layers they did, and a shift is then only close to re-evaluation); the same shift on
    a model with magnitude 1.5 is visibly wrong (docs/llama_cpp.md pitfall 15), so the comparison can fail."""
    linear = {
        "llama.rope.scaling.type": ("linear", GGUFValueType.STRING),
        "llama.rope.scaling.factor": (4.0, GGUFValueType.FLOAT32),
    }
    scaled = {**linear, "llama.rope.scaling.attn_factor": (1.5, GGUFValueType.FLOAT32)}
    errors = {}
    for name, kv in (("m=1", linear), ("m=1.5", scaled)):
        path = write_tiny_gguf(tmp_path / f"{name}.gguf", n_layer=1, context_length=1024, extra_kv=kv)
        with open_rt(path, n_ctx=256, type_k="f32", type_v="f32") as rt:
            ids = random_tokens(200, rt.n_vocab, seed=7)
            keep, drop, rest, new = ids[:20], ids[20:100], ids[100:160], ids[160:]
            ref = rt.logits(keep + rest + new)[-len(new) :]
            unshifted = rt.logits(keep + drop + rest + new)[-len(new) :]
            rt.logits(keep + drop + rest)
            if name == "m=1":
                assert rt.info.kv_shift_exact and "linear rope" in rt.info.rope and "factor 4" in rt.info.rope
                rt.shift(len(drop), n_keep=len(keep))
            else:
                assert not rt.info.kv_shift_exact
                rt._ctx.shift(n_keep=len(keep), n_discard=len(drop))  # what Runtime.shift refuses to do
            assert rt.n_past == len(keep) + len(rest)
            shifted = rt.logits(new, clear=False)
            with pytest.raises(RuntimeConfigError, match="cannot discard"):
                rt.shift(rt.n_past + 1) if name == "m=1" else rt._ctx.shift(n_keep=0, n_discard=rt.n_past + 1)
        errors[name] = float(np.abs(shifted - ref).max())
        assert np.abs(unshifted - ref).max() > 1e-3  # the dropped tokens mattered
    assert errors["m=1"] <= 1e-4, errors
    assert errors["m=1.5"] > 1e-2, errors


def test_shift_is_refused_for_yarn(converted):
    """YaRN's magnitude != 1: llama.cpp's shift would scale the cached keys twice (docs/llama_cpp.md pitfall 15)."""
    with open_rt(converted["yarn"], n_ctx=512) as rt:
        rt.logits(random_tokens(100, 1000))
        with pytest.raises(RuntimeConfigError, match="magnitude") as info:
            rt.shift(50, n_keep=1)
        assert "re-evaluate" in info.value.fix
        assert rt.n_past == 100  # the cache is untouched
