"""edgerope.convert.quantize and ``edgerope quantize``: llama.cpp's real quantizer on tiny GGUFs written here.

The checks after quantizing read both files with gguf.GGUFReader directly (not through the verifier
under test), then load the result in the llama.cpp runtime.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from helpers.tiny_gguf import write_tiny_gguf

from edgerope.cli import cli
from edgerope.convert.quantize import QUANT_TYPES, main_type, quantize
from edgerope.errors import GGUFError, OutputError, RuntimeConfigError
from edgerope.runtime.runtime import Runtime

pytestmark = pytest.mark.llama

QT = GGMLQuantizationType
ROPE_FREQS = np.linspace(1.0, 8.0, 32).astype(np.float32)  # head_dim 64 -> 32 pairs
ROPE_KV = {
    "llama.rope.scaling.finetuned": (True, GGUFValueType.BOOL),
    "llama.rope.scaling.attn_factor": (1.0625, GGUFValueType.FLOAT32),
}
IDS = [1] + np.random.default_rng(0).integers(3, 312, 99).tolist()


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hidden 256 (K-quant rows fit), 4 heads of 64, F32 rope_freqs, extra rope keys."""
    return write_tiny_gguf(
        tmp_path_factory.mktemp("quant") / "tiny-f32.gguf",
        hidden=256, n_head=4, n_head_kv=2, ffn=512,
        extra_kv=ROPE_KV, extra_tensors={"rope_freqs.weight": ROPE_FREQS},
    )  # fmt: skip


def read(path: Path) -> tuple[dict, dict]:
    """(metadata key -> python value, tensor name -> (type, shape, raw bytes)) straight from GGUFReader."""
    r = GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {
        t.name: (QT(int(t.tensor_type)), tuple(int(d) for d in t.shape), bytes(t.data.tobytes())) for t in r.tensors
    }
    return kv, tensors


def logits(path: Path) -> np.ndarray:
    with Runtime.open(path, backend="cpu", n_threads=1, type_k="f32", type_v="f32") as rt:
        return rt.logits(IDS)


@pytest.fixture(scope="module")
def reference_logits(f32_gguf: Path) -> np.ndarray:
    return logits(f32_gguf)


# Relative L2 error of the logits vs the F32 file.  The random, wide weights carry no structure, so weight
# (and, on the CPU, q8 activation) quantization noise shows in full: measured 3e-3 (F16), 0.07 (Q8_0), 0.64 (Q4_K_M).
@pytest.mark.parametrize(
    ("qtype", "main", "tolerance"), [("F16", QT.F16, 0.01), ("Q8_0", QT.Q8_0, 0.1), ("Q4_K_M", QT.Q4_K, 0.8)]
)
def test_quantize_keeps_metadata_and_rope_tensors_and_runs(
    tmp_path, f32_gguf, reference_logits, qtype, main, tolerance
):
    before = f32_gguf.read_bytes()
    out = tmp_path / f"tiny-{qtype}.gguf"
    report = quantize(f32_gguf, out, qtype=qtype, n_threads=1)
    assert f32_gguf.read_bytes() == before  # input untouched
    assert report.path == out and out.is_file() and report.bytes_out < report.bytes_in * 0.6
    assert not list(tmp_path.glob(".*partial"))

    kv_in, t_in = read(f32_gguf)
    kv_out, t_out = read(out)
    rewritten = {"general.file_type", "general.quantization_version"}
    assert {k: v for k, v in kv_in.items() if k not in rewritten} == {
        k: v for k, v in kv_out.items() if k not in rewritten
    }
    assert kv_out["llama.rope.scaling.attn_factor"] == pytest.approx(1.0625)
    assert {n: s for n, (_, s, _) in t_in.items()} == {n: s for n, (_, s, _) in t_out.items()}
    ftype, _, freqs = t_out["rope_freqs.weight"]
    assert ftype == QT.F32 and freqs == t_in["rope_freqs.weight"][2]
    assert np.array_equal(np.frombuffer(freqs, dtype=np.float32), ROPE_FREQS)
    assert t_out["blk.0.attn_q.weight"][0] == main
    assert all(t == QT.F32 for n, (t, s, _) in t_out.items() if len(s) == 1)  # 1-D tensors stay F32

    assert report.rope_tensors == ("rope_freqs.weight",) and not report.demoted
    assert report.tensor_types[main.name] >= 1 and sum(report.tensor_types.values()) == len(t_out)

    got = logits(out)
    err = float(np.linalg.norm(got - reference_logits) / np.linalg.norm(reference_logits))
    assert 0 < err < tolerance, f"{qtype}: rel L2 {err:.3f}"


def test_rows_not_divisible_by_256_are_reported(tmp_path):
    """ffn 320: ffn_down rows (320) do not fit Q4_K/Q6_K blocks of 256; llama.cpp demotes them."""
    src = write_tiny_gguf(tmp_path / "odd.gguf", hidden=256, n_head=4, n_head_kv=2, ffn=320)
    report = quantize(src, tmp_path / "odd-q4km.gguf", qtype="q4_k_m", n_threads=1)
    _, t_out = read(report.path)
    demoted = {n: t.name for n, (t, s, _) in t_out.items() if len(s) == 2 and s[0] % 256}
    assert set(demoted) == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}
    assert report.demoted == demoted
    assert all(t in ("Q5_0", "Q8_0", "Q5_1") for t in demoted.values())
    assert report.notes and "not divisible by 256" in report.notes[0]
    with Runtime.open(report.path, backend="cpu", n_threads=1) as rt:
        assert np.isfinite(rt.logits(IDS[:20])).all()


