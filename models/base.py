"""What every PyTorch model family shares: rope tables, masks, attention, and the causal-LM base with HF checkpoints.

What it does:

* ``RotaryEmbedding``: cos/sin tables from ``edgerope.rope.scaling`` only (inverse frequencies from
  ``inv_freq``, the magnitude from ``attention_factor``; length-dependent methods resolved per forward from
  ``max(position_ids) + 1``, as transformers does); ``apply_rope`` rotates the first ``rotary_dim`` channels
  of each head in the NEOX / Hugging Face ``rotate_half`` layout (``ROTATION``) and passes the rest through
  (partial rotary);
* ``causal_mask`` (padding and sliding windows) and ``attend`` (grouped-query attention, an explicit scale);
* ``CausalLM``: the base of every family's model -- ``model`` (embeddings, layers, final norm) and
  ``lm_head`` named as the HF state dict, one forward loop over layers that each get their rope table
  (or none: NoPE) and their mask (full or sliding), gradient checkpointing, tied embeddings, strict
  ``from_pretrained`` (``CausalLM.from_pretrained`` picks the family's class from ``config.json``, like
  transformers' AutoModel), atomic ``save_pretrained``, and ``set_config`` (a new rope for fine-tuning).

Rotation convention: within the ``r`` rotating channels of a head, channel ``i`` and channel ``i + r/2`` form
pair ``i`` and rotate together by angle ``p * inv_freq[i]``.  llama.cpp's ``llama`` and ``smollm3`` arches
rotate adjacent channels ``(2i, 2i+1)`` instead; the GGUF exporter permutes Q/K rows for them
(docs/llama_cpp.md §3.1).

What it does not do: KV caching or generation (inference runs in llama.cpp), the training loop, dropout.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from edgerope.errors import CheckpointError, ConfigError, OutputError
from edgerope.models.config import ModelConfig
from edgerope.rope import scaling
from edgerope.system.files import atomic_output

ROTATION = "neox"  # channel i rotates with channel i + rotary_dim/2 (HF rotate_half)
LOADABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Buffers some HF checkpoints carry; rope is recomputed from the config, so they are ignored on load.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
# The config fields set_config may change: everything else decides the tensors and the function beyond rope.
ROPE_FIELDS = ("rope", "rope_local", "max_position_embeddings", "rope_finetuned", "name", "torch_dtype")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x_a, x_b) -> (-x_b, x_a) over the two halves of the last dim, shape (..., D) -> (..., D)."""
    x1, x2 = x.chunk(2, dim=-1)  # (..., D) -> 2 x (..., D/2)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, T, D) by ``cos``/``sin`` (B or 1, T, R) in the NEOX layout; channels R.. pass through."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, T, R) -> (B, 1, T, R), broadcast over heads
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :r], x[..., r:]  # (B, H, T, R), (B, H, T, D - R)
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the positions of one forward; no parameters or buffers (nothing in the state dict).

    ``head_dim`` is the rotary dimension: the whole head, or its rotating part under partial rotary.
    """

    def __init__(self, rope: scaling.RopeScaling, *, head_dim: int) -> None:
        super().__init__()
        self.rope = rope
        self.head_dim = head_dim
        self.attention_factor = scaling.attention_factor(rope)
        self._cache: dict[int | None, torch.Tensor] = {}

    def length_key(self, seq_len: int) -> int | None:
        """The length ``inv_freq`` must be computed at (None: the method does not depend on length)."""
        match self.rope:
            case scaling.LongRope(original_max_position_embeddings=orig):
                return orig + 1 if seq_len > orig else None  # long factors past the original window
            case scaling.DynamicNtk(max_position_embeddings=max_pos):
                return seq_len if seq_len > max_pos else None  # base grows only past max_position_embeddings
        return None

    def inv_freq(self, seq_len: int) -> torch.Tensor:
        """Inverse frequencies (D/2,) float32 for a forward whose largest position is ``seq_len - 1``."""
        key = self.length_key(seq_len)
        if key not in self._cache:
            values = scaling.inv_freq(self.rope, self.head_dim, seq_len=key)
            table = torch.from_numpy(values).to(torch.float32)
            if isinstance(self.rope, scaling.DynamicNtk) and key is not None:
                return table  # one length per forward: not worth keeping
            self._cache[key] = table
        return self._cache[key]

    def forward(self, position_ids: torch.Tensor, *, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, T, D) for ``position_ids`` (B, T), scaled by the attention factor, cast to ``dtype``."""
        seq_len = int(position_ids.max()) + 1
        inv = self.inv_freq(seq_len).to(position_ids.device)  # (D/2,)
        freqs = position_ids[..., None].float() * inv  # (B, T, 1) * (D/2,) -> (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D): channels i and i + D/2 share angle i
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in float32 and cast back before the weight (Llama, Qwen, Phi, SmolLM)."""

    def __init__(self, dim: int, *, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The MLP gate activation by transformers' name (``ModelConfig.hidden_act``)."""
    if name == "silu":
        return F.silu
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    raise ConfigError(f"hidden activation {name!r} is not supported", fix="use silu or gelu_pytorch_tanh")


