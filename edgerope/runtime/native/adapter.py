"""The LoRA adapter handle: ``NativeLoraAdapter`` owns a ``llama_adapter_lora`` loaded for one ``NativeModel``;
``set_lora_adapters`` puts adapters (with their scales) on a context.

llama.cpp frees a model's adapters with the model (``llama_adapter_lora_free`` frees one earlier), and a context
keeps pointers to the adapters set on it: close the contexts first, then the adapters, then the model
(``edgerope.runtime.runtime.Runtime.close`` does).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgerope.errors import GGUFError, RuntimeConfigError
from edgerope.runtime.native._lib import _ROUTER, _llama, _said
from edgerope.runtime.native.handles import NativeContext, NativeModel, _Handle


class NativeLoraAdapter(_Handle):
    """Owns a ``llama_adapter_lora`` (``llama_adapter_lora_init``) of ``model``; ``close()`` frees it once."""

    _what = "LoRA adapter"

    def __init__(self, model: NativeModel, path: str | os.PathLike[str]) -> None:
        lib = _llama()
        self.model, self.path = model, Path(path)
        self._ptr: Any = None
        mark = _ROUTER.mark()
        ptr = lib.llama_adapter_lora_init(model.handle(), os.fsencode(self.path))
        if not ptr:
            raise GGUFError(
                "llama.cpp could not load the LoRA adapter" + _said(mark),
                where=str(self.path),
                fix="write it for this base with `edgerope convert ADAPTER_DIR --lora-gguf -o adapter.gguf`",
            )
        self._ptr = ptr

    def _free(self, lib: Any, ptr: Any) -> None:
        if not self.model.closed:  # the model frees its adapters itself
            lib.llama_adapter_lora_free(ptr)

    def meta(self, key: str) -> str | None:
        """A metadata value of the adapter GGUF as llama.cpp read it (a string), or None."""
        buf = ctypes.create_string_buffer(4096)
        n = _llama().llama_adapter_meta_val_str(self.handle(), key.encode("utf-8"), buf, len(buf))
        return None if n < 0 else buf.value.decode("utf-8", "replace")


def set_lora_adapters(ctx: NativeContext, adapters: Sequence[tuple[NativeLoraAdapter, float]]) -> None:
    """Make ``adapters`` (adapter, scale) the context's LoRA set (empty: none); llama.cpp applies
    ``scale x alpha / rank x B (A x)`` on each adapted matmul from the next decode on."""
    lib = _llama()
    n = len(adapters)
    ptrs = (lib.llama_adapter_lora_p_ctypes * max(1, n))(*[a.handle() for a, _ in adapters])
    scales = (ctypes.c_float * max(1, n))(*[float(s) for _, s in adapters])
    rc = lib.llama_set_adapters_lora(ctx.handle(), ptrs if n else None, n, scales if n else None)
    if rc != 0:
        raise RuntimeConfigError(f"llama.cpp refused the LoRA adapters (code {rc})")
