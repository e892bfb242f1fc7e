"""GPU offload for preflight (``edgerope.runtime.preflight``): which devices the layers go to, and the offload plan.

What it does: checks ``backend`` against what this llama.cpp build reports (``offload_targets``), and plans the
layers, context and memory per device (``plan_gpu``, through ``edgerope.runtime.gpu_plan``) after checking the
cache types against what CUDA's flash attention can run (``edgerope.runtime.gpu_devices``).

What it does not do: load anything.  Its native calls are queries of the build (can it offload, which devices).
"""

from __future__ import annotations

import logging
from typing import Protocol

from edgerope.errors import RuntimeConfigError
from edgerope.gguf.hparams import ModelHparams
from edgerope.gguf.kv import KV_PAD, KVType
from edgerope.gguf.reader import GGUFFile
from edgerope.runtime.gpu_devices import GpuDevice, check_flash_attention, offload_devices
from edgerope.runtime.gpu_plan import (
    GpuPlan,
    OffloadModel,
    OffloadRequest,
    evaluate_offload,
    offload_fix,
    offload_refusal,
    plan_offload,
)
from edgerope.runtime.native import FlashAttn, backend_devices, supports_gpu_offload
from edgerope.runtime.plan import BUDGET_SAFETY, model_shape
from edgerope.system.memory import available_memory, parse_size

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "cpu", "gpu")


class CacheChoice(Protocol):
    """The cache types and flash attention preflight chose."""

    type_k: KVType
    type_v: KVType
    flash_attn: FlashAttn


def offload_targets(backend: str, n_gpu_layers: int | None) -> tuple[GpuDevice, ...]:
    """The GPUs the layers go to (none: the CPU), ``backend`` checked against what this llama.cpp build has."""
    if backend not in BACKENDS:
        raise RuntimeConfigError(f"unknown backend {backend!r}", fix=f"use one of: {', '.join(BACKENDS)}")
    if n_gpu_layers is not None and (not isinstance(n_gpu_layers, int) or n_gpu_layers < -1):
        raise RuntimeConfigError(f"n_gpu_layers must be -1 (all) or a count >= 0, got {n_gpu_layers!r}")
    if backend == "cpu" or n_gpu_layers == 0:
        return ()
    devices = offload_devices(backend_devices()) if supports_gpu_offload() else ()
    if backend == "gpu" and not devices:
        raise RuntimeConfigError(
            "backend 'gpu' was requested, but this llama.cpp build has no GPU support (or sees no GPU)",
            fix="reinstall llama-cpp-python with a GPU backend (e.g. CMAKE_ARGS='-DGGML_CUDA=on'), or use "
            "backend='cpu'",
        )
    return devices


def host_budget(memory_budget: int | str | None) -> int | None:
    if memory_budget is not None:
        return parse_size(memory_budget)
    try:
        return int(available_memory() * (1 - BUDGET_SAFETY))
    except RuntimeConfigError:  # no memory query on this platform: the CPU side is not checked
        return None


def plan_gpu(
    f: GGUFFile,
    hp: ModelHparams,
    devices: tuple[GpuDevice, ...],
    caches: CacheChoice,
    *,
    n_ctx: int | None,
    n_gpu_layers: int | None,
    n_batch: int,
    memory_budget: int | str | None,
    gpu_memory_budget: int | str | None,
    backend: str,
) -> tuple[GpuPlan | None, tuple[str, ...]]:
    """The GPU offload (layers, context, VRAM per device), or (None, notes) when ``backend`` is auto and not
    one layer fits the GPUs; refuses what CUDA's flash attention cannot run and what does not fit."""
    where = str(f.path)
    tk, tv = caches.type_k.name, caches.type_v.name
    flash = check_flash_attention(
        devices, type_k=tk, type_v=tv, head_dim_k=hp.head_dim_k, head_dim_v=hp.head_dim_v, flash=caches.flash_attn.value
    )
    if flash.refusal:
        raise RuntimeConfigError(flash.refusal, where=where, fix=flash.fix)
    for w in flash.warnings:
        logger.warning("%s", w)
    fa = flash.flash_attn if flash.flash_attn is not None else caches.flash_attn is FlashAttn.ON
    model = OffloadModel(hp, model_shape(hp, f.kv(), where=where), tuple(f.tensors))
    req = OffloadRequest(
        type_k=tk, type_v=tv, flash_attn=fa, n_batch=n_batch, n_ubatch=n_batch,
        gpu_budget=parse_size(gpu_memory_budget) if gpu_memory_budget is not None else None,
        host_budget=host_budget(memory_budget),
    )  # fmt: skip
    plan = plan_offload(model, devices, req, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers)
    if plan.n_gpu_layers == 0:  # not one layer fits the GPUs (or none was asked for)
        if backend == "auto" and n_gpu_layers is None:
            why = f"not one layer fits the GPU memory of {', '.join(d.describe() for d in devices)}"
            return None, (f"running on the CPU: {why}",)
        plan = evaluate_offload(model, devices, req, n_ctx=n_ctx or KV_PAD, n_gpu_layers=1)  # the smallest offload
    if not plan.fits or plan.n_gpu_layers == 0:
        raise RuntimeConfigError(offload_refusal(plan, n_ctx), where=where, fix=offload_fix(model, devices, req, plan))
    notes = [*flash.warnings, plan.summary()]
    if not plan.full_offload:
        notes.append(f"{plan.n_layer + 1 - plan.n_gpu_layers} of {plan.n_layer + 1} layers run on the CPU")
    return plan, tuple(notes)
