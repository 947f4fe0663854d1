"""Phi-3 / Phi-3.5 / Phi-4-mini decoders: one fused ``qkv_proj`` (rows ``[q; k; v]``) and one ``gate_up_proj``.

The slice maps put query head ``h`` at rows ``h·d_h ..`` of ``qkv_proj``, KV group ``g`` at ``H·d_h + g·d_h ..`` (k)
and ``(H + G)·d_h + g·d_h ..`` (v), neuron ``j`` at rows ``j`` (gate) and ``I + j`` (up) of ``gate_up_proj``. The
attention forward splits ``qkv`` at ``config.num_attention_heads · d_h``, so after head removal each attention module
gets its own config copy holding its head counts.
"""

from __future__ import annotations

from torch import nn

from lit_prune.arch.base import ModelAdapter, own_config


class Phi3Adapter(ModelAdapter):
    """Fused ``qkv_proj`` and ``gate_up_proj``; ``o_proj`` and ``down_proj`` as in LLaMA."""

    model_types = ("phi3",)
    q_attr = k_attr = v_attr = "qkv_proj"
    gate_attr = up_attr = "gate_up_proj"

    def on_attention_resized(self, attention: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        """Also give the module a config whose head counts split ``qkv`` where its rows now are."""
        super().on_attention_resized(attention, num_heads, num_kv_heads)
        own_config(attention, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads)
