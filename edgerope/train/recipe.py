"""The recipe of a fine-tuning run, decided before training: scaled rope, memory estimate, lr schedule, device.

What it does:

* ``original_context_of`` / ``scaled_rope``: the scaled rope variant (built
  with ``edgerope.rope.scaling``) for a checkpoint, a type and a factor or target,
  refusing inconsistent requests; ``kept_rope``: the checkpoint's own rope for ``rope="keep"``
  (``--rope keep``: LongRoPE, llama3, ... trained as declared), refusing a factor or target;
* ``estimate_memory`` (params + grads + AdamW + activations; full or LoRA), ``available_memory``
  and ``peak_memory`` (measured after a run);
* ``default_lr`` (YaRN's 2e-5 scaled to the model size) and ``lr_multiplier``
  (linear warmup, cosine or linear decay);
* device and autocast choice.

What it does not do: train (``edgerope.train.finetune``), save state (``edgerope.train.checkpoint``).
"""

from __future__ import annotations

import math

import torch

from edgerope.errors import ConfigError, EdgeropeError, RopeConfigError
from edgerope.models.config import ModelConfig
from edgerope.rope import EXTENDING_CHOICES, FINETUNE_CHOICES
from edgerope.rope.scaling import (
    Default,
    Linear,
    RopeScaling,
    Yarn,
    describe,
    ntk_theta,
    original_context,
    validate_for_context,
)
from edgerope.system.memory import available_memory as available_memory_cpu
from edgerope.system.memory import process_peak_rss, process_rss

PRECISIONS = ("auto", "fp32", "bf16")
SCHEDULES = ("cosine", "linear")
# rope "keep": the default row length is the checkpoint's context, at most this many tokens (a row of a 128K
# context is far past what one device trains; --seq-len goes further, the memory check still refuses what won't fit)
KEEP_SEQ_LEN = 32768
YARN_LR, YARN_PARAMS = 2e-5, 6.7e9  # YaRN's recipe: lr 2e-5 for Llama 2 7B
LORA_LR_X = 5.0  # LoRA's default lr over full fine-tuning's (bench/bench_lora.py measured it on the tiny model)


# ---------------------------------------------------------------------------------------------------- rope


def original_context_of(cfg: ModelConfig, *, rescale: bool = False, where: str = "config.json") -> int:
    """The context the checkpoint was pre-trained at; refuses an already scaled one unless ``rescale``."""
    scaled = not isinstance(cfg.rope, Default) or bool(cfg.rope_finetuned)
    if scaled and not rescale:
        raise RopeConfigError(
            f"the checkpoint is already scaled ({describe(cfg.rope)}, fine-tuned: {cfg.rope_finetuned})",
            where=where,
            fix="train at its own rope with rope='keep' (--rope keep), fine-tune the unscaled base checkpoint, "
            "or pass rescale=True (--rescale) to scale it again",
        )
    return original_context(cfg.rope) or cfg.max_position_embeddings


def scaled_rope(
    rope: str, *, theta: float, head_dim: int, original: int, factor: float | None, target: int | None
) -> tuple[RopeScaling, int]:
    """(the scaled rope variant, the target context) for ``rope`` in ``EXTENDING_CHOICES``.

    NTK-aware scaling is returned in the form HF stores it: plain rope with the enlarged base.
    """
    if rope not in EXTENDING_CHOICES:
        raise RopeConfigError(f"unknown rope type {rope!r}", fix=f"use one of {', '.join(FINETUNE_CHOICES)}")
    if factor is None and target is None:
        raise ConfigError("give a scaling factor or a target context", fix="e.g. --factor 8")
    if factor is None:
        factor = target / original  # type: ignore[operator]
    if target is None:
        target = int(round(factor * original))
    if target <= original:
        raise RopeConfigError(
            f"the target context {target} must exceed the original context {original}",
            fix=f"use a factor > 1, e.g. factor 8 -> target {8 * original}",
        )
    if abs(factor * original - target) > 0.5:
        raise RopeConfigError(
            f"factor {factor:g} is inconsistent with target {target}: {factor:g} x {original} = {factor * original:g}",
            fix=f"give one of them, or factor {target / original:g} for target {target}",
        )
    variant: RopeScaling
    if rope == "yarn":
        variant = Yarn(theta=theta, factor=float(factor), original_max_position_embeddings=original)
    elif rope == "linear":
        variant = Linear(theta=theta, factor=float(factor))
    else:
        variant = Default(theta=ntk_theta(theta, float(factor), head_dim))
    validate_for_context(variant, context_length=target)
    return variant, target


