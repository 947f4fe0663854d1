"""``DepthPruning``: remove whole transformer blocks chosen by a similarity criterion, inside ``Trainer.fit``."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader
from typing_extensions import override

from lit_prune.allocation import make_depth_plan
from lit_prune.arch import adapter_for, unwrap
from lit_prune.callbacks.base import PruningCallback, count_windows
from lit_prune.criteria.depth_config import DepthConfig, DepthCriterion
from lit_prune.criteria.scoring import score_blocks
from lit_prune.plan import PruningPlan
from lit_prune.surgery import apply_plan

log = logging.getLogger(__name__)


class DepthPruning(PruningCallback):
    """Remove ``num_layers`` (or ``amount`` × blocks) whole blocks ranked least important by ``criterion``.

    Lifecycle: ``setup`` validates the model (nothing modified on error); ``on_fit_start`` (or
    ``on_train_epoch_start`` of ``at_epoch``) runs ONE calibration pass with forward hooks that collect every
    statistic the criterion needs (global criteria add one pass per candidate block), reduces it across DDP ranks,
    removes the same blocks on every rank, rebuilds the DDP wrapper and the optimizers, and writes the plan as JSON
    next to the checkpoints. Hooks are removed even when the pass fails.

    The options and their defaults are those of :class:`~lit_prune.criteria.depth_config.DepthConfig` (shared with
    :func:`~lit_prune.criteria.scoring.score_blocks` and :func:`~lit_prune.allocation.make_depth_plan`), built into
    :attr:`config`.

    Args:
        criterion: ``bi`` (Block Influence), ``angular`` (last token), ``angular_block`` (Gromov et al.: the
            contiguous window of ``num_layers`` blocks), ``cka`` (1 − linear CKA of block input/output, last
            token), ``cka_all`` (all tokens), ``cka_global`` / ``cosine_global`` / ``kl_global`` (compare the
            final representation / next-token distribution with and without each block), ``consensus`` (Borda
            count over ``consensus_of``), and the controls ``random`` (seeded) and ``reversed`` (of
            ``reversed_of``).
        num_layers: how many blocks to remove.
        amount: or the fraction of the current blocks to remove (rounded to the nearest block).
        protect: block indices that are never removed (e.g. ``[0, 29]`` for the first and last).
        consensus_of: criteria aggregated by ``consensus`` (default the one-pass ones: bi, angular, cka).
        reversed_of: the criterion that ``reversed`` negates.
        seed: seed of ``random``.
        **kwargs: ``at_epoch``, ``calibration``, ``calibration_batches``, ``verbose`` (0 silent, 1 one line with the
            removed blocks and the parameters before and after, 2 also every score vector): see
            :class:`~lit_prune.callbacks.PruningCallback`.

    Raises:
        MisconfigurationException: for any option :class:`~lit_prune.criteria.depth_config.DepthConfig` refuses (an
            unknown criterion or member of ``consensus_of`` / ``reversed_of``, values out of range), for both or
            neither of ``num_layers`` and ``amount``; in ``setup``: ``protect`` out of range or more blocks asked
            than unprotected.

    Example::

        trainer = pl.Trainer(callbacks=[DepthPruning(criterion="consensus", num_layers=6, protect=[0])])
        trainer.fit(CausalLMModule(model="builtin:smollm2-135m-instruct"), datamodule=TextDataModule(...))
    """

    name = "depth"

    def __init__(
        self,
        criterion: DepthCriterion = DepthConfig.criterion,
        num_layers: int | None = DepthConfig.num_layers,
        amount: float | None = DepthConfig.amount,
        protect: Sequence[int] = DepthConfig.protect,
        consensus_of: Sequence[str] = DepthConfig.consensus_of,
        reversed_of: str = DepthConfig.reversed_of,
        seed: int = DepthConfig.seed,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        config = DepthConfig.for_callback(
            criterion=criterion,
            num_layers=num_layers,
            amount=amount,
            protect=tuple(protect),
            consensus_of=tuple(consensus_of),
            reversed_of=reversed_of,
            seed=seed,
        )
        message = config.count_error()  # scoring alone needs no count, removing blocks does
        if message is not None:
            raise MisconfigurationException(message)
        self.config = config
        """The validated options (:class:`~lit_prune.criteria.depth_config.DepthConfig`) every pruning step uses."""
        self.last_scores: dict[str, torch.Tensor] = {}
        """Every score the last pruning step computed (criterion and its components), one value per block."""

    @property
    def criterion(self) -> str:
        """The depth criterion (``config.criterion``)."""
        return self.config.criterion

    @property
    def num_layers(self) -> int | None:
        """How many blocks to remove, or None with ``amount`` (``config.num_layers``)."""
        return self.config.num_layers

    @property
    def state_key(self) -> str:
        """Distinguishes several DepthPruning callbacks in one checkpoint."""
        return self._generate_state_key(criterion=self.criterion, at_epoch=self.at_epoch)

    def num_to_remove(self, num_blocks: int) -> int:
        """Blocks this callback removes from a model with ``num_blocks`` blocks."""
        return self.config.num_to_remove(num_blocks)

    @override
    def check_model(self, pl_module: pl.LightningModule) -> None:
        model = unwrap(pl_module)
        num_blocks = adapter_for(model).num_blocks(model)
        protect = self.config.protect
        out_of_range = [p for p in protect if p >= num_blocks]
        if out_of_range:
            raise MisconfigurationException(
                f"DepthPruning `protect` indices {out_of_range} are out of range: the model has {num_blocks} blocks "
                f"(0..{num_blocks - 1})"
            )
        k = self.num_to_remove(num_blocks)
        free = num_blocks - len(protect)
        if k > free or k >= num_blocks:
            raise MisconfigurationException(
                f"DepthPruning cannot remove {k} blocks: the model has {num_blocks} blocks, {len(protect)} "
                f"protected, and at least one must remain"
            )

    @override
    def metrics_to_log(self, plan: PruningPlan) -> dict[str, float]:
        """Parameters after pruning, every block's score under every computed criterion, and the removed blocks."""
        metrics = super().metrics_to_log(plan)
        for name, scores in self.last_scores.items():
            metrics.update({f"depth/score/{name}/block_{i:02d}": float(v) for i, v in enumerate(scores.tolist())})
        metrics.update({f"depth/removed/block_{i:02d}": 1.0 for i in plan.drop_layers})
        return metrics

    @override
    def prune(self, pl_module: pl.LightningModule, calibration: DataLoader) -> PruningPlan:
        """Score the blocks on ``calibration``, remove the lowest-scoring ones, and return the applied plan."""
        self.check_model(pl_module)
        model = unwrap(pl_module)
        num_blocks = adapter_for(model).num_blocks(model)
        k = self.num_to_remove(num_blocks)
        start = time.perf_counter()
        cfg = self.config
        scores = score_blocks(
            model,
            calibration,
            config=cfg,
            n=k,
            max_batches=self.calibration_batches,
            progress=self.verbose > 0,
        )
        seconds = time.perf_counter() - start
        self.last_scores = scores
        from_data = cfg.criterion != "random" and not (cfg.criterion == "reversed" and cfg.reversed_of == "random")
        windows = count_windows(calibration, self.calibration_batches, _device(model)) if from_data else None
        plan = make_depth_plan(
            model,
            scores[cfg.criterion],
            num_remove=k,
            config=cfg,
            method=f"depth:{cfg.criterion}",
            meta={
                "criterion": cfg.criterion,
                "consensus_of": list(cfg.consensus_of),
                "reversed_of": cfg.reversed_of,
                "seed": cfg.seed,
                "protect": list(cfg.protect),
                "calibration_batches": self.calibration_batches,
                "scoring_seconds": seconds,
                "component_scores": {name: s.tolist() for name, s in scores.items()},
            },
            calibration_windows=windows,  # warns when the choice may change with another sample
        )
        record = getattr(pl_module, "apply_plan", None)
        if callable(record):
            record(plan)  # CausalLMModule: applies and remembers the plan for checkpoint reloads
        else:
            apply_plan(model, plan)
        if self.verbose:
            on = f" on {windows} calibration windows" if windows is not None else ""
            rank_zero_info(
                f"DepthPruning ({self.criterion}): removed blocks {list(plan.drop_layers)} of {num_blocks}; "
                f"params {plan.params_before:,} -> {plan.params_after:,} "
                f"({100 * (plan.fraction_removed or 0):.1f}% removed); scoring{on} took {seconds:.1f} s"
            )
        if self.verbose > 1:  # each score vector once (the criteria log them at DEBUG)
            for name, s in scores.items():
                rank_zero_info(f"DepthPruning scores [{name}]: " + ", ".join(f"{v:.4g}" for v in s.tolist()))
        return plan


def _device(model: torch.nn.Module) -> torch.device | None:
    return next((p.device for p in model.parameters()), None)
