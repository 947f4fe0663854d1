"""Achieved sparsity of the prunable Linears: exact zeros in the weights, per layer, per block and overall."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lit_prune.arch import block_linears


@dataclass(frozen=True)
class SparsityReport:
    """Fraction of exactly-zero weights in the prunable Linears (what the model is, not what the masks say).

    Args:
        layers: ``{linear name: zero fraction}`` in :func:`~lit_prune.sparse.prunable_linears` order.
        blocks: zero fraction of each block's 7 projections together (weighted by their sizes).
        zeros: zero weights over all prunable Linears.
        total: weights in all prunable Linears.
    """

    layers: dict[str, float]
    blocks: tuple[float, ...]
    zeros: int
    total: int

    @property
    def overall(self) -> float:
        """Zeros over all prunable weights (the size-weighted mean of the layers)."""
        return self.zeros / self.total if self.total else 0.0

    def to_dict(self, prefix: str = "sparsity") -> dict[str, float]:
        """Flat metrics for ``log_dict``: ``{prefix}/overall`` and ``{prefix}/block_{i}``."""
        out = {f"{prefix}/overall": self.overall}
        out.update({f"{prefix}/block_{i}": value for i, value in enumerate(self.blocks)})
        return out

    def __str__(self) -> str:
        blocks = ", ".join(f"{value:.1%}" for value in self.blocks)
        return f"Sparsity {self.overall:.2%} ({self.zeros}/{self.total} zeros); blocks [{blocks}]"


def sparsity_report(model: nn.Module) -> SparsityReport:
    """Count the exact zeros of every prunable Linear's weight (bias excluded).

    Under PEFT the base weights are counted; unmerged adapters make the effective weight dense.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                   num_attention_heads=2, num_key_value_heads=2)
        >>> model = LlamaForCausalLM(cfg)
        >>> _ = model.model.layers[1].mlp.down_proj.weight.data.zero_()
        >>> report = sparsity_report(model)
        >>> report.blocks, report.zeros, report.total
        ((0.0, 0.2), 512, 5120)
    """
    per_block = block_linears(model)
    names = [name for block in per_block for name in block]
    weights = [linear.weight for block in per_block for linear in block.values()]
    if not weights:
        return SparsityReport({}, (), 0, 0)
    with torch.no_grad():
        counts = [int((w == 0).sum()) for w in weights]
    sizes = [w.numel() for w in weights]
    layers = {name: zeros / size for name, zeros, size in zip(names, counts, sizes)}
    blocks, start = [], 0
    for block in per_block:
        stop = start + len(block)
        blocks.append(sum(counts[start:stop]) / max(sum(sizes[start:stop]), 1))
        start = stop
    return SparsityReport(layers, tuple(blocks), sum(counts), sum(sizes))
