"""The checked parameters a ``NativeContext`` is created with: flash attention, rope overrides, context sizes."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from edgerope.errors import RuntimeConfigError
from edgerope.runtime.native._lib import _llama


class FlashAttn(str, enum.Enum):
    """When llama.cpp uses flash attention (llama_flash_attn_type)."""

    AUTO = "auto"  # llama.cpp decides (on when the backend supports it)
    ON = "on"
    OFF = "off"

    @property
    def native(self) -> int:
        lib = _llama()
        return {
            FlashAttn.AUTO: lib.LLAMA_FLASH_ATTN_TYPE_AUTO,
            FlashAttn.ON: lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            FlashAttn.OFF: lib.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[self]


@dataclass(frozen=True)
class RopeOverrides:
    """llama_context_params rope fields; the defaults are llama.cpp's C "take it from the GGUF" sentinels.

    ``yarn_attn_factor=-1`` defers to the model (1.0 on llama/qwen2): llama-cpp-python's ``Llama()``
    passes an explicit 1.0, and a value other than 1 multiplies the cos/sin magnitude for
    none/linear/longrope/llama3 models while YaRN discards it (docs/llama_cpp.md pitfalls 3 and 4).  Betas at -1 keep
    a GGUF value on the arches that read one (``Llama()`` would force 32/1).
    """

    rope_scaling_type: int = -1  # -1 from model; 0 none, 1 linear, 2 yarn, 3 longrope
    rope_freq_base: float = 0.0  # 0 from model
    rope_freq_scale: float = 0.0  # 0 from model; this is 1/factor
    yarn_ext_factor: float = -1.0  # <0 from model (1 for yarn, else 0)
    yarn_attn_factor: float = -1.0  # <0 from model
    yarn_beta_fast: float = -1.0  # <0 from model (32)
    yarn_beta_slow: float = -1.0  # <0 from model (1)
    yarn_orig_ctx: int = 0  # 0 from model

    @classmethod
    def from_mapping(cls, values: Mapping[str, float] | None, *, where: str = "rope_overrides") -> RopeOverrides:
        """Build from llama-cpp-python field names; unknown names are an error, not silently dropped."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RuntimeConfigError(
                f"unknown rope override(s): {', '.join(unknown)}", where=where, fix=f"use: {', '.join(sorted(known))}"
            )
        out: dict[str, Any] = {}
        for name, value in values.items():
            kind = int if name in ("rope_scaling_type", "yarn_orig_ctx") else float
            try:
                out[name] = kind(value)
            except (TypeError, ValueError):
                raise RuntimeConfigError(f"rope override {name}={value!r} is not a number", where=where) from None
        if out.get("rope_scaling_type", -1) not in (-1, 0, 1, 2, 3):
            raise RuntimeConfigError(
                f"rope_scaling_type {out['rope_scaling_type']} is not one llama.cpp knows",
                where=where,
                fix="use -1 (from model), 0 none, 1 linear, 2 yarn or 3 longrope",
            )
        return cls(**out)

    def explicit(self) -> dict[str, float]:
        """Only the fields that differ from the sentinels (the runtime overrides actually applied)."""
        default = RopeOverrides()
        return {k: v for k, v in asdict(self).items() if v != getattr(default, k)}


@dataclass(frozen=True)
class ContextParams:
    """What a ``NativeContext`` is created with (a checked subset of llama_context_params)."""

    n_ctx: int
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int = 4
    type_k: int = 1  # ggml type id (gguf.GGMLQuantizationType): F32 0, F16 1, Q8_0 8, BF16 30, ...
    type_v: int = 1
    flash_attn: FlashAttn = FlashAttn.AUTO
    offload_kqv: bool = True  # False keeps the KV cache and attention on the CPU
    rope: RopeOverrides = RopeOverrides()
