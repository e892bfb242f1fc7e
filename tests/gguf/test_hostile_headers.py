"""Hostile GGUF headers: one test per defect class that crashed, hung or allocated gigabytes, each now a clean
``GGUFError`` (what / where / fix) before anything is sized from the bad value.

Classes: counts in the model's metadata (``block_count`` 2^31 built a 2^31-tuple; 0 raised ValueError in the
planner; ``rope.dimension_count`` 2^31 allocated 8 GiB in ``inspect``), counts in the file's structure (key and
tensor counts, array lengths, tensor dimensions and element counts that overflow int64), nesting (an array of
arrays 5,000 deep raised RecursionError in every command), and special files (a FIFO given as the model blocked
forever).  Every check runs through the library and through the ``edgerope`` command (exit 2, no traceback).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest
from helpers.tiny_gguf import write_tiny_gguf

from edgerope.errors import GGUFError
from edgerope.gguf.hparams import model_hparams
from edgerope.gguf.inspect import inspect_gguf
from edgerope.gguf.reader import open_gguf
from edgerope.runtime.plan import plan_memory

COMMAND_TIMEOUT = 60


def with_value(path: Path, key: str, value: object, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny GGUF with metadata ``key`` set to ``value`` (the writer's value replaced as it is added)."""
    real = gguf.GGUFWriter.add_key_value

    def add(self, k, v, vtype, *a, **kw):
        return real(self, k, value if k == key else v, vtype, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "add_key_value", add)
        extra = {key: (value, gguf.GGUFValueType.UINT32)} if key in NOT_WRITTEN else None
        return write_tiny_gguf(path, extra_kv=extra)


NOT_WRITTEN = {"llama.attention.key_length"}  # keys the tiny GGUF does not write by default


def edgerope(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgerope", *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        cwd=cwd,
        env={**os.environ, "EDGEROPE_NO_GUARD": "1"},  # a crash must show as a signal here, not a report
    )


def assert_clean_refusal(res: subprocess.CompletedProcess[str], *words: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "Traceback" not in out and "error:" in out, out
    for w in words:
        assert w in out, f"{w!r} not in:\n{out}"


# --------------------------------------------------------------------------------------------------------------
# counts in the model's metadata

HUGE = {
    "block_count 2^31": ("llama.block_count", 2**31, "block_count"),
    "block_count 0": ("llama.block_count", 0, "block_count"),
    "rope dims 2^31": ("llama.rope.dimension_count", 2**31, "dimension_count"),
    "embedding 2^31": ("llama.embedding_length", 2**31, "embedding_length"),
    "heads 2^31": ("llama.attention.head_count", 2**31, "head_count"),
    "key length 2^31": ("llama.attention.key_length", 2**31, "key_length"),
    "context 0": ("llama.context_length", 0, "context_length"),
    "vocab size 2^31": ("llama.vocab_size", 2**31, None),  # the token list's length wins; bounded either way
}


@pytest.mark.parametrize("case", HUGE)
def test_metadata_counts_are_bounded_before_anything_is_sized(case, tmp_path, monkeypatch):
    key, value, words = HUGE[case]
    path = with_value(tmp_path / "bad.gguf", key, value, monkeypatch)
    t0 = time.perf_counter()
    with open_gguf(path) as f:
        if words is None:
            assert model_hparams(f).n_vocab == 312
            return
        with pytest.raises(GGUFError, match=words) as exc:
            model_hparams(f)
        assert exc.value.where == str(path) and exc.value.fix
    with pytest.raises(GGUFError, match=words):
        plan_memory(path, memory_budget="1GiB")
    report = inspect_gguf(path)  # reports instead of raising; nothing sized from the value
    assert any(fd.severity == "error" and words in fd.message for fd in report.findings)
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("case", ["block_count 2^31", "block_count 0", "rope dims 2^31"])
@pytest.mark.parametrize("command", ["plan", "ask"])
def test_commands_refuse_them_with_exit_2(case, command, tmp_path, monkeypatch):
    key, value, words = HUGE[case]
    path = with_value(tmp_path / "bad.gguf", key, value, monkeypatch)
    (tmp_path / "doc.txt").write_text("a short document\n")
    args = ["plan", str(path)] if command == "plan" else ["ask", str(path), "--doc", "doc.txt", "-q", "x", "--no-cache"]
    assert_clean_refusal(edgerope(*args, cwd=tmp_path), words)


def test_inspect_of_huge_rotary_dims_stays_small(tmp_path, monkeypatch):
    """``inspect`` used to build the rope report for 2^31 rotary dims (8 GiB of float64)."""
    path = with_value(tmp_path / "bad.gguf", "llama.rope.dimension_count", 2**31, monkeypatch)
    res = edgerope("inspect", str(path), "--json", cwd=tmp_path)
    assert res.returncode == 0 and "dimension_count" in res.stdout, res.stderr


# --------------------------------------------------------------------------------------------------------------
# the file's structure


def _kv_bytes(key: str, vtype: int, payload: bytes) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype) + payload


