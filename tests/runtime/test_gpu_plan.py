"""GPU planning and preflight with injected devices: runs anywhere, no GPU needed.

The devices are what ``edgerope.runtime.native.backend_devices`` returns on a GPU build (an H100 as CUDA0, an
Apple M2 as Metal, two unequal GPUs, an RPC server, an integrated GPU), injected into the planner and into
``plan_runtime``'s device query.  Expected values come from llama.cpp's own rules (src/llama-model.cpp
``load_tensors``: the last n_gpu_layers of n_layer + 1 layers, split by free memory; ggml-cuda's buffer padding;
fattn.cu's kernels and ``GGML_CUDA_FA_QUANTS``), restated here independently, and from exact sums over the
GGUF's tensors and KV formula.  The real GPU path is checked by bench/gpu_check.py on a GPU machine.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from helpers.tiny_gguf import write_tiny_gguf

from edgerope.errors import RuntimeConfigError
from edgerope.gguf.hparams import ModelHparams
from edgerope.gguf.kv import kv_bytes
from edgerope.gguf.reader import TensorInfo, open_gguf
from edgerope.runtime import offload, preflight
from edgerope.runtime.gpu_devices import (
    GpuDevice,
    check_flash_attention,
    cuda_fa_pairs,
    offload_devices,
)
from edgerope.runtime.gpu_plan import (
    GPU_RESERVE_BYTES,
    OffloadModel,
    OffloadRequest,
    assign_layers,
    cuda_alloc_bytes,
    evaluate_offload,
    largest_offload_context,
    plan_offload,
)
from edgerope.runtime.plan import ModelShape
from edgerope.system.memory import GiB, MiB

CPU = {"name": "CPU", "type": "cpu", "backend": "CPU", "memory_free": 64 * GiB, "memory_total": 64 * GiB}
H100 = {
    "name": "CUDA0",
    "description": "NVIDIA H100 80GB HBM3",
    "type": "gpu",
    "backend": "CUDA",
    "memory_free": 79 * GiB,
    "memory_total": 80 * GiB,
    "features": {"ARCHS": "900", "FA_QUANTS": "q4_0-q4_0,q8_0-q8_0,f16-f16,bf16-bf16", "USE_GRAPHS": "1"},
}
M2 = {"name": "Metal", "description": "Apple M2", "type": "igpu", "backend": "Metal", "memory_free": 16 * GiB,
      "memory_total": 16 * GiB}  # fmt: skip


def cuda(free: int, name: str = "CUDA0", **features: str) -> GpuDevice:
    return GpuDevice(name, "test GPU", "CUDA", free, free, "gpu", features)


# --------------------------------------------------------------------------------------------------------------
# devices and flash attention


def test_offload_devices_follow_llama_cpp_selection():
    rpc = {**H100, "name": "RPC0", "backend": "RPC"}
    assert [d.name for d in offload_devices([CPU, H100, rpc])] == ["CUDA0"]
    assert [d.name for d in offload_devices([CPU, M2])] == ["Metal"]  # integrated: only without a discrete GPU
    assert [d.name for d in offload_devices([CPU, M2, H100])] == ["CUDA0"]
    assert offload_devices([CPU]) == ()
    d = offload_devices([H100])[0]
    assert d.cuda and d.memory_free == 79 * GiB and d.features["ARCHS"] == "900"


def test_compiled_flash_attention_pairs():
    default = {("q4_0", "q4_0"), ("q8_0", "q8_0"), ("f16", "f16"), ("bf16", "bf16")}
    assert cuda_fa_pairs({}) == default  # a build that does not report it: CMake's default list
    assert cuda_fa_pairs({"FA_QUANTS": "q4_0-q4_0,q8_0-q8_0,f16-f16,bf16-bf16"}) == default
    assert cuda_fa_pairs({"FA_QUANTS": "q8_0-q4_0"}) == {("f16", "f16"), ("q8_0", "q4_0")}  # f16-f16 always
    assert len(cuda_fa_pairs({"FA_QUANTS": "all"})) == 49 and ("q5_1", "bf16") in cuda_fa_pairs({"FA_QUANTS": "ALL"})


def fa(devices, tk, tv, *, flash="auto", dims=(128, 128)):
    return check_flash_attention(devices, type_k=tk, type_v=tv, head_dim_k=dims[0], head_dim_v=dims[1], flash=flash)


@pytest.mark.parametrize("pair", [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("bf16", "bf16")])
def test_same_type_pairs_run_without_warning(pair):
    r = fa(offload_devices([H100]), *pair)
    assert r.refusal is None and r.warnings == () and r.flash_attn is True


@pytest.mark.parametrize("pair", [("q8_0", "q4_0"), ("f16", "q8_0"), ("q4_0", "q8_0"), ("q5_1", "q5_1")])
def test_pairs_the_build_did_not_compile_are_warned_clearly(pair):
    r = fa(offload_devices([H100]), *pair)
    assert r.refusal is None and len(r.warnings) == 1
    w = r.warnings[0]
    assert f"K {pair[0]} / V {pair[1]}" in w and "CUDA0" in w and "converts K and V to f16" in w
    assert "GGML_CUDA_FA_QUANTS=all" in w and "q8_0/q8_0" in w
    all_quants = GpuDevice("CUDA0", backend="CUDA", features={"FA_QUANTS": "all"})
    assert fa([all_quants], *pair).warnings == ()


def test_caches_without_a_cuda_kernel_are_refused_when_flash_attention_is_forced():
    r = fa(offload_devices([H100]), "iq4_nl", "iq4_nl")  # a quantized V forces flash attention
    assert r.refusal and "iq4_nl" in r.refusal and "on the CPU" in r.refusal and "q4_0" in r.fix
    assert fa(offload_devices([H100]), "iq4_nl", "f16").refusal is None  # auto: llama.cpp turns it off
    assert fa(offload_devices([H100]), "iq4_nl", "f16", flash="on").refusal


def test_head_sizes_without_a_cuda_kernel():
    devs = offload_devices([H100])
    r = fa(devs, "q8_0", "q8_0", dims=(48, 48))
    assert r.refusal and "head size 48/48" in r.refusal and "f16 V cache" in r.fix
    assert fa(devs, "f16", "f16", dims=(48, 48)).flash_attn is False  # auto: off, no refusal
    for dims in ((40, 40), (64, 64), (80, 80), (96, 96), (112, 112), (256, 256)):
        assert fa(devs, "q8_0", "q8_0", dims=dims).refusal is None
    gqa_only = fa(devs, "f16", "f16", dims=(576, 512))
    assert gqa_only.refusal is None and "GQA" in gqa_only.warnings[0]


def test_non_cuda_backends_are_not_judged_by_cuda_rules():
    assert fa(offload_devices([M2]), "iq4_nl", "iq4_nl") == fa([], "iq4_nl", "iq4_nl")


# --------------------------------------------------------------------------------------------------------------
# layers and bytes


def llama_cpp_assignment(n_layer: int, n_gpu_layers: int, free: list[float]) -> list[int | None]:
    """llama.cpp's load_tensors, transcribed: i_gpu_start, act_gpu_layers, std::upper_bound over the splits."""
    n_gpu = n_layer + 1 if n_gpu_layers < 0 else n_gpu_layers
    total, acc, splits = sum(free), 0.0, []
    for f in free:
        acc += f
        splits.append(acc / total)
    i_gpu_start = max(n_layer + 1 - n_gpu, 0)
    act = min(n_gpu, n_layer + 1)
    out = []
    for il in range(n_layer + 1):
        if il < i_gpu_start or il - i_gpu_start >= act:
            out.append(None)
        else:
            x = (il - i_gpu_start) / act
            out.append(next((i for i, s in enumerate(splits) if s > x), len(splits) - 1))
    return out


