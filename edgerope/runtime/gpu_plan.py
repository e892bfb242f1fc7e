"""GPU offload, planned before anything native: which layers go to which GPU, the VRAM each device needs, and the
default context that fits.

Everything here is pure: it takes the devices llama.cpp reports as ``edgerope.runtime.gpu_devices.GpuDevice``
values (name, backend, free/total memory, the backend's features), so the decisions are tested with injected
devices on machines without a GPU (tests/runtime/test_gpu_plan.py).

What llama.cpp does, mirrored here (vendored llama.cpp, ``src/llama-model.cpp`` ``load_tensors`` and
``src/llama.cpp`` device selection; docs/llama_cpp.md §11.7):

* ``n_gpu_layers`` = L offloads the last L of the n_layer + 1 "layers", the output layer (``output.weight``,
  ``output_norm``) counting as the last one: L = n_layer + 1 offloads everything; ``token_embd`` (the input
  layer) always stays in CPU memory; a model without ``output.weight`` gets a copy of ``token_embd`` on the
  output's device;
* layers are split across GPUs in proportion to their free memory;
* with ``offload_kqv`` each layer's K/V cache lives on that layer's device;
* a CUDA buffer pads each quantized tensor's last row to 512 elements and aligns tensors to 128 bytes
  (``ggml_backend_cuda_buffer_type_get_alloc_size``);
* CUDA's flash-attention prefill kernels convert a cache that is not f16 to f16 copies held in the compute
  buffer (``ggml_cuda_flash_attn_ext_get_alloc_size``).

The VRAM plan per device: weights (the tensors placed there, CUDA-padded), KV cache (exact, ``edgerope.gguf.kv``),
compute buffer (``edgerope.runtime.plan.compute_phases``: the graph's peak; the logits only on the output's
device; plus the f16 K/V copies CUDA's flash attention allocates for caches that are not f16), a CUDA pool
estimate (activations converted for cuBLAS; not in llama.cpp's reported buffers) and a reserve of 1 GiB per
device (llama.cpp's own ``--fit-target`` default: CUDA context growth, cuBLAS workspace, other processes).

What it does not do: tensor-parallel splits (``split_mode`` row/tensor), RPC devices, sliding-window cache
sizes other than full, measured calibration of the compute model on a GPU (bench/gpu_check.py measures it).
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from edgerope.gguf.hparams import ModelHparams
from edgerope.gguf.kv import KV_PAD, kv_bytes, kv_type, padded_ctx
from edgerope.gguf.reader import TensorInfo
from edgerope.runtime.gpu_devices import GpuDevice
from edgerope.runtime.plan import (
    OVERHEAD_BYTES,
    ModelShape,
    compute_buffer_bytes,
    compute_phases,
    largest_fitting_context,
    output_buffer_bytes,
    work_buffer_bytes,
)
from edgerope.system.memory import GiB, format_bytes

GPU_RESERVE_BYTES = 1 * GiB  # kept free on every device (llama.cpp's --fit-target default)
MIN_DEFAULT_CTX = 4096  # auto offload keeps at least this context (or the model's, if shorter) before fewer layers
CUDA_ALIGNMENT = 128
MATRIX_ROW_PADDING = 512
_LAYER = re.compile(r"^blk\.(\d+)\.")


# --------------------------------------------------------------------------------------------------------------
# the VRAM plan


@dataclass(frozen=True)
class DeviceUse:
    """What one device holds and needs."""

    device: str
    description: str
    layers: int  # repeating layers placed here
    output: bool  # the output layer is here (its compute buffer holds the logits)
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int  # llama.cpp's "compute buffer size" for this device (estimate)
    pool_bytes: int  # CUDA's memory pool (not in llama.cpp's reported buffers; estimate)
    reserve_bytes: int
    budget_bytes: int | None  # None: the device reports no memory (not checked)

    @property
    def buffers_bytes(self) -> int:
        """What llama.cpp reports for this device: model + KV + compute buffers."""
        return self.weights_bytes + self.kv_bytes + self.compute_bytes

    @property
    def total_bytes(self) -> int:
        return self.buffers_bytes + self.pool_bytes + self.reserve_bytes

    @property
    def fits(self) -> bool:
        return self.budget_bytes is None or self.total_bytes <= self.budget_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(buffers_bytes=self.buffers_bytes, total_bytes=self.total_bytes, fits=self.fits)
        return d


@dataclass(frozen=True)
class GpuPlan:
    """Layers, context and memory of one GPU offload, decided before loading (``plan_offload``)."""

    n_ctx: int
    n_gpu_layers: int  # what llama.cpp is given: n_layer + 1 offloads everything
    n_layer: int
    type_k: str
    type_v: str
    flash_attn: bool
    devices: tuple[DeviceUse, ...]
    host_weights_bytes: int  # tensors left in CPU memory (token_embd always; the layers not offloaded)
    host_kv_bytes: int
    host_compute_bytes: int
    output_bytes: int  # the logits buffer (host memory)
    host_budget_bytes: int | None
    n_ctx_source: str = ""
    notes: tuple[str, ...] = ()

    @property
    def full_offload(self) -> bool:
        return self.n_gpu_layers >= self.n_layer + 1

    @property
    def host_total_bytes(self) -> int:
        return (
            self.host_weights_bytes + self.host_kv_bytes + self.host_compute_bytes + self.output_bytes + OVERHEAD_BYTES
        )

    @property
    def fits(self) -> bool:
        host = self.host_budget_bytes is None or self.host_total_bytes <= self.host_budget_bytes
        return host and all(d.fits for d in self.devices)

    def summary(self) -> str:
        parts = [
            f"{d.device}: {d.layers}{' + output' if d.output else ''} layers, weights {format_bytes(d.weights_bytes)}, "
            f"KV {format_bytes(d.kv_bytes)}, compute {format_bytes(d.compute_bytes)}"
            + (f", {format_bytes(d.total_bytes)} planned of {format_bytes(d.budget_bytes)}" if d.budget_bytes else "")
            for d in self.devices
            if d.layers or d.output
        ]
        return (
            f"GPU offload {self.n_gpu_layers}/{self.n_layer + 1} layers at n_ctx {self.n_ctx} ({'; '.join(parts)}; "
            f"CPU memory {format_bytes(self.host_total_bytes)})"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            devices=[u.to_dict() for u in self.devices],
            host_total_bytes=self.host_total_bytes,
            full_offload=self.full_offload,
            fits=self.fits,
        )
        return d


def cuda_alloc_bytes(t: TensorInfo) -> int:
    """Bytes a CUDA buffer allocates for weight ``t``: its last row padded to 512 elements when quantized, then
    aligned to 128 bytes."""
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(t.ggml_type)]
    size = t.n_bytes
    if block > 1 and t.shape and t.shape[0] % MATRIX_ROW_PADDING:
        size += (MATRIX_ROW_PADDING - t.shape[0] % MATRIX_ROW_PADDING) // block * type_size
    return math.ceil(size / CUDA_ALIGNMENT) * CUDA_ALIGNMENT


def tensor_layer(name: str, n_layer: int) -> int:
    """The "layer" llama.cpp places a weight by: 0..n_layer-1 for ``blk.N.*``, n_layer for the output layer, -1
    for the input layer (``token_embd``, kept on the CPU) and anything else outside the blocks."""
    m = _LAYER.match(name)
    if m:
        return min(int(m.group(1)), n_layer - 1)
    if name.startswith("output"):
        return n_layer
    if name.startswith("rope_"):  # per-layer duplicates of a tiny tensor; counted with the first layer
        return 0
    return -1


def assign_layers(n_layer: int, n_gpu_layers: int, free: Sequence[int]) -> list[int | None]:
    """The device index of each of the n_layer + 1 layers (None: the CPU), as llama.cpp assigns them: the last
    ``n_gpu_layers`` layers offloaded, split across devices in proportion to ``free``."""
    n_dev = len(free)
    n_gpu = n_layer + 1 if n_gpu_layers < 0 else min(n_gpu_layers, n_layer + 1)
    if n_dev == 0 or n_gpu == 0:
        return [None] * (n_layer + 1)
    weights = [float(f) for f in free] if any(free) else [1.0] * n_dev
    total = sum(weights)
    splits = list(itertools.accumulate(w / total for w in weights))
    start = n_layer + 1 - n_gpu
    out: list[int | None] = []
    for il in range(n_layer + 1):
        if il < start:
            out.append(None)
        else:
            out.append(min(bisect.bisect_right(splits, (il - start) / n_gpu), n_dev - 1))
    return out


@dataclass(frozen=True)
class OffloadModel:
    """What the GPU plan needs from a GGUF: hyperparameters, shape and tensors (placed per layer once)."""

    hp: ModelHparams
    shape: ModelShape
    tensors: tuple[TensorInfo, ...]

    def layer_weights(self, *, cuda: bool) -> tuple[list[int], int, int]:
        """(bytes per layer 0..n_layer (n_layer: output), input-layer bytes, bytes of the output's copy of
        token_embd when the model has no output.weight)."""
        n = self.hp.n_layers
        per = [0] * (n + 1)
        inp = tied = 0
        names = {t.name for t in self.tensors}
        for t in self.tensors:
            size = cuda_alloc_bytes(t) if cuda else t.n_bytes
            il = tensor_layer(t.name, n)
            if il < 0:
                inp += t.n_bytes
                if t.name == "token_embd.weight" and "output.weight" not in names:
                    tied = size
            else:
                per[il] += size
        return per, inp, tied


def _kv_layer_bytes(hp: ModelHparams, n_ctx: int, type_k: str, type_v: str) -> list[int]:
    return [
        kv_bytes(n_ctx, n_layers=1, n_kv_heads=h, head_dim_k=hp.head_dim_k, head_dim_v=hp.head_dim_v,
                 type_k=type_k, type_v=type_v)
        for h in hp.n_head_kv_layers
    ]  # fmt: skip


@dataclass(frozen=True)
class OffloadRequest:
    """The settings a GPU plan is made for."""

    type_k: str
    type_v: str
    flash_attn: bool  # what the compute estimate assumes (on when it will be on)
    n_batch: int
    n_ubatch: int
    gpu_budget: int | None = None  # usable bytes per device; None: free memory less GPU_RESERVE_BYTES
    host_budget: int | None = None  # usable CPU memory; None: not checked


def evaluate_offload(
    model: OffloadModel, devices: Sequence[GpuDevice], req: OffloadRequest, *, n_ctx: int, n_gpu_layers: int
) -> GpuPlan:
    """The memory of ``n_gpu_layers`` offloaded at ``n_ctx`` (no decision: ``plan_offload`` decides)."""
    hp, shape = model.hp, model.shape
    n_layer = hp.n_layers
    cuda = any(d.cuda for d in devices)
    per_layer, input_bytes, tied = model.layer_weights(cuda=cuda)
    kv_layer = _kv_layer_bytes(hp, n_ctx, req.type_k, req.type_v)
    home = assign_layers(n_layer, n_gpu_layers, [d.memory_free for d in devices])
    n_kv = padded_ctx(n_ctx)
    t = min(n_kv, req.n_ubatch, req.n_batch)
    attn, ffn, out = compute_phases(shape, n_ctx, n_ubatch=t, flash_attn=req.flash_attn)
    fa_extra = 0
    if cuda and req.flash_attn:  # CUDA's prefill kernels convert a cache that is not f16 to f16 copies
        n_kv_heads = max(hp.n_head_kv_layers)
        caches = ((req.type_k, hp.head_dim_k), (req.type_v, hp.head_dim_v))
        fa_extra = sum(2 * n_kv * n_kv_heads * dim for tt, dim in caches if tt != "f16")
    uses = []
    for i, d in enumerate(devices):
        layers = [il for il in range(n_layer) if home[il] == i]
        output = home[n_layer] == i
        weights = sum(per_layer[il] for il in layers) + (per_layer[n_layer] + tied if output else 0)
        if not layers and not output:
            compute = 0
        else:
            compute = max(attn + fa_extra, ffn, out if output else 0)
        if d.memory_total or req.gpu_budget is not None:
            budget = req.gpu_budget if req.gpu_budget is not None else d.memory_free
            reserve = 0 if req.gpu_budget is not None else GPU_RESERVE_BYTES
        else:
            budget, reserve = None, 0
        used = bool(layers or output)
        uses.append(
            DeviceUse(
                device=d.name,
                description=d.description,
                layers=len(layers),
                output=output,
                weights_bytes=weights,
                kv_bytes=sum(kv_layer[il] for il in layers),
                compute_bytes=compute,
                pool_bytes=4 * t * max(shape.n_ff, shape.n_embd) if cuda and used else 0,
                reserve_bytes=reserve if used else 0,
                budget_bytes=budget,
            )
        )
    cpu_layers = [il for il in range(n_layer) if home[il] is None]
    host_weights = (
        input_bytes + sum(per_layer[il] for il in cpu_layers) + (per_layer[n_layer] if home[n_layer] is None else 0)
    )
    if cpu_layers or home[n_layer] is None:  # the CPU backend runs those layers: its own compute and work buffers
        host_compute = compute_buffer_bytes(shape, n_ctx, n_ubatch=t, flash_attn=req.flash_attn) + work_buffer_bytes(
            shape, n_ctx, n_ubatch=t, flash_attn=req.flash_attn, type_v=req.type_v
        )
    else:  # the pinned host buffer of the graph's inputs (token embeddings looked up on the CPU)
        host_compute = 4 * t * (shape.n_embd + 8)
    return GpuPlan(
        n_ctx=n_ctx,
        n_gpu_layers=n_layer + 1 if n_gpu_layers < 0 else min(n_gpu_layers, n_layer + 1),
        n_layer=n_layer,
        type_k=req.type_k,
        type_v=req.type_v,
        flash_attn=req.flash_attn,
        devices=tuple(uses),
        host_weights_bytes=host_weights,
        host_kv_bytes=sum(kv_layer[il] for il in cpu_layers),
        host_compute_bytes=host_compute,
        output_bytes=output_buffer_bytes(shape, n_outputs=min(req.n_batch, n_kv)),
        host_budget_bytes=req.host_budget,
    )


def largest_offload_context(
    model: OffloadModel, devices: Sequence[GpuDevice], req: OffloadRequest, n_gpu_layers: int
) -> int:
    """Largest n_ctx (a multiple of 256, <= context_length) whose plan fits; 0 if none does."""

    def fits(n: int) -> bool:
        return evaluate_offload(model, devices, req, n_ctx=n, n_gpu_layers=n_gpu_layers).fits

    return largest_fitting_context(model.hp.n_ctx_train, fits)


def _most_layers(model: OffloadModel, devices: Sequence[GpuDevice], req: OffloadRequest, n_ctx: int) -> int:
    """Largest n_gpu_layers whose devices fit at ``n_ctx`` (VRAM grows with every layer offloaded); 0 if none."""

    def gpu_fits(n: int) -> bool:
        return all(d.fits for d in evaluate_offload(model, devices, req, n_ctx=n_ctx, n_gpu_layers=n).devices)

    lo, hi = 0, model.hp.n_layers + 1
    if gpu_fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if gpu_fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def plan_offload(
    model: OffloadModel,
    devices: Sequence[GpuDevice],
    req: OffloadRequest,
    *,
    n_ctx: int | None = None,
    n_gpu_layers: int | None = None,
) -> GpuPlan:
    """Decide layers and context for ``devices`` (the plan's ``fits`` says whether it fits; the caller refuses).

    * ``n_gpu_layers`` given (-1: all): kept; the default context is the largest that fits with it.
    * ``n_gpu_layers`` None: everything offloaded when the requested context, or by default at least
      ``min(context_length, MIN_DEFAULT_CTX)``, fits the GPUs that way; else as many layers as fit at that
      context, the rest on the CPU (by default, when not one layer fits there, the target context is halved
      until one does, down to 256).  The default context is then the largest that fits (capped at
      context_length).  0 layers: nothing fits the GPUs.
    """
    full = model.hp.n_layers + 1
    target = n_ctx if n_ctx is not None else min(model.hp.n_ctx_train, MIN_DEFAULT_CTX)
    if n_gpu_layers is not None:
        layers = full if n_gpu_layers < 0 else min(n_gpu_layers, full)
        how = f"n_gpu_layers {layers} (requested)"
    else:
        layers = _most_layers(model, devices, req, target)
        while n_ctx is None and layers == 0 and target > KV_PAD:  # the compute buffer alone is too large
            target = max(KV_PAD, target // 2 // KV_PAD * KV_PAD)
            layers = _most_layers(model, devices, req, target)
        how = "every layer fits" if layers == full else f"{layers} of {full} layers fit at n_ctx {target}"
    if n_ctx is not None:
        plan = evaluate_offload(model, devices, req, n_ctx=n_ctx, n_gpu_layers=layers)
        return replace(plan, n_ctx_source=f"requested; {how}")
    best = largest_offload_context(model, devices, req, layers)
    plan = evaluate_offload(model, devices, req, n_ctx=best or KV_PAD, n_gpu_layers=layers)
    limit = "the model's context_length" if best == model.hp.n_ctx_train else "the largest that fits"
    return replace(plan, n_ctx_source=f"{limit} ({how})")


def offload_refusal(plan: GpuPlan, n_ctx: int | None) -> str:
    """Why ``plan`` does not fit, per device and for the CPU side, in words."""
    asked = f"n_ctx {n_ctx}" if n_ctx is not None else f"n_ctx {plan.n_ctx} (the smallest)"
    over = [
        f"{d.device} needs about {format_bytes(d.total_bytes)} (weights {format_bytes(d.weights_bytes)}, KV "
        f"{format_bytes(d.kv_bytes)}, compute {format_bytes(d.compute_bytes)}, "
        f"reserve {format_bytes(d.reserve_bytes)}) "
        f"of {format_bytes(d.budget_bytes or 0)} free"
        for d in plan.devices
        if not d.fits
    ]
    if plan.host_budget_bytes is not None and plan.host_total_bytes > plan.host_budget_bytes:
        over.append(
            f"the CPU side needs about {format_bytes(plan.host_total_bytes)} of a "
            f"{format_bytes(plan.host_budget_bytes)} memory budget"
        )
    return f"{asked} with {plan.n_gpu_layers} of {plan.n_layer + 1} layers on the GPU does not fit: " + "; ".join(over)


def offload_fix(model: OffloadModel, devices: Sequence[GpuDevice], req: OffloadRequest, plan: GpuPlan) -> str:
    """What would fit instead: the largest context per cache type at the same layers, fewer layers, a budget."""
    sugg = []
    for t in dict.fromkeys((req.type_k, "q8_0", "q4_0")):
        alt = replace(req, type_k=t, type_v=t, flash_attn=req.flash_attn or kv_type(t).quantized)
        n = largest_offload_context(model, devices, alt, plan.n_gpu_layers)
        if n:
            sugg.append(f"n_ctx <= {n} with a {t} cache")
    sugg.append("fewer GPU layers (n_gpu_layers)")
    return "use " + "; or ".join(sugg) + "; or give gpu_memory_budget / memory_budget (--memory) if more is free"
