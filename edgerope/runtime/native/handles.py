"""The handle owners: ``NativeModel``, ``NativeContext`` and ``NativeSampler`` own a llama.cpp model, context
and sampler chain; each is a context manager whose ``close()`` frees the native object once.
"""

from __future__ import annotations

import ctypes
import os
import weakref
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgerope.errors import GGUFError, RuntimeConfigError
from edgerope.runtime.native import _lib
from edgerope.runtime.native._lib import _ROUTER, _buft_overrides, _llama, _said
from edgerope.runtime.native.params import ContextParams, FlashAttn


class _Handle:
    """Base of the handle owners: a context manager whose ``close()`` frees the native object once."""

    _what = "handle"
    _ptr: Any = None

    def _free(self, lib: Any, ptr: Any) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def close(self) -> None:
        """Free the native object.  Safe to call twice."""
        if self._ptr is not None and _lib._LIB is not None:
            self._free(_lib._LIB, self._ptr)
        self._ptr = None

    def handle(self) -> Any:
        """The native pointer; a clear error once closed."""
        if self._ptr is None:
            raise RuntimeConfigError(
                f"the {self._what} has been closed", fix="open a new one; close() frees llama.cpp's memory"
            )
        return self._ptr

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- interpreter shutdown
            pass


class NativeModel(_Handle):
    """Owns a ``llama_model``: the weights (or only the vocab) of one GGUF.

    ``cpu_only`` passes an empty device list, so no GPU backend is used even on a GPU build.
    Closing the model closes the contexts made from it first.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_gpu_layers: int = 0,
        use_mmap: bool = True,
        vocab_only: bool = False,
        cpu_only: bool = False,
        use_extra_bufts: bool = True,
        buft_overrides: Sequence[tuple[str, str]] = (),
    ) -> None:
        lib = _llama()
        self.path = Path(path)
        self._ptr: Any = None
        self._contexts: weakref.WeakSet[NativeContext] = weakref.WeakSet()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = int(n_gpu_layers)
        params.load_mode = lib.LLAMA_LOAD_MODE_MMAP if use_mmap else lib.LLAMA_LOAD_MODE_NONE
        params.vocab_only = bool(vocab_only)
        no_devices = (ctypes.c_void_p * 1)(None)  # NULL-terminated, empty: CPU only; kept alive across the call
        if cpu_only:
            params.devices = ctypes.cast(no_devices, ctypes.c_void_p)
            params.n_gpu_layers = 0
        params.use_extra_bufts = bool(use_extra_bufts)
        overrides = _buft_overrides(buft_overrides)  # kept alive across the load
        if overrides is not None:
            params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
        mark = _ROUTER.mark()
        ptr = lib.llama_model_load_from_file(os.fsencode(self.path), params)
        if not ptr:
            raise GGUFError(
                "llama.cpp could not load the model" + _said(mark),
                where=str(self.path),
                fix="check the file with `edgerope inspect`",
            )
        self._ptr = ptr
        self._vocab = lib.llama_model_get_vocab(ptr)
        self.vocab_only = bool(vocab_only)
        self.n_gpu_layers = params.n_gpu_layers

    _what = "model"

    def _free(self, lib: Any, ptr: Any) -> None:
        lib.llama_model_free(ptr)

    def close(self) -> None:
        """Free the model, and first every context made from it.  Safe to call twice."""
        for ctx in list(getattr(self, "_contexts", ())):
            ctx.close()
        super().close()
        self._vocab = None

    def _vocab_handle(self) -> Any:
        self.handle()
        return self._vocab

    # facts
    @property
    def n_vocab(self) -> int:
        return int(_llama().llama_vocab_n_tokens(self._vocab_handle()))

    @property
    def n_ctx_train(self) -> int:
        """As llama.cpp reports it now (a custom-YaRN context rewrites it, docs/llama_cpp.md pitfall 17)."""
        return int(_llama().llama_model_n_ctx_train(self.handle()))

    @property
    def bos(self) -> int | None:
        tok = int(_llama().llama_vocab_bos(self._vocab_handle()))
        return None if tok < 0 else tok

    @property
    def eos(self) -> int | None:
        tok = int(_llama().llama_vocab_eos(self._vocab_handle()))
        return None if tok < 0 else tok

    @property
    def add_bos(self) -> bool:
        return bool(_llama().llama_vocab_get_add_bos(self._vocab_handle()))

    def is_eog(self, token: int) -> bool:
        """End of generation (EOS, EOT, ...) per the GGUF vocab."""
        return bool(_llama().llama_vocab_is_eog(self._vocab_handle(), int(token)))

    # tokens
    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = False) -> list[int]:
        """Token ids for ``text``; ``add_special`` adds BOS/EOS as the GGUF vocab says."""
        lib = _llama()
        vocab = self._vocab_handle()
        data = text.encode("utf-8")
        cap = len(data) + 8
        for _ in range(2):
            buf = (lib.llama_token * cap)()
            n = lib.llama_tokenize(vocab, data, len(data), buf, cap, add_special, parse_special)
            if n >= 0:
                return np.ctypeslib.as_array(buf, shape=(cap,))[:n].tolist()
            cap = -n
        raise RuntimeConfigError(f"llama.cpp could not tokenize {len(data)} bytes of text")

    def detokenize(self, tokens: Sequence[int] | np.ndarray, *, special: bool = False) -> str:
        """Text for ``tokens`` (bytes that are not valid UTF-8 on their own become U+FFFD)."""
        lib = _llama()
        vocab = self._vocab_handle()
        ids = np.ascontiguousarray(tokens, dtype=np.int32)
        ptr = ids.ctypes.data_as(ctypes.POINTER(lib.llama_token))
        cap = 8 * len(ids) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(cap)
            n = lib.llama_detokenize(vocab, ptr, len(ids), buf, cap, False, special)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            cap = -n + 1
        raise RuntimeConfigError(f"llama.cpp could not detokenize {len(ids)} tokens")

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as llama.cpp sees it (as a string), or None."""
        buf = ctypes.create_string_buffer(512)
        n = _llama().llama_model_meta_val_str(self.handle(), key.encode("utf-8"), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            _llama().llama_model_meta_val_str(self.handle(), key.encode("utf-8"), buf, len(buf))
        return buf.value.decode("utf-8", "replace")


class NativeContext(_Handle):
    """Owns a ``llama_context`` (KV cache, compute buffers) for one sequence of one ``NativeModel``.

    It tracks ``n_past``, the number of cached positions: every ``decode``/``logits`` call appends
    at the end; ``clear()`` empties the cache.
    """

    def __init__(self, model: NativeModel, params: ContextParams) -> None:
        lib = _llama()
        self.model = model
        self.params = params
        self._ptr: Any = None
        self.n_past = 0
        self.n_evaluated = 0  # tokens run through llama_decode over the context's life (tests count prefills)
        self._seq_zero = ctypes.c_int32(0)  # every token's (single) sequence id points here
        cp = lib.llama_context_default_params()
        cp.n_ctx = int(params.n_ctx)
        cp.n_batch = int(params.n_batch)
        cp.n_ubatch = int(min(params.n_ubatch, params.n_batch))
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = int(params.n_threads)
        cp.type_k, cp.type_v = int(params.type_k), int(params.type_v)
        cp.flash_attn_type = params.flash_attn.native
        cp.offload_kqv = cp.op_offload = bool(params.offload_kqv)
        cp.embeddings = False
        for name, value in asdict(params.rope).items():
            setattr(cp, name, value)
        mark = _ROUTER.mark()
        ptr = lib.llama_init_from_model(model.handle(), cp)
        said = _ROUTER.lines_since(mark)
        if not ptr:
            raise RuntimeConfigError(
                "llama.cpp refused to create the context" + _said(mark),
                where=str(model.path),
                fix="check n_ctx, cache types and flash attention against the model",
            )
        self._ptr = ptr
        self._memory = lib.llama_get_memory(ptr)
        self.flash_attn = _flash_attn_from_log(said, params.flash_attn)
        self.n_ctx = int(lib.llama_n_ctx(ptr))
        self.n_batch = int(lib.llama_n_batch(ptr))
        self.n_vocab = model.n_vocab
        model._contexts.add(self)

    _what = "context"

    def _free(self, lib: Any, ptr: Any) -> None:
        lib.llama_free(ptr)
        self._memory = None

    def clear(self) -> None:
        """Empty the KV cache (positions restart at 0)."""
        self.handle()
        if self._memory is not None:
            _llama().llama_memory_clear(self._memory, True)
        self.n_past = 0

    def _decode_chunk(self, tokens: np.ndarray, *, output: np.ndarray) -> None:
        """One llama_decode of ``tokens`` (int32, len <= n_batch) at positions n_past..; ``output`` int8 flags."""
        lib = _llama()
        n = len(tokens)
        pos = np.arange(self.n_past, self.n_past + n, dtype=np.int32)
        n_seq_id = np.ones(n, dtype=np.int32)
        seq_id = np.full(n, ctypes.addressof(self._seq_zero), dtype=np.uintp)  # (n,) pointers to one int32 0
        batch = lib.llama_batch(
            n_tokens=n,
            token=tokens.ctypes.data_as(ctypes.POINTER(lib.llama_token)),
            embd=None,
            pos=pos.ctypes.data_as(ctypes.POINTER(lib.llama_pos)),
            n_seq_id=n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=seq_id.ctypes.data_as(ctypes.POINTER(ctypes.POINTER(lib.llama_seq_id))),
            logits=output.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )
        mark = _ROUTER.mark()
        rc = lib.llama_decode(self.handle(), batch)
        if rc != 0:
            # rc < 0 leaves processed ubatches in the cache: start over rather than guess its state
            self.clear()
            raise RuntimeConfigError(
                f"llama_decode failed with code {rc}" + _said(mark),
                fix="1 means no room in the KV cache (raise n_ctx); the cache was cleared",
            )
        self.n_past += n
        self.n_evaluated += n

    def _tokens(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(tokens, dtype=np.int32)
        if ids.ndim != 1:
            raise RuntimeConfigError(f"tokens must be one sequence (1-D), got shape {ids.shape}")
        if len(ids) and (ids.min() < 0 or ids.max() >= self.n_vocab):
            raise RuntimeConfigError(f"token ids must lie in [0, {self.n_vocab}), got {ids.min()}..{ids.max()}")
        if self.n_past + len(ids) > self.n_ctx:
            raise RuntimeConfigError(
                f"{self.n_past} cached + {len(ids)} new tokens exceed the context of {self.n_ctx}",
                fix="open the runtime with a larger n_ctx, or clear the cache",
            )
        return ids

    def decode(self, tokens: Sequence[int] | np.ndarray, *, outputs: Literal["last", "none"] = "last") -> None:
        """Append ``tokens`` in n_batch chunks; with ``"last"`` the final token's logits stay readable by a sampler."""
        self.handle()
        ids = self._tokens(tokens)
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start : start + self.n_batch]
            flags = np.zeros(len(chunk), dtype=np.int8)
            if outputs == "last" and start + len(chunk) == len(ids):
                flags[-1] = 1
            self._decode_chunk(chunk, output=flags)

    def shift(self, *, n_keep: int, n_discard: int) -> None:
        """Drop the cached positions [n_keep, n_keep + n_discard) and move the later ones down by n_discard
        (``llama_memory_seq_rm`` + ``llama_memory_seq_add``; llama.cpp re-ropes the moved keys at the next
        decode).  The caller decides whether the rope allows it (docs/llama_cpp.md pitfall 15)."""
        lib = _llama()
        self.handle()
        if not (0 <= n_keep and 0 < n_discard and n_keep + n_discard <= self.n_past):
            raise RuntimeConfigError(
                f"cannot discard {n_discard} positions after {n_keep} kept ones from {self.n_past} cached",
                fix="n_keep >= 0, n_discard >= 1, n_keep + n_discard <= the cached positions",
            )
        if not lib.llama_memory_can_shift(self._memory):
            raise RuntimeConfigError("this model's KV memory cannot be shifted", fix="evaluate the kept tokens again")
        if not lib.llama_memory_seq_rm(self._memory, 0, n_keep, n_keep + n_discard):
            self.clear()
            raise RuntimeConfigError("llama.cpp could not remove the positions; the cache was cleared")
        lib.llama_memory_seq_add(self._memory, 0, n_keep + n_discard, -1, -n_discard)
        self.n_past -= n_discard

    def state_bytes(self) -> bytes:
        """llama.cpp's saved state of the sequence (its KV cells, ``llama_state_seq_get_data``)."""
        lib = _llama()
        size = int(lib.llama_state_seq_get_size(self.handle(), 0))
        buf = (ctypes.c_uint8 * size)()
        n = int(lib.llama_state_seq_get_data(self._ptr, buf, size, 0))
        if n != size:
            raise RuntimeConfigError(f"llama.cpp saved {n} of {size} state bytes")
        return bytes(buf)

    def restore_state(self, data: bytes, *, n_past: int) -> None:
        """Replace the cache by ``data`` (from ``state_bytes`` of a context with the same settings) holding
        ``n_past`` positions.  On failure the cache is cleared and ``RuntimeConfigError`` raised."""
        lib = _llama()
        self.clear()
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        mark = _ROUTER.mark()
        n = int(lib.llama_state_seq_set_data(self._ptr, buf, len(data), 0))
        if n == 0 or n_past > self.n_ctx:
            self.clear()
            raise RuntimeConfigError(
                "llama.cpp refused the saved sequence state" + _said(mark),
                fix="the state was saved with other context settings; evaluate the tokens again",
            )
        self.n_past = int(n_past)

    def logits(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Append ``tokens`` and return the logits of every one of them, float32, shape (T, n_vocab)."""
        lib = _llama()
        self.handle()
        ids = self._tokens(tokens)
        out = np.empty((len(ids), self.n_vocab), dtype=np.float32)  # (T, V)
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start : start + self.n_batch]
            self._decode_chunk(chunk, output=np.ones(len(chunk), dtype=np.int8))
            ptr = lib.llama_get_logits(self._ptr)
            out[start : start + len(chunk)] = np.ctypeslib.as_array(ptr, shape=(len(chunk), self.n_vocab))
        return out


class NativeSampler(_Handle):
    """Owns a llama.cpp sampler chain (``llama_sampler_chain_*``); ``greedy()`` builds argmax sampling."""

    def __init__(self) -> None:
        lib = _llama()
        params = lib.llama_sampler_chain_default_params()
        params.no_perf = True
        self._ptr: Any = lib.llama_sampler_chain_init(params)
        if not self._ptr:
            raise RuntimeConfigError("llama.cpp could not create a sampler chain")

    @classmethod
    def greedy(cls) -> NativeSampler:
        chain = cls()
        _llama().llama_sampler_chain_add(chain.handle(), _llama().llama_sampler_init_greedy())  # chain owns it
        return chain

    @classmethod
    def random(cls, *, temperature: float, top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> NativeSampler:
        """llama.cpp's chain: top-k (0: off), top-p (1: off), temperature, then a draw seeded with ``seed``."""
        lib = _llama()
        chain = cls()
        if top_k > 0:
            lib.llama_sampler_chain_add(chain.handle(), lib.llama_sampler_init_top_k(int(top_k)))
        if top_p < 1.0:
            lib.llama_sampler_chain_add(chain.handle(), lib.llama_sampler_init_top_p(float(top_p), 1))
        lib.llama_sampler_chain_add(chain.handle(), lib.llama_sampler_init_temp(float(temperature)))
        lib.llama_sampler_chain_add(chain.handle(), lib.llama_sampler_init_dist(int(seed)))
        return chain

    _what = "sampler"

    def _free(self, lib: Any, ptr: Any) -> None:
        lib.llama_sampler_free(ptr)

    def sample(self, ctx: NativeContext, idx: int = -1) -> int:
        """Pick a token from the logits of output ``idx`` (-1: the last) of ``ctx``'s latest decode."""
        return int(_llama().llama_sampler_sample(self.handle(), ctx.handle(), idx))

    def reset(self) -> None:
        """Forget accepted tokens (stateful samplers in the chain start over)."""
        _llama().llama_sampler_reset(self.handle())


def _flash_attn_from_log(lines: list[str], requested: FlashAttn) -> bool:
    """Whether flash attention ended up on: llama.cpp resolves AUTO at context creation and only logs it."""
    if requested is FlashAttn.OFF:
        return False
    text = "\n".join(lines)
    if "Flash Attention not supported" in text or "flash_attn is not compatible" in text:
        return False
    if requested is FlashAttn.ON or "Flash Attention enabled" in text or "enabling flash_attn" in text:
        return True
    return False