@pytest.mark.parametrize("n_layer", [1, 2, 7, 32, 80])
@pytest.mark.parametrize("n_gpu", [0, 1, 2, 5, -1, 1000])
@pytest.mark.parametrize("free", [[80.0], [24.0, 24.0], [8.0, 24.0], [10.0, 20.0, 40.0]])
def test_layer_assignment_matches_llama_cpp(n_layer, n_gpu, free):
    got = assign_layers(n_layer, n_gpu, free)
    assert got == llama_cpp_assignment(n_layer, min(n_gpu, n_layer + 1) if n_gpu >= 0 else n_gpu, free)
    placed = sum(d is not None for d in got)
    assert placed == (n_layer + 1 if n_gpu < 0 else min(n_gpu, n_layer + 1))
    if placed:
        assert got[-1] is not None  # the output layer goes first


def test_cuda_buffers_pad_quantized_rows_and_align():
    def t(qtype, shape):
        block, size = GGML_QUANT_SIZES[qtype]
        n = math.prod(shape)
        return TensorInfo("w", shape, qtype, n, n // block * size, 0)

    assert cuda_alloc_bytes(t(Q.F32, (4096, 4096))) == 4096 * 4096 * 4
    assert cuda_alloc_bytes(t(Q.F16, (100, 3))) == 640  # 600 bytes, aligned to 128
    assert cuda_alloc_bytes(t(Q.Q8_0, (4096, 11008))) == 4096 * 11008 // 32 * 34  # rows already multiples of 512
    # 96 elements per row: the last row is padded by 416 elements (13 blocks of 34 bytes), then aligned to 128
    assert cuda_alloc_bytes(t(Q.Q8_0, (96, 10))) == math.ceil((96 * 10 // 32 * 34 + 13 * 34) / 128) * 128


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gpu") / "tiny.gguf", context_length=32768)


def offload_model(path: Path) -> OffloadModel:
    from edgerope.gguf.hparams import model_hparams
    from edgerope.runtime.plan import model_shape

    with open_gguf(path) as f:
        hp = model_hparams(f)
        return OffloadModel(hp, model_shape(hp, f.kv()), tuple(f.tensors))


REQ = OffloadRequest(type_k="f16", type_v="f16", flash_attn=True, n_batch=512, n_ubatch=512)


def test_full_offload_places_every_weight_but_the_input_layer(tiny):
    m = offload_model(tiny)
    plan = evaluate_offload(m, offload_devices([H100]), REQ, n_ctx=4096, n_gpu_layers=-1)
    (dev,) = plan.devices
    emb = next(t for t in m.tensors if t.name == "token_embd.weight")
    assert dev.weights_bytes == sum(cuda_alloc_bytes(t) for t in m.tensors if t.name != emb.name)
    assert plan.host_weights_bytes == emb.n_bytes and plan.host_kv_bytes == 0
    assert dev.kv_bytes == kv_bytes(4096, n_layers=2, n_kv_heads=1, head_dim_k=32, head_dim_v=32, type_k="f16",
                                    type_v="f16")  # fmt: skip
    assert dev.layers == 2 and dev.output and plan.full_offload and plan.n_gpu_layers == 3
    assert dev.reserve_bytes == GPU_RESERVE_BYTES and dev.budget_bytes == 79 * GiB and plan.fits


def test_tied_embeddings_put_a_copy_on_the_output_device(tmp_path):
    from edgerope.gguf.hparams import model_hparams
    from edgerope.runtime.plan import model_shape

    with open_gguf(write_tiny_gguf(tmp_path / "t.gguf")) as f:
        hp = model_hparams(f)
        untied = OffloadModel(hp, model_shape(hp, f.kv()), tuple(f.tensors))
        tied = OffloadModel(hp, untied.shape, tuple(t for t in f.tensors if t.name != "output.weight"))
    emb = next(t for t in tied.tensors if t.name == "token_embd.weight")
    a = evaluate_offload(untied, offload_devices([H100]), REQ, n_ctx=256, n_gpu_layers=-1).devices[0]
    b = evaluate_offload(tied, offload_devices([H100]), REQ, n_ctx=256, n_gpu_layers=-1).devices[0]
    out = next(t for t in untied.tensors if t.name == "output.weight")
    assert b.weights_bytes == a.weights_bytes - cuda_alloc_bytes(out) + cuda_alloc_bytes(emb)


def test_partial_offload_leaves_the_first_layers_and_their_cache_on_the_cpu(tiny):
    m = offload_model(tiny)
    plan = evaluate_offload(m, offload_devices([H100]), REQ, n_ctx=1024, n_gpu_layers=2)  # layer 1 + output
    (dev,) = plan.devices
    assert dev.layers == 1 and dev.output and not plan.full_offload
    layer0 = sum(t.n_bytes for t in m.tensors if t.name.startswith("blk.0."))
    emb = next(t.n_bytes for t in m.tensors if t.name == "token_embd.weight")
    assert plan.host_weights_bytes == emb + layer0
    assert plan.host_kv_bytes == dev.kv_bytes > 0  # one layer each


def mid_size(qtype: Q = Q.Q4_0, n_layer: int = 32) -> OffloadModel:
    """A Llama-3-8B-shaped model (4096 wide, 32 heads of 128, 8 KV heads, FFN 14336, 128256 tokens), as tensor
    infos only: the planner's numbers at real sizes without writing a 4 GB file."""
    block, size = GGML_QUANT_SIZES[qtype]

    def t(name: str, shape: tuple[int, ...], ty: Q = qtype) -> TensorInfo:
        b, s = GGML_QUANT_SIZES[ty]
        n = math.prod(shape)
        return TensorInfo(name, shape, ty, n, n // b * s, 0)

    e, ff, v, kvd = 4096, 14336, 128256, 1024
    ts = [t("token_embd.weight", (e, v)), t("output_norm.weight", (e,), Q.F32), t("output.weight", (e, v))]
    for i in range(n_layer):
        ts += [
            t(f"blk.{i}.attn_norm.weight", (e,), Q.F32), t(f"blk.{i}.ffn_norm.weight", (e,), Q.F32),
            t(f"blk.{i}.attn_q.weight", (e, e)), t(f"blk.{i}.attn_k.weight", (e, kvd)),
            t(f"blk.{i}.attn_v.weight", (e, kvd)), t(f"blk.{i}.attn_output.weight", (e, e)),
            t(f"blk.{i}.ffn_gate.weight", (e, ff)), t(f"blk.{i}.ffn_up.weight", (e, ff)),
            t(f"blk.{i}.ffn_down.weight", (ff, e)),
        ]  # fmt: skip
    hp = ModelHparams("llama", n_layer, e, 32, 8, 128, 128, 128, 131072, v)
    return OffloadModel(hp, ModelShape(e, ff, 32, v, 131072, None), tuple(ts))


def test_the_default_context_is_the_largest_that_fits_the_device():
    m = mid_size()
    small = offload_devices([{**H100, "memory_free": 12 * GiB, "memory_total": 12 * GiB}])
    plan = plan_offload(m, small, REQ)
    assert plan.full_offload and plan.fits and 4096 <= plan.n_ctx < 131072
    assert plan.n_ctx % 256 == 0 and "largest that fits" in plan.n_ctx_source
    bigger = evaluate_offload(m, small, REQ, n_ctx=plan.n_ctx + 256, n_gpu_layers=plan.n_gpu_layers)
    assert not bigger.fits and bigger.devices[0].total_bytes > 12 * GiB
    q8 = plan_offload(m, small, OffloadRequest("q8_0", "q8_0", True, 512, 512))
    assert q8.n_ctx > plan.n_ctx  # half the cache: a longer context in the same memory
    roomy = plan_offload(m, offload_devices([H100]), REQ)
    assert roomy.n_ctx == 131072 and "context_length" in roomy.n_ctx_source  # no 4096 cap any more


def test_a_device_too_small_for_the_weights_gets_fewer_layers():
    m = mid_size()
    four = offload_devices([{**H100, "memory_free": 4 * GiB, "memory_total": 4 * GiB}])
    plan = plan_offload(m, four, REQ)
    assert 0 < plan.n_gpu_layers < 33 and plan.fits and plan.n_ctx >= 4096
    more = evaluate_offload(m, four, REQ, n_ctx=4096, n_gpu_layers=plan.n_gpu_layers + 1)
    assert not more.devices[0].fits  # one more layer would not fit at the minimum default context
    assert plan.host_weights_bytes > 0 and plan.host_kv_bytes > 0


def test_layers_follow_free_memory_across_two_gpus():
    m = mid_size()
    devs = [cuda(8 * GiB, "CUDA0"), cuda(24 * GiB, "CUDA1")]
    plan = evaluate_offload(m, devs, REQ, n_ctx=8192, n_gpu_layers=-1)
    a, b = plan.devices
    # llama.cpp's split: layer il goes to the first device whose cumulative share exceeds il/33 (0.25 | 1.0)
    assert a.layers == 9 and b.layers == 23 and b.output and not a.output
    assert a.kv_bytes * 23 == b.kv_bytes * 9  # each layer's cache lives with the layer


def test_an_explicit_budget_replaces_free_memory_and_the_reserve():
    m = mid_size()
    req = OffloadRequest("f16", "f16", True, 512, 512, gpu_budget=10 * GiB)
    dev = evaluate_offload(m, offload_devices([H100]), req, n_ctx=4096, n_gpu_layers=-1).devices[0]
    assert dev.budget_bytes == 10 * GiB and dev.reserve_bytes == 0


def test_cuda_flash_attention_copies_of_a_quantized_cache_are_in_the_compute_buffer():
    m = mid_size()
    n = 131072
    f16 = evaluate_offload(m, offload_devices([H100]), REQ, n_ctx=n, n_gpu_layers=-1).devices[0]
    q8 = evaluate_offload(m, offload_devices([H100]), OffloadRequest("q8_0", "q8_0", True, 512, 512), n_ctx=n,
                          n_gpu_layers=-1).devices[0]  # fmt: skip
    one_layer_f16 = 2 * n * 8 * 128 * 2  # K and V of one layer as f16 copies (512 MiB): the attention phase's peak
    mask = n * 512 * 2
    assert q8.compute_bytes == mask + one_layer_f16 and f16.compute_bytes < one_layer_f16
    assert q8.kv_bytes < f16.kv_bytes


# --------------------------------------------------------------------------------------------------------------
# plan_runtime with injected devices


@pytest.fixture
def gpu_build(monkeypatch):
    """A CUDA build with the given devices, as far as preflight can tell."""

    def install(*devices: dict) -> None:
        monkeypatch.setattr(offload, "supports_gpu_offload", lambda: True)
        monkeypatch.setattr(offload, "backend_devices", lambda: [CPU, *devices])

    return install


def test_auto_offloads_everything_with_a_default_context_that_fits(gpu_build, tiny):
    gpu_build(H100)
    plan = preflight.plan_runtime(tiny, memory_budget="8GiB")
    assert plan.n_gpu_layers == 3 and plan.gpu_plan is not None and plan.gpu_plan.full_offload
    assert plan.n_ctx == 32768  # was capped at 4096 when GPU memory was not planned
    assert plan.memory_plan is None and plan.context_params().offload_kqv
    assert any(n.startswith("GPU offload 3/3 layers") and "CUDA0" in n for n in plan.notes), plan.notes


def test_a_small_gpu_limits_the_default_context(gpu_build, tiny):
    gpu_build({**H100, "memory_free": 2 * GiB, "memory_total": 2 * GiB})
    plan = preflight.plan_runtime(tiny, memory_budget="8GiB", gpu_memory_budget="20MiB")
    g = plan.gpu_plan
    assert g is not None and g.full_offload and 256 <= plan.n_ctx < 32768 and g.devices[0].total_bytes <= 20 * MiB


def test_a_request_that_does_not_fit_the_gpu_is_refused_with_what_would(gpu_build, tiny):
    gpu_build(H100)
    with pytest.raises(RuntimeConfigError) as exc:
        preflight.plan_runtime(tiny, backend="gpu", n_ctx=32768, gpu_memory_budget="12MiB", memory_budget="8GiB")
    e = exc.value
    assert "CUDA0 needs about" in e.what and "does not fit" in e.what
    assert "n_ctx <=" in e.fix and "q8_0" in e.fix and "n_gpu_layers" in e.fix


def test_auto_falls_back_to_the_cpu_when_not_one_layer_fits(gpu_build, tiny):
    gpu_build({**H100, "memory_free": 512 * MiB, "memory_total": 512 * MiB})  # less than the 1 GiB reserve
    plan = preflight.plan_runtime(tiny, memory_budget="8GiB")
    assert plan.n_gpu_layers == 0 and plan.gpu_plan is None and plan.memory_plan is not None
    assert any("running on the CPU" in n for n in plan.notes)
    with pytest.raises(RuntimeConfigError, match="does not fit"):
        preflight.plan_runtime(tiny, backend="gpu", memory_budget="8GiB")


def test_explicit_layers_and_cpu_backend(gpu_build, tiny):
    gpu_build(H100)
    plan = preflight.plan_runtime(tiny, n_gpu_layers=1, n_ctx=1024, memory_budget="8GiB")
    assert plan.n_gpu_layers == 1 and plan.gpu_plan.devices[0].layers == 0 and plan.gpu_plan.devices[0].output
    assert any("2 of 3 layers run on the CPU" in n for n in plan.notes)
    cpu = preflight.plan_runtime(tiny, backend="cpu", n_ctx=1024, memory_budget="8GiB")
    assert cpu.n_gpu_layers == 0 and cpu.gpu_plan is None and not cpu.context_params().offload_kqv
    assert preflight.plan_runtime(tiny, n_gpu_layers=0, n_ctx=1024, memory_budget="8GiB").gpu_plan is None
    with pytest.raises(RuntimeConfigError, match="n_gpu_layers"):
        preflight.plan_runtime(tiny, n_gpu_layers=-2)


def test_cache_types_are_checked_against_cuda_flash_attention(gpu_build, tmp_path):
    gpu_build(H100)
    path = write_tiny_gguf(tmp_path / "hd64.gguf", hidden=128, n_head=2)  # head size 64: CUDA has kernels
    with pytest.raises(RuntimeConfigError, match="iq4_nl") as exc:
        preflight.plan_runtime(path, type_k="iq4_nl", type_v="iq4_nl", memory_budget="8GiB")
    assert "q4_0" in exc.value.fix
    mixed = preflight.plan_runtime(path, type_k="q8_0", type_v="q4_0", memory_budget="8GiB")
    assert any("K q8_0 / V q4_0" in n for n in mixed.notes) and mixed.n_gpu_layers == 3
    same = preflight.plan_runtime(path, type_k="q8_0", type_v="q8_0", memory_budget="8GiB")
    assert not any("flash-attention kernel" in n for n in same.notes)
    odd = write_tiny_gguf(tmp_path / "hd160.gguf", hidden=320, n_head=2)  # head size 160: no CUDA kernel
    with pytest.raises(RuntimeConfigError, match="head size 160"):
        preflight.plan_runtime(odd, type_k="q8_0", type_v="q8_0", memory_budget="8GiB", allow_extrapolation=True)


def test_without_gpu_devices_backend_gpu_is_refused(gpu_build, tiny):
    gpu_build()  # a GPU build that sees no GPU
    with pytest.raises(RuntimeConfigError, match="no GPU"):
        preflight.plan_runtime(tiny, backend="gpu")
    assert preflight.plan_runtime(tiny, memory_budget="8GiB").n_gpu_layers == 0


def test_largest_offload_context_is_monotone_in_the_budget():
    m = mid_size(Q.Q8_0)
    sizes = [largest_offload_context(m, [cuda(g * GiB)], REQ, -1) for g in (10, 12, 16, 24, 48)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1] == 131072
