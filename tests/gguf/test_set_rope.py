"""set_rope: metadata changes exactly as planned, tensor bytes identical, input untouched, refusals, bad input.

Files are read back with gguf's own ``GGUFReader`` (not edgerope.gguf.reader) so the checks do not
trust the code under test; the end-to-end test runs a set-rope'd tiny model in the real llama.cpp
runtime against transformers with the same weights and the target rope config.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFValueType as VT
from gguf import Keys
from helpers.any_gguf import write_gguf

import edgerope.gguf.set_rope as set_rope_module
from edgerope.cli import cli
from edgerope.errors import EdgeropeError, GGUFError, OutputError, RopeConfigError, UnsupportedRopeError
from edgerope.gguf.inspect import inspect_gguf
from edgerope.gguf.set_rope import set_rope
from edgerope.rope.scaling import Linear

U32, F32, STR, BOOL = VT.UINT32, VT.FLOAT32, VT.STRING, VT.BOOL
T, FACTOR, ORIG = Keys.Rope.SCALING_TYPE, Keys.Rope.SCALING_FACTOR, Keys.Rope.SCALING_ORIG_CTX_LEN


def read(path: Path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> (type, shape, sha256 of its bytes)) via gguf's stock reader."""
    r = gguf.GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {
        t.name: (int(t.tensor_type), tuple(int(d) for d in t.shape), hashlib.sha256(t.data.tobytes()).hexdigest())
        for t in r.tensors
    }
    return kv, tensors


def file_state(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- what gets written


def test_yarn_on_an_unscaled_llama_changes_exactly_the_planned_keys(tmp_path):
    src = write_gguf(tmp_path / "in.gguf", ctx=4096)
    before = file_state(src)
    kv_in, t_in = read(src)
    report = set_rope(src, tmp_path / "out.gguf", rope_type="yarn", factor=4)
    kv_out, t_out = read(tmp_path / "out.gguf")
    want = {
        "llama.context_length": 16384,
        "llama.rope.dimension_count": 64,
        "llama.rope.scaling.type": "yarn",
        "llama.rope.scaling.factor": 4.0,
        "llama.rope.scaling.original_context_length": 4096,
    }
    assert report.changed_keys == want and report.removed_keys == [] and report.removed_tensors == []
    assert kv_out == {**kv_in, **want}
    assert t_out == t_in  # names, types, shapes and the sha256 of every tensor's bytes
    assert list(t_out) == list(t_in)
    assert file_state(src) == before and leftovers(tmp_path) == []
    assert (
        report.verified
        and report.context_length == 16384
        and report.tensor_bytes == sum(t.n_bytes for t in gguf.GGUFReader(src).tensors)
    )
    r = inspect_gguf(tmp_path / "out.gguf")
    assert r.rope.n_ctx_orig == 4096 and r.rope.factor == pytest.approx(4) and r.rope.ext_factor == 1.0


def test_qwen25_yarn_128k(tmp_path):
    src = write_gguf(tmp_path / "qwen.gguf", "qwen2", ctx=32768, vocab="gpt2", n_vocab=200)
    kv_in, _ = read(src)
    kv_in["qwen2.rope.freq_base"] = 1e6
    report = set_rope(src, tmp_path / "q128k.gguf", rope_type="yarn", factor=4, original_context=32768, freq_base=1e6)
    kv_out, _ = read(tmp_path / "q128k.gguf")
    assert report.context_length == 131072
    assert kv_out["qwen2.context_length"] == 131072 and kv_out["qwen2.rope.scaling.original_context_length"] == 32768
    assert kv_out["qwen2.rope.freq_base"] == 1e6
    r = inspect_gguf(tmp_path / "q128k.gguf")
    assert r.rope.rotation == "NEOX" and r.rope.magnitude == pytest.approx(1 + 0.1 * math.log(4))
    assert {f.code for f in r.findings} == {"kv_shift_magnitude"}


def test_mixed_tensor_types_alignment_and_byte_order_survive(tmp_path):
    bf16 = gguf.quants.quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32), gguf.GGMLQuantizationType.BF16)
    extra = {"x.bf16": (bf16, gguf.GGMLQuantizationType.BF16), "x.odd": np.arange(7, dtype=np.float32)}
    for endian in (gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG):
        src = write_gguf(tmp_path / f"in{endian}.gguf", tensors=extra, alignment=64, endian=endian)
        out = tmp_path / f"out{endian}.gguf"
        set_rope(src, out, rope_type="linear", factor=2)
        kv_in, t_in = read(src)
        kv_out, t_out = read(out)
        assert t_out == t_in and kv_out["general.alignment"] == 64
        assert kv_out["llama.rope.scaling.type"] == "linear" and kv_out["llama.context_length"] == 8192
        assert all(t.data_offset % 64 == 0 for t in gguf.GGUFReader(out).tensors)
        assert gguf.GGUFReader(out).endianess == gguf.GGUFReader(src).endianess