def kept_rope(
    cfg: ModelConfig, *, factor: float | None, target: int | None, rescale: bool
) -> tuple[RopeScaling, int, int, int]:
    """(the checkpoint's own rope, its original context, the context it reaches, the default row length) for
    rope ``"keep"``.

    The rope is ``cfg.rope`` exactly as config.json declares it (LongRoPE's factor lists, llama3's bands, ...);
    the context is what ``edgerope convert`` advertises for it (``max_position_embeddings``, or factor x
    original for a scaled config that leaves it at the original length); rows default to
    ``max_position_embeddings`` tokens, at most ``KEEP_SEQ_LEN``.  A factor, a target or ``rescale`` asks for a
    new rope: refused, naming the flag.
    """
    asked = (("--factor (factor=)", factor is not None), ("--target-context (target_context=)", target is not None),
             ("--rescale (rescale=True)", rescale))  # fmt: skip
    given = " and ".join(flag for flag, yes in asked if yes)
    if given:
        raise ConfigError(
            f"rope 'keep' trains at the checkpoint's own rope ({describe(cfg.rope)}); {given} would scale it again",
            where="--rope keep (rope='keep')",
            fix=f"drop {given}, or scale anew with --rope {'|'.join(EXTENDING_CHOICES)}",
        )
    from edgerope.convert.export import extended_context  # the context convert writes for this config

    target = extended_context(cfg, cfg.rope)
    original = min(original_context(cfg.rope) or target, target)
    return cfg.rope, original, target, min(cfg.max_position_embeddings, KEEP_SEQ_LEN)


# ---------------------------------------------------------------------------------------------------- memory


def estimate_memory(
    cfg: ModelConfig,
    *,
    batch_size: int,
    seq_len: int,
    grad_checkpointing: bool,
    bytes_per_act: int = 4,
    lora_params: int | None = None,
    lora_rank: int = 0,
) -> int:
    """Bytes one training step needs: weights, gradients, AdamW's two moments, activations, logits.

    Full fine-tuning: fp32 weights, grads and AdamW's two moments, 16 B/param.  LoRA (``lora_params`` trainable
    parameters of rank ``lora_rank``): the frozen fp32 weights (4 B/param) plus 16 B per adapter parameter, and
    each adapted projection keeps its rank-r intermediate (B x T x r per target, 7 per layer at most) -- the
    activations of the frozen layers stay, since the gradient flows through them to earlier adapters.
    Activations per layer ~ B x T x (12 d + 4 i) values (norms, q/k/v, attention output, MLP), plus
    the B x H x T x T attention weights when the attention kernel materialises them, plus the logits
    (B x T x V, float32, three copies: logits, log-softmax, grad).  With gradient checkpointing only each
    layer's input is kept, plus one layer's activations during its recompute.  An estimate, not a bound.
    """
    n = cfg.n_params
    states = 16 * n if lora_params is None else 4 * n + 16 * lora_params
    B, T, d, i = batch_size, seq_len, cfg.hidden_size, cfg.intermediate_size
    per_layer = B * T * (12 * d + 4 * i + 7 * lora_rank) * bytes_per_act
    per_layer += 2 * B * cfg.num_attention_heads * T * T * bytes_per_act
    layers = cfg.num_hidden_layers
    acts = (layers * B * T * d * bytes_per_act + per_layer) if grad_checkpointing else layers * per_layer
    logits = 3 * B * T * cfg.vocab_size * 4
    return int(states + acts + logits)


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device``: CUDA free memory, else the planner's MemAvailable (unknown: do not refuse)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])

    try:
        return available_memory_cpu()
    except EdgeropeError:
        return 1 << 62


def memory_in_use(device: torch.device) -> int:
    """Bytes in use now (CUDA: allocated, and its peak counter is reset; CPU: resident set size)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))
    return process_rss()


def peak_memory(device: torch.device) -> int:
    """Peak bytes: CUDA max allocated, else the process's peak resident set size (``process_peak_rss``)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return process_peak_rss()


# ---------------------------------------------------------------------------------------------------- recipe


def default_lr(n_params: int, *, lora: bool = False) -> float:
    """YaRN's 2e-5 for 7B, scaled by sqrt(7B / n_params) and capped at 1e-3 for small models; LoRA: ``LORA_LR_X``
    times that (the adapter starts at zero and moves only a low-rank part), capped at 1e-2."""
    full = min(1e-3, max(YARN_LR, YARN_LR * math.sqrt(YARN_PARAMS / n_params)))
    return float(min(1e-2, LORA_LR_X * full) if lora else full)


def lr_multiplier(step: int, *, steps: int, warmup: int, schedule: str, min_ratio: float = 0.1) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup, then decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    t = (step - warmup) / max(1, steps - warmup)
    decay = 0.5 * (1 + math.cos(math.pi * t)) if schedule == "cosine" else 1 - t
    return min_ratio + (1 - min_ratio) * decay


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}", fix=f"use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    bf16_ok = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    if precision == "bf16" and not bf16_ok:
        raise ConfigError(f"bf16 is not supported on {device}", fix="use precision fp32")
    if precision == "auto":  # bf16 where the hardware has it; CPU bf16 autocast is slow, keep fp32
        return torch.bfloat16 if device.type == "cuda" and bf16_ok else None
    return torch.bfloat16
