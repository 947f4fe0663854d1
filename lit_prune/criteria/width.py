"""Width criteria: one score per query head and per MLP neuron of every block, higher = more important.

The scores are functions of the weights and of the reduced sums in :class:`~lit_prune.stats.WidthStats`
(formulas: METHODS.md §1 and the docstrings below):

* :func:`amp` (AMP, Mugnaini et al.): mean L1 norm of each head's / neuron's contribution to the block output;
* :func:`magnitude`: L2 norm of the weights a unit owns (no data);
* :func:`wanda_sp`: Wanda's ``|W|·‖X_col‖₂`` summed over the weights a unit owns;
* controls: :func:`random_scores`, :func:`reversed_scores`.

:func:`~lit_prune.criteria.scoring.score_width` runs at most one statistics pass (none for the data-free criteria)
and scores.
Heads are query heads; under GQA, query head ``h`` belongs to KV head ``h // group_size`` and grouping is left to
the allocation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_prune.arch import AttentionView, MLPView, adapter_for
from lit_prune.criteria import registry
from lit_prune.criteria.registry import register_criterion
from lit_prune.criteria.width_config import WidthConfig
from lit_prune.stats import WidthStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WidthScores:
    """Per-block importance of query heads and MLP neurons (float32, on CPU; higher = more important).

    Args:
        heads: one ``(H_b,)`` tensor per block: the score of every query head of block ``b`` (GQA: query head
            ``h`` belongs to KV head ``h // (H_b / G_b)``).
        neurons: one ``(I_b,)`` tensor per block: the score of every MLP neuron of block ``b``.
        criterion: the criterion that produced them, e.g. ``"amp"``.
    """

    heads: tuple[Tensor, ...]
    neurons: tuple[Tensor, ...]
    criterion: str = ""

    def __post_init__(self) -> None:
        heads, neurons = tuple(self.heads), tuple(self.neurons)
        if len(heads) != len(neurons):
            raise ValueError(
                f"WidthScores needs one head and one neuron tensor per block, got {len(heads)} and {len(neurons)}"
            )
        for kind, values in (("heads", heads), ("neurons", neurons)):
            for b, t in enumerate(values):
                if not isinstance(t, Tensor) or t.dim() != 1 or t.numel() == 0:
                    raise ValueError(f"WidthScores.{kind}[{b}] must be a non-empty 1-D tensor, got {t!r}")
                if not torch.isfinite(t).all():
                    raise ValueError(f"WidthScores.{kind}[{b}] holds non-finite scores")
        object.__setattr__(self, "heads", tuple(t.detach().float().cpu() for t in heads))
        object.__setattr__(self, "neurons", tuple(t.detach().float().cpu() for t in neurons))

    @property
    def num_blocks(self) -> int:
        """Number of blocks scored."""
        return len(self.heads)


def _sums(stats: WidthStats, name: str) -> tuple[Tensor, ...]:
    """One statistic of ``stats``, raising when it was not collected."""
    value = getattr(stats, name)
    if value is None:
        raise ValueError(f"The statistics have no {name!r} sums; collect them with `needs` including {name!r}")
    return value


def _views(model: nn.Module) -> tuple[list[AttentionView], list[MLPView]]:
    """Attention and MLP views of every block of ``model`` (unwrapped through PEFT / Lightning wrappers)."""
    adapter = adapter_for(model)
    return adapter.attentions(model), adapter.mlps(model)


def width_needs_for(criterion: str, *, reversed_of: str = WidthConfig.reversed_of) -> set[str]:
    """The :class:`~lit_prune.stats.WidthStatistics` needs of a criterion (empty for data-free ones).

    Args:
        criterion: one of :data:`WIDTH_CRITERIA`.
        reversed_of: the criterion ``reversed`` negates.

    Returns:
        A subset of :data:`~lit_prune.stats.WIDTH_NEEDS`.

    Raises:
        ValueError: if ``criterion`` or ``reversed_of`` is unknown.

    Example:
        >>> sorted(width_needs_for("amp"))
        ['amp_heads', 'amp_neurons']
    """
    return registry.needs("width", criterion, {"reversed": reversed_of})


def amp(stats: WidthStats, model: nn.Module | None = None) -> WidthScores:
    """AMP: the mean over tokens of the L1 norm of each unit's contribution to the block's output.

    Head ``h``: ``mean_t ‖X_h[t] W_{O,h}ᵀ‖₁`` (``X_h`` its slice of the o_proj input, ``W_{O,h}`` its o_proj
    columns). Neuron ``j``: ``mean_t ‖a_j[t] W_down[:, j]‖₁ = mean_t |a_j[t]| · ‖W_down[:, j]‖₁`` (``a`` the
    down_proj input), so heads and neurons are scored by the same quantity: what the block's output loses when the
    unit is zeroed. The paper's code scores a neuron by ``mean_t |a_j[t]|`` alone; that is :func:`amp_act` (and
    what this returns when ``model`` is None). The two differ only by the per-neuron column norm.

    Args:
        stats: reduced sums with ``amp_heads`` and ``amp_neurons``.
        model: the model the statistics were collected on (for the down_proj column norms).

    Returns:
        The scores, criterion ``"amp"`` (``"amp_act"`` without ``model``).

    Raises:
        ValueError: if the sums are missing, a block saw no token, or the model's widths differ from the
            statistics'.
    """
    heads, neurons = _sums(stats, "amp_heads"), _sums(stats, "amp_neurons")
    if bool((stats.count <= 0).any()):
        raise ValueError(f"No calibration tokens behind the statistics (count {stats.count.tolist()})")
    count = stats.count.tolist()
    head_scores = tuple(h / c for h, c in zip(heads, count, strict=True))
    neuron_scores = tuple(n / c for n, c in zip(neurons, count, strict=True))
    if model is None:
        return WidthScores(head_scores, neuron_scores, "amp_act")
    attentions, mlps = _views(model)
    _check_widths(stats, attentions, mlps)
    column_l1 = [m.down.weight().abs().sum(0) for m in mlps]
    scaled = tuple(n * w.to(n.device) for n, w in zip(neuron_scores, column_l1, strict=True))
    return WidthScores(head_scores, scaled, "amp")


def amp_act(stats: WidthStats) -> WidthScores:
    """AMP as in the paper's code: heads as in :func:`amp`, neurons by ``mean_t |a_j[t]|`` (activation only)."""
    return amp(stats, None)