def test_stale_scaling_keys_are_removed(tmp_path):
    kv = {
        T: ("yarn", STR),
        FACTOR: (4.0, F32),
        ORIG: (4096, U32),
        Keys.Rope.SCALING_FINETUNED: (True, BOOL),
        Keys.Rope.SCALING_YARN_BETA_FAST: (32.0, F32),
        Keys.Rope.SCALING_ATTN_FACTOR: (0.9, F32),
    }
    src = write_gguf(tmp_path / "y.gguf", ctx=16384, kv=kv)
    kv_in, t_in = read(src)
    report = set_rope(src, tmp_path / "lin.gguf", rope_type="linear", factor=2)
    kv_out, t_out = read(tmp_path / "lin.gguf")
    gone = [
        "llama.rope.scaling.attn_factor",
        "llama.rope.scaling.finetuned",
        "llama.rope.scaling.original_context_length",
        "llama.rope.scaling.yarn_beta_fast",
    ]
    assert report.removed_keys == gone and not set(gone) & set(kv_out)
    assert kv_out["llama.rope.scaling.type"] == "linear" and kv_out["llama.rope.scaling.factor"] == 2.0
    assert kv_out["llama.context_length"] == 8192  # 2 x the recorded original 4096
    assert t_out == t_in

    set_rope(src, tmp_path / "none.gguf", rope_type="none")
    kv_none, _ = read(tmp_path / "none.gguf")
    assert kv_none["llama.context_length"] == 4096
    assert not [k for k in kv_none if k.startswith("llama.rope.scaling.")]
    assert inspect_gguf(tmp_path / "none.gguf").rope.summary.startswith("plain RoPE")


def test_stale_frequency_factor_tensors_are_removed_and_reported(tmp_path):
    ff = np.array([1.0] * 10 + [8.0] * 22, np.float32)
    src = write_gguf(tmp_path / "l3.gguf", ctx=131072, tensors={"rope_freqs.weight": ff})
    with pytest.raises(RopeConfigError, match="does not record its original context"):
        set_rope(src, tmp_path / "out.gguf", rope_type="yarn", factor=16)
    report = set_rope(src, tmp_path / "out.gguf", rope_type="yarn", factor=16, original_context=8192)
    _, t_in = read(src)
    _, t_out = read(tmp_path / "out.gguf")
    assert report.removed_tensors == ["rope_freqs.weight"] and any(
        "removed rope_freqs.weight" in n for n in report.notes
    )
    assert t_out == {k: v for k, v in t_in.items() if k != "rope_freqs.weight"}
    assert inspect_gguf(tmp_path / "out.gguf").rope.freq_factors is None


def test_ntk_by_factor_and_by_base(tmp_path):
    src = write_gguf(tmp_path / "in.gguf", ctx=4096)
    set_rope(src, tmp_path / "a.gguf", rope_type="ntk", factor=4)
    kv, _ = read(tmp_path / "a.gguf")
    assert kv["llama.rope.freq_base"] == pytest.approx(10000 * 4 ** (64 / 62), rel=1e-6)  # b * alpha^(d/(d-2))
    assert kv["llama.context_length"] == 16384 and "llama.rope.scaling.type" not in kv
    set_rope(src, tmp_path / "b.gguf", rope_type="ntk", freq_base=500000.0)
    kv, _ = read(tmp_path / "b.gguf")
    assert kv["llama.rope.freq_base"] == 500000.0 and kv["llama.context_length"] == 4096


def test_yarn_attention_factor_is_stored_the_way_llama_reads_it(tmp_path):
    src = write_gguf(tmp_path / "in.gguf", ctx=4096)
    set_rope(src, tmp_path / "a.gguf", rope_type="yarn", factor=4, attn_factor=1.0)
    kv, _ = read(tmp_path / "a.gguf")
    assert kv["llama.rope.scaling.attn_factor"] == pytest.approx(1 / (1 + 0.1 * math.log(4)), rel=1e-6)
    r = inspect_gguf(tmp_path / "a.gguf")
    assert r.rope.magnitude == pytest.approx(1.0, rel=1e-6) and "kv_shift_magnitude" not in {f.code for f in r.findings}


