"""Width surgery: remove attention heads and MLP neurons by replacing projections with smaller ``nn.Linear`` s.

Real tensors shrink (no masks): a block that keeps ``n`` of its ``H`` query heads gets a ``q_proj`` with ``n·d_h``
output rows and an ``o_proj`` with ``n·d_h`` input columns; KV heads whose query heads are all gone lose their
``k_proj`` / ``v_proj`` rows. Under GQA every surviving KV head must keep the same number of query heads (the
attention kernels repeat each KV head ``H / G`` times), and the query heads keep their order, so query head ``h``
still reads KV head ``h // (H / G)``. ``num_key_value_groups`` of the attention module is updated; the config is
brought in line with the new shapes by :func:`lit_prune.shapes.sync_config`.

Every argument is validated before anything is modified: a failing call leaves the model as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from lit_prune.arch import AttentionView, MLPView, ModelAdapter, adapter_for
from lit_prune.plan import _as_index

log = logging.getLogger(__name__)


def _checked_keep(keep: Iterable[int], width: int, what: str) -> list[int]:
    """Kept indices as a sorted list: integers in ``[0, width)``, unique, at least one."""
    if isinstance(keep, (str, bytes)) or not hasattr(keep, "__iter__"):
        raise ValueError(f"The {what} to keep must be a sequence of indices, got {keep!r}")
    values = list(keep.tolist() if isinstance(keep, torch.Tensor) else keep)
    ints = [_as_index(v) for v in values]
    bad = [v for v, i in zip(values, ints) if i is None or not 0 <= i < width]
    if bad:
        raise ValueError(f"The {what} to keep must be integer indices in [0, {width}), got {bad!r}")
    kept = sorted(i for i in ints if i is not None)
    if len(set(kept)) != len(kept):
        raise ValueError(f"The {what} to keep must not repeat an index, got {kept}")
    if not kept:
        raise ValueError(f"At least one of the {width} {what} must be kept, got none")
    return kept


def _check_plain_linear(*linears: nn.Module) -> None:
    """Surgery replaces plain ``nn.Linear`` s; a PEFT/quantized wrapper must be merged or converted first."""
    for linear in linears:
        if type(linear) is not nn.Linear:
            raise TypeError(
                f"Width surgery needs plain nn.Linear projections, got {type(linear).__name__}; merge LoRA "
                "adapters (`merge_and_unload()`) or dequantize the model before pruning heads or neurons"
            )


def _sliced(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new ``nn.Linear`` holding the selected output rows and/or input columns of ``linear`` (bias follows rows)."""
    weight = linear.weight.detach()
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    out_features, in_features = weight.shape
    # built on the meta device (no init of a weight that is replaced at once), then given the sliced tensors
    new = nn.Linear(in_features, out_features, bias=linear.bias is not None, device="meta", dtype=weight.dtype)
    new.weight = nn.Parameter(
        weight if rows is not None or cols is not None else weight.clone(), requires_grad=linear.weight.requires_grad
    )
    if linear.bias is not None:
        bias = linear.bias.detach()
        bias = bias.index_select(0, rows.to(bias.device)) if rows is not None else bias.clone()
        new.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    mask = linear._buffers.get("weight_mask")  # a sparsity keep mask (lit_prune.sparse) follows the kept weights
    if mask is not None and mask.dtype == torch.bool:
        if rows is not None:
            mask = mask.index_select(0, rows.to(mask.device))
        if cols is not None:
            mask = mask.index_select(1, cols.to(mask.device))
        new.register_buffer("weight_mask", mask.clone(), persistent=True)
    new.train(linear.training)
    return new