def _magnitude_block(attn: AttentionView, mlp: MLPView) -> tuple[Tensor, Tensor]:
    """``(H,)`` and ``(I,)`` L2 norms of the weights each head and neuron owns."""
    H, dh = attn.num_heads, attn.head_dim
    q, o = attn.q.weight(), attn.o.weight()  # (H·d_h, d), (d, H·d_h)
    heads = q.pow(2).reshape(H, -1).sum(1) + o.pow(2).reshape(o.size(0), H, dh).sum((0, 2))  # (H,)
    up, down = mlp.up.weight(), mlp.down.weight()  # (I, d), (d, I)
    rows = up.pow(2).sum(1) if mlp.gate is None else mlp.gate.weight().pow(2).sum(1) + up.pow(2).sum(1)
    neurons = rows + down.pow(2).sum(0)  # (I,)
    return heads.sqrt(), neurons.sqrt()


def magnitude(model: nn.Module) -> WidthScores:
    """The L2 norm of the weights each unit owns (no data).

    Head ``h``: ``‖[Wq[rows of h, :], Wo[:, columns of h]]‖₂`` (its ``d_h`` q_proj rows and ``d_h`` o_proj columns;
    k/v are shared by the group). Neuron ``j``: ``‖[Wgate[j, :], Wup[j, :], Wdown[:, j]]‖₂``. Biases are left out.

    Args:
        model: a Hugging Face causal LM (or a wrapper around one) whose family has an adapter.

    Returns:
        The scores, criterion ``"magnitude"``.
    """
    parts = [_magnitude_block(a, m) for a, m in zip(*_views(model), strict=True)]
    return WidthScores(tuple(h for h, _ in parts), tuple(n for _, n in parts), "magnitude")


def _check_widths(stats: WidthStats, attentions: list[AttentionView], mlps: list[MLPView]) -> None:
    """Raise when the model's widths are not the ones the statistics were collected on."""
    heads = tuple(a.num_heads for a in attentions)
    neurons = tuple(m.intermediate_size for m in mlps)
    if heads != stats.heads or neurons != stats.neurons:
        raise ValueError(
            f"The statistics were collected on a model with heads {list(stats.heads)} and neurons "
            f"{list(stats.neurons)} per block, but the model now has {list(heads)} and {list(neurons)}"
        )