def causal_mask(
    T: int, *, attention_mask: torch.Tensor | None, sliding_window: int | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, T, T), True = may attend; None when plain causal attention suffices.

    ``attention_mask`` (B, T) marks real tokens with 1 and padding with 0.  A
    padding query is let attend to itself so its row is never empty (its
    output is meaningless either way).  With ``sliding_window`` w a query at
    index i sees keys j with i - w < j <= i.
    """
    if attention_mask is None and (sliding_window is None or sliding_window >= T):
        return None
    i = torch.arange(T, device=device)[:, None]  # (T, 1) query index
    j = torch.arange(T, device=device)[None, :]  # (1, T) key index
    allowed = j <= i  # (T, T)
    if sliding_window is not None:
        allowed = allowed & (i - j < sliding_window)
    allowed = allowed[None, None]  # (T, T) -> (1, 1, T, T)
    if attention_mask is not None:
        keys = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, T) -> (B, 1, 1, T)
        allowed = (allowed & keys) | torch.eye(T, dtype=torch.bool, device=device)  # (B, 1, T, T)
    return allowed


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *, scale: float | None = None
) -> torch.Tensor:
    """Causal grouped-query attention: q (B, H, T, hd), k and v (B, KV, T, hd) -> (B, H, T, hd).

    Query head h reads KV head h // (H/KV); ``scale`` defaults to hd ** -0.5.
    """
    B, H, T, hd = q.shape
    KV = k.shape[1]
    if KV != H:
        k = k[:, :, None].expand(B, KV, H // KV, T, hd).reshape(B, H, T, hd)  # (B, KV, T, hd) -> (B, H, T, hd)
        v = v[:, :, None].expand(B, KV, H // KV, T, hd).reshape(B, H, T, hd)  # (B, KV, T, hd) -> (B, H, T, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)


class DecoderStack(nn.Module):
    """Embeddings, layers and final norm: the ``model.`` prefix of the HF state dict."""

    def __init__(self, cfg: ModelConfig, layers: list[nn.Module], norm: nn.Module) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = norm


class CausalLM(nn.Module):
    """Causal LM: ``model`` (embeddings, layers, norm) and ``lm_head``; HF parameter names throughout.

    A family subclasses it with ``model_types`` (the ``config.json`` model types it computes) and
    ``make_layer`` (and ``make_norm``, ``embed``, ``head`` where it differs).  Every layer is called as
    ``layer(h, cos, sin, mask)`` with its rope table (``cos``/``sin`` None on a NoPE layer) and its mask.
    ``gradient_checkpointing`` (a plain bool, default False) recomputes each layer in the backward pass when
    the model is training.
    """

    model_types: tuple[str, ...] = ()
    auto_family = True  # from_pretrained on this very class builds whichever family config.json names

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.check_config(cfg)
        self.config = cfg
        layers = [self.make_layer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.model = DecoderStack(cfg, layers, self.make_norm(cfg))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.set_config(cfg)
        self.tie_weights()

    # ------------------------------------------------------------------ what a family defines

    def make_layer(self, cfg: ModelConfig, index: int) -> nn.Module:
        raise NotImplementedError

    def make_norm(self, cfg: ModelConfig) -> nn.Module:
        return RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def check_config(self, cfg: ModelConfig) -> None:
        """Refuse a config this model cannot compute (``ConfigError``)."""
        if cfg.model_type not in type(self).model_types:
            raise ConfigError(
                f"{type(self).__name__} cannot build a {cfg.model_type!r} model",
                fix=f"use edgerope.models.{cfg.family.module}.Model, or CausalLM.from_pretrained",
            )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)  # (B, T) -> (B, T, d)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(h))  # (B, T, d) -> (B, T, V)

    # ------------------------------------------------------------------ rope and masks

    def set_config(self, cfg: ModelConfig) -> None:
        """Take ``cfg`` as the config and rebuild the rope tables from it (fine-tuning at a new rope).

        Only the rope, the context length and provenance may differ from the current config: the tensors and
        everything else the function depends on stay.
        """
        if hasattr(self, "rotary"):
            keep = {f: getattr(cfg, f) for f in ROPE_FIELDS}
            if self.config.replace(**keep) != cfg:
                raise ConfigError(
                    "set_config may change the rope, the context length and provenance only",
                    fix="build a new model for a config with other sizes or settings",
                )
        self.config = cfg
        self.rotary = RotaryEmbedding(cfg.rope, head_dim=cfg.rotary_dim)
        if cfg.rope_local is not None:
            self.rotary_local = RotaryEmbedding(cfg.rope_local, head_dim=cfg.rotary_dim)
        # per layer: which rope table ("global", "local" or None for NoPE) and which window (None: full)
        self.layer_plan: list[tuple[str | None, int | None]] = [
            (cfg.rope_kind(i), cfg.sliding_window if cfg.is_sliding(i) else None) for i in range(cfg.num_hidden_layers)
        ]

    def tie_weights(self) -> None:
        """Share ``lm_head.weight`` with ``model.embed_tokens.weight`` when the config ties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) in float32 for ``input_ids`` (B, T).

        ``position_ids`` (B, T) or (1, T) default to 0..T-1; they may jump
        (PoSE).  Attention stays causal in sequence order whatever the ids.
        ``attention_mask`` (B, T): 1 for tokens, 0 for padding.
        """
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None]  # (1, T)
        h = self.embed(input_ids)  # (B, T, d)
        tables: dict[str | None, tuple[torch.Tensor | None, torch.Tensor | None]] = {None: (None, None)}
        masks: dict[int | None, torch.Tensor | None] = {}
        for which, window in self.layer_plan:
            if which not in tables:
                rotary = self.rotary if which == "global" else self.rotary_local
                tables[which] = rotary(position_ids, dtype=h.dtype)  # (B or 1, T, R) each
            if window not in masks:
                masks[window] = causal_mask(T, attention_mask=attention_mask, sliding_window=window, device=h.device)
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer, (which, window) in zip(self.model.layers, self.layer_plan, strict=True):
            cos, sin = tables[which]
            args = (h, cos, sin, masks[window])
            h = checkpoint(layer, *args, use_reentrant=False) if use_ckpt else layer(*args)
        return self.head(h).float()  # (B, T, V)

    # ------------------------------------------------------------------ checkpoints

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape of a complete HF checkpoint of this model (``lm_head`` omitted when tied)."""
        shapes = {name: tuple(t.shape) for name, t in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            shapes.pop("lm_head.weight", None)
        return shapes

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, dtype: torch.dtype | None = None) -> CausalLM:
        """Load ``config.json`` and every safetensors shard of ``model_dir``, strictly.

        Called on ``CausalLM`` (or ``LlamaModel``, for callers of the Llama-only days) it builds the family's
        own class named by ``config.json``; on a family's class, that family only.
        Missing tensors, unexpected tensors, shape mismatches and non-float tensors raise ``CheckpointError``
        naming them.  ``dtype`` None keeps the stored dtype (of ``model.embed_tokens.weight``); bf16/f16/f32
        are accepted.
        """
        model_dir = Path(model_dir)
        cfg = ModelConfig.load(model_dir)
        model_cls = model_class(cfg) if cls.__dict__.get("auto_family") else cls
        tensors = read_safetensors(model_dir)
        with torch.device("meta"):
            model = model_cls(cfg)
        state = check_tensors(tensors, model.expected_tensors(), tied=cfg.tie_word_embeddings, where=str(model_dir))
        dtype = dtype or state["model.embed_tokens.weight"].dtype
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
        model.tie_weights()
        return model

    def save_pretrained(self, out_dir: str | Path, *, force: bool = False) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``out_dir`` (temp file + rename, then re-read).

        Refuses to overwrite an existing checkpoint unless ``force``, and always
        refuses a folder holding a sharded index (it would shadow the new file).
        """
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise OutputError("output path is a file, not a folder", where=str(out), fix="name a folder")
        out.mkdir(parents=True, exist_ok=True)
        if (out / INDEX_FILE).exists():
            raise OutputError(
                "folder holds a sharded checkpoint", where=str(out / INDEX_FILE), fix="save to a new folder"
            )
        if not force and ((out / SINGLE_FILE).exists() or (out / "config.json").exists()):
            raise OutputError("a checkpoint already exists here", where=str(out), fix="pass force=True or a new folder")
        skip = {"lm_head.weight"} if self.config.tie_word_embeddings else set()
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k not in skip}
        dtype = str(tensors["model.embed_tokens.weight"].dtype).removeprefix("torch.")
        cfg = self.config.replace(torch_dtype=dtype)
        text = json.dumps(cfg.to_hf(), indent=2) + "\n"
        if ModelConfig.from_hf(json.loads(text)) != cfg:  # checked before anything is written
            raise OutputError("the config would not read back as itself from config.json", where=str(out))

        def verify(path: Path) -> None:
            with safe_open(str(path), framework="pt") as f:
                written = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            if written != {k: tuple(v.shape) for k, v in tensors.items()}:
                raise OutputError("model.safetensors did not read back with the tensors written", where=str(out))

        _atomic_write(out / SINGLE_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}), verify)
        _atomic_write(out / "config.json", lambda p: p.write_text(text, encoding="utf-8"))
        return out


def model_class(cfg: ModelConfig) -> type[CausalLM]:
    """The PyTorch class of ``cfg``'s family (``edgerope.models.<module>.Model``)."""
    return importlib.import_module(f"edgerope.models.{cfg.family.module}").Model