def _head_rows(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    """Row (or column) indices of the given heads in a ``(heads·head_dim, ·)`` projection."""
    return (torch.tensor(heads, dtype=torch.long)[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def kv_heads_kept(view: AttentionView, keep: Sequence[int]) -> list[int]:
    """The KV heads that survive when ``keep`` query heads do, after checking GQA stays uniform.

    Raises:
        ValueError: if the surviving KV heads would keep different numbers of query heads.
    """
    group = view.group_size
    per_kv: dict[int, int] = {}
    for h in keep:
        per_kv[h // group] = per_kv.get(h // group, 0) + 1
    if len(set(per_kv.values())) > 1:
        raise ValueError(
            f"Under GQA every surviving KV head must keep the same number of query heads; keeping query heads "
            f"{list(keep)} (group size {group}) leaves {dict(sorted(per_kv.items()))} per KV head. Keep the same "
            "number of heads in every group (gqa='query') or whole groups (gqa='group')"
        )
    return sorted(per_kv)


def prune_heads(model: nn.Module, block: int, keep: Iterable[int]) -> list[int]:
    """Keep only the query heads ``keep`` of block ``block`` (and the KV heads they read); in place.

    Args:
        model: a Hugging Face causal LM (or a wrapper :func:`lit_prune.arch.unwrap` sees through).
        block: index of the block, in the model's current numbering.
        keep: query-head indices to keep (current numbering of that block).

    Returns:
        The kept query-head indices, sorted.

    Raises:
        ValueError: bad block or head indices, nothing kept, or a non-uniform GQA result. Nothing is modified.
        TypeError: if a projection is not a plain ``nn.Linear`` (merge adapters first).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                   num_attention_heads=4, num_key_value_heads=2, head_dim=8)
        >>> model = LlamaForCausalLM(cfg)
        >>> prune_heads(model, 0, [0, 2])   # one query head from each of the 2 KV groups
        [0, 2]
        >>> attn = model.model.layers[0].self_attn
        >>> attn.q_proj.out_features, attn.k_proj.out_features, attn.num_key_value_groups
        (16, 16, 1)
    """
    adapter = adapter_for(model)
    view = _view(adapter, model, block)
    kept = _checked_keep(keep, view.num_heads, f"query heads of block {block}")
    kv_kept = kv_heads_kept(view, kept)
    _check_plain_linear(view.q, view.k, view.v, view.o)
    if len(kept) == view.num_heads:
        return kept

    q_rows = _head_rows(kept, view.head_dim)
    attn = view.module
    setattr(attn, adapter.q_attr, _sliced(view.q, rows=q_rows))
    setattr(attn, adapter.o_attr, _sliced(view.o, cols=q_rows))
    if len(kv_kept) < view.num_kv_heads:
        kv_rows = _head_rows(kv_kept, view.head_dim)
        setattr(attn, adapter.k_attr, _sliced(view.k, rows=kv_rows))
        setattr(attn, adapter.v_attr, _sliced(view.v, rows=kv_rows))
    _set_int_attr(attn, "num_key_value_groups", len(kept) // len(kv_kept))
    _set_int_attr(attn, "num_heads", len(kept))
    _set_int_attr(attn, "num_attention_heads", len(kept))
    _set_int_attr(attn, "num_key_value_heads", len(kv_kept))
    log.debug(
        "Block %d: query heads %d -> %d, KV heads %d -> %d",
        block,
        view.num_heads,
        len(kept),
        view.num_kv_heads,
        len(kv_kept),
    )
    return kept


def prune_neurons(model: nn.Module, block: int, keep: Iterable[int]) -> list[int]:
    """Keep only the MLP neurons ``keep`` of block ``block`` (rows of gate/up, columns of down); in place.

    Args:
        model: a Hugging Face causal LM (or a wrapper :func:`lit_prune.arch.unwrap` sees through).
        block: index of the block, in the model's current numbering.
        keep: neuron indices to keep.

    Returns:
        The kept neuron indices, sorted.

    Raises:
        ValueError: bad block or neuron indices, or nothing kept. Nothing is modified.
        TypeError: if a projection is not a plain ``nn.Linear`` (merge adapters first).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                   num_attention_heads=4, num_key_value_heads=2)
        >>> model = LlamaForCausalLM(cfg)
        >>> len(prune_neurons(model, 1, range(0, 32, 2)))
        16
        >>> model.model.layers[1].mlp.down_proj.in_features
        16
    """
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    _check_block(block, len(blocks))
    view: MLPView = adapter.mlp(blocks[block])
    kept = _checked_keep(keep, view.intermediate_size, f"MLP neurons of block {block}")
    _check_plain_linear(view.gate, view.up, view.down)
    if len(kept) == view.intermediate_size:
        return kept
    rows = torch.tensor(kept, dtype=torch.long)
    setattr(view.module, adapter.gate_attr, _sliced(view.gate, rows=rows))
    setattr(view.module, adapter.up_attr, _sliced(view.up, rows=rows))
    setattr(view.module, adapter.down_attr, _sliced(view.down, cols=rows))
    _set_int_attr(view.module, "intermediate_size", len(kept))
    log.debug("Block %d: MLP neurons %d -> %d", block, view.intermediate_size, len(kept))
    return kept


def check_width_keep(
    model: nn.Module, keep_heads: Mapping[int, Sequence[int]], keep_neurons: Mapping[int, Sequence[int]]
) -> None:
    """Validate a whole width change before any block is touched (so a multi-block change is all or nothing)."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    head_dim = adapter.head_dim(model)
    for block, keep in keep_heads.items():
        _check_block(block, len(blocks))
        view = adapter.attention(blocks[block], head_dim)
        kv_heads_kept(view, _checked_keep(keep, view.num_heads, f"query heads of block {block}"))
        _check_plain_linear(view.q, view.k, view.v, view.o)
    for block, keep in keep_neurons.items():
        _check_block(block, len(blocks))
        mlp = adapter.mlp(blocks[block])
        _checked_keep(keep, mlp.intermediate_size, f"MLP neurons of block {block}")
        _check_plain_linear(mlp.gate, mlp.up, mlp.down)


def _check_block(block: object, num_blocks: int) -> None:
    index = _as_index(block)
    if index is None or not 0 <= index < num_blocks:
        raise ValueError(
            f"`block` must be an index in [0, {num_blocks}) (the model has {num_blocks} blocks), got {block!r}"
        )


def _view(adapter: ModelAdapter, model: nn.Module, block: int) -> AttentionView:
    blocks = adapter.blocks(model)
    _check_block(block, len(blocks))
    return adapter.attention(blocks[block], adapter.head_dim(model))


def _set_int_attr(module: nn.Module, name: str, value: int) -> None:
    """Update an int attribute the module already has (families differ in which they keep)."""
    current = module.__dict__.get(name)
    if isinstance(current, int) and not isinstance(current, bool):
        setattr(module, name, value)