def test_grok_stores_the_betas_it_reads(tmp_path):
    src = write_gguf(tmp_path / "grok.gguf", "grok", ctx=8192)
    set_rope(src, tmp_path / "g.gguf", rope_type="yarn", factor=4, beta_fast=16, beta_slow=2)
    kv, _ = read(tmp_path / "g.gguf")
    assert kv["grok.rope.scaling.yarn_beta_fast"] == 16.0 and kv["grok.rope.scaling.yarn_beta_slow"] == 2.0
    r = inspect_gguf(tmp_path / "g.gguf")
    assert (r.rope.beta_fast, r.rope.beta_slow) == (16.0, 2.0)


def test_in_place_replaces_only_after_verification(tmp_path):
    src = write_gguf(tmp_path / "m.gguf", ctx=4096)
    os.chmod(src, 0o640)
    _, t_in = read(src)
    report = set_rope(src, rope_type="yarn", factor=2, in_place=True)
    kv, t_out = read(src)
    assert report.in_place and report.output == str(src)
    assert kv["llama.rope.scaling.type"] == "yarn" and kv["llama.context_length"] == 8192
    assert t_out == t_in and (src.stat().st_mode & 0o777) == 0o640 and leftovers(tmp_path) == []


def test_progress_reports_every_tensor_byte(tmp_path):
    src = write_gguf(tmp_path / "in.gguf")
    calls: list[tuple[int, int]] = []
    report = set_rope(
        src, tmp_path / "o.gguf", rope_type="linear", factor=2, progress=lambda d, t: calls.append((d, t))
    )
    assert calls and calls[-1] == (report.tensor_bytes, report.tensor_bytes)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


# --------------------------------------------------------------------------- refusals


