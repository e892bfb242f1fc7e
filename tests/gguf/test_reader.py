"""gguf_file: typed reading checked against gguf's own reader, llama.cpp's hyperparameter defaults, and bad files.

``write_gguf`` (also used by test_inspect and test_set_rope) builds small synthetic GGUFs of any
architecture with ``gguf.GGUFWriter``.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf import Keys
from helpers.any_gguf import BYTE_TOKENS, SPM_SPECIAL, spm_vocab, write_gguf  # noqa: F401

from edgerope.errors import GGUFError
from edgerope.gguf.hparams import model_hparams
from edgerope.gguf.reader import open_gguf


def test_metadata_values_and_types_match_gguf_reader(tmp_path):
    extra = {
        "test.u8": (7, VT.UINT8),
        "test.i16": (-3, VT.INT16),
        "test.u64": (2**40, VT.UINT64),
        "test.f64": (0.125, VT.FLOAT64),
        "test.bool": (True, VT.BOOL),
        "test.utf8": ("caf\u00e9 \u2581 \U0001f600", VT.STRING),
        "test.floats": ([0.5, -1.25, 3.0], VT.FLOAT32),
        "test.bools": ([True, False], VT.BOOL),
    }
    p = write_gguf(tmp_path / "m.gguf", kv=extra)
    f = open_gguf(p)
    ref = gguf.GGUFReader(p)
    user_keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(f.metadata) == user_keys
    for k in user_keys:
        field = ref.fields[k]
        assert f.metadata[k].value == field.contents(), k
        assert f.metadata[k].type == field.types[0], k
        if field.types[0] == VT.ARRAY:
            assert f.metadata[k].sub_type == field.types[-1]
            assert f.metadata[k].length == len(field.contents())
        start = field.offset + int(field.parts[0].nbytes) + int(field.parts[1].nbytes)
        assert f.raw_value(k) == ref.data[start : field.offset + sum(int(x.nbytes) for x in field.parts)].tobytes()
    assert f.architecture == "llama" and f.version == 3
    assert f.get("llama.context_length") == 4096 and f.arch_get(Keys.LLM.CONTEXT_LENGTH) == 4096
    assert f.metadata["llama.context_length"].type_name == "uint32"
    assert f.metadata[Keys.Tokenizer.LIST].type_name == "array[string]"
    assert set(f.arch_kv()) == {k for k in user_keys if k.startswith("llama.")}


def test_tensor_infos_offsets_and_bytes(tmp_path):
    data = np.arange(24, dtype=np.float32).reshape(3, 8)  # numpy (rows, cols) -> GGUF shape (8, 3)
    p = write_gguf(tmp_path / "t.gguf", tensors={"x.weight": data}, alignment=64)
    f = open_gguf(p)
    t = f.tensor("x.weight")
    assert (t.shape, t.ggml_type, t.n_elements, t.n_bytes) == ((8, 3), QT.F32, 24, 96)
    assert f.alignment == 64 and t.data_offset % 64 == 0
    raw = p.read_bytes()
    assert raw[t.data_offset : t.data_offset + 96] == data.tobytes()
    assert f.tensor_bytes("x.weight").tobytes() == data.tobytes()
    v = f.tensor("blk.0.attn_v.weight")
    assert v.ggml_type == QT.Q8_0 and v.n_bytes == v.n_elements // 32 * 34
    assert f.n_parameters == sum(t.n_elements for t in gguf.GGUFReader(p).tensors)
    assert f.tensor("missing") is None


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0])
def test_freq_factors_as_float_whatever_the_stored_type(tmp_path, qtype):
    values = np.linspace(1.0, 8.0, 32).astype(np.float32)
    if qtype == QT.F32:
        t: Any = values
    elif qtype == QT.F16:
        t = values.astype(np.float16)
    else:
        t = (gguf.quants.quantize(values.reshape(1, 32), qtype).reshape(-1), qtype)
    p = write_gguf(tmp_path / "ff.gguf", tensors={"rope_freqs.weight": t})
    got = open_gguf(p).freq_factors()
    assert set(got) == {"rope_freqs.weight"} and got["rope_freqs.weight"].dtype == np.float64
    tol = {QT.F32: 0, QT.F16: 4e-3, QT.BF16: 3e-2, QT.Q8_0: 4e-2}[qtype]
    np.testing.assert_allclose(got["rope_freqs.weight"], values, rtol=tol, atol=tol)


def test_big_endian_file_reads_the_same(tmp_path):
    little = open_gguf(write_gguf(tmp_path / "le.gguf"))
    big = open_gguf(write_gguf(tmp_path / "be.gguf", endian=gguf.GGUFEndian.BIG))
    assert big.big_endian and not little.big_endian
    assert big.kv() == little.kv()
    np.testing.assert_array_equal(big.tensor_values("token_embd.weight"), little.tensor_values("token_embd.weight"))


# --------------------------------------------------------------------------- hyperparameters


def test_hparams_defaults_follow_llama_cpp(tmp_path):
    # no head_count_kv (defaults to head_count), no key/value length (n_embd / n_head), no dimension_count
    hp = model_hparams(open_gguf(write_gguf(tmp_path / "a.gguf", n_embd=256, n_head=4, n_head_kv=None)))
    assert (hp.n_layers, hp.n_embd, hp.n_head, hp.n_head_kv) == (2, 256, 4, 4)
    assert (hp.head_dim_k, hp.head_dim_v, hp.n_rot, hp.n_ctx_train, hp.n_vocab) == (64, 64, 64, 4096, 300)


def test_hparams_explicit_head_dims_per_layer_kv_heads_and_vocab_size(tmp_path):
    kv = {
        Keys.Attention.KEY_LENGTH: (256, VT.UINT32),
        Keys.Attention.VALUE_LENGTH: (128, VT.UINT32),
        Keys.Rope.DIMENSION_COUNT: (64, VT.UINT32),
        Keys.LLM.VOCAB_SIZE: (512, VT.UINT32),
    }
    p = write_gguf(
        tmp_path / "g.gguf", "gemma3", n_embd=640, n_head=4, n_head_kv=[2, 1], kv=kv, vocab=None, weights=False
    )
    hp = model_hparams(open_gguf(p))
    assert hp.n_head_kv == (2, 1) and hp.n_head_kv_layers == (2, 1) and hp.n_head_layers == (4, 4)
    assert (hp.head_dim_k, hp.head_dim_v, hp.n_rot, hp.n_vocab) == (256, 128, 64, 512)


def test_hparams_missing_required_key(tmp_path):
    p = write_gguf(tmp_path / "x.gguf", drop=(Keys.LLM.BLOCK_COUNT,))
    with pytest.raises(GGUFError, match="missing required key llama.block_count"):
        model_hparams(open_gguf(p))


# --------------------------------------------------------------------------- bad files


def _error(path: Path) -> GGUFError:
    with pytest.raises(GGUFError) as exc:
        open_gguf(path)
    assert exc.value.where == str(path) or exc.value.where is None
    return exc.value


def test_missing_file_and_folder(tmp_path):
    assert "no such file" in _error(tmp_path / "nope.gguf").what
    assert "is a folder" in _error(tmp_path).what


@pytest.mark.parametrize(
    ("content", "looks_like"),
    [
        (b"<!DOCTYPE html>\n<html><body>rate limited</body></html>", "an HTML page"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "a Git LFS pointer"),
        (b"", "an empty file"),
        (b'{"model_type": "llama"}', "a JSON file"),
        (b"PK\x03\x04" + b"\0" * 40, "a ZIP archive"),
        (struct.pack("<I", 0x67676A74) + b"\0" * 40, "a legacy GGML file"),
        (b"\x89PNG\r\n\x1a\n", "unrecognised data"),
    ],
)
def test_not_a_gguf_says_what_it_looks_like(tmp_path, content, looks_like):
    p = tmp_path / "model.gguf"
    p.write_bytes(content)
    err = _error(p)
    assert err.what.startswith("not a GGUF file") and looks_like in err.what
    assert err.fix


def test_safetensors_is_recognised(tmp_path):
    from safetensors.numpy import save_file

    p = tmp_path / "model.gguf"
    save_file({"w": np.zeros((2, 2), np.float32)}, str(p))
    err = _error(p)
    assert "safetensors" in err.what and "edgerope convert" in err.fix


@pytest.mark.parametrize(("version", "phrase"), [(1, "early draft"), (4, "newer than")])
def test_unsupported_version(tmp_path, version, phrase):
    p = tmp_path / "v.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", version, 0, 0))
    assert phrase in _error(p).what


def test_truncated_header_and_truncated_tensor_data(tmp_path):
    good = write_gguf(tmp_path / "good.gguf").read_bytes()
    f = open_gguf(tmp_path / "good.gguf")
    last = max(f.tensors, key=lambda t: t.data_offset)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good[: last.data_offset + last.n_bytes - 1])
    err = _error(cut)
    assert "truncated" in err.what and "1 bytes missing" in err.what
    cut.write_bytes(good[:200])
    assert "header is cut short" in _error(cut).what
    cut.write_bytes(good[:12])
    assert "cut off inside the GGUF header" in _error(cut).what


def test_corrupt_header(tmp_path):
    raw = bytearray(write_gguf(tmp_path / "good.gguf").read_bytes())
    # the first key-value: u64 key length at 24, key, then its u32 value type
    klen = struct.unpack_from("<Q", raw, 24)[0]
    struct.pack_into("<I", raw, 24 + 8 + klen, 99)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(raw))
    err = _error(bad)
    assert "corrupt" in err.what and "GGUFValueType" in err.what


def test_unknown_tensor_type(tmp_path):
    p = write_gguf(tmp_path / "good.gguf", tensors={"zz.weight": np.zeros(4, np.float32)})
    raw = bytearray(p.read_bytes())
    name = b"zz.weight"
    pos = raw.index(name) + len(name)  # then: u32 n_dims, u64 dims, u32 type
    n_dims = struct.unpack_from("<I", raw, pos)[0]
    struct.pack_into("<I", raw, pos + 4 + 8 * n_dims, 250)
    p.write_bytes(bytes(raw))
    err = _error(p)
    assert "tensor type" in err.what and "upgrade the gguf package" in err.fix
