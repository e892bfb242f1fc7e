"""The built-in demo: one tiny model, every rope scaling method, PyTorch versus llama.cpp at 8x context.

For each method a tiny Llama (trained context 256, extended x8 to 2048) is
made by ``edgerope.models.tiny_random``, converted to GGUF by ``edgerope.convert.export``, and its
logits at every one of 2048 positions are compared between the PyTorch model
and the real llama.cpp runtime with an f32, an f16 and a q8_0 KV cache.  The
YaRN model is also quantized to Q8_0 with llama.cpp's own quantizer.

The tiny model has random weights: the demo proves that both engines compute
the same function, not that the model reads long documents (that is the
fine-tuning demo's job).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from edgerope.models.config import ModelConfig

ORIGINAL_CONTEXT = 256
FACTOR = 8

# name -> HF rope_parameters (5.x form); the tiny model's context becomes FACTOR x ORIGINAL_CONTEXT
VARIANTS: dict[str, dict[str, Any]] = {
    "none (extrapolated)": {"rope_type": "default", "rope_theta": 10000.0},
    "linear x8": {"rope_type": "linear", "factor": 8.0},
    "ntk-aware x8": {"rope_type": "ntk", "alpha": 8.0},
    "yarn x8": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIGINAL_CONTEXT},
    "yarn x8, attention_factor 1": {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": ORIGINAL_CONTEXT,
        "attention_factor": 1.0,
    },
    "yarn x8, mscale 1 / 0.5": {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": ORIGINAL_CONTEXT,
        "mscale": 1.0,
        "mscale_all_dim": 0.5,
    },
    "llama3 x8": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": ORIGINAL_CONTEXT,
    },
}
KV_SETTINGS = (("f32", "f32", False), ("f16", "f16", False), ("q8_0", "q8_0", True))


@dataclass
class DemoRow:
    variant: str
    rope: str
    gguf_rope_keys: dict[str, Any]
    errors: dict[str, dict[str, float]]  # kv setting -> {"within": rel L2 <= L0, "beyond": rel L2 > L0}


@dataclass
class DemoReport:
    workdir: str
    n_positions: int
    original_context: int
    model: str
    rows: list[DemoRow] = field(default_factory=list)
    quantized: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_demo(
    workdir: str | Path,
    *,
    n_positions: int = FACTOR * ORIGINAL_CONTEXT,
    seed: int = 0,
    on_step: Callable[[str], None] | None = None,
) -> DemoReport:
    """Build, convert and check every variant under ``workdir``; returns the per-variant error table."""
    from edgerope.convert.export import convert
    from edgerope.models.config import ModelConfig
    from edgerope.models.tiny_random import train_tokenizer
    from edgerope.rope.scaling import describe

    step = on_step or (lambda _msg: None)
    start = time.perf_counter()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    step("training the tiny tokenizer on CPython's documentation")
    tok_dir = train_tokenizer(work / "tokenizer").parent
    report = DemoReport(str(work), n_positions, ORIGINAL_CONTEXT, "")
    rng = np.random.default_rng(seed)
    for name, rope_parameters in VARIANTS.items():
        step(f"{name}: make, convert, compare")
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        hf_dir = _make_checkpoint(work / slug, rope_parameters, n_positions=n_positions, tok_dir=tok_dir, seed=seed)
        cfg = ModelConfig.load(hf_dir)
        report.model = _model_line(cfg)
        gguf_path = work / f"{slug}.f32.gguf"
        convert(hf_dir, gguf_path, outtype="f32", force=True)
        tokens = [1] + rng.integers(3, cfg.vocab_size, size=n_positions - 1).tolist()
        errors = _errors(hf_dir, gguf_path, tokens=tokens, n_positions=n_positions)
        report.rows.append(DemoRow(name, describe(cfg.rope), _rope_keys(gguf_path), errors))
        if name == "yarn x8":
            step("yarn x8: quantize to Q8_0 with llama.cpp's quantizer")
            q8 = work / f"{slug}.Q8_0.gguf"
            report.quantized = _quantized(hf_dir, gguf_path, q8, tokens=tokens, n_positions=n_positions)
    report.seconds = time.perf_counter() - start
    return report


def _make_checkpoint(out: Path, rope_parameters: dict[str, Any], *, n_positions: int, tok_dir: Path, seed: int) -> Path:
    """The tiny model with ``rope_parameters``: context ``n_positions`` when scaled, else the original context."""
    from edgerope.models.tiny_random import make_tiny_checkpoint

    scaled = rope_parameters["rope_type"] not in ("default",)
    return make_tiny_checkpoint(
        out,
        rope_parameters={"rope_theta": 10000.0, **rope_parameters},
        max_position_embeddings=n_positions if scaled else ORIGINAL_CONTEXT,
        tokenizer_dir=tok_dir,
        seed=seed,
    )


def _model_line(cfg: ModelConfig) -> str:
    return (
        f"tiny {cfg.model_type}: {cfg.n_params / 1e6:.2f}M parameters, {cfg.num_hidden_layers} layers, "
        f"head_dim {cfg.head_dim}, {cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads"
    )


def _errors(hf_dir: Path, gguf_path: Path, *, tokens: list[int], n_positions: int) -> dict[str, dict[str, float]]:
    """Relative L2 error of llama.cpp's logits against PyTorch's, per KV setting: within and beyond the original."""
    from edgerope.evaluation import parity

    results = parity.check_parity(
        hf_dir,
        gguf_path,
        tokens=tokens,
        original_context=ORIGINAL_CONTEXT,
        kv_settings=KV_SETTINGS,
        n_ctx=n_positions,
    )
    errors = {}
    for res in results:
        within = res.buckets[0]
        beyond = res.buckets[1:]
        diff_beyond = max((b.rel_l2 for b in beyond), default=float("nan"))
        errors[res.kv + (" +FA" if res.flash_attn else "")] = {"within": within.rel_l2, "beyond": diff_beyond}
    return errors


def _rope_keys(gguf_path: Path) -> dict[str, Any]:
    """The GGUF's rope and context-length keys, and its rope frequency-factor tensors."""
    from edgerope.gguf.reader import open_gguf

    with open_gguf(gguf_path) as view:
        keys = {k: v for k, v in view.kv().items() if ".rope." in k or k.endswith(".context_length")}
        keys.update({name: "F32 tensor" for name in view.freq_factors()})
    return keys


def _quantized(hf_dir: Path, gguf_path: Path, out: Path, *, tokens: list[int], n_positions: int) -> dict[str, Any]:
    """``gguf_path`` quantized to Q8_0 by llama.cpp into ``out``; its size and error with a q8_0 KV cache."""
    from edgerope.convert.quantize import quantize
    from edgerope.evaluation import parity

    q = quantize(gguf_path, out, qtype="Q8_0", force=True)
    qres = parity.check_parity(
        hf_dir,
        q.path,
        tokens=tokens,
        original_context=ORIGINAL_CONTEXT,
        kv_settings=(("q8_0", "q8_0", True),),
        n_ctx=n_positions,
    )[0]
    return {
        "path": str(q.path),
        "bytes": Path(q.path).stat().st_size,
        "f32_bytes": gguf_path.stat().st_size,
        "rel_l2_q8_0_kv": qres.rel_l2,
    }