REFUSALS: dict[str, tuple[dict, type[EdgeropeError], str]] = {
    "yarn factor 1": ({"rope_type": "yarn", "factor": 1.0}, RopeConfigError, "must be > 1"),
    "linear factor 0.5": ({"rope_type": "linear", "factor": 0.5}, RopeConfigError, "must be > 1"),
    "yarn without factor": ({"rope_type": "yarn"}, RopeConfigError, "needs --factor"),
    "original >= context": (
        {"rope_type": "yarn", "factor": 4, "original_context": 4096, "context_length": 4096},
        RopeConfigError,
        "must be smaller than the context length",
    ),
    "unknown type": ({"rope_type": "dynamic", "factor": 2}, RopeConfigError, "unknown rope type"),
    "yarn betas on llama": (
        {"rope_type": "yarn", "factor": 4, "beta_fast": 8, "beta_slow": 2},
        UnsupportedRopeError,
        "ignores the yarn_beta_\\* keys",
    ),
    "attn factor with linear": ({"rope_type": "linear", "factor": 2, "attn_factor": 1.0}, RopeConfigError, "YaRN only"),
    "ntk without factor or base": ({"rope_type": "ntk"}, RopeConfigError, "--factor"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_leave_nothing_behind(tmp_path, case):
    kwargs, exc_type, phrase = REFUSALS[case]
    src = write_gguf(tmp_path / "in.gguf", ctx=4096)
    before = file_state(src)
    with pytest.raises(exc_type, match=phrase) as exc:
        set_rope(src, tmp_path / "out.gguf", **kwargs)
    assert exc.value.fix or exc.value.where
    assert not (tmp_path / "out.gguf").exists() and leftovers(tmp_path) == []
    assert file_state(src) == before


def test_beta_refusal_explains_the_runtime_alternative(tmp_path):
    src = write_gguf(tmp_path / "in.gguf")
    with pytest.raises(UnsupportedRopeError) as exc:
        set_rope(src, tmp_path / "out.gguf", rope_type="yarn", factor=4, beta_fast=8, beta_slow=2)
    assert "yarn-beta-fast" in exc.value.fix


def test_arch_specific_refusals(tmp_path):
    ds = write_gguf(tmp_path / "ds.gguf", "deepseek2", weights=False)
    with pytest.raises(UnsupportedRopeError):
        set_rope(ds, tmp_path / "o1.gguf", rope_type="yarn", factor=4)
    g4 = write_gguf(
        tmp_path / "g4.gguf", "gemma4", weights=False, tensors={"rope_freqs.weight": np.ones(32, np.float32)}
    )
    with pytest.raises(UnsupportedRopeError, match="part of the 'gemma4' architecture"):
        set_rope(g4, tmp_path / "o2.gguf", rope_type="yarn", factor=4)
    assert leftovers(tmp_path) == [] and not (tmp_path / "o1.gguf").exists()


def test_output_path_rules(tmp_path):
    src = write_gguf(tmp_path / "in.gguf")
    out = tmp_path / "out.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists"):
        set_rope(src, out, rope_type="linear", factor=2)
    assert out.read_bytes() == b"keep me"
    set_rope(src, out, rope_type="linear", factor=2, force=True)
    assert read(out)[0]["llama.rope.scaling.factor"] == 2.0
    with pytest.raises(OutputError, match="use --in-place"):
        set_rope(src, src, rope_type="linear", factor=2, force=True)
    with pytest.raises(OutputError, match="no output file"):
        set_rope(src, None, rope_type="linear", factor=2)
    with pytest.raises(OutputError, match="does not exist"):
        set_rope(src, tmp_path / "nope" / "o.gguf", rope_type="linear", factor=2)


def test_a_failed_verification_deletes_the_output(tmp_path, monkeypatch):
    # fault injection: the verifier reports a mismatch; nothing may be left and the input must survive
    src = write_gguf(tmp_path / "in.gguf")
    before = file_state(src)

    def failing_verify(*args, **kwargs):
        raise OutputError("verification of the written file failed: injected")

    monkeypatch.setattr(set_rope_module, "_verify", failing_verify)
    for kwargs in ({"out_path": tmp_path / "o.gguf"}, {"in_place": True}):
        with pytest.raises(OutputError, match="injected"):
            set_rope(src, rope_type="linear", factor=2, **kwargs)
        assert not (tmp_path / "o.gguf").exists() and leftovers(tmp_path) == [] and file_state(src) == before


def _corrupt_copy(monkeypatch, kind: str) -> None:
    """set-rope's kernel copy replaced by a faulty one: ``shifted`` copies from one byte later (an off-by-one,
    the realistic bug), ``flip`` flips the middle byte of each copied piece (a silent corruption
    that sampled blocks may miss)."""

    def faulty(s, d, offset, count):
        chunk = bytearray(os.pread(s, count, offset))
        if kind == "shifted":
            return os.write(d, (os.pread(s, len(chunk), offset + 1) + b"\0")[: len(chunk)])
        if len(chunk) >= 64:
            chunk[len(chunk) // 2] ^= 0xFF
        return os.write(d, bytes(chunk))

    monkeypatch.setattr(set_rope_module, "copy_range", faulty)


@pytest.mark.parametrize(
    ("kind", "full_verify"),
    [("shifted", False), ("shifted", True), ("flip", True)],
    ids=["shift", "shift-full", "flip-full"],
)
def test_a_faulty_copy_is_caught_and_nothing_is_left(tmp_path, monkeypatch, kind, full_verify):
    """A copy that shifts tensor bytes fails set-rope's sampled comparison; one flipped byte fails --full-verify;
    either way the output is removed and the input is untouched."""
    src = write_gguf(tmp_path / "in.gguf")
    before = file_state(src)
    _corrupt_copy(monkeypatch, kind)
    for kwargs in ({"out_path": tmp_path / "o.gguf"}, {"in_place": True}):
        with pytest.raises(OutputError, match="differ"):
            set_rope(src, rope_type="linear", factor=2, full_verify=full_verify, **kwargs)
        assert not (tmp_path / "o.gguf").exists() and leftovers(tmp_path) == [] and file_state(src) == before


# --------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (lambda good: good[: len(good) - 100], "truncated"),
        (lambda good: b"<!doctype html><html>404</html>", "HTML page"),
        (lambda good: good[:24] + b"\xff" * 16 + good[40:], "corrupt"),
    ],
)
def test_cli_bad_input_exits_2_without_output(tmp_path, content, phrase):
    good = write_gguf(tmp_path / "good.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content(good))
    out = tmp_path / "out.gguf"
    res = CliRunner().invoke(cli, ["set-rope", str(bad), "-o", str(out), "--type", "yarn", "--factor", "4"])
    assert res.exit_code == 2, res.output
    assert phrase in res.output and "Traceback" not in res.output
    assert not out.exists() and leftovers(tmp_path) == []


def test_cli_text_and_json(tmp_path):
    src = write_gguf(tmp_path / "in.gguf", ctx=4096)
    runner = CliRunner()
    res = runner.invoke(cli, ["set-rope", str(src), "-o", str(tmp_path / "a.gguf"), "--type", "yarn", "--factor", "4"])
    assert res.exit_code == 0, res.output
    assert "llama.rope.scaling.type = yarn" in res.output and "verified" in res.output
    args = ["set-rope", str(src), "-o", str(tmp_path / "b.gguf"), "--type", "linear", "--factor", "2", "--json"]
    res = runner.invoke(cli, args)
    data = json.loads(res.output)
    assert data["verified"] and data["changed_keys"]["llama.rope.scaling.factor"] == 2.0
    res = runner.invoke(cli, args)  # exists now
    assert res.exit_code == 2 and json.loads(res.output)["error"] == "OutputError"
    res = runner.invoke(cli, ["set-rope", str(src), "--type", "linear", "--factor", "2", "--in-place"])
    assert res.exit_code == 0 and read(src)[0]["llama.rope.scaling.type"] == "linear"


def test_cli_unknown_type_is_a_usage_error(tmp_path):
    src = write_gguf(tmp_path / "in.gguf")
    res = CliRunner().invoke(cli, ["set-rope", str(src), "-o", str(tmp_path / "o.gguf"), "--type", "llama3"])
    assert res.exit_code == 2 and "Invalid value for '--type'" in res.output


def test_unreadable_input_raises_gguf_error(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        set_rope(tmp_path / "missing.gguf", tmp_path / "o.gguf", rope_type="none")


# --------------------------------------------------------------------------- real llama.cpp


@pytest.mark.llama
def test_set_rope_model_runs_in_llama_cpp_like_transformers_with_the_target_rope(make_tiny):
    """A plain tiny Llama converted to GGUF, then set-rope'd to YaRN x8, matches HF's YaRN model at 8x context."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("llama_cpp")
    from edgerope.convert.export import convert
    from edgerope.runtime.runtime import Runtime

    def llama_cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
        opts = {"type_k": "f32", "type_v": "f32", "flash_attn": "off", "backend": "cpu", "allow_extrapolation": True}
        with Runtime.open(path, n_ctx=768, **opts) as rt:
            return rt.logits(tokens)

    yarn8 = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256, "rope_theta": 10000.0}
    plain_hf = make_tiny(max_position_embeddings=256, weight_std=0.06)
    target_hf = make_tiny(rope_parameters=yarn8, max_position_embeddings=2048, weight_std=0.06)  # same weights
    plain = convert(plain_hf, plain_hf / "plain.gguf", outtype="f32").path
    yarn = plain_hf / "yarn.gguf"
    report = set_rope(plain, yarn, rope_type="yarn", factor=8)
    assert report.context_length == 2048 and report.changed_keys["llama.rope.scaling.original_context_length"] == 256

    tokens = [1] + np.random.default_rng(0).integers(3, 1000, size=599).tolist()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        target_hf, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].numpy()
    got = llama_cpp_logits(yarn, tokens)
    err = np.abs(got - ref)
    assert err[:256].max() < 1e-3 and err[256:].max() < 1e-3, f"max |dlogit| {err.max():.2e}"
    before = np.abs(llama_cpp_logits(plain, tokens) - ref)
    assert before[256:].max() > 100 * err[256:].max()  # the unscaled file really computes something else


# --------------------------------------------------------------------------- per family (tests/helpers/families.py)


def _family_parity(cell_id, tmp_path, tiny_tokenizer_dir, *, rope_type, factor=4.0, over=None, **options):
    """Convert a family cell at its original context, set-rope it to ``rope_type`` x ``factor``, and compare
    llama.cpp at 4x with edgerope's PyTorch model of the same weights at the same rope (both rope functions of
    Gemma 3 included).  Returns (the report, rel L2, rel L2 of the unscaled file, the GGUF keys)."""
    torch = pytest.importorskip("torch")
    llama_cpp = pytest.importorskip("llama_cpp")
    from helpers.families import BY_ID, L0, T

    from edgerope.convert.export import convert
    from edgerope.models.base import CausalLM
    from edgerope.rope.scaling import Yarn

    hf = BY_ID[cell_id].make(tmp_path / cell_id, tiny_tokenizer_dir, max_position_embeddings=L0, **(over or {}))
    plain = convert(hf, tmp_path / "plain.gguf", outtype="f32").path
    report = set_rope(plain, tmp_path / "scaled.gguf", rope_type=rope_type, factor=factor, **options)
    model = CausalLM.from_pretrained(hf).eval()
    cfg = model.config
    theta = cfg.rope.theta
    want = (
        Yarn(theta, factor, L0, attention_factor=options.get("attn_factor"))
        if rope_type == "yarn"
        else Linear(theta, factor)
    )
    model.set_config(cfg.replace(rope=want, max_position_embeddings=T))
    tokens = [2] + np.random.default_rng(0).integers(3, 1000, size=T - 1).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([tokens]))[0].numpy()

    def run(path):
        llm = llama_cpp.Llama(str(path), n_ctx=T, n_batch=T, n_ubatch=T, logits_all=True, type_k=0, type_v=0,
                              verbose=False)  # fmt: skip
        llm.eval(tokens)
        out = np.asarray(llm.scores[:T])
        llm.close()
        return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))

    return report, run(tmp_path / "scaled.gguf"), run(plain), read(tmp_path / "scaled.gguf")[0]


@pytest.mark.llama
def test_gemma3_set_rope_changes_the_global_rope_only(tmp_path, tiny_tokenizer_dir):
    """Gemma 3 has two rope functions; set-rope changes the full-attention layers' (rope.freq_base, scaling)
    and says so; the sliding-window layers keep rope.freq_base_swa, unscaled (llama.cpp never scales them)."""
    report, err, before, kv = _family_parity("gemma3-default", tmp_path, tiny_tokenizer_dir, rope_type="linear")
    assert err < 1e-3 < before, (err, before)  # GeGLU tolerance (docs/llama_cpp.md §11.5)
    assert kv["gemma3.rope.scaling.type"] == "linear" and kv["gemma3.rope.freq_base_swa"] == 1e4
    assert kv["gemma3.rope.freq_base"] == 1e6
    note = next(n for n in report.notes if "two rope functions" in n)
    assert "full-attention (global) layers" in note and "5 sliding-window layers keep plain rope at base 10000" in note
    with pytest.raises(UnsupportedRopeError, match="sliding-window layers"):  # its factor would reach them too
        set_rope(tmp_path / "plain.gguf", tmp_path / "y.gguf", rope_type="yarn", factor=4, attn_factor=1.3)
    assert not (tmp_path / "y.gguf").exists()


@pytest.mark.llama
def test_qwen3_set_rope_uses_key_length(tmp_path, tiny_tokenizer_dir):
    """Qwen3's head_dim (attention.key_length 48) is not hidden/heads (32): the rope must be planned at 48."""
    report, err, before, kv = _family_parity("qwen3-default", tmp_path, tiny_tokenizer_dir, rope_type="yarn")
    assert err < 1e-4 < before, (err, before)
    assert kv["qwen3.rope.dimension_count"] == kv["qwen3.attention.key_length"] == 48
    report, err, _, kv = _family_parity("qwen3-default", tmp_path / "a", tiny_tokenizer_dir, rope_type="yarn",
                                        attn_factor=1.3)  # fmt: skip
    assert err < 1e-4 and kv["qwen3.rope.scaling.attn_factor"] == pytest.approx(1.3 / (1 + 0.1 * math.log(4)))


@pytest.mark.llama
@pytest.mark.parametrize("cell_id", ["phi3-default", "smollm3-default", "llama3-default-tied"])
def test_set_rope_per_family(cell_id, tmp_path, tiny_tokenizer_dir):
    report, err, before, kv = _family_parity(cell_id, tmp_path, tiny_tokenizer_dir, rope_type="yarn")
    assert err < 1e-4 < before, (err, before)
    if cell_id == "smollm3-default":
        assert any("NoPE" in n for n in report.notes)


@pytest.mark.llama
def test_phi4_partial_rotary_set_rope(tmp_path, tiny_tokenizer_dir):
    """Phi-4-mini rotates 24 of 32 channels: set-rope plans YaRN over rope.dimension_count, not the head."""
    partial = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75}}
    report, err, before, kv = _family_parity(
        "phi3-default", tmp_path, tiny_tokenizer_dir, rope_type="yarn", over=partial
    )
    assert err < 1e-4 < before, (err, before)
    assert kv["phi3.rope.dimension_count"] == 24 and any("rotates 24 channels" in n for n in report.notes)
