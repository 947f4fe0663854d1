"""Phi-1 / Phi-1.5 / Phi-2 decoders: biased ``q/k/v_proj`` and ``dense``, a non-gated MLP ``fc1 -> act -> fc2``.

Attention and MLP run in parallel on one ``input_layernorm`` output; the final norm is ``final_layernorm``; the
LM head has a bias. With ``qk_layernorm=True`` the q/k LayerNorms are sized ``hidden_size // num_attention_heads``,
so removing heads would break a reload: head pruning is refused there (neurons and blocks still prune).
"""

from __future__ import annotations

from torch import nn

from lit_prune.arch.base import ModelAdapter


class PhiAdapter(ModelAdapter):
    """Phi-2's names: ``dense`` is the attention output, ``fc1``/``fc2`` the MLP (no gate)."""

    model_types = ("phi",)
    o_attr = "dense"
    gate_attr = None
    up_attr = "fc1"
    down_attr = "fc2"
    norm_attr = "final_layernorm"

    def check_head_pruning(self, model: nn.Module) -> None:
        """Refuse head removal when the q/k LayerNorm widths are derived from the head count."""
        if getattr(self.config(model), "qk_layernorm", False):
            raise ValueError(
                "This Phi model has qk_layernorm=True: its q/k LayerNorms are sized hidden_size // "
                "num_attention_heads, so removing heads cannot be reloaded; prune MLP neurons or blocks only"
            )
