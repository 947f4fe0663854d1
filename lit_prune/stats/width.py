"""One-pass width statistics (AMP contributions, Wanda column norms) of every head and MLP neuron, gathered by hooks.

:class:`WidthStatistics` holds sums only, float64 and reduced with ``dist_reduce_fx="sum"``, so ranks that saw
different batches reduce to the same numbers and memory does not depend on the number of calibration tokens. Widths
may differ per block (a pruned model is non-uniform): each statistic is one flat state with per-block offsets, split
back into one tensor per block by :meth:`WidthStatistics.compute`. The criteria live in
:mod:`lit_prune.criteria.width`; the formulas are in METHODS.md §1.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import accumulate
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lit_prune._validation import check_int
from lit_prune.arch import AttentionView, MLPView, adapter_for
from lit_prune.stats._common import _F64, Batches, _check_mask, _check_names, _f64_chunks, _ReadOnly, _tokens
from lit_prune.stats.engine import hooked_pass
from lit_prune.stats.hooks import Hooks

log = logging.getLogger(__name__)

WIDTH_NEEDS = ("amp_heads", "amp_neurons", "attn_in_sq", "down_in_sq", "mlp_in_sq", "o_in_sq")
"""What a :class:`WidthStatistics` can collect."""

WIDTH_SITES = ("attn_in", "o_in", "mlp_in", "down_in")
"""Where the hooks read a block's activations: the inputs of q_proj, o_proj, gate_proj and down_proj, in order."""

_SITE_OF = {
    "attn_in_sq": "attn_in",
    "amp_heads": "o_in",
    "o_in_sq": "o_in",
    "mlp_in_sq": "mlp_in",
    "amp_neurons": "down_in",
    "down_in_sq": "down_in",
}
SQUARE_OF = {"attn_in": "attn_in_sq", "o_in": "o_in_sq", "mlp_in": "mlp_in_sq", "down_in": "down_in_sq"}
"""The ``Σ x²`` need read at each site: the same sums as the per-Linear ``input_sq`` of that site's Linear."""

_CHUNK_ELEMENTS = 1 << 24
"""Largest float32 intermediate (tokens x heads x hidden) of the per-head contributions: 64 MB."""


class WidthStats(_ReadOnly):
    """The reduced sums of a :class:`WidthStatistics`, one tensor per block (what the width criteria read).

    Absent needs are None. All tensors are float64 copies.

    Args:
        heads: ``H_b`` per block (query heads).
        neurons: ``I_b`` per block.
        head_dim: ``d_h``.
        hidden_size: ``d``.
        count: ``(L,)``, the non-pad tokens behind the sums of each block.
        amp_heads: ``(H_b,)`` per block, Σ over tokens of ``‖O_h[t]‖₁`` with ``O_h = X_h W_{O,h}ᵀ``.
        amp_neurons: ``(I_b,)`` per block, Σ over tokens of ``|a_j|`` (``a`` = input of down_proj).
        attn_in_sq: ``(d,)`` per block, Σ over tokens of ``x_j²`` (``x`` = input of q/k/v_proj).
        o_in_sq: ``(H_b·d_h,)`` per block, Σ over tokens of ``z_c²`` (``z`` = input of o_proj).
        mlp_in_sq: ``(d,)`` per block, Σ over tokens of ``x_j²`` (``x`` = input of gate/up_proj).
        down_in_sq: ``(I_b,)`` per block, Σ over tokens of ``a_j²``.
    """

    __slots__ = (
        "heads",
        "neurons",
        "head_dim",
        "hidden_size",
        "count",
        "amp_heads",
        "amp_neurons",
        "attn_in_sq",
        "o_in_sq",
        "mlp_in_sq",
        "down_in_sq",
    )
    heads: tuple[int, ...]
    neurons: tuple[int, ...]
    head_dim: int
    hidden_size: int
    count: Tensor
    amp_heads: tuple[Tensor, ...] | None
    amp_neurons: tuple[Tensor, ...] | None
    attn_in_sq: tuple[Tensor, ...] | None
    o_in_sq: tuple[Tensor, ...] | None
    mlp_in_sq: tuple[Tensor, ...] | None
    down_in_sq: tuple[Tensor, ...] | None

    def __init__(
        self,
        heads: Sequence[int],
        neurons: Sequence[int],
        head_dim: int,
        hidden_size: int,
        count: Tensor,
        **sums: tuple[Tensor, ...] | None,
    ) -> None:
        unknown = sorted(set(sums) - set(WIDTH_NEEDS))
        if unknown:
            raise TypeError(f"WidthStats got unknown sums {unknown}; known: {list(WIDTH_NEEDS)}")
        self._set(heads=tuple(heads), neurons=tuple(neurons), head_dim=head_dim, hidden_size=hidden_size, count=count)
        self._set(**{name: sums.get(name) for name in WIDTH_NEEDS})

    @property
    def num_blocks(self) -> int:
        """``L``."""
        return len(self.heads)

    def __repr__(self) -> str:
        parts = [f"heads={self.heads}", f"neurons={self.neurons}", f"head_dim={self.head_dim}"]
        parts += [f"hidden_size={self.hidden_size}", f"count={self.count.tolist()}"]
        parts += [f"{name}={'set' if getattr(self, name) is not None else None}" for name in WIDTH_NEEDS]
        return f"WidthStats({', '.join(parts)})"


