"""One view over decoder-only model families: where the blocks, projections and heads are, and what they cost.

Everything else in lit-prune asks the adapter instead of reaching into module names, so a new family is one more
adapter in the registry, never an ``if`` chain elsewhere. Head and neuron counts are read from the current module
shapes (they change under pruning); ``head_dim`` is read from the config, never assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model's ``config.model_type`` has no registered :class:`ModelAdapter`."""


@dataclass(frozen=True)
class AttentionView:
    """The projections of one attention module and its current head layout."""

    module: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for multi-head attention)."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class MLPView:
    """The projections of one gated MLP (``down(act(gate(x)) * up(x))``)."""

    module: nn.Module
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear

    @property
    def intermediate_size(self) -> int:
        """Current number of MLP neurons."""
        return self.down.in_features


def _linear_params(linear: nn.Linear) -> tuple[int, int]:
    """Parameters per output row and per input column of a Linear (bias counted with the rows)."""
    per_row = linear.in_features + (1 if linear.bias is not None else 0)
    return per_row, linear.out_features


def model_config(model: nn.Module) -> Any:
    """The Hugging Face config of ``model`` (unwrapped), or None."""
    return getattr(unwrap(model), "config", None)


_ADAPTER_MARKER = "lora_"
"""Parameters whose qualified name contains this are PEFT LoRA adapters (``lora_A``, ``lora_B``,
``lora_embedding_A/B``, ``lora_magnitude_vector``), left out of every count so counts describe the base model."""


def _count(module: nn.Module) -> int:
    """Parameters of ``module``, tied weights once; unmerged LoRA adapters are not counted.

    Args:
        module: any module, possibly holding PEFT LoRA layers.

    Returns:
        The number of base-model parameter elements.
    """
    return sum(p.numel() for name, p in module.named_parameters() if _ADAPTER_MARKER not in name)


def _base_layer(module: nn.Module) -> nn.Module:
    """The layer a PEFT tuner layer wraps (following nested ``base_layer``s), or ``module`` itself."""
    seen = 0
    while isinstance(getattr(module, "base_layer", None), nn.Module) and seen < 8:
        module = module.base_layer  # type: ignore[assignment]
        seen += 1
    return module


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT wrapper or a ``CausalLMModule`` (or the model itself)."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
            if inner is model:
                break
            model = inner
        elif hasattr(model, "config"):
            break
        elif isinstance(getattr(model, "model", None), nn.Module):
            model = getattr(model, "model")  # a LightningModule holding the HF model
        else:
            break
    return model