def with_extra_kv(src: Path, dst: Path, kv: bytes) -> Path:
    """``src`` with one more metadata pair appended after its last one (before the tensor infos), data realigned."""
    with open_gguf(src) as f:
        raw = src.read_bytes()
        last = max(f._fields.values(), key=lambda fl: fl.offset)  # noqa: SLF001 -- test helper
        end = last.offset + sum(int(p.nbytes) for p in last.parts)
        n_tensors, n_kv = struct.unpack_from("<QQ", raw, 8)
        data_start, align = f.data_offset, f.alignment
    infos = raw[end:data_start].rstrip(b"\0")  # tensor infos; their padding is recomputed
    head = raw[:8] + struct.pack("<QQ", n_tensors, n_kv + 1) + raw[24:end] + kv + infos
    pad = (-len(head)) % align
    dst.write_bytes(head + b"\0" * pad + raw[data_start:])
    return dst


def nested_array(depth: int) -> bytes:
    payload = struct.pack("<IQ", gguf.GGUFValueType.UINT8, 0)
    for _ in range(depth):
        payload = struct.pack("<IQ", gguf.GGUFValueType.ARRAY, 1) + payload
    return payload


@pytest.mark.parametrize("depth", [1, 5000])
def test_nested_arrays_are_refused_without_recursion(depth, tmp_path):
    good = write_tiny_gguf(tmp_path / "good.gguf")
    bad = with_extra_kv(good, tmp_path / "nested.gguf", _kv_bytes("evil.nested", 9, nested_array(depth)))
    with pytest.raises(GGUFError, match="array of arrays") as exc:
        open_gguf(bad)
    assert "evil.nested" in exc.value.what and exc.value.fix
    for args in (["inspect", str(bad)], ["plan", str(bad)], ["set-rope", str(bad), "-o", "o.gguf", "--type", "none"]):
        assert_clean_refusal(edgerope(*args, cwd=tmp_path), "array of arrays")
    assert not (tmp_path / "o.gguf").exists()


def test_the_helper_writes_a_readable_file(tmp_path):
    good = write_tiny_gguf(tmp_path / "good.gguf")
    ok = with_extra_kv(good, tmp_path / "ok.gguf", _kv_bytes("test.flag", 7, b"\x01"))
    with open_gguf(ok) as f, open_gguf(good) as g:
        assert f.get("test.flag") is True and [t.name for t in f.tensors] == [t.name for t in g.tensors]
        assert f.tensor_bytes("output.weight").tobytes() == g.tensor_bytes("output.weight").tobytes()


def _patch_count(path: Path, at: int, value: int) -> None:
    raw = bytearray(path.read_bytes())
    struct.pack_into("<Q", raw, at, value)
    path.write_bytes(bytes(raw))


def _tensor_info_offset(path: Path, name: str) -> int:
    raw = path.read_bytes()
    n = name.encode()
    return raw.index(struct.pack("<Q", len(n)) + n) + 8 + len(n)  # at n_dims


STRUCTURE = {
    "tensor count 2^63": (lambda p: _patch_count(p, 8, 2**63), "cut short or corrupt"),
    "key count 2^64-1": (lambda p: _patch_count(p, 16, 2**64 - 1), "cut short or corrupt"),
    "array length 2^40": (
        lambda p: _patch_count(p, p.read_bytes().index(b"tokenizer.ggml.scores") + 21 + 4 + 4, 2**40),
        "array of 1,099,511,627,776 elements",
    ),
    "string length 2^40": (
        lambda p: _patch_count(p, p.read_bytes().index(b"general.name") + 12 + 4, 2**40),
        "claims 1,099,511,627,776 bytes",
    ),
    "1000 dims": (
        lambda p: p.write_bytes(_set_u32(p.read_bytes(), _tensor_info_offset(p, "output.weight"), 1000)),
        "1,000 dimensions",
    ),
    "dims overflow int64": (
        lambda p: _patch_count(p, _tensor_info_offset(p, "output.weight") + 4, 2**62),
        "overflows int64",
    ),
    "dims beyond the file": (
        lambda p: _patch_count(p, _tensor_info_offset(p, "output.weight") + 4, 2**40),
        "more than the whole file",
    ),
}