def wanda_sp(model: nn.Module, stats: WidthStats) -> WidthScores:
    """Structured Wanda: ``|W_ik|·‖X_k‖₂`` summed over every weight a unit owns.

    With ``‖·‖`` the L2 norm of an input column over all calibration tokens (``sqrt`` of the summed squares),
    ``x`` the q_proj input, ``z`` the o_proj input, ``m`` the gate/up_proj input and ``a`` the down_proj input::

        head h   = Σ_{r ∈ q rows of h} Σ_k |Wq[r, k]|·‖x_k‖ + Σ_{c ∈ o columns of h} Σ_i |Wo[i, c]|·‖z_c‖
        neuron j = Σ_k |Wgate[j, k]|·‖m_k‖ + Σ_k |Wup[j, k]|·‖m_k‖ + Σ_i |Wdown[i, j]|·‖a_j‖

    Args:
        model: the model the statistics were collected on (same widths).
        stats: reduced sums with ``attn_in_sq``, ``o_in_sq``, ``mlp_in_sq`` and ``down_in_sq``.

    Returns:
        The scores, criterion ``"wanda_sp"``.

    Raises:
        ValueError: if the sums are missing or the model's widths differ from those of the statistics.
    """
    attn_in, o_in = _sums(stats, "attn_in_sq"), _sums(stats, "o_in_sq")
    mlp_in, down_in = _sums(stats, "mlp_in_sq"), _sums(stats, "down_in_sq")
    attentions, mlps = _views(model)
    _check_widths(stats, attentions, mlps)
    heads, neurons = [], []
    for b, (attn, mlp) in enumerate(zip(attentions, mlps, strict=True)):
        q, o = attn.q.weight(), attn.o.weight()  # (H·d_h, d), (d, H·d_h)
        x_norm = attn_in[b].sqrt().to(q)  # (d,)
        z_norm = o_in[b].sqrt().to(o)  # (H·d_h,)
        per_column = q.abs() @ x_norm + o.abs().sum(0) * z_norm  # (H·d_h,): q row r and o column r of one head dim
        heads.append(per_column.view(attn.num_heads, attn.head_dim).sum(1))  # (H,)
        up, down = mlp.up.weight(), mlp.down.weight()  # (I, d), (d, I)
        m_norm = mlp_in[b].sqrt().to(up)  # (d,)
        a_norm = down_in[b].sqrt().to(down)  # (I,)
        rows = up.abs() @ m_norm if mlp.gate is None else mlp.gate.weight().abs() @ m_norm + up.abs() @ m_norm
        neurons.append(rows + down.abs().sum(0) * a_norm)  # (I,)
    return WidthScores(tuple(heads), tuple(neurons), "wanda_sp")


def random_scores(model_or_shapes: nn.Module | Sequence[tuple[int, int]], seed: int) -> WidthScores:
    """Seeded uniform random scores (a control: any criterion should beat it).

    Args:
        model_or_shapes: a model (its current widths are used) or ``(H_b, I_b)`` per block.
        seed: the generator seed; the same seed and shapes give the same scores.

    Returns:
        The scores in ``[0, 1)``, criterion ``"random"``.

    Raises:
        ValueError: if ``seed`` is not an int or a shape is not a pair of positive ints.

    Example:
        >>> random_scores([(2, 3)], seed=0).neurons[0].shape
        torch.Size([3])
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"`seed` must be an int, got {seed!r}")
    if isinstance(model_or_shapes, nn.Module):
        attentions, mlps = _views(model_or_shapes)
        shapes = [(a.num_heads, m.intermediate_size) for a, m in zip(attentions, mlps, strict=True)]
    else:
        shapes = [tuple(shape) for shape in model_or_shapes]  # type: ignore[misc]
    for b, shape in enumerate(shapes):
        if len(shape) != 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape):
            raise ValueError(f"`model_or_shapes[{b}]` must be (num_heads, num_neurons), positive ints; got {shape!r}")
    generator = torch.Generator().manual_seed(seed)
    heads, neurons = [], []
    for num_heads, num_neurons in shapes:
        heads.append(torch.rand(num_heads, generator=generator))
        neurons.append(torch.rand(num_neurons, generator=generator))
    return WidthScores(tuple(heads), tuple(neurons), "random")


def reversed_scores(scores: WidthScores) -> WidthScores:
    """The opposite order of ``scores`` (a control: removes what the criterion deems most important).

    Args:
        scores: any width scores.

    Returns:
        ``-scores``, criterion ``"reversed"``.
    """
    return WidthScores(tuple(-h for h in scores.heads), tuple(-n for n in scores.neurons), "reversed")


register_criterion(
    "amp",
    "width",
    amp,
    needs=("amp_heads", "amp_neurons"),
    call=lambda i: amp(i.stats, i.model),
    description="AMP: mean L1 norm of each head's / neuron's contribution to the block output",
)
register_criterion(
    "amp_act",
    "width",
    amp_act,
    needs=("amp_heads", "amp_neurons"),
    call=lambda i: amp_act(i.stats),
    description="AMP as in the paper's code: neurons by their mean |activation| only",
)
register_criterion(
    "magnitude",
    "width",
    magnitude,
    call=lambda i: magnitude(i.model),
    description="L2 norm of the weights each head / neuron owns (no data)",
)
register_criterion(
    "wanda_sp",
    "width",
    wanda_sp,
    needs=("attn_in_sq", "o_in_sq", "mlp_in_sq", "down_in_sq"),
    call=lambda i: wanda_sp(i.model, i.stats),
    description="structured Wanda: |W|·‖x‖ summed over the weights a unit owns",
)
register_criterion(
    "random",
    "width",
    random_scores,
    call=lambda i: random_scores(i.model, i.seed),
    description="seeded uniform random scores (control)",
)
register_criterion(
    "reversed",
    "width",
    reversed_scores,
    of=(WidthConfig.reversed_of,),
    of_composites=True,
    call=lambda i: reversed_scores(i.scores[i.of[0]]),
    description="the opposite order of `reversed_of` (control)",
)

WIDTH_CRITERIA = registry.names("width")
"""Every name :func:`~lit_prune.criteria.scoring.score_width` accepts (read from the registry)."""
