"""Parameter counts of a causal LM: total, embedding (input embedding plus an untied LM head) and the rest."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from torch import nn

from lit_prune.arch import adapter_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of the base model; tied weights are counted once, unmerged LoRA adapters not at all.

    Args:
        total: every parameter.
        embedding: the input embedding, plus the LM head when it is not tied to it.
        non_embedding: ``total - embedding`` (blocks and the final norm): what depth and width pruning shrink.
    """

    total: int
    embedding: int
    non_embedding: int

    def as_dict(self) -> dict[str, int]:
        """The counts as a plain dict (for loggers and JSON)."""
        return asdict(self)


def count_params(model: nn.Module) -> ParamCount:
    """Count ``model``'s parameters through its :class:`lit_prune.arch.ModelAdapter`.

    The counts describe the base model: unmerged LoRA adapters (PEFT ``lora_A``/``lora_B``, ``lora_embedding_*``,
    ``lora_magnitude_vector``) are not counted, and a LoRA-wrapped ``lm_head`` or ``embed_tokens`` counts as the
    layer it wraps. Merge the adapters first (``merge_and_unload``) to count the deployed model.

    Args:
        model: a supported Hugging Face causal LM, or a wrapper around one (``CausalLMModule``, PEFT model).

    Returns:
        A :class:`ParamCount`.

    Raises:
        lit_prune.arch.UnsupportedModelError: if the model family has no adapter.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
        >>> count_params(LlamaForCausalLM(cfg)).embedding
        512
    """
    adapter = adapter_for(model)
    total = adapter.total_params(model)
    embedding = adapter.embedding_params(model)
    return ParamCount(total=total, embedding=embedding, non_embedding=total - embedding)
