"""The devices llama.cpp offloads to, and what CUDA's flash attention can do with a K/V cache pair: pure, from
llama.cpp's device list (``edgerope.runtime.native.backend_devices``), so tested with injected devices.

llama.cpp's rules mirrored here (vendored llama.cpp: ``src/llama.cpp`` device selection, ``ggml-cuda/fattn.cu``,
``ggml/cmake/common.cmake``; docs/llama_cpp.md §11.7):

* devices: every GPU device except RPC ones; integrated GPUs only when there is no discrete one;
* CUDA's flash attention (CUDA, ROCm and MUSA builds share it) reads K/V of f32, f16, bf16, q4_0, q4_1, q5_0,
  q5_1 and q8_0 only (no iq4_nl: the op then runs on the CPU); head sizes 40, 64, 72, 80, 96, 112, 128 and 256
  (K = V; 192/128, 320/256, 512 and 576/512 only for some GQA ratios); its vector kernel (decoding) exists
  only for the K/V pairs compiled in (``GGML_CUDA_FA_QUANTS``, reported as the backend feature ``FA_QUANTS``;
  by default q4_0-q4_0, q8_0-q8_0, f16-f16, bf16-bf16, and f16-f16 always): another pair is converted to f16
  at every step (slow; llama.cpp logs it once).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgerope.gguf.kv import kv_type
from edgerope.system.memory import format_bytes

CUDA_BACKENDS = frozenset({"CUDA", "ROCm", "MUSA"})  # one code base (ggml-cuda), GGML_CUDA_NAME
CUDA_FA_KV_TYPES = frozenset({"f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"})
CUDA_FA_VEC_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "bf16", "f16")  # GGML_CUDA_FA_QUANTS=all
CUDA_FA_DEFAULT_PAIRS = "q4_0-q4_0,q8_0-q8_0,f16-f16,bf16-bf16"
CUDA_FA_HEAD_DIMS = frozenset({40, 64, 72, 80, 96, 112, 128, 256})
CUDA_FA_GQA_HEAD_DIMS = frozenset({(192, 128), (320, 256), (512, 512), (576, 512)})


# --------------------------------------------------------------------------------------------------------------
# devices


@dataclass(frozen=True)
class GpuDevice:
    """One device llama.cpp can offload to, as it reports it."""

    name: str  # "CUDA0", "Metal", "Vulkan0"
    description: str = ""  # "NVIDIA H100 80GB HBM3"
    backend: str = "CUDA"  # the backend registry: CUDA, ROCm, MUSA, Metal, Vulkan, ...
    memory_free: int = 0
    memory_total: int = 0
    kind: str = "gpu"  # "gpu" (discrete) or "igpu" (integrated, host memory)
    features: Mapping[str, str] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.backend in CUDA_BACKENDS

    @classmethod
    def from_native(cls, d: Mapping[str, Any]) -> GpuDevice:
        return cls(
            name=str(d.get("name", "")),
            description=str(d.get("description", "")),
            backend=str(d.get("backend", "")),
            memory_free=int(d.get("memory_free", 0)),
            memory_total=int(d.get("memory_total", 0)),
            kind=str(d.get("type", "gpu")),
            features=dict(d.get("features", {})),
        )

    def describe(self) -> str:
        mem = (
            f", {format_bytes(self.memory_free)} free of {format_bytes(self.memory_total)}" if self.memory_total else ""
        )
        return f"{self.name} ({self.description or self.backend}{mem})"


def offload_devices(devices: Iterable[GpuDevice | Mapping[str, Any]]) -> tuple[GpuDevice, ...]:
    """The devices llama.cpp offloads to, in its order: discrete GPUs (not RPC), else integrated ones."""
    devs = [d if isinstance(d, GpuDevice) else GpuDevice.from_native(d) for d in devices]
    gpus = [d for d in devs if d.kind == "gpu" and d.backend != "RPC"]
    return tuple(gpus or [d for d in devs if d.kind == "igpu"])


# --------------------------------------------------------------------------------------------------------------
# flash attention on CUDA


def cuda_fa_pairs(features: Mapping[str, str]) -> frozenset[tuple[str, str]]:
    """The K/V type pairs the build's CUDA flash-attention vector kernel was compiled for (``FA_QUANTS``; f16-f16
    always; a build that does not report it has the default list)."""
    raw = str(features.get("FA_QUANTS", CUDA_FA_DEFAULT_PAIRS)).strip().lower()
    if raw == "all":
        return frozenset((k, v) for k in CUDA_FA_VEC_TYPES for v in CUDA_FA_VEC_TYPES)
    pairs = {("f16", "f16")}
    for item in re.split(r"[,;]", raw):
        k, _, v = item.strip().partition("-")
        if k and v:
            pairs.add((k, v))
    return frozenset(pairs)


@dataclass(frozen=True)
class FlashCheck:
    """What CUDA's flash attention does with a cache-type pair and head size: a refusal (what, fix), warnings."""

    refusal: str | None = None
    fix: str | None = None
    warnings: tuple[str, ...] = ()
    flash_attn: bool | None = None  # whether flash attention will run (None: llama.cpp decides, not CUDA)