def build_model(cfg: ModelConfig) -> CausalLM:
    """A freshly initialised model of ``cfg``'s family."""
    return model_class(cfg)(cfg)


def _atomic_write(path: Path, write, verify=None) -> None:
    """Write through a temp file in the same folder, check it, then rename over ``path``."""
    with atomic_output(path) as tmp:
        write(tmp)
        if verify is not None:
            verify(tmp)


def read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: the shards its index names, else model.safetensors, else every *.safetensors."""
    index = model_dir / INDEX_FILE
    weight_map: dict[str, str] | None = None
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"unreadable safetensors index ({exc})", where=str(index)) from None
    elif (model_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError("no safetensors weights found", where=str(model_dir), fix="save the model as safetensors")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = model_dir / name
        if not path.is_file():
            raise CheckpointError(f"shard {name} named by the index is missing", where=str(index))
        try:
            shard = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read safetensors file ({exc})", where=str(path)) from None
        if dup := sorted(set(shard) & set(tensors)):
            raise CheckpointError(f"tensors stored twice: {_names(dup)}", where=str(path))
        tensors.update(shard)
    if weight_map is not None and set(weight_map) != set(tensors):
        lost = sorted(set(weight_map) - set(tensors)) + sorted(set(tensors) - set(weight_map))
        raise CheckpointError(f"index and shards disagree on: {_names(lost)}", where=str(index))
    return tensors


def check_tensors(
    tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], *, tied: bool, where: str
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors to load, or ``CheckpointError`` listing every missing/unexpected/misshapen one."""
    state = {k: v for k, v in tensors.items() if not k.endswith(IGNORED_SUFFIXES)}
    if tied and "lm_head.weight" in state:
        head, emb = state.pop("lm_head.weight"), state.get("model.embed_tokens.weight")
        if emb is None or head.shape != emb.shape or not torch.equal(head, emb.to(head.dtype)):
            raise CheckpointError(
                "tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight",
                where=where,
                fix="set tie_word_embeddings to false in config.json, or drop lm_head.weight",
            )
    problems = []
    if missing := sorted(set(expected) - set(state)):
        problems.append(f"missing tensors: {_names(missing)}")
    if unexpected := sorted(set(state) - set(expected)):
        problems.append(f"unexpected tensors: {_names(unexpected)}")
    bad = [
        f"{k} {tuple(v.shape)} (config needs {expected[k]})"
        for k, v in state.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if bad:
        problems.append(f"shape mismatches: {_names(sorted(bad))}")
    if odd := sorted(f"{k} {v.dtype}" for k, v in state.items() if v.dtype not in LOADABLE_DTYPES):
        problems.append(f"unsupported dtypes (need float32/bfloat16/float16): {_names(odd)}")
    if problems:
        raise CheckpointError(
            "checkpoint does not match config.json:\n    - " + "\n    - ".join(problems),
            where=where,
            fix="use the config.json saved with these weights (architecture, sizes, tie_word_embeddings)",
        )
    return state


def _names(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")
