"""Per-block widths of a (possibly pruned) model and the config record that lets non-uniform models reload.

A stock Hugging Face config describes one width for every block (``num_attention_heads``, ``num_key_value_heads``,
``intermediate_size``). After width pruning with a non-uniform allocation the blocks differ, so lit-prune writes
the widths of every block into the config under :data:`LAYER_SHAPES_KEY` (saved in ``config.json``), sets the global
fields to widths every block fits into, and :func:`lit_prune.load_pretrained` rebuilds the blocks at their saved
widths before the weights are loaded. When all blocks agree the record is dropped and the config alone describes the
model, so plain ``AutoModelForCausalLM.from_pretrained`` loads it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from lit_prune.arch import adapter_for, model_config, text_config
from lit_prune.surgery.width import prune_heads, prune_neurons

LAYER_SHAPES_KEY = "lit_prune_layer_shapes"
"""Config attribute (and ``config.json`` key) holding one :class:`BlockShape` dict per block of a non-uniform model."""


@dataclass(frozen=True)
class BlockShape:
    """The widths of one block."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


def block_shapes(model: nn.Module) -> list[BlockShape]:
    """The current widths of every block, read from the tensors."""
    adapter = adapter_for(model)
    return [
        BlockShape(attn.num_heads, attn.num_kv_heads, mlp.intermediate_size)
        for attn, mlp in zip(adapter.attentions(model), adapter.mlps(model))
    ]


def is_uniform(shapes: list[BlockShape]) -> bool:
    """Whether every block has the same widths (a stock config can describe the model)."""
    return len(set(shapes)) <= 1


def sync_config(model: nn.Module) -> list[BlockShape]:
    """Make the (text) config describe the current block widths; returns them.

    Uniform widths go into ``num_attention_heads`` / ``num_key_value_heads`` / ``intermediate_size`` and any
    :data:`LAYER_SHAPES_KEY` record is removed, unless the config class rejects them (transformers' ``LlamaConfig``
    needs ``hidden_size`` to be a multiple of the head count): then the model is recorded like a non-uniform one.
    Non-uniform widths are recorded per block under :data:`LAYER_SHAPES_KEY` and the global fields take widths every
    block fits into (the most KV heads times the most query heads per KV head, raised until the config class accepts
    it; the widest MLP). ``head_dim`` is always written explicitly, because ``hidden_size // num_attention_heads`` no
    longer holds after heads are removed.
    """
    adapter = adapter_for(model)
    cfg = text_config(model_config(model))
    shapes = block_shapes(model)
    if cfg is None or not shapes:
        return shapes
    checkable = _config_valid(cfg)  # a config that fails its own checks already is not second-guessed below
    cfg.head_dim = adapter.head_dim(model)
    if is_uniform(shapes):
        first = shapes[0]
        cfg.num_attention_heads = first.num_attention_heads
        cfg.num_key_value_heads = first.num_key_value_heads
        cfg.intermediate_size = first.intermediate_size
        if not checkable or _config_valid(cfg):
            if LAYER_SHAPES_KEY in cfg.__dict__:
                delattr(cfg, LAYER_SHAPES_KEY)
            return shapes
        # e.g. transformers' LlamaConfig refuses a hidden_size that is not a multiple of the head count: keep the
        # per-block record and global widths the config accepts
    kv_heads = max(s.num_key_value_heads for s in shapes)
    per_kv = max(s.num_attention_heads // s.num_key_value_heads for s in shapes)
    cfg.intermediate_size = max(s.intermediate_size for s in shapes)
    _set_global_heads(cfg, kv_heads, per_kv)
    setattr(cfg, LAYER_SHAPES_KEY, [asdict(s) for s in shapes])
    return shapes


def _set_global_heads(cfg: Any, kv_heads: int, per_kv: int) -> None:
    """Set global head counts every block fits into (>= ``kv_heads`` KV heads, >= ``per_kv`` query heads each).

    The smallest such pair comes first; larger ones are tried until the config class accepts it (LlamaConfig needs
    ``hidden_size`` to be a multiple of the head count). The blocks keep their real widths either way.
    """
    limit = max(int(getattr(cfg, "hidden_size", 0) or 0), kv_heads * per_kv)
    for kv in range(kv_heads, limit + 1):
        for per in range(per_kv, limit // kv + 1):
            cfg.num_key_value_heads, cfg.num_attention_heads = kv, kv * per
            if _config_valid(cfg):
                return
    cfg.num_key_value_heads, cfg.num_attention_heads = kv_heads, kv_heads * per_kv


def _config_valid(cfg: Any) -> bool:
    """Whether the config passes its class's own validation (what ``from_pretrained`` will run on it)."""
    validate = getattr(cfg, "validate", None)
    if not callable(validate):
        return True
    try:
        validate()
    except Exception:  # noqa: BLE001 - any validation failure means "not loadable as is"
        return False
    return True


def loads_without_lit_prune(model: nn.Module) -> bool:
    """Whether the model's config (after :func:`sync_config`) describes it alone, so plain ``from_pretrained`` works."""
    cfg = text_config(model_config(model))
    return cfg is None or LAYER_SHAPES_KEY not in cfg.__dict__


def shapes_from_config(config: Any) -> list[BlockShape] | None:
    """The per-block record of a non-uniform model's config, or None for a stock (uniform) config.

    Raises:
        ValueError: if the record is malformed or does not have one entry per block.
    """
    cfg = text_config(config)
    record = getattr(cfg, LAYER_SHAPES_KEY, None)
    if record is None:
        return None
    try:
        shapes = [BlockShape(**{k: int(v) for k, v in entry.items()}) for entry in record]
    except (TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"config.{LAYER_SHAPES_KEY} is malformed ({err}); expected one dict per block") from None
    if len(shapes) != cfg.num_hidden_layers:
        raise ValueError(
            f"config.{LAYER_SHAPES_KEY} has {len(shapes)} entries for {cfg.num_hidden_layers} blocks "
            "(num_hidden_layers); the checkpoint is inconsistent: restore the config.json that "
            "lit_prune.save_pretrained wrote next to these weights (one entry per block)"
        )
    return shapes


def resize_to_shapes(model: nn.Module, shapes: list[BlockShape]) -> None:
    """Shrink freshly built blocks to ``shapes`` (the first heads of the first KV groups; the first neurons).

    Used when a non-uniform checkpoint is loaded: the model is built at the config's global (widest) widths and each
    block is cut to its recorded widths before the saved weights are loaded into it, so which indices survive does
    not matter here.
    """
    adapter = adapter_for(model)
    if len(shapes) != adapter.num_blocks(model):
        raise ValueError(f"{len(shapes)} block shapes for a model with {adapter.num_blocks(model)} blocks")
    for b, (attn, shape) in enumerate(zip(adapter.attentions(model), shapes)):
        per_group = shape.num_attention_heads // shape.num_key_value_heads
        if per_group * shape.num_key_value_heads != shape.num_attention_heads or (
            shape.num_attention_heads > attn.num_heads or shape.num_key_value_heads > attn.num_kv_heads
        ):
            raise ValueError(f"Block {b}: recorded widths {shape} do not fit the built block ({attn.num_heads} heads)")
        keep = [g * attn.group_size + j for g in range(shape.num_key_value_heads) for j in range(per_group)]
        if any(j >= attn.group_size for j in range(per_group)):
            raise ValueError(f"Block {b}: {per_group} query heads per KV head exceed the built group size")
        prune_heads(model, b, keep)
        prune_neurons(model, b, range(shape.intermediate_size))