def check_flash_attention(
    devices: Sequence[GpuDevice], *, type_k: str, type_v: str, head_dim_k: int, head_dim_v: int, flash: str
) -> FlashCheck:
    """Check a K/V cache pair against the CUDA devices' flash attention (``flash``: "on", "off" or "auto";
    a quantized V cache forces it on).  Refused: a forced flash attention that CUDA cannot run (a cache type
    without a kernel, a head size without one), since llama.cpp would run attention on the CPU and copy the
    whole cache over PCIe at every layer.  Warned: a pair the build did not compile (converted to f16 at
    every step), a head size supported only for some GQA ratios."""
    cuda = [d for d in devices if d.cuda]
    if not cuda:
        return FlashCheck()
    tk, tv = kv_type(type_k), kv_type(type_v)
    forced = flash == "on" or tv.quantized
    if flash == "off" and not tv.quantized:
        return FlashCheck(flash_attn=False)
    missing = [t.name for t in (tk, tv) if t.name not in CUDA_FA_KV_TYPES]
    dims = (head_dim_k, head_dim_v)
    dims_ok = head_dim_k == head_dim_v and head_dim_k in CUDA_FA_HEAD_DIMS
    dims_maybe = dims in CUDA_FA_GQA_HEAD_DIMS
    where = ", ".join(d.name for d in cuda)
    if missing or not (dims_ok or dims_maybe):
        if not forced:  # auto: llama.cpp's probe finds the op on the CPU and turns flash attention off
            return FlashCheck(flash_attn=False)
        why = (
            f"no CUDA flash-attention kernel reads a {' or '.join(missing)} cache"
            if missing
            else f"CUDA flash attention has no kernel for head size {head_dim_k}/{head_dim_v}"
        )
        what = (
            f"{why} ({where}): with flash attention on (required by the {tv.name} V cache)"
            if tv.quantized
            else f"{why} ({where}): with flash attention on"
        ) + ", llama.cpp would run attention on the CPU and copy the whole cache from the GPU at every layer"
        fix = (
            "use q4_0 (the same size as iq4_nl) or q8_0 caches"
            if missing
            else "use an f16 V cache and flash_attn='auto' (llama.cpp then turns flash attention off)"
        )
        return FlashCheck(refusal=what, fix=fix)
    warnings = []
    if dims_maybe:
        warnings.append(
            f"CUDA flash attention supports head size {head_dim_k}/{head_dim_v} only for some GQA ratios; otherwise "
            "llama.cpp runs attention on the CPU"
        )
    for d in cuda:
        pairs = cuda_fa_pairs(d.features)
        if (tk.name, tv.name) not in pairs:
            compiled = ", ".join(sorted(f"{k}-{v}" for k, v in pairs))
            warnings.append(
                f"this llama.cpp build has no CUDA flash-attention kernel for K {tk.name} / V {tv.name} on {d.name} "
                f"(compiled: {compiled}): llama.cpp converts K and V to f16 at every decoding step, which is slow; "
                "use the same type for K and V (q8_0/q8_0, q4_0/q4_0, f16/f16), or rebuild llama-cpp-python with "
                "CMAKE_ARGS='-DGGML_CUDA=on -DGGML_CUDA_FA_QUANTS=all'"
            )
            break
    return FlashCheck(warnings=tuple(warnings), flash_attn=True if forced or flash == "auto" else None)
