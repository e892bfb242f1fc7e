"""A compact PyTorch decoder for the Llama family (Llama, Mistral, Qwen2), weight-compatible with Hugging Face.

What it does:

* builds a decoder from ``edgerope.models.config.ModelConfig``: RMSNorm, grouped-query
  attention (optional q/k/v bias for Qwen2, o bias for Llama ``attention_bias``),
  a SiLU-gated MLP, optionally tied input/output embeddings;
* names every module and parameter exactly as the Hugging Face state dict does
  (``model.embed_tokens.weight``, ``model.layers.N.self_attn.q_proj.weight``,
  ..., ``model.norm.weight``, ``lm_head.weight``), so ``from_pretrained`` loads
  HF safetensors strictly and ``save_pretrained`` writes files HF loads;
* applies RoPE from ``edgerope.rope.scaling`` only: the inverse frequencies come from
  ``rope.inv_freq`` and the cos/sin magnitude from ``rope.attention_factor``.
  This module has no rope math of its own.  Length-dependent methods (LongRoPE
  short/long factors, dynamic NTK) are resolved per forward from
  ``max(position_ids) + 1``, as transformers does for a fresh model.

Rotation convention: **NEOX / Hugging Face ``rotate_half``**.  Within a head of
``d`` channels, channel ``i`` and channel ``i + d/2`` form pair ``i`` and are
rotated together by angle ``p * inv_freq[i]``:
``x'_i = x_i cos - x_{i+d/2} sin`` and ``x'_{i+d/2} = x_{i+d/2} cos + x_i sin``.
(llama.cpp's ``llama`` arch rotates adjacent channels ``(2i, 2i+1)`` instead; the
GGUF exporter permutes Q/K rows for it -- see docs/llama_cpp.md §3.1.)

What it does not do: KV caching or generation (inference runs in llama.cpp),
the training loss or loop (``edgerope.train.finetune``), tokenization, dropout.
"""

from __future__ import annotations

import json
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

ROTATION = "neox"  # channel i rotates with channel i + head_dim/2 (HF rotate_half)
LOADABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Buffers some HF checkpoints carry; rope is recomputed from the config, so they are ignored on load.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x_a, x_b) -> (-x_b, x_a) over the two halves of the last dim, shape (..., D) -> (..., D)."""
    x1, x2 = x.chunk(2, dim=-1)  # (..., D) -> 2 x (..., D/2)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, T, D) by ``cos``/``sin`` (B or 1, T, D) in the NEOX layout (module docstring)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, T, D) -> (B, 1, T, D), broadcast over heads
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the positions of one forward; no parameters or buffers (nothing in the state dict)."""

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
    """x / rms(x) * weight, normalised in float32 and cast back before the weight (as HF does)."""

    def __init__(self, dim: int, *, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query causal self-attention with RoPE on q and k."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, self.n_head * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_head * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_head * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * hd, d, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, hd = self.n_head, self.n_kv_head, self.head_dim
        q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # (B, T, H*hd) -> (B, H, T, hd)
        k = self.k_proj(x).view(B, T, KV, hd).transpose(1, 2)  # (B, T, KV*hd) -> (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, KV, hd).transpose(1, 2)  # (B, T, KV*hd) -> (B, KV, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if KV != H:  # query head h reads KV head h // (H/KV)
            k = k[:, :, None].expand(B, KV, H // KV, T, hd).reshape(B, H, T, hd)  # (B, KV, T, hd) -> (B, H, T, hd)
            v = v[:, :, None].expand(B, KV, H // KV, T, hd).reshape(B, H, T, hd)  # (B, KV, T, hd) -> (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, H * hd)  # (B, H, T, hd) -> (B, T, H*hd)
        return self.o_proj(y)


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """Embeddings, layers and final norm: the ``model.`` prefix of the HF state dict."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


def causal_mask(
    T: int, *, attention_mask: torch.Tensor | None, sliding_window: int | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, T, T), True = may attend; None when plain causal attention suffices.

    ``attention_mask`` (B, T) marks real tokens with 1 and padding with 0.  A
    padding query is let attend to itself so its row is never empty (its
    output is meaningless either way).
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


class LlamaModel(nn.Module):
    """Causal LM: ``model`` (embeddings, layers, norm) and ``lm_head``; HF parameter names throughout.

    ``gradient_checkpointing`` (a plain bool, default False) recomputes each
    layer in the backward pass when the model is training.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.model_type == "qwen2" and cfg.sliding_window is not None:
            raise ConfigError(
                "Qwen2 sliding-window attention is not supported (it applies only from max_window_layers on)",
                where="config.json: use_sliding_window",
                fix="set use_sliding_window to false",
            )
        self.config = cfg
        self.model = DecoderStack(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.rope, head_dim=cfg.head_dim)
        self.gradient_checkpointing = False
        self.tie_weights()

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
        h = self.model.embed_tokens(input_ids)  # (B, T) -> (B, T, d)
        cos, sin = self.rotary(position_ids, dtype=h.dtype)  # (B or 1, T, hd) each
        window = self.config.sliding_window if self.config.model_type == "mistral" else None  # HF Llama has none
        mask = causal_mask(T, attention_mask=attention_mask, sliding_window=window, device=h.device)
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.model.layers:
            h = checkpoint(layer, h, cos, sin, mask, use_reentrant=False) if use_ckpt else layer(h, cos, sin, mask)
        return self.lm_head(self.model.norm(h)).float()  # (B, T, d) -> (B, T, V)

    # ------------------------------------------------------------------ checkpoints

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape of a complete HF checkpoint of this model (``lm_head`` omitted when tied)."""
        shapes = {name: tuple(t.shape) for name, t in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            shapes.pop("lm_head.weight", None)
        return shapes

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, dtype: torch.dtype | None = None) -> LlamaModel:
        """Load ``config.json`` and every safetensors shard of ``model_dir``, strictly.

        Missing tensors, unexpected tensors, shape mismatches and non-float
        tensors raise ``CheckpointError`` naming them.  ``dtype`` None keeps the
        stored dtype (of ``model.embed_tokens.weight``); bf16/f16/f32 are accepted.
        """
        model_dir = Path(model_dir)
        cfg = ModelConfig.load(model_dir)
        tensors = read_safetensors(model_dir)
        with torch.device("meta"):
            model = cls(cfg)
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