class ModelAdapter:
    """Module paths and parameter accounting for one decoder family.

    Subclasses set the attribute names; the base class implements everything on top of them. All methods take
    the model (or a block) so one adapter serves every instance of its family.
    """

    model_types: tuple[str, ...] = ()
    decoder_attr: str = "model"
    layers_attr: str = "layers"
    attention_attr: str = "self_attn"
    mlp_attr: str = "mlp"
    q_attr, k_attr, v_attr, o_attr = "q_proj", "k_proj", "v_proj", "o_proj"
    gate_attr, up_attr, down_attr = "gate_proj", "up_proj", "down_proj"
    embed_attr: str = "embed_tokens"
    norm_attr: str = "norm"
    lm_head_attr: str = "lm_head"

    # --- structure ---------------------------------------------------------------------------------------------
    def decoder(self, model: nn.Module) -> nn.Module:
        """The decoder stack (embeddings, blocks, final norm) of a ``*ForCausalLM`` or bare decoder model."""
        model = unwrap(model)
        inner = getattr(model, self.decoder_attr, None)
        return inner if isinstance(inner, nn.Module) and hasattr(inner, self.layers_attr) else model

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The transformer blocks, in order."""
        layers = getattr(self.decoder(model), self.layers_attr)
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(f"Expected `{self.layers_attr}` to be an nn.ModuleList, got {type(layers).__name__}")
        return layers

    def num_blocks(self, model: nn.Module) -> int:
        """Current number of transformer blocks."""
        return len(self.blocks(model))

    def head_dim(self, model: nn.Module) -> int:
        """Per-head dimension from the config (``head_dim`` if set, else ``hidden_size // num_attention_heads``)."""
        cfg = model_config(model)
        explicit = getattr(cfg, "head_dim", None)
        return int(explicit) if explicit else int(cfg.hidden_size // cfg.num_attention_heads)

    def hidden_size(self, model: nn.Module) -> int:
        """Width of the residual stream."""
        return int(model_config(model).hidden_size)

    def attention(self, block: nn.Module, head_dim: int) -> AttentionView:
        """Projections and current head counts of a block's attention."""
        attn = getattr(block, self.attention_attr)
        q, k, v, o = (getattr(attn, a) for a in (self.q_attr, self.k_attr, self.v_attr, self.o_attr))
        if q.out_features % head_dim or k.out_features % head_dim:
            raise ValueError(
                f"q_proj/k_proj widths ({q.out_features}, {k.out_features}) are not multiples of head_dim={head_dim}"
            )
        return AttentionView(attn, q, k, v, o, q.out_features // head_dim, k.out_features // head_dim, head_dim)

    def mlp(self, block: nn.Module) -> MLPView:
        """Projections of a block's gated MLP."""
        mlp = getattr(block, self.mlp_attr)
        return MLPView(mlp, getattr(mlp, self.gate_attr), getattr(mlp, self.up_attr), getattr(mlp, self.down_attr))

    def attentions(self, model: nn.Module) -> list[AttentionView]:
        """Attention views of every block."""
        hd = self.head_dim(model)
        return [self.attention(b, hd) for b in self.blocks(model)]

    def mlps(self, model: nn.Module) -> list[MLPView]:
        """MLP views of every block."""
        return [self.mlp(b) for b in self.blocks(model)]

    def embeddings(self, model: nn.Module) -> nn.Embedding:
        """The input token embedding."""
        return getattr(self.decoder(model), self.embed_attr)

    def lm_head(self, model: nn.Module) -> nn.Linear | None:
        """The output projection, or None for a bare decoder."""
        return getattr(unwrap(model), self.lm_head_attr, None)

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm applied after the last block."""
        return getattr(self.decoder(model), self.norm_attr)

    # --- parameter accounting ----------------------------------------------------------------------------------
    def total_params(self, model: nn.Module) -> int:
        """All parameters, tied weights counted once; unmerged LoRA adapters are not counted."""
        return _count(unwrap(model))

    def embedding_params(self, model: nn.Module) -> int:
        """Input embedding plus the LM head when it is not tied to the embedding.

        Unmerged LoRA adapters are not counted: a PEFT-wrapped ``embed_tokens`` or ``lm_head`` counts as the base
        layer it wraps.
        """
        embed_weight: torch.Tensor = _base_layer(self.embeddings(model)).weight  # type: ignore[assignment]
        n = embed_weight.numel()
        head = self.lm_head(model)
        if head is not None:
            base_head = _base_layer(head)
            if base_head.weight is not embed_weight:
                n += _count(base_head)
        return n

    def non_embedding_params(self, model: nn.Module) -> int:
        """Everything but the embedding and an untied LM head; unmerged LoRA adapters are not counted."""
        return self.total_params(model) - self.embedding_params(model)

    def block_params(self, model: nn.Module) -> list[int]:
        """Parameters of each block (attention, MLP and norms); unmerged LoRA adapters are not counted."""
        return [_count(b) for b in self.blocks(model)]

    def head_params(self, view: AttentionView) -> int:
        """Parameters one query head owns: its q rows and its o_proj columns (k/v are shared by the group)."""
        q_row, _ = _linear_params(view.q)
        return view.head_dim * q_row + view.head_dim * view.o.out_features

    def kv_group_params(self, view: AttentionView) -> int:
        """Parameters one KV group owns: its query heads plus its k and v rows."""
        k_row, _ = _linear_params(view.k)
        v_row, _ = _linear_params(view.v)
        return view.group_size * self.head_params(view) + view.head_dim * (k_row + v_row)

    def neuron_params(self, view: MLPView) -> int:
        """Parameters one MLP neuron owns: a gate row, an up row and a down_proj column."""
        gate_row, _ = _linear_params(view.gate)
        up_row, _ = _linear_params(view.up)
        return gate_row + up_row + view.down.out_features


class LlamaAdapter(ModelAdapter):
    """LLaMA and the families that share its module names (Mistral, Qwen2, Qwen3)."""

    model_types = ("llama", "mistral", "qwen2", "qwen3")


_REGISTRY: dict[str, ModelAdapter] = {}


def register_adapter(adapter: ModelAdapter) -> None:
    """Make ``adapter`` the one :func:`adapter_for` returns for each of its ``model_types``."""
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter


def supported_model_types() -> list[str]:
    """Model types that have an adapter."""
    return sorted(_REGISTRY)


def adapter_for_type(model_type: str | None, what: str = "") -> ModelAdapter:
    """The adapter registered for ``model_type``; the loaders call it as soon as a config is read, before weights.

    Args:
        model_type: a ``config.model_type`` (``"llama"``, ...).
        what: what the type was read from (a class name, a ``config.json`` path), quoted in the error.

    Raises:
        UnsupportedModelError: naming the model type and listing the supported ones.
    """
    if model_type not in _REGISTRY:
        raise UnsupportedModelError(
            f"lit-prune has no adapter for model_type={model_type!r}{f' ({what})' if what else ''}; "
            f"supported: {supported_model_types()}. Register one with lit_prune.arch.register_adapter."
        )
    return _REGISTRY[model_type]


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model.config.model_type``.

    Raises:
        UnsupportedModelError: naming the model type and listing the supported ones.
    """
    return adapter_for_type(getattr(model_config(model), "model_type", None), type(model).__name__)


register_adapter(LlamaAdapter())