def _set_u32(raw: bytes, at: int, value: int) -> bytes:
    b = bytearray(raw)
    struct.pack_into("<I", b, at, value)
    return bytes(b)


@pytest.mark.parametrize("case", STRUCTURE)
def test_structural_counts_are_checked_before_use(case, tmp_path):
    edit, words = STRUCTURE[case]
    path = write_tiny_gguf(tmp_path / "bad.gguf")
    edit(path)
    t0 = time.perf_counter()
    with pytest.raises(GGUFError, match="corrupt") as exc:
        open_gguf(path)
    assert words in exc.value.what and exc.value.where == str(path)
    assert time.perf_counter() - t0 < 5


def test_scalar_arrays_are_decoded_on_first_use(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf")
    with open_gguf(path) as f:
        mv = f.metadata["tokenizer.ggml.scores"]
        assert mv._load is not None and mv.length == 312  # noqa: SLF001
        assert len(mv.value) == 312 and mv._load is None  # noqa: SLF001


def test_frequency_factors_longer_than_any_rotary_dimension_are_refused(tmp_path):
    import numpy as np

    path = write_tiny_gguf(tmp_path / "m.gguf", extra_tensors={"rope_freqs.weight": np.ones(1 << 20, np.float32)})
    with open_gguf(path) as f, pytest.raises(GGUFError, match="1,048,576 values"):
        f.freq_factors()


# --------------------------------------------------------------------------------------------------------------
# special files


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_is_refused_by_type_not_opened(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    with pytest.raises(GGUFError, match="FIFO"):
        open_gguf(fifo)  # opening it would block until a writer came
    assert_clean_refusal(edgerope("inspect", str(fifo), cwd=tmp_path), "FIFO")


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_a_device_is_refused_by_type(tmp_path):
    with pytest.raises(GGUFError, match="character device"):
        open_gguf("/dev/zero")


# --------------------------------------------------------------------------------------------------------------
# shapes llama.cpp's graph asserts on (found by test_hostile_mutations): an abort at context creation before


def _with_tensor_type(path: Path, name: str, ggml_type: int) -> Path:
    raw = path.read_bytes()
    at = _tensor_info_offset(path, name)
    (n_dims,) = struct.unpack_from("<I", raw, at)
    path.write_bytes(_set_u32(raw, at + 4 + 8 * n_dims, ggml_type))
    return path


def _with_u32_key(path: Path, key: str, value: int) -> Path:
    raw = path.read_bytes()
    k = key.encode()
    at = raw.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)  # the value type, then the value
    assert struct.unpack_from("<I", raw, at)[0] == gguf.GGUFValueType.UINT32
    path.write_bytes(_set_u32(raw, at + 4, value))
    return path


@pytest.fixture
def qwen2_gguf(make_tiny, tmp_path):
    """The tiny Qwen2 checkpoint converted by edgerope (64 wide, 2 heads of 32, 1 KV head): qwen2's loader does
    not check the attention rows against the head counts, so these shapes reach the graph."""
    from edgerope.convert.export import convert

    return convert(make_tiny(model_type="qwen2"), tmp_path / "qwen2.gguf", outtype="f32").path


GRAPH_ASSERTS = {
    "K head size != V head size": (lambda p: _with_u32_key(p, "qwen2.attention.key_length", 63), "V head size"),
    "projection rows != heads x head size": (lambda p: _with_u32_key(p, "qwen2.attention.head_count", 3), "rows"),
    "F16 norm weight": (lambda p: _with_tensor_type(p, "output_norm.weight", 1), "not F32"),
}


@pytest.mark.parametrize("case", GRAPH_ASSERTS)
def test_shapes_the_graph_asserts_on_are_refused_before_llama_cpp(case, qwen2_gguf, tmp_path):
    from edgerope.gguf.checks import check_runnable

    make, words = GRAPH_ASSERTS[case]
    path = make(Path(qwen2_gguf))
    with open_gguf(path) as f, pytest.raises(GGUFError, match=words):
        check_runnable(f)
    (tmp_path / "doc.txt").write_text("a short document\n")
    res = edgerope("ask", str(path), "--doc", "doc.txt", "-q", "x", "--no-cache", "--ctx", "256", cwd=tmp_path)
    assert_clean_refusal(res, words)  # was SIGABRT (GGML_ASSERT / binary_op: unsupported types)
