"""LLaMA and the families that share its module names: Mistral, Qwen2 (biased q/k/v), Qwen3 (q_norm/k_norm)."""

from __future__ import annotations

from lit_prune.arch.base import ModelAdapter


class LlamaAdapter(ModelAdapter):
    """Separate ``q/k/v/o_proj``, gated MLP ``gate/up/down_proj``: the base class's defaults."""

    model_types = ("llama", "mistral", "qwen2", "qwen3")
