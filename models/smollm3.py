"""SmolLM3 in PyTorch (``SmolLM3ForCausalLM``), weight-compatible with Hugging Face.

What it does: the Llama decoder (``edgerope.models.llama``) where the layers ``no_rope_layers`` marks 0
apply no position encoding at all (NoPE: every 4th layer in the released model, the pattern llama.cpp's
``smollm3`` arch hard-codes), tied embeddings by default, rope base 2,000,000 by default, sliding windows on
the layers ``layer_types`` marks when ``use_sliding_window``.  The rope (YaRN for long context) reaches the
other layers unchanged; ``CausalLM`` hands a NoPE layer no rope table.

What it does not do: generation.
"""

from __future__ import annotations

from torch import nn

from edgerope.models.base import CausalLM
from edgerope.models.config import ModelConfig
from edgerope.models.llama import DecoderLayer


class SmolLM3Model(CausalLM):
    """SmolLM3 causal LM: Llama layers, rope on the layers ``no_rope_layers`` marks 1 only."""

    model_types = ("smollm3",)

    def make_layer(self, cfg: ModelConfig, index: int) -> nn.Module:
        return DecoderLayer(cfg)


Model = SmolLM3Model
