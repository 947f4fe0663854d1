"""``prune_sparse``: unstructured / N:M pruning of every block's projections, end to end, on a live model.

The stages are pure functions elsewhere: statistics (:mod:`lit_prune.sparse.calibrate`), per-layer ratios
(:mod:`lit_prune.allocation.sparsity`), masks and the SparseGPT update (:mod:`lit_prune.criteria.sparse`). This
module chains them: optional dense statistics for the allocation (OWL / DSA read the dense model's Wanda scores),
exact integer counts per Linear (``sparsity`` is the mean over all prunable weights), then the criterion block by block
(``protocol="sequential"``: each block calibrated on the outputs of the already pruned blocks) or from one dense pass
(``"one_shot"``), and finally the masks as buffers (:func:`lit_prune.sparse.attach_masks`).

The result's ``record`` is what a sparsity :class:`~lit_prune.plan.PruningPlan` holds (:mod:`lit_prune.sparse.record`);
:func:`replay_sparsity` runs :func:`prune_sparse` again from such a record and checks the masks are the recorded ones,
so the callback, the functional API and :func:`lit_prune.surgery.apply_plan` change a model through this one function.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from lit_prune.allocation.sparsity import AllocationFunction, dsa, layer_counts, linear_map, outlier_ratio, owl, uniform
from lit_prune.allocation.trim import trim
from lit_prune.arch import block_linears
from lit_prune.criteria import registry
from lit_prune.criteria.sparse import hessian_from_sum, magnitude_scores, prune_mask, sparsegpt, wanda_scores
from lit_prune.sparse.calibrate import one_shot_stats, sequential_prune
from lit_prune.sparse.config import (
    PROTOCOLS,
    Allocation,
    SparseCriterion,
    SparsityConfig,
    check_sparse_options,
)
from lit_prune.sparse.masks import attach_masks, masks_of
from lit_prune.sparse.record import calibration_digest, masks_digest, reiterable, sparsity_record
from lit_prune.stats._common import Batches
from lit_prune.stats.linear import LinearStats

log = logging.getLogger(__name__)

__all__ = [
    "PROTOCOLS",
    "Allocation",
    "SparseCriterion",
    "SparsityConfig",
    "SparsityResult",
    "check_sparse_options",
    "prune_sparse",
    "replay_sparsity",
]


@dataclass
class SparsityResult:
    """What :func:`prune_sparse` did.

    Args:
        masks: ``{linear name: bool keep mask}`` (also attached to the model as ``weight_mask`` buffers).
        block_ratios: the sparsity each block was allocated (before integer rounding).
        counts: weights pruned per Linear (exact integers; their sum is ``round(sparsity · prunable weights)``).
        seconds: wall time of the whole call (statistics, allocation, masks, updates).
        meta: the main options, for a plan's ``meta``.
        record: the plan's ``sparsity`` record (:func:`lit_prune.sparse.record.sparsity_record`): the config, the
            calibration digest, the sparsity each Linear reached and the masks' digest.
    """

    masks: dict[str, Tensor]
    block_ratios: list[float]
    counts: dict[str, int]
    seconds: float
    meta: dict[str, object] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Achieved mean sparsity over the masked weights."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(self.counts.values()) / total if total else 0.0


def _needs(criterion: str, trim_rows: bool) -> set[str]:
    needs = set(registry.criterion("sparse", criterion).needs)
    if trim_rows:
        needs |= {"input_sq", "last_token"} if criterion != "magnitude" else {"last_token"}
    return needs


def _block_ratios(
    model: nn.Module,
    batches: Batches,
    linears: list[dict[str, nn.Linear]],
    config: SparsityConfig,
    sizes: list[int],
    *,
    max_batches: int | None,
    progress: bool,
) -> list[float]:
    sparsity, allocation = config.target, config.allocation
    if allocation == "uniform":
        return uniform(sizes, sparsity)
    if allocation == "linear_map":
        scores_per_block = config.layer_scores
        assert scores_per_block is not None  # SparsityConfig requires them for linear_map
        if len(scores_per_block) != len(linears):
            raise ValueError(
                f"`layer_scores` must hold one score per block ({len(linears)}), got {len(scores_per_block)}"
            )
        return linear_map(list(scores_per_block), sparsity, config.eps, sizes=sizes)
    dense = one_shot_stats(model, batches, {"input_sq"}, progress=progress, max_batches=max_batches)
    function = config.dsa_function
    function = AllocationFunction.parse(function) if isinstance(function, str) else function
    values = []  # one number per block, computed from that block's Wanda scores only (memory: one block's scores)
    for block in linears:
        scores = [wanda_scores(lin.weight, cast(Tensor, dense[name].input_sq)) for name, lin in block.items()]
        values.append(outlier_ratio(scores, config.owl_m) if allocation == "owl" else function(scores))
        del scores
    if allocation == "owl":
        return owl(values, sparsity, config.lam, sizes=sizes)
    return dsa(
        [torch.tensor([v], dtype=torch.float64) for v in values],
        AllocationFunction(reduce="mean"),
        sparsity,
        config.lam,
        sizes=sizes,
    )


def _scores(weight: Tensor, stats: LinearStats | None) -> Tensor:
    """Wanda scores where input norms were collected, else magnitudes (SparseGPT needs them only for TRIM's rows)."""
    if stats is None or stats.input_sq is None:
        return magnitude_scores(weight)
    return wanda_scores(weight, stats.input_sq)


def _prune_linear(linear: nn.Linear, stats: LinearStats | None, config: SparsityConfig, count: int) -> Tensor:
    """Prune one Linear in place (zeros, and SparseGPT's update); return its keep mask."""
    weight = linear.weight
    nm = config.pattern
    amount: int | Tensor | None = None if nm is not None else count
    if config.trim_rows:
        assert stats is not None
        assert stats.last_inputs is not None
        amount = trim(weight.detach().float(), _scores(weight, stats), stats.last_inputs.to(weight.device), count)
    if config.criterion == "sparsegpt":
        assert stats is not None
        assert stats.hessian_sum is not None
        hessian = hessian_from_sum(stats.hessian_sum, stats.count)
        new_weight, keep = sparsegpt(
            weight.detach(), hessian, amount, n_m=nm, blocksize=config.blocksize, percdamp=config.percdamp
        )
        weight.data.copy_(new_weight)
        return keep
    scores = _scores(weight, stats if config.criterion == "wanda" else None)
    per_row = config.criterion != "magnitude" or isinstance(amount, Tensor)
    keep = prune_mask(scores, amount, n_m=nm, per_row=per_row)
    weight.data.masked_fill_(~keep, 0)
    return keep


def prune_sparse(
    model: nn.Module,
    batches: Batches | None,
    criterion: SparseCriterion | None = None,
    sparsity: float | None = None,
    *,
    config: SparsityConfig | None = None,
    max_batches: int | None = None,
    progress: bool = False,
    **options: Any,
) -> SparsityResult:
    """Prune ``sparsity`` of every block's prunable projection weights, exactly, and attach the masks.

    What to prune and how is a :class:`~lit_prune.sparse.config.SparsityConfig`: pass one as ``config``, or its
    fields as keywords (``criterion`` and ``sparsity`` also positionally), which replace the config's (or the
    defaults'), e.g. ``prune_sparse(model, batches, "sparsegpt", 0.6, allocation="owl", trim_rows=True)``.

    Args:
        model: a Hugging Face causal LM or a wrapper (LightningModule); pruned in place (LoRA must be merged first).
        batches: calibration batches (dicts with ``input_ids``, optional ``attention_mask``); None only for
            ``magnitude`` with ``uniform`` / ``linear_map`` allocation and no TRIM.
        criterion: the config's ``criterion`` (None: keep the config's, by default ``wanda``).
        sparsity: the config's ``sparsity`` (None: keep the config's, by default 0.5).
        config: the options; None: the defaults.
        max_batches: use at most this many calibration batches.
        progress: show progress bars.
        **options: any other :class:`~lit_prune.sparse.config.SparsityConfig` field (``n_m``, ``allocation``,
            ``protocol``, ``trim_rows``, ``owl_m``, ``lam``, ``eps``, ``layer_scores``, ``dsa_function``,
            ``blocksize``, ``percdamp``).

    A model that already carries masks keeps its zeros (the new masks are combined with the old ones, so a row whose
    earlier zeros exceed its new count ends up sparser than asked: ``counts`` report what was achieved). Blocks are
    pruned and masked one after the other: if a step fails (e.g. a Hessian that is not positive definite), the
    blocks before it stay pruned, with their masks.

    Raises:
        ValueError: for invalid options or missing calibration batches (nothing is modified then).
        TypeError: for a keyword that is not a ``SparsityConfig`` field.
    """
    given = {"criterion": criterion, "sparsity": sparsity}
    cfg = SparsityConfig.build(config, **{k: v for k, v in given.items() if v is not None}, **options)
    nm, target = cfg.pattern, cfg.target
    needs = _needs(cfg.criterion, cfg.trim_rows)
    uses_data = _uses_calibration(cfg)
    if batches is None and uses_data:
        raise ValueError(f"criterion={cfg.criterion!r}, allocation={cfg.allocation!r} need calibration `batches`")
    batches = reiterable(batches)  # read more than once (the digest, OWL's dense pass, the criterion's pass)
    data: Batches = batches if batches is not None and uses_data else []  # [] only when no statistics are needed
    calibration = calibration_digest(data, max_batches) if uses_data else None
    start = time.perf_counter()
    linears = block_linears(model)
    sizes = [sum(lin.weight.numel() for lin in block.values()) for block in linears]
    ratios = (
        [target] * len(linears)
        if nm is not None
        else _block_ratios(model, data, linears, cfg, sizes, max_batches=max_batches, progress=progress)
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
    masks_before = masks_digest(previous)

    def prune_block(b: int, stats: dict[str, LinearStats] | None) -> None:
        with torch.no_grad():
            for name, lin in linears[b].items():
                keep = _prune_linear(lin, stats[name] if stats is not None else None, cfg, counts[name])
                masks[name] = keep & previous[name] if name in previous else keep  # earlier zeros stay zero
        attach_masks(model, {name: masks[name] for name in linears[b]})  # a failure later leaves masked blocks

    if not needs:
        for b in range(len(linears)):
            prune_block(b, None)
    elif cfg.protocol == "sequential":
        sequential_prune(model, data, needs, prune_block, progress=progress, max_batches=max_batches)
    else:
        stats = one_shot_stats(model, data, needs, progress=progress, max_batches=max_batches)
        for b in range(len(linears)):
            prune_block(b, stats)
    counts = {name: int((~mask).sum()) for name, mask in masks.items()}  # as achieved (earlier masks, dead inputs)
    seconds = time.perf_counter() - start
    result = SparsityResult(masks=masks, block_ratios=list(ratios), counts=counts, seconds=seconds)
    result.meta = {
        "criterion": cfg.criterion,
        "allocation": cfg.allocation,
        "protocol": cfg.protocol,
        "n_m": nm,
        "trim": cfg.trim_rows,
        "target": target,
    }
    result.record = sparsity_record(
        cfg,
        masks,
        counts,
        max_batches=max_batches if uses_data else None,
        calibration=calibration,
        masks_before=masks_before,
    )
    log.debug(
        "Sparsity (%s, %s, %s%s): %.4f of %s prunable weights zeroed in %.1f s; block ratios %.3f..%.3f",
        cfg.criterion,
        cfg.allocation,
        cfg.protocol,
        f", {nm[0]}:{nm[1]}" if nm else "",
        result.sparsity,
        f"{sum(sizes):,}",
        seconds,
        min(ratios),
        max(ratios),
    )
    return result


def _uses_calibration(config: SparsityConfig) -> bool:
    """Whether ``config`` reads calibration batches (every criterion but magnitude, TRIM, OWL and DSA do)."""
    return bool(_needs(config.criterion, config.trim_rows)) or config.allocation in ("owl", "dsa")


def _counts_line(digest: Mapping[str, Any]) -> str:
    return (
        f"{digest['batches']} batches, {digest['sequences']} sequences, {digest['tokens']} tokens "
        f"(sha256 {str(digest['sha256'])[:12]}...)"
    )


def replay_sparsity(
    model: nn.Module, record: Mapping[str, Any], calibration: Batches | None = None, *, progress: bool = False
) -> SparsityResult:
    """Re-compute the masks a sparsity plan records (``plan.sparsity``), on the same calibration, and check them.

    Same calibration + same method + same model gives the same masks: the record's config
    (:class:`~lit_prune.sparse.config.SparsityConfig`) and ``max_batches`` go to :func:`prune_sparse`, and the
    masks it makes must reach the recorded sparsity in every Linear (exact integer counts) and have the recorded
    digest. Before anything changes, it checks the config, that the model's prunable Linears are the recorded ones,
    that the model carries the masks it carried when the plan was made (none, usually: a second replay is refused)
    and that ``calibration`` is the recorded calibration (its token digest).

    Args:
        model: the model the plan was made on, as it was then (a Hugging Face causal LM or a wrapper).
        record: a :class:`~lit_prune.plan.PruningPlan`'s ``sparsity`` (:data:`lit_prune.plan.SPARSITY_KEYS`).
        calibration: the calibration batches the plan was made on (as for :func:`prune_sparse`); may be None only
            for a method that reads none (``magnitude`` with ``uniform`` / ``linear_map`` and no TRIM).
        progress: show progress bars.

    Returns:
        What :func:`prune_sparse` did.

    Raises:
        ValueError: before any change, for an invalid config, other Linears, other masks already on the model,
            missing or other calibration; after pruning, if the masks differ from the record (the model is then
            left pruned with the new masks: reload it to undo).
    """
    try:
        config = SparsityConfig(**record["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"The plan's sparsity config is invalid: {err}; nothing was modified") from None
    names = [name for block in block_linears(model) for name in block]
    recorded: Mapping[str, float] = record["linears"]
    missing = [n for n in recorded if n not in set(names)]
    extra = [n for n in names if n not in recorded]
    if missing or extra:
        raise ValueError(
            f"The plan records the sparsity of {len(recorded)} Linears, this model has {len(names)} prunable Linears "
            f"(not in the model: {missing[:3]}{'...' if len(missing) > 3 else ''}; not in the plan: "
            f"{extra[:3]}{'...' if len(extra) > 3 else ''}): it was made on another model or at another step; "
            "nothing was modified"
        )
    if masks_digest(masks_of(model)) != record.get("masks_before_sha256"):
        state = "carried no masks" if record.get("masks_before_sha256") is None else "carried other masks"
        raise ValueError(
            f"The model carries other sparsity masks than when the plan was made (it {state} then): was the plan "
            "already applied, or is an earlier step of the plan list missing? Nothing was modified"
        )
    expected = record.get("calibration")
    uses_data = _uses_calibration(config)
    batches = reiterable(calibration) if uses_data else None
    if uses_data and batches is None:
        made_on = f": {_counts_line(expected)}" if expected is not None else ""
        raise ValueError(
            f"This sparsity plan ({config.criterion}, {config.allocation} allocation) re-computes its masks from "
            f"calibration batches: pass `calibration=` the batches it was made on{made_on}. Nothing was modified"
        )
    if batches is not None and expected is not None:
        got = calibration_digest(batches, record.get("max_batches"))
        if got != dict(expected):
            raise ValueError(
                f"The calibration differs from the one the sparsity plan was made on: got {_counts_line(got)}, the "
                f"plan records {_counts_line(expected)}. Replay it on the same calibration windows (the same data, "
                "`calibration_windows`, `calibration_seed`, `seq_len` and `batch_size`). Nothing was modified"
            )
    result = prune_sparse(model, batches, config=config, max_batches=record.get("max_batches"), progress=progress)
    reached = result.record["linears"]
    differ = [n for n in names if reached[n] != recorded[n]]
    wanted_digest = record.get("masks_sha256")
    if differ or (wanted_digest is not None and result.record["masks_sha256"] != wanted_digest):
        what = (
            f"{len(differ)} of {len(names)} Linears reached another sparsity (first {differ[0]!r}: "
            f"{reached[differ[0]]:.6f}, the plan records {recorded[differ[0]]:.6f})"
            if differ
            else "every Linear reached the recorded sparsity but other weights were zeroed (the masks' digest differs)"
        )
        why = (
            "the calibration matched the record, so the model's weights differ from the ones the plan was made on, "
            "or the numerics do (another device, dtype or torch version)"
            if expected is not None
            else "the calibration or the model differs from the one the plan was made on"
        )
        raise ValueError(
            f"The re-computed sparsity masks differ from the plan's: {what}; {why}. The model is left pruned with "
            "the new masks: reload it to undo"
        )
    return result
