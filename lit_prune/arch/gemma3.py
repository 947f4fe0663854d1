"""Gemma 3 text decoders (``Gemma3ForCausalLM``, ``model_type="gemma3_text"``).

Module names are LLaMA's; what differs is handled elsewhere through the config: ``q_norm``/``k_norm`` act per head
over ``head_dim`` (shared by all heads, untouched by head removal), four norms per block (counted with the block),
GeGLU (``gate_proj``/``up_proj`` as in LLaMA), and ``layer_types`` (sliding / full attention) that depth surgery
shortens with the blocks. The embedding is scaled by ``sqrt(hidden_size)`` inside the embedding module.
"""

from __future__ import annotations

from lit_prune.arch.base import ModelAdapter


class Gemma3TextAdapter(ModelAdapter):
    """Gemma 3's text decoder: LLaMA's projection names."""

    model_types = ("gemma3_text",)