def test_refusals_leave_no_output(tmp_path, f32_gguf):
    out = tmp_path / "out.gguf"
    with pytest.raises(RuntimeConfigError, match="Q4_K_M"):
        quantize(f32_gguf, out, qtype="Q4_K_X")
    with pytest.raises(RuntimeConfigError, match="importance matrix"):
        quantize(f32_gguf, out, qtype="IQ2_XXS")
    with pytest.raises(GGUFError, match="no such file"):
        quantize(tmp_path / "absent.gguf", out, qtype="Q8_0")
    f16_freqs = write_tiny_gguf(tmp_path / "f16f.gguf", extra_tensors={"rope_freqs.weight": np.ones(16, np.float16)})
    with pytest.raises(GGUFError, match="rope_freqs.weight is F16"):
        quantize(f16_freqs, out, qtype="Q8_0")
    with pytest.raises(OutputError, match="overwrite the input"):
        quantize(f32_gguf, f32_gguf, qtype="Q8_0", force=True)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["f16f.gguf"]

    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists"):
        quantize(f32_gguf, out, qtype="Q8_0")
    assert out.read_bytes() == b"keep me"
    q8 = quantize(f32_gguf, out, qtype="Q8_0", force=True, n_threads=1).path
    with pytest.raises(GGUFError, match="already quantized"):
        quantize(q8, tmp_path / "again.gguf", qtype="Q4_K_M")


def test_all_advertised_names_map_to_llama_cpp():
    from edgerope.runtime import native

    ids = {name: native.ftype_id(name) for name in QUANT_TYPES}
    assert ids["Q4_K"] == ids["Q4_K_M"] and ids["Q3_K"] == ids["Q3_K_M"] and ids["F32"] == 0
    assert len(set(ids.values())) == len(ids) - 3  # Q3_K, Q4_K, Q5_K are aliases
    assert {main_type(n).name for n in ("Q4_K_M", "Q3_K_L", "Q6_K", "IQ3_M", "Q2_K", "BF16")} == {
        "Q4_K", "Q3_K", "Q6_K", "IQ3_S", "Q2_K", "BF16"
    }  # fmt: skip
    for name in QUANT_TYPES:
        main_type(name)


def test_cli_quantize_json_and_bad_type_exit_2(tmp_path, f32_gguf):
    runner = CliRunner()
    out = tmp_path / "cli.gguf"
    bad = runner.invoke(cli, ["quantize", str(f32_gguf), "-o", str(out), "--type", "Q9_9"])
    assert bad.exit_code == 2 and "unknown quantization type 'Q9_9'" in bad.output and "Traceback" not in bad.output
    assert not out.exists()
    ok = runner.invoke(cli, ["quantize", str(f32_gguf), "-o", str(out), "--type", "q8_0", "--threads", "1", "--json"])
    assert ok.exit_code == 0, ok.output
    data = json.loads(ok.output)
    assert data["qtype"] == "Q8_0" and data["path"] == str(out) and data["rope_tensors"] == ["rope_freqs.weight"]
    again = runner.invoke(cli, ["quantize", str(f32_gguf), "-o", str(out), "--type", "q8_0", "--json"])
    assert again.exit_code == 2 and json.loads(again.output)["error"] == "OutputError"
    text = runner.invoke(cli, ["quantize", str(f32_gguf), "-o", str(out), "--force", "--threads", "1"])
    assert text.exit_code == 0 and "rope tensors kept F32 and byte-identical: rope_freqs.weight" in text.output


def test_convert_outtype_k_quant_chains_through_llama_cpp(make_tiny, tmp_path):
    """`convert --outtype Q4_K_M`: HF -> f16 -> llama.cpp quantizer; llama3 rope_freqs stay F32 and exact,
    the rope keys equal a direct f16 conversion's, no intermediate file is left, and the result runs."""
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
        "rope_theta": 10000.0,
    }
    hf = make_tiny(rope_parameters=rope, max_position_embeddings=2048, hidden_size=256, intermediate_size=512)
    out, ref = tmp_path / "out" / "m.Q4_K_M.gguf", tmp_path / "ref.gguf"
    out.parent.mkdir()
    r = CliRunner().invoke(cli, ["convert", str(hf), "-o", str(out), "--outtype", "q4_k_m", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["quantized"]["qtype"] == "Q4_K_M"
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    assert CliRunner().invoke(cli, ["convert", str(hf), "-o", str(ref), "--outtype", "f16"]).exit_code == 0
    q, f = GGUFReader(out), GGUFReader(ref)
    rope_keys = {k for k in f.fields if ".rope." in k or k.endswith("context_length")}
    assert rope_keys and all(q.fields[k].parts[-1].tobytes() == f.fields[k].parts[-1].tobytes() for k in rope_keys)
    (qf,) = [t for t in q.tensors if t.name == "rope_freqs.weight"]
    (ff,) = [t for t in f.tensors if t.name == "rope_freqs.weight"]
    assert qf.tensor_type == GGMLQuantizationType.F32 and np.array_equal(qf.data, ff.data)
    assert any(t.tensor_type == GGMLQuantizationType.Q4_K for t in q.tensors)
    with Runtime.open(out, n_ctx=256, backend="cpu") as rt:
        assert np.isfinite(rt.logits(rt.tokenize("def main():")[:8])).all()
    bad = CliRunner().invoke(cli, ["convert", str(hf), "-o", str(tmp_path / "x.gguf"), "--outtype", "q9_z"])
    assert bad.exit_code == 2 and not (tmp_path / "x.gguf").exists()
