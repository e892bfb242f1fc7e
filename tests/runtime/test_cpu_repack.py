"""The CPU weight-layout policy (``cpu_repack``): the decision with injected CPU features, and the real runtime.

The decision is checked against what llama.cpp reports for several CPUs (an Intel Xeon with AMX, an AMD EPYC,
an ARM laptop, a build without repacking); the runtime tests load real quantized GGUFs and compare the
buffers llama.cpp logs ("CPU_REPACK model buffer size", "AMX model buffer size") with the decision.  On an
AMX machine they run the path that crashed (Q8_0/Q4_0/Q4_K weights, first decode).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from helpers.tiny_gguf import write_tiny_gguf

from edgerope.errors import RuntimeConfigError
from edgerope.gguf.reader import TensorInfo
from edgerope.runtime import native
from edgerope.runtime.cpu_repack import (
    CpuBackend,
    CpuRepack,
    plan_layout,
    repacks,
    steering_patterns,
)


def WeightTensor(name: str, shape: tuple[int, ...], qtype: Q, n_bytes: int) -> TensorInfo:  # noqa: N802
    return TensorInfo(name, shape, qtype, n_elements=0, n_bytes=n_bytes, data_offset=0)


X86 = {"SSE3": "1", "AVX": "1", "AVX2": "1", "FMA": "1", "AVX512": "1"}
XEON_AMX = CpuBackend(("AMX", "CPU_REPACK"), {**X86, "AMX_INT8": "1", "REPACK": "1"})
EPYC = CpuBackend(("CPU_REPACK",), {**X86, "REPACK": "1"})
ARM = CpuBackend(("CPU_REPACK",), {"NEON": "1", "DOTPROD": "1", "MATMUL_INT8": "1", "REPACK": "1"})
NO_REPACK = CpuBackend((), {"AVX2": "1"})


def model(qtype: Q, *, layers: int = 2, rows: int = 256, tied: bool = False) -> list[WeightTensor]:
    """A llama-shaped tensor list: norms F32, embeddings Q8_0 (not a matmul weight), projections ``qtype``."""
    out = [
        WeightTensor("token_embd.weight", (256, 1000), Q.Q8_0, 256 * 1000),
        WeightTensor("output_norm.weight", (256,), Q.F32, 1024),
    ]
    if not tied:
        out.append(WeightTensor("output.weight", (256, 1000), qtype, 1000))
    for i in range(layers):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            out.append(WeightTensor(f"blk.{i}.{name}.weight", (256, rows), qtype, 100))
        out.append(WeightTensor(f"blk.{i}.attn_norm.weight", (256,), Q.F32, 1024))
    return out


def test_auto_avoids_amx_and_steers_what_cpu_repack_takes():
    layout = plan_layout("auto", XEON_AMX, model(Q.Q4_0))
    assert layout.use_extra_bufts is False and layout.avoided == ("AMX",)
    assert all(buft == "CPU_REPACK" for _, buft in layout.overrides)
    steered = [t.name for t in model(Q.Q4_0) if any(re.search(p, t.name) for p, _ in layout.overrides)]
    assert sorted(steered) == sorted(t.name for t in model(Q.Q4_0) if t.ggml_type == Q.Q4_0)
    assert "token_embd.weight" not in steered  # GET_ROWS: ggml never repacks it
    assert layout.repacked_bytes == 14 * 100 + 1000  # 14 projections of 100 B + output 1000 B


def test_auto_on_amx_q8_0_turns_extra_buffers_off_without_steering():
    """x86 CPU_REPACK takes no Q8_0 weight: AMX was the only extra layout, and it is the one that crashes."""
    layout = plan_layout("auto", XEON_AMX, model(Q.Q8_0))
    assert (layout.use_extra_bufts, layout.overrides, layout.repacked_bytes) == (False, (), 0)
    assert "AMX avoided" in layout.reason


@pytest.mark.parametrize("cpu", [EPYC, ARM, NO_REPACK], ids=["epyc", "arm", "no-repack"])
def test_auto_is_llama_cpp_default_where_nothing_crashes(cpu):
    layout = plan_layout("auto", cpu, model(Q.Q4_0))
    assert layout.use_extra_bufts is True and layout.overrides == () and layout.avoided == ()


def test_on_and_off():
    on = plan_layout("on", XEON_AMX, model(Q.Q8_0))
    assert on.use_extra_bufts is True and "WARNING" in on.reason
    assert on.repacked_bytes == 14 * 100 + 1000  # AMX takes the Q8_0 projections and output
    off = plan_layout(CpuRepack.OFF, EPYC, model(Q.Q4_0))
    assert (off.use_extra_bufts, off.overrides, off.repacked_bytes) == (False, (), 0)
    with pytest.raises(RuntimeConfigError, match="auto, on, off"):
        plan_layout("fast", EPYC, [])


def test_gpu_offload_is_never_steered():
    layout = plan_layout("auto", XEON_AMX, model(Q.Q4_0), gpu_offload=True)
    assert layout.use_extra_bufts is False and layout.overrides == ()


def test_repack_rules_follow_ggml():
    """ggml_repack_get_optimal_repack_type on x86: type, the feature it needs, rows (ne1) % 8."""

    def t(qtype, rows=256, name="blk.0.ffn_up.weight"):
        return WeightTensor(name, (256, rows), qtype, 1)

    assert repacks(t(Q.Q4_K), EPYC) and repacks(t(Q.IQ4_NL), EPYC) and repacks(t(Q.Q2_K), EPYC)
    assert not repacks(t(Q.Q2_K), CpuBackend(("CPU_REPACK",), {"AVX2": "1"}))  # Q2_K needs AVX-512
    assert not repacks(t(Q.Q4_0, rows=100), EPYC)  # 100 rows: not a multiple of 8
    assert not repacks(t(Q.Q8_0), EPYC) and not repacks(t(Q.Q6_K), EPYC)  # no x86 repack for these
    assert not repacks(t(Q.Q4_0, name="token_embd.weight"), EPYC)
    assert not repacks(t(Q.Q4_0), CpuBackend(("CPU_REPACK",), {"SSE3": "1"}))  # no AVX2


def test_steering_patterns_match_exactly_the_chosen_tensors():
    names = [f"blk.{i}.{k}.weight" for i in range(12) for k in ("attn_q", "ffn_up", "ffn_down")] + ["output.weight"]
    chosen = [n for n in names if not (n.startswith("blk.3.") and "ffn_up" in n)] + []
    chosen = [n for n in chosen if n != "output.weight"]
    pats = steering_patterns(chosen, names)
    assert len(pats) == 3  # one per kind, however many layers
    for n in [*names, "blk.1.attn_q.weight.extra", "xblk.1.attn_q.weight", "blk.1.attn_q_norm.weight"]:
        hit = any(re.search(p, n) for p in pats)
        assert hit == (n in chosen), n


# ---------------------------------------------------------------------------------------------- real runtime


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[str, Path]:
    from edgerope.convert.quantize import quantize

    d = tmp_path_factory.mktemp("repack")
    src = write_tiny_gguf(d / "f32.gguf", hidden=256, n_head=4, n_head_kv=2, ffn=512)
    out = {}
    for q in ("Q8_0", "Q4_0", "Q4_K_M"):
        out[q] = d / f"{q}.gguf"
        quantize(src, out[q], qtype=q, n_threads=1)
    return out


def buffer_sizes(records) -> dict[str, float]:
    sizes = {}
    for r in records:
        m = re.search(r"(\S+) model buffer size =\s+([0-9.]+) MiB", r.getMessage())
        if m:
            sizes[m.group(1)] = float(m.group(2))
    return sizes


@pytest.mark.llama
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K_M"])
def test_runtime_layout_matches_llama_cpp_buffers(quantized, qtype, caplog):
    """The default policy on this machine: llama.cpp's buffers are what the decision said, and decoding runs
    (on an AMX CPU this is the path that crashed)."""
    from edgerope.runtime.runtime import Runtime

    caplog.set_level(logging.DEBUG, logger=native.LOGGER_NAME)
    with Runtime.open(quantized[qtype], n_ctx=256, backend="cpu", n_threads=1) as rt:
        info = rt.info.cpu_repack
        out = rt.generate([1, *np.arange(3, 40).tolist()], 4)
        assert len(out.tokens) + (out.stop_reason == "eog") >= 1
        plan = rt.plan
    sizes = buffer_sizes(caplog.records)
    bufts, _ = native.cpu_backend()
    assert "AMX" not in sizes, "auto must never use the AMX buffer type"
    repacked_mib = info["repacked_bytes"] / 2**20
    if repacked_mib:
        assert sizes.get("CPU_REPACK") == pytest.approx(repacked_mib, abs=0.006)
    else:
        assert "CPU_REPACK" not in sizes
    if "CPU_REPACK" in bufts and qtype == "Q4_0":
        assert repacked_mib > 0, "Q4_0 matmul weights are repacked on every AVX2/NEON CPU"
    assert plan.memory_plan is not None and plan.memory_plan.repacked_bytes == info["repacked_bytes"]
    if "AMX" in bufts:
        assert info["avoided"] == ["AMX"] and info["use_extra_bufts"] is False
    else:
        assert info["use_extra_bufts"] is True and info["overrides"] == []