def _sites(needs: Iterable[str]) -> list[str]:
    """The hook sites that ``needs`` reads, in forward order."""
    wanted = {_SITE_OF[need] for need in needs}
    return [site for site in WIDTH_SITES if site in wanted]


class WidthStatistics(Metric):
    """Per-head and per-neuron statistics of every block, streamed over calibration batches.

    Only the states that ``needs`` asks for are allocated; each is one flat float64 vector holding the blocks one
    after the other (``sizes`` gives the per-block lengths, :meth:`compute` splits them):

    * ``amp_heads`` ``(ΣH_b,)``: Σ over non-pad tokens of ``‖O_h[t]‖₁``, ``O_h = X_h W_{O,h}ᵀ`` where ``X_h`` is head
      ``h``'s slice of the o_proj input and ``W_{O,h}`` its o_proj columns; computed in float32 in chunks of tokens
      (fp16 overflows), summed in float64.
    * ``amp_neurons`` ``(ΣI_b,)``: Σ over non-pad tokens of ``|a_j|``, ``a`` = input of down_proj.
    * ``attn_in_sq`` ``(L·d,)`` / ``mlp_in_sq`` ``(L·d,)``: Σ ``x_j²`` of the q_proj input / gate_proj input.
    * ``o_in_sq`` ``(ΣH_b·d_h,)`` / ``down_in_sq`` ``(ΣI_b,)``: Σ of the squared o_proj / down_proj inputs.
      The squares are taken in float64, exactly as :class:`~lit_prune.stats.linear.LinearInputStatistics`'
      ``input_sq`` of the same Linear (so one pass that asks for both computes them once, see
      :func:`~lit_prune.stats.collect.collect_statistics`).
    * ``count`` ``(L,)``: the non-pad tokens seen per block.

    Per batch, :meth:`update` is called once per block and site (the pre-hooks of
    :func:`collect_width_statistics` do that); the order does not matter.

    Args:
        heads: ``H_b``, the query heads of each block.
        neurons: ``I_b``, the MLP neurons of each block.
        head_dim: ``d_h``.
        hidden_size: ``d``.
        needs: a non-empty subset of :data:`WIDTH_NEEDS`.
        **kwargs: passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``).

    Raises:
        ValueError: if a width is not a positive int, ``heads`` and ``neurons`` differ in length or are empty, or
            ``needs`` is empty or names something unknown.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    count: Tensor

    def __init__(
        self,
        heads: Sequence[int],
        neurons: Sequence[int],
        head_dim: int,
        hidden_size: int,
        needs: Iterable[str],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        heads, neurons = tuple(heads), tuple(neurons)
        if not heads or len(heads) != len(neurons):
            raise ValueError(
                f"`heads` and `neurons` must give one width per block (same non-zero length), "
                f"got {len(heads)} and {len(neurons)}"
            )
        for b, (h, i) in enumerate(zip(heads, neurons, strict=True)):
            check_int(f"heads[{b}]", h)
            check_int(f"neurons[{b}]", i)
        check_int("head_dim", head_dim)
        check_int("hidden_size", hidden_size)
        self.needs = _check_names("needs", needs, WIDTH_NEEDS)
        self.heads, self.neurons, self.head_dim, self.hidden_size = heads, neurons, head_dim, hidden_size
        L, d = len(heads), hidden_size
        self.sizes: dict[str, tuple[int, ...]] = {
            "amp_heads": heads,
            "amp_neurons": neurons,
            "attn_in_sq": (d,) * L,
            "o_in_sq": tuple(h * head_dim for h in heads),
            "mlp_in_sq": (d,) * L,
            "down_in_sq": neurons,
        }
        self._offsets = {name: (0, *accumulate(sizes)) for name, sizes in self.sizes.items()}
        for name in sorted(self.needs):
            self.add_state(name, torch.zeros(sum(self.sizes[name]), dtype=_F64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(L, dtype=_F64), dist_reduce_fx="sum")
        self.sites = _sites(self.needs)
        self._count_site = self.sites[0]  # tokens are counted once per block and batch, at the first site

    @property
    def num_blocks(self) -> int:
        """``L``."""
        return len(self.heads)

    def _slot(self, name: str, block: int) -> Tensor:
        """The view of flat state ``name`` that belongs to ``block``."""
        start, stop = self._offsets[name][block], self._offsets[name][block + 1]
        return getattr(self, name)[start:stop]

    def update(  # type: ignore[override]
        self,
        block: int,
        site: str,
        inputs: Tensor,
        attention_mask: Tensor | None = None,
        o_weight: Tensor | None = None,
    ) -> None:
        """Add one block's activations at one site for one batch.

        Args:
            block: the block index.
            site: one of :data:`WIDTH_SITES`: ``"attn_in"`` (q_proj input ``(B, T, d)``), ``"o_in"`` (o_proj input
                ``(B, T, H_b·d_h)``), ``"mlp_in"`` (gate_proj input ``(B, T, d)``) or ``"down_in"`` (down_proj input
                ``(B, T, I_b)``). Sites that no need reads are ignored.
            inputs: the activations, any float dtype.
            attention_mask: ``(B, T)``, 1 on tokens and 0 on padding; None: no padding.
            o_weight: ``(d, H_b·d_h)``, the o_proj weight; required at ``"o_in"`` when ``amp_heads`` is collected.

        Raises:
            ValueError: if ``block`` or ``site`` is out of range, the shapes disagree with the block's widths, or
                ``o_weight`` is missing or misshapen.
        """
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"`block` must be in 0..{self.num_blocks - 1}, got {block}")
        if site not in WIDTH_SITES:
            raise ValueError(f"`site` must be one of {list(WIDTH_SITES)}, got {site!r}")
        width = {
            "attn_in": self.hidden_size,
            "o_in": self.heads[block] * self.head_dim,
            "mlp_in": self.hidden_size,
            "down_in": self.neurons[block],
        }[site]
        if inputs.dim() != 3 or inputs.size(-1) != width:
            raise ValueError(
                f"`inputs` at site {site!r} of block {block} must be (batch, seq_len, {width}), "
                f"got {tuple(inputs.shape)}"
            )
        _check_mask(attention_mask, inputs)
        if site not in self.sites:
            return
        mask = None if attention_mask is None else attention_mask.to(self.device)
        tokens = _tokens(inputs.to(self.device), mask)  # (N, width), the input's dtype
        x = tokens.float()
        if site == self._count_site:
            self.count[block] += x.size(0)
        square = SQUARE_OF[site]
        if square in self.needs:
            slot = self._slot(square, block)
            for chunk in _f64_chunks(tokens):  # the formula of LinearInputStatistics' input_sq, bit for bit
                slot.add_(chunk.square().sum(0))
        if site == "down_in" and "amp_neurons" in self.needs:
            self._slot("amp_neurons", block).add_(x.abs().sum(0, dtype=_F64))
        if site == "o_in" and "amp_heads" in self.needs:
            self._slot("amp_heads", block).add_(self._head_contributions(block, x, o_weight))

    def _head_contributions(self, block: int, x: Tensor, o_weight: Tensor | None) -> Tensor:
        """``(H_b,)`` float64: Σ over the rows of ``x`` ``(N, H_b·d_h)`` of ``‖X_h W_{O,h}ᵀ‖₁`` per head."""
        H, dh = self.heads[block], self.head_dim
        if o_weight is None or o_weight.dim() != 2 or o_weight.size(1) != H * dh:
            got = None if o_weight is None else tuple(o_weight.shape)
            raise ValueError(f"`o_weight` must be the o_proj weight (hidden, {H * dh}) of block {block}, got {got}")
        w = o_weight.detach().to(device=self.device, dtype=torch.float32)  # (d, H·d_h)
        w = w.view(w.size(0), H, dh).permute(1, 2, 0)  # (H, d_h, d)
        total = torch.zeros(H, dtype=_F64, device=self.device)
        chunk = max(1, _CHUNK_ELEMENTS // (H * w.size(-1)))
        for start in range(0, x.size(0), chunk):
            xh = x[start : start + chunk].view(-1, H, dh).transpose(0, 1)  # (H, n, d_h)
            contribution = torch.bmm(xh, w)  # (H, n, d)
            total += contribution.abs().sum(-1).sum(-1, dtype=_F64)
        return total

    def compute(self) -> WidthStats:
        """The reduced sums (summed over ranks when ``torch.distributed`` is initialized), split per block."""

        def split(name: str) -> tuple[Tensor, ...] | None:
            if name not in self.needs:
                return None
            return tuple(t.clone() for t in torch.split(getattr(self, name), list(self.sizes[name])))

        sums = {name: split(name) for name in WIDTH_NEEDS}
        return WidthStats(self.heads, self.neurons, self.head_dim, self.hidden_size, self.count.clone(), **sums)


def _first_input(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tensor:
    """The tensor a Linear received: its first positional argument, else its first keyword argument."""
    return args[0] if args else next(iter(kwargs.values()))


def collect_width_statistics(
    model: nn.Module,
    batches: Batches,
    needs: Iterable[str] = WIDTH_NEEDS,
    max_batches: int | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> WidthStats:
    """One pass of the decoder stack over calibration batches, filling a :class:`WidthStatistics` from hooks.

    Only the decoder runs (no LM head). Forward pre-hooks on q_proj, o_proj, gate_proj and down_proj of every
    block (only those the needs read) reduce each activation to per-column sums on the spot, so nothing grows with
    the number of tokens. Runs under ``torch.no_grad()`` in eval mode; every module's mode is restored and the hooks
    are removed afterwards, also when the forward raises. Widths are read from the current modules, so a pruned,
    non-uniform model works.

    Args:
        model: a Hugging Face causal LM (or a PEFT / Lightning wrapper around one) whose family has an adapter.
        batches: an iterable (e.g. a DataLoader) of LongTensors ``(B, T)`` or of dicts with ``input_ids`` and
            optional ``attention_mask`` (left or right padding); a single 2-D tensor is one batch.
        needs: what to collect, a non-empty subset of :data:`WIDTH_NEEDS` (default: all).
        max_batches: stop after this many batches (None: all).
        progress: show a tqdm progress bar.
        device: where to run; default the model's current device (the statistics live there too).

    Returns:
        The reduced :class:`WidthStats` (summed over ranks under DDP: every rank must call this).

    Raises:
        ValueError: if ``needs`` is invalid, ``max_batches`` is not a positive int or None, the q_proj and o_proj
            widths of a block disagree, a batch is malformed, or there is no batch.
        TypeError: if a batch is neither a tensor nor a dict with ``input_ids``.
    """
    metric = hooked_pass(
        model,
        batches,
        lambda hf_model, hooks, current: attach_width_statistics(hf_model, needs, hooks, current),
        max_batches=max_batches,
        progress=progress,
        device=device,
        desc="width statistics",
    )
    seen = "all" if max_batches is None else f"<= {max_batches}"
    log.debug("Width statistics %s over %s batches of %d blocks", sorted(metric.needs), seen, metric.num_blocks)
    return metric.compute()


def width_shapes(model: nn.Module) -> tuple[list[int], list[int], int, int]:
    """``(heads, neurons, head_dim, hidden_size)`` of ``model``'s blocks as they are now (the metric's sizes)."""
    adapter = adapter_for(model)
    return (
        [view.num_heads for view in adapter.attentions(model)],
        [view.intermediate_size for view in adapter.mlps(model)],
        adapter.head_dim(model),
        adapter.hidden_size(model),
    )


def site_modules(attn: AttentionView, mlp: MLPView) -> dict[str, nn.Module]:
    """``{site: module}``: the projection whose input each of :data:`WIDTH_SITES` reads in one block."""
    mlp_in = mlp.gate if mlp.gate is not None else mlp.up  # gate and up read the same input
    return {"attn_in": attn.q.module, "o_in": attn.o.module, "mlp_in": mlp_in.module, "down_in": mlp.down.module}


def attach_width_statistics(
    model: nn.Module, needs: Iterable[str], hooks: Hooks, current: dict[str, Tensor | None], **metric_kwargs: Any
) -> WidthStatistics:
    """Register, through ``hooks``, forward pre-hooks that fill a new :class:`WidthStatistics` from ``model``.

    An ``Attach`` of the pass driver (:func:`~lit_prune.stats.engine.run_pass`), which sets
    ``current["attention_mask"]`` before each batch and removes the hooks when done; ``metric_kwargs`` go to the
    metric (e.g. ``sync_on_compute=False``). Pre-hooks registered on the same projections *before* these (e.g.
    masks that zero pruned heads) act first, so the statistics see what the masked model computes. Sized for the
    model's current widths.

    Raises:
        ValueError: if a block's q_proj and o_proj widths disagree, or ``needs`` is invalid.
    """
    adapter = adapter_for(model)
    attentions, mlps = adapter.attentions(model), adapter.mlps(model)
    metric = WidthStatistics(*width_shapes(model), needs, **metric_kwargs)

    def site_hook(block: int, site: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            o_weight = attentions[block].o.weight() if site == "o_in" else None  # a PEFT layer: its base weight
            metric.update(block, site, _first_input(args, kwargs), current["attention_mask"], o_weight)

        return hook

    for b, (attn, mlp) in enumerate(zip(attentions, mlps, strict=True)):
        modules = site_modules(attn, mlp)
        for site in metric.sites:
            hooks.forward_pre(modules[site], site_hook(b, site))
    return metric
