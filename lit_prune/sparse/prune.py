"""``prune_sparse``: unstructured / N:M pruning of every block's projections, end to end, on a live model.

The stages are pure functions elsewhere: statistics (:mod:`lit_prune.sparse.calibrate`), per-layer ratios
(:mod:`lit_prune.allocation.sparsity`), masks and the SparseGPT update (:mod:`lit_prune.criteria.sparse`). This
module chains them: optional dense statistics for the allocation (OWL / DSA read the dense model's Wanda scores),
exact integer counts per Linear (``sparsity`` is the mean over all prunable weights), then the criterion block by block
(``protocol="sequential"``: each block calibrated on the outputs of the already pruned blocks) or from one dense pass
(``"one_shot"``), and finally the masks as buffers (:func:`lit_prune.sparse.attach_masks`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
from torch import Tensor, nn

from lit_prune.allocation.sparsity import (
    DSA_PAPER_FUNCTION,
    SPARSITY_ALLOCATIONS,
    AllocationFunction,
    dsa,
    layer_counts,
    linear_map,
    outlier_ratio,
    owl,
    uniform,
)
from lit_prune.allocation.trim import trim
from lit_prune.criteria import registry
from lit_prune.criteria.sparse import (
    check_nm,
    hessian_from_sum,
    magnitude_scores,
    prune_mask,
    sparsegpt,
    wanda_scores,
)
from lit_prune.sparse.calibrate import one_shot_stats, sequential_prune
from lit_prune.sparse.linear_stats import LinearStats
from lit_prune.sparse.masks import attach_masks, block_linears, masks_of
from lit_prune.stats._common import Batches

log = logging.getLogger(__name__)

PROTOCOLS = ("sequential", "one_shot")
SparseCriterion = Literal["magnitude", "wanda", "sparsegpt"]
"""The registered sparse criteria (``registry.names("sparse")``; a test keeps the two equal)."""
Allocation = Literal["uniform", "owl", "linear_map", "dsa"]


@dataclass
class SparsityResult:
    """What :func:`prune_sparse` did.

    Args:
        masks: ``{linear name: bool keep mask}`` (also attached to the model as ``weight_mask`` buffers).
        block_ratios: the sparsity each block was allocated (before integer rounding).
        counts: weights pruned per Linear (exact integers; their sum is ``round(sparsity · prunable weights)``).
        seconds: wall time of the whole call (statistics, allocation, masks, updates).
    """

    masks: dict[str, Tensor]
    block_ratios: list[float]
    counts: dict[str, int]
    seconds: float
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Achieved mean sparsity over the masked weights."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(self.counts.values()) / total if total else 0.0


def check_sparse_options(
    criterion: object,
    sparsity: object,
    n_m: object,
    allocation: object,
    protocol: object,
    layer_scores: object = None,
    trim_rows: object = False,
) -> tuple[int, int] | None:
    """Validate the options of :func:`prune_sparse` (and the callback) before anything runs; return ``n_m`` parsed.

    Raises:
        ValueError: naming the bad option, its value and what is allowed.
    """
    registry.criterion("sparse", criterion)
    if allocation not in SPARSITY_ALLOCATIONS:
        raise ValueError(f"`allocation` must be one of {list(SPARSITY_ALLOCATIONS)}, got {allocation!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"`protocol` must be one of {list(PROTOCOLS)}, got {protocol!r}")
    nm = check_nm(n_m)  # type: ignore[arg-type]
    if nm is not None:
        if allocation != "uniform":
            raise ValueError(f"N:M sparsity ({nm[0]}:{nm[1]}) has a fixed ratio per layer: use allocation='uniform'")
        if trim_rows:
            raise ValueError(f"N:M sparsity ({nm[0]}:{nm[1]}) has a fixed count per row: TRIM does not apply")
        return nm
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
        raise ValueError(f"`sparsity` must be a fraction in (0, 1), got {sparsity!r}")
    if allocation == "linear_map" and layer_scores is None:
        raise ValueError("allocation='linear_map' needs `layer_scores`: one score per block (higher = sparser)")
    return None


def _needs(criterion: str, trim_rows: bool) -> set[str]:
    needs = set(registry.criterion("sparse", criterion).needs)
    if trim_rows:
        needs |= {"input_sq", "last_token"} if criterion != "magnitude" else {"last_token"}
    return needs


def _block_ratios(
    model: nn.Module,
    batches: Batches,
    linears: list[dict[str, nn.Linear]],
    sparsity: float,
    allocation: str,
    sizes: list[int],
    *,
    owl_m: float,
    lam: float,
    eps: float,
    layer_scores: Sequence[float] | None,
    dsa_function: AllocationFunction | str,
    max_batches: int | None,
    progress: bool,
) -> list[float]:
    if allocation == "uniform":
        return uniform(sizes, sparsity)
    if allocation == "linear_map":
        assert layer_scores is not None
        if len(layer_scores) != len(linears):
            raise ValueError(f"`layer_scores` must hold one score per block ({len(linears)}), got {len(layer_scores)}")
        return linear_map(list(layer_scores), sparsity, eps, sizes=sizes)
    dense = one_shot_stats(model, batches, {"input_sq"}, progress=progress, max_batches=max_batches)
    function = AllocationFunction.parse(dsa_function) if isinstance(dsa_function, str) else dsa_function
    values = []  # one number per block, computed from that block's Wanda scores only (memory: one block's scores)
    for block in linears:
        scores = [wanda_scores(lin.weight, cast(Tensor, dense[name].input_sq)) for name, lin in block.items()]
        values.append(outlier_ratio(scores, owl_m) if allocation == "owl" else function(scores))
        del scores
    if allocation == "owl":
        return owl(values, sparsity, lam, sizes=sizes)
    return dsa(
        [torch.tensor([v], dtype=torch.float64) for v in values],
        AllocationFunction(reduce="mean"),
        sparsity,
        lam,
        sizes=sizes,
    )


def _scores(weight: Tensor, stats: LinearStats | None) -> Tensor:
    """Wanda scores where input norms were collected, else magnitudes (SparseGPT needs them only for TRIM's rows)."""
    if stats is None or stats.input_sq is None:
        return magnitude_scores(weight)
    return wanda_scores(weight, stats.input_sq)


def _prune_linear(
    linear: nn.Linear,
    stats: LinearStats | None,
    criterion: str,
    count: int,
    nm: tuple[int, int] | None,
    trim_rows: bool,
    blocksize: int,
    percdamp: float,
) -> Tensor:
    """Prune one Linear in place (zeros, and SparseGPT's update); return its keep mask."""
    weight = linear.weight
    amount: int | Tensor | None = None if nm is not None else count
    if trim_rows and nm is None:
        assert stats is not None
        assert stats.last_inputs is not None
        amount = trim(weight.detach().float(), _scores(weight, stats), stats.last_inputs.to(weight.device), count)
    if criterion == "sparsegpt":
        assert stats is not None
        assert stats.hessian_sum is not None
        hessian = hessian_from_sum(stats.hessian_sum, stats.count)
        new_weight, keep = sparsegpt(weight.detach(), hessian, amount, n_m=nm, blocksize=blocksize, percdamp=percdamp)
        weight.data.copy_(new_weight)
        return keep
    scores = _scores(weight, stats if criterion == "wanda" else None)
    keep = prune_mask(scores, amount, n_m=nm, per_row=criterion != "magnitude" or isinstance(amount, Tensor))
    weight.data.masked_fill_(~keep, 0)
    return keep


def prune_sparse(
    model: nn.Module,
    batches: Batches | None,
    criterion: SparseCriterion = "wanda",
    sparsity: float = 0.5,
    *,
    n_m: tuple[int, int] | str | None = None,
    allocation: Allocation = "uniform",
    protocol: Literal["sequential", "one_shot"] = "sequential",
    trim_rows: bool = False,
    owl_m: float = 5.0,
    lam: float = 0.08,
    eps: float = 0.2,
    layer_scores: Sequence[float] | None = None,
    dsa_function: AllocationFunction | str = DSA_PAPER_FUNCTION,
    blocksize: int = 128,
    percdamp: float = 0.01,
    max_batches: int | None = None,
    progress: bool = False,
) -> SparsityResult:
    """Prune ``sparsity`` of every block's q/k/v/o/gate/up/down weights, exactly, and attach the masks.

    Args:
        model: a Hugging Face causal LM or a wrapper (LightningModule); pruned in place (LoRA must be merged first).
        batches: calibration batches (dicts with ``input_ids``, optional ``attention_mask``); None only for
            ``magnitude`` with ``uniform`` / ``linear_map`` allocation and no TRIM.
        criterion: ``magnitude`` (|W|, ranked per layer), ``wanda`` (|W|·‖X_j‖, per output row), ``sparsegpt``
            (OBS mask selection and weight update from the Hessian of the inputs).
        sparsity: the mean sparsity over all prunable weights, met exactly in integer counts.
        n_m: ``(N, M)`` or ``"2:4"``: N zeros in every group of M inputs of each row (then ``sparsity`` = N/M).
        allocation: ``uniform``; ``owl`` (dense Wanda outlier ratio > ``owl_m``·mean → less sparsity, band ±``lam``);
            ``linear_map`` of ``layer_scores`` into [S(1−eps), S(1+eps)] (higher = sparser); ``dsa`` (an
            :class:`~lit_prune.allocation.sparsity.AllocationFunction` of the dense Wanda scores, band ±``lam``).
        protocol: ``sequential`` (block by block, inputs from the pruned blocks before) or ``one_shot`` (all
            statistics from one pass of the dense model).
        trim_rows: TRIM: refine each Linear's count into per-row counts by output cosine on last-token inputs.
        owl_m: OWL's outlier threshold ``M``.
        lam: OWL / DSA band half-width.
        eps: ``linear_map``'s relative band.
        layer_scores: per-block scores for ``linear_map``.
        dsa_function: DSA's allocation function (operators chained as a string or an ``AllocationFunction``).
        blocksize: SparseGPT's column block.
        percdamp: SparseGPT's damping, as a fraction of the mean Hessian diagonal.
        max_batches: use at most this many calibration batches.
        progress: show progress bars.

    A model that already carries masks keeps its zeros (the new masks are combined with the old ones, so a row whose
    earlier zeros exceed its new count ends up sparser than asked: ``counts`` report what was achieved). Blocks are
    pruned and masked one after the other: if a step fails (e.g. a Hessian that is not positive definite), the
    blocks before it stay pruned, with their masks.

    Raises:
        ValueError: for invalid options or missing calibration batches (nothing is modified then).
    """
    nm = check_sparse_options(criterion, sparsity, n_m, allocation, protocol, layer_scores, trim_rows)
    target = nm[0] / nm[1] if nm is not None else float(sparsity)
    needs = _needs(criterion, trim_rows and nm is None)
    if batches is None and (needs or allocation in ("owl", "dsa")):
        raise ValueError(f"criterion={criterion!r}, allocation={allocation!r} need calibration `batches`")
    data: Batches = batches if batches is not None else []  # None only when no statistics are needed (checked above)
    start = time.perf_counter()
    linears = block_linears(model)
    sizes = [sum(lin.weight.numel() for lin in block.values()) for block in linears]
    ratios = (
        [target] * len(linears)
        if nm is not None
        else _block_ratios(
            model,
            data,
            linears,
            target,
            allocation,
            sizes,
            owl_m=owl_m,
            lam=lam,
            eps=eps,
            layer_scores=layer_scores,
            dsa_function=dsa_function,
            max_batches=max_batches,
            progress=progress,
        )
    )
    names = [name for block in linears for name in block]
    flat = [lin for block in linears for lin in block.values()]
    per_linear = [ratios[b] for b, block in enumerate(linears) for _ in block]
    if nm is None:
        counts = dict(zip(names, layer_counts(per_linear, [lin.weight.numel() for lin in flat], target)))
    else:
        counts = {name: lin.weight.numel() * nm[0] // nm[1] for name, lin in zip(names, flat)}
    masks: dict[str, Tensor] = {}
    previous = {name: mask.clone() for name, mask in masks_of(model).items()}

    def prune_block(b: int, stats: dict[str, LinearStats] | None) -> None:
        with torch.no_grad():
            for name, lin in linears[b].items():
                block_stats = stats[name] if stats is not None else None
                keep = _prune_linear(
                    lin, block_stats, criterion, counts[name], nm, trim_rows and nm is None, blocksize, percdamp
                )
                masks[name] = keep & previous[name] if name in previous else keep  # earlier zeros stay zero
        attach_masks(model, {name: masks[name] for name in linears[b]})  # a failure later leaves masked blocks

    if not needs:
        for b in range(len(linears)):
            prune_block(b, None)
    elif protocol == "sequential":
        sequential_prune(model, data, needs, prune_block, progress=progress, max_batches=max_batches)
    else:
        stats = one_shot_stats(model, data, needs, progress=progress, max_batches=max_batches)
        for b in range(len(linears)):
            prune_block(b, stats)
    counts = {name: int((~mask).sum()) for name, mask in masks.items()}  # as achieved (earlier masks, dead inputs)
    seconds = time.perf_counter() - start
    result = SparsityResult(masks=masks, block_ratios=list(ratios), counts=counts, seconds=seconds)
    result.meta = {
        "criterion": criterion,
        "allocation": allocation,
        "protocol": protocol,
        "n_m": nm,
        "trim": trim_rows,
        "target": target,
    }
    log.debug(
        "Sparsity (%s, %s, %s%s): %.4f of %s prunable weights zeroed in %.1f s; block ratios %.3f..%.3f",
        criterion,
        allocation,
        protocol,
        f", {nm[0]}:{nm[1]}" if nm else "",
        result.sparsity,
        f"{sum(sizes):,}",
        seconds,
        min(ratios),
        max(ratios),
    )
    return result
