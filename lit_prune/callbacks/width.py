"""``WidthPruning``: remove attention heads and MLP neurons ranked least important, inside ``Trainer.fit``."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader
from typing_extensions import override

from lit_prune.allocation import make_width_plan
from lit_prune.arch import adapter_for, unwrap
from lit_prune.callbacks.base import PruningCallback, count_windows, warn_small_calibration
from lit_prune.criteria.scoring import score_width, score_width_with_grams
from lit_prune.criteria.width import WidthScores, random_scores, width_needs_for
from lit_prune.criteria.width_config import GQAMode, ParamsOf, WidthAllocation, WidthConfig, WidthCriterion
from lit_prune.plan import PruningPlan
from lit_prune.sparse.record import calibration_digest, ranks_digest
from lit_prune.surgery import apply_plan, check_width_keep
from lit_prune.surgery.reconstruct import (
    Reconstruct,
    ReconstructConfig,
    plan_lambdas,
    reader_linears,
    reconstruction_record,
)

log = logging.getLogger(__name__)


class WidthPruning(PruningCallback):
    """Remove ``amount`` of the parameters as attention heads and MLP neurons, lowest ``criterion`` score first.

    Lifecycle: ``setup`` validates the model and the budget (nothing modified on error); ``on_fit_start`` (or
    ``on_train_epoch_start`` of ``at_epoch``) runs ONE calibration pass with forward hooks that collect what the
    criterion needs (none for ``magnitude`` / ``random``), reduces it across DDP ranks, allocates the budget
    (:func:`lit_prune.allocation.make_width_plan`), cuts the same heads and neurons on every rank, rebuilds the DDP
    wrapper and the optimizers, and writes the plan as JSON next to the checkpoints. With ``reconstruct="lsq"`` the
    same pass also collects the input Grams of every ``o_proj`` and ``down_proj``, and the cut Linears are refit by
    least squares on their kept inputs (:mod:`lit_prune.surgery.reconstruct`; recorded in the plan).

    The options and their defaults are those of :class:`~lit_prune.criteria.width_config.WidthConfig` (shared with
    :func:`~lit_prune.criteria.scoring.score_width` and :func:`~lit_prune.allocation.make_width_plan`), built into
    :attr:`config`.

    Args:
        criterion: ``amp`` (mean L1 norm of each head's and neuron's contribution to the block output),
            ``amp_act`` (the AMP paper code: neurons by mean |activation| only), ``magnitude`` (weight norms),
            ``wanda_sp`` (|W|·‖x‖ summed over the unit's weights), and the controls ``random`` (seeded) and
            ``reversed`` (of ``reversed_of``).
        amount: a fraction in (0, 1) of the parameters counted by ``of``, or an int: parameters to remove.
        of: ``"total"`` (all parameters, embeddings included) or ``"non_embedding"``.
        gqa: ``"query"`` removes the same number of query heads from every KV group (k/v kept; a uniform result
            stays a stock checkpoint); ``"group"`` removes whole KV groups (their query heads and k/v rows).
        allocation: ``"uniform"`` (AMP: the same ratio in every block) or ``"global"`` (scores normalised per
            block and ranked across blocks; every block keeps at least ``min_keep``).
        round_to: kept MLP widths are multiples of this (e.g. 8 or 64, for hardware-friendly matmuls).
        min_keep: the smallest fraction of heads and neurons any block keeps (both allocations; a uniform ratio
            that would go below it is an error, global allocation stops at it).
        reversed_of: the criterion that ``reversed`` negates.
        seed: seed of ``random``.
        reconstruct: ``"none"`` (cut only) or ``"lsq"`` (refit ``o_proj`` after heads and ``down_proj`` after neurons
            go: ``W' = W·C[:, K]·(C[K, K] + λI)⁻¹``). Its Grams take ``(d_o² + d_ff²)·8`` bytes per block (float64:
            about 650 MB for SmolLM2-135M's 30 blocks).
        ridge: λ relative to the mean diagonal of the kept inputs' Gram (``reconstruct="lsq"``), >= 0.
        **kwargs: ``at_epoch``, ``calibration``, ``calibration_batches``, ``verbose`` (0 silent, 1 log what was
            removed, 2 also per-block widths): see :class:`~lit_prune.callbacks.PruningCallback`.

    Raises:
        MisconfigurationException: for any option :class:`~lit_prune.criteria.width_config.WidthConfig` refuses (an
            unknown criterion, ``reversed_of``, gqa mode, allocation or ``of``, values out of range); in ``setup``:
            a budget the model cannot meet.

    Example::

        trainer = pl.Trainer(callbacks=[WidthPruning(criterion="amp", amount=0.2, gqa="query")])
        trainer.fit(CausalLMModule(model="builtin:smollm2-135m-instruct"), datamodule=TextDataModule(...))
    """

    name = "width"

    def __init__(
        self,
        criterion: WidthCriterion = WidthConfig.criterion,
        amount: float | int = WidthConfig.amount,
        of: ParamsOf = WidthConfig.of,
        gqa: GQAMode = WidthConfig.gqa,
        allocation: WidthAllocation = WidthConfig.allocation,
        round_to: int = WidthConfig.round_to,
        min_keep: float = WidthConfig.min_keep,
        reversed_of: str = WidthConfig.reversed_of,
        seed: int = WidthConfig.seed,
        reconstruct: Reconstruct = ReconstructConfig.reconstruct,
        ridge: float = ReconstructConfig.ridge,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        config = WidthConfig.for_callback(
            criterion=criterion,
            amount=amount,
            of=of,
            gqa=gqa,
            allocation=allocation,
            round_to=round_to,
            min_keep=min_keep,
            reversed_of=reversed_of,
            seed=seed,
        )
        self.config = config
        """The validated options (:class:`~lit_prune.criteria.width_config.WidthConfig`) every pruning step uses."""
        self.reconstruction = ReconstructConfig.for_callback(reconstruct=reconstruct, ridge=ridge)
        """How the cut Linears are refit (:class:`~lit_prune.surgery.reconstruct.ReconstructConfig`)."""
        self.last_scores: WidthScores | None = None
        """The head and neuron scores of the last pruning step."""

    @property
    def criterion(self) -> str:
        """The width criterion (``config.criterion``)."""
        return self.config.criterion

    @property
    def state_key(self) -> str:
        """Distinguishes several WidthPruning callbacks in one checkpoint."""
        return self._generate_state_key(criterion=self.criterion, amount=self.config.amount, at_epoch=self.at_epoch)

    @override
    def check_model(self, pl_module: pl.LightningModule) -> None:
        """Fail before any calibration if the model family is unsupported or the budget cannot be met.

        The budget is checked with a dry-run allocation on placeholder scores (the model is only read), so an
        amount that would empty a block fails here, not after the calibration pass. The dry run is silent: its plan
        line and any warning about its placeholder plan would only repeat (or contradict) the real one's.
        """
        model = unwrap(pl_module)
        adapter = adapter_for(model)
        everything = {b: range(a.num_heads) for b, a in enumerate(adapter.attentions(model))}
        neurons = {b: range(m.intermediate_size) for b, m in enumerate(adapter.mlps(model))}
        try:
            check_width_keep(model, everything, neurons)  # plain nn.Linear projections (LoRA merged) everywhere
            adapter.check_head_pruning(model)  # a family quirk may refuse head removal (Phi with qk_layernorm)
        except (TypeError, ValueError) as err:
            raise MisconfigurationException(f"WidthPruning: {err}") from None
        try:
            with _silenced():
                self.plan_for(model, random_scores(model, seed=0))
        except ValueError as err:
            raise MisconfigurationException(f"WidthPruning: {err}") from None

    def plan_for(self, model: torch.nn.Module, scores: WidthScores) -> PruningPlan:
        """The plan this callback's budget and allocation make from ``scores`` (the model is only read)."""
        cfg = self.config
        return make_width_plan(
            model,
            scores,
            config=cfg,
            method=f"width:{cfg.criterion}",
            meta={"calibration_batches": self.calibration_batches, "seed": cfg.seed, "reversed_of": cfg.reversed_of},
        )

    @override
    def prune(self, pl_module: pl.LightningModule, calibration: DataLoader) -> PruningPlan:
        """Score heads and neurons on ``calibration``, cut the lowest under the budget, and return the plan."""
        self.check_model(pl_module)
        model = unwrap(pl_module)
        start = time.perf_counter()
        refit = self.reconstruction
        grams = None
        if refit.enabled:  # the scores' statistics and the Grams the refits read, in one pass
            scores, grams = score_width_with_grams(
                model, calibration, reader_linears(model), config=self.config, max_batches=self.calibration_batches,
                progress=self.verbose > 0,
            )  # fmt: skip
        else:
            scores = score_width(
                model, calibration, config=self.config, max_batches=self.calibration_batches, progress=self.verbose > 0
            )
        seconds = time.perf_counter() - start
        self.last_scores = scores
        windows = None
        cfg = self.config
        if width_needs_for(cfg.criterion, reversed_of=cfg.reversed_of):  # magnitude / random read no calibration data
            windows = count_windows(calibration, self.calibration_batches, next(model.parameters()).device)
            warn_small_calibration("WidthPruning", windows, "the heads and neurons")
        plan = self.plan_for(model, scores)
        if grams is not None:
            windows = windows or count_windows(calibration, self.calibration_batches, next(model.parameters()).device)
            lambdas = plan_lambdas(model, plan, grams, refit.ridge)
            digest = ranks_digest(calibration_digest(calibration, self.calibration_batches))  # same on every rank
            record_of = reconstruction_record(refit, lambdas, digest, self.calibration_batches)
            plan = dataclasses.replace(plan, reconstruction=record_of)
        if windows is not None:
            plan.meta["calibration_windows"] = windows
        plan.meta["scoring_seconds"] = seconds
        start = time.perf_counter()
        record = getattr(pl_module, "apply_plan", None)
        if callable(record):
            record(plan, statistics=grams)  # CausalLMModule: applies and remembers the plan for checkpoint reloads
        else:
            apply_plan(model, plan, statistics=grams)
        surgery_seconds = time.perf_counter() - start
        if self.verbose:
            heads = sum(len(k) for k in (plan.keep_heads or {}).values())
            rank_zero_info(
                f"WidthPruning ({cfg.criterion}, gqa={cfg.gqa}, {cfg.allocation}): params {plan.params_before:,} -> "
                f"{plan.params_after:,} ({100 * (plan.fraction_removed or 0):.1f}% removed); "
                f"{len(plan.keep_heads or {})} blocks lost heads ({heads} kept there), "
                f"{len(plan.keep_neurons or {})} blocks lost neurons; scoring took {seconds:.1f} s"
                + (
                    f"; {refit.reconstruct} refit of {len(plan.reconstruction['lambdas'])} Linears (ridge "
                    f"{refit.ridge:g} x mean Gram diagonal) took {surgery_seconds:.1f} s"
                    if plan.reconstruction is not None
                    else ""
                )
            )
        if self.verbose > 1:
            for b, shape in enumerate(_widths(model)):
                rank_zero_info(f"WidthPruning block {b:2d}: {shape}")
        return plan

    @override
    def metrics_to_log(self, plan: PruningPlan) -> dict[str, float]:
        """Parameters after pruning and, per block, the heads and neurons kept."""
        metrics = super().metrics_to_log(plan)
        heads_before = plan.heads_before or ()
        neurons_before = plan.neurons_before or ()
        for b, width in enumerate(heads_before):
            metrics[f"width/heads/block_{b:02d}"] = float(len((plan.keep_heads or {}).get(b, range(width))))
        for b, width in enumerate(neurons_before):
            metrics[f"width/neurons/block_{b:02d}"] = float(len((plan.keep_neurons or {}).get(b, range(width))))
        return metrics


def _widths(model: torch.nn.Module) -> list[str]:
    adapter = adapter_for(model)
    return [
        f"{a.num_heads} heads / {a.num_kv_heads} KV, {m.intermediate_size} neurons"
        for a, m in zip(adapter.attentions(model), adapter.mlps(model))
    ]


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """Drop the allocation module's log records, and every Python warning, inside the block (the dry run)."""
    logger = logging.getLogger("lit_prune.allocation.structured")

    def drop(record: logging.LogRecord) -> bool:
        return False

    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.removeFilter(drop)
