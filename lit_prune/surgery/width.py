"""Width surgery: remove attention heads and MLP neurons by replacing projections with smaller ``nn.Linear`` s.

Real tensors shrink (no masks): a block that keeps ``n`` of its ``H`` query heads gets a ``q_proj`` with ``n·d_h``
output rows and an ``o_proj`` with ``n·d_h`` input columns; KV heads whose query heads are all gone lose their
``k_proj`` / ``v_proj`` rows. Under GQA every surviving KV head must keep the same number of query heads (the
attention kernels repeat each KV head ``H / G`` times), and the query heads keep their order, so query head ``h``
still reads KV head ``h // (H / G)``. ``num_key_value_groups`` of the attention module is updated; the config is
brought in line with the new shapes by :func:`lit_prune.surgery.config.sync_config`.

Every argument is validated before anything is modified: a failing call leaves the model as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from lit_prune.arch import AttentionView, MLPView, ModelAdapter, Projection, adapter_for
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


def _dim_index(size: int, parts: list[tuple[Projection, Sequence[int] | None]]) -> torch.Tensor | None:
    """Indices to keep along one dim of a Linear from its unit slices (None: the dim is not cut).

    The slices on a dim must tile it (a fused ``[q; k; v]`` Linear has three); each contributes its kept units'
    indices in order, so the surviving rows keep the fused layout the family's forward splits.
    """
    if not parts or all(kept is None for _, kept in parts):
        return None
    ordered = sorted(parts, key=lambda item: item[0].placement.offset)
    start = 0
    for proj, _ in ordered:
        if proj.placement.offset != start:
            raise RuntimeError(f"The slices of `{proj.placement.path}` do not tile its dim {proj.dim} (gap at {start})")
        start += proj.placement.size
    if start != size:
        raise RuntimeError(f"The slices of `{ordered[0][0].placement.path}` cover {start} of its {size} indices")
    return torch.cat([proj.indices(kept) for proj, kept in ordered])


def _cut(parts: list[tuple[Projection, Sequence[int] | None]]) -> None:
    """Replace every Linear the slices name by the part of it that the kept units (None: all) occupy."""
    slots: dict[tuple[int, str], list[tuple[Projection, Sequence[int] | None]]] = {}
    for proj, kept in parts:
        slots.setdefault((id(proj.parent), proj.attr), []).append((proj, kept))
    for group in slots.values():
        proj = group[0][0]
        linear = proj.linear
        rows = _dim_index(int(linear.out_features), [(p, k) for p, k in group if p.dim == 0])
        cols = _dim_index(int(linear.in_features), [(p, k) for p, k in group if p.dim == 1])
        if rows is not None or cols is not None:
            setattr(proj.parent, proj.attr, _sliced(linear, rows=rows, cols=cols))  # type: ignore[arg-type]


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
    _check_plain_linear(*(p.module for p in view.linears()))
    if len(kept) == view.num_heads:
        return kept
    adapter.check_head_pruning(model)  # only a real removal is refused (a reload calls this with every head kept)
    kv_cut = kv_kept if len(kv_kept) < view.num_kv_heads else None
    _cut([(view.q, kept), (view.o, kept), (view.k, kv_cut), (view.v, kv_cut)])
    adapter.on_attention_resized(view.module, len(kept), len(kv_kept))
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
    _check_plain_linear(*(p.module for p in view.linears()))
    if len(kept) == view.intermediate_size:
        return kept
    _cut([(p, kept) for p in view.projections])
    adapter.on_mlp_resized(view.module, len(kept))
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
        kept = _checked_keep(keep, view.num_heads, f"query heads of block {block}")
        kv_heads_kept(view, kept)
        _check_plain_linear(*(p.module for p in view.linears()))
        if len(kept) < view.num_heads:
            adapter.check_head_pruning(model)
    for block, keep in keep_neurons.items():
        _check_block(block, len(blocks))
        mlp = adapter.mlp(blocks[block])
        _checked_keep(keep, mlp.intermediate_size, f"MLP neurons of block {block}")
        _check_plain_linear(*(p.module for p in mlp.linears()))


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
