"""``SparsityPruning``: unstructured or N:M sparsity inside ``Trainer.fit``, kept through training and LoRA merges."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader
from typing_extensions import override

from lit_prune.allocation.sparsity import DSA_PAPER_FUNCTION
from lit_prune.arch import adapter_for, block_linears, unwrap
from lit_prune.callbacks.base import PruningCallback
from lit_prune.plan import PruningPlan
from lit_prune.sparse.config import Allocation, Protocol, SparseCriterion, SparsityConfig
from lit_prune.sparse.masks import MASK_BUFFER, apply_masks, restore_masks_on_load
from lit_prune.sparse.prune import SparsityResult, prune_sparse
from lit_prune.sparse.report import sparsity_report

log = logging.getLogger(__name__)

_RESTORES_MASKS = "_lit_prune_restores_masks"


class SparsityPruning(PruningCallback):
    """Zero ``sparsity`` of every block's projection weights by ``criterion``, and keep them zero while training.

    Lifecycle: ``setup`` validates the model (nothing modified on error); ``on_fit_start`` (or the start of epoch
    ``at_epoch``) merges LoRA adapters if any, runs :func:`lit_prune.sparse.prune.prune_sparse` on the calibration
    batches (statistics summed over DDP ranks, so every rank computes the same masks), stores the keep masks as
    ``weight_mask`` buffers, rebuilds the DDP wrapper and optimizers, writes the plan JSON and logs
    ``sparsity/overall`` and ``sparsity/block_XX``. The plan's ``sparsity`` record holds :attr:`config`, a digest of
    the calibration tokens, the sparsity every Linear reached and a digest of the masks, so ``lit-prune prune --plan``
    (:func:`lit_prune.surgery.apply_plan`) re-computes the same masks on the same calibration; per-block sparsity is
    in its ``meta``. During training, gradients of pruned weights
    are zeroed after ``backward`` and the masks are re-applied after every batch, so no pruned weight comes back;
    LoRA adapters attached later are merged with the masks re-applied (exact sparsity), and ``save_pretrained``
    folds the masks into the weights. Checkpoints carry the masks; :class:`~lit_prune.CausalLMModule` recreates them
    on load.

    The options and their defaults are those of :class:`~lit_prune.sparse.config.SparsityConfig` (shared with
    :func:`~lit_prune.sparse.prune_sparse`), built into :attr:`config`.

    Args:
        criterion: ``magnitude`` (|W| per layer), ``wanda`` (|W|·‖X_j‖ per output row) or ``sparsegpt`` (OBS mask and
            weight update from the input Hessian).
        sparsity: mean sparsity over all prunable weights (met exactly in integer counts); ignored with ``n_m``.
        n_m: ``"2:4"`` / ``"4:8"`` (N zeros in every M consecutive inputs of a row), or None for unstructured.
        allocation: ``uniform``, ``owl``, ``linear_map`` (of ``layer_scores``) or ``dsa`` (of ``dsa_function``).
        protocol: ``sequential`` (block by block on the pruned blocks' outputs) or ``one_shot`` (dense statistics).
        trim: refine each layer's count into per-row counts (TRIM; the config's ``trim_rows``).
        owl_m: OWL's outlier threshold ``M`` (> 0).
        lam: OWL / DSA band half-width λ, in [0, 1).
        eps: ``linear_map``'s relative band ε, in [0, 1).
        layer_scores: per-block scores for ``linear_map`` (higher = sparser).
        dsa_function: DSA allocation function, e.g. ``"log|log|abs|geomean|cos|exp"``.
        blocksize: SparseGPT's column block.
        percdamp: SparseGPT's relative damping (>= 0).
        **kwargs: ``at_epoch``, ``calibration``, ``calibration_batches``, ``verbose`` (0 silent, 1 log the achieved
            sparsity, 2 also every block's): see :class:`~lit_prune.callbacks.PruningCallback`.

    Raises:
        MisconfigurationException: for any option :class:`~lit_prune.sparse.config.SparsityConfig` refuses (an
            unknown criterion, allocation or protocol, a sparsity outside (0, 1), a bad ``n_m``, N:M with a
            non-uniform allocation or TRIM, ``linear_map`` without ``layer_scores``, a constant out of range), or
            one :class:`~lit_prune.callbacks.PruningCallback` refuses.

    Example::

        trainer = pl.Trainer(callbacks=[SparsityPruning(criterion="wanda", sparsity=0.5, allocation="owl")])
        trainer.fit(CausalLMModule(model="builtin:smollm2-135m-instruct"), datamodule=TextDataModule(...))
    """

    name = "sparsity"

    def __init__(
        self,
        criterion: SparseCriterion = SparsityConfig.criterion,
        sparsity: float = SparsityConfig.sparsity,
        n_m: str | None = None,
        allocation: Allocation = SparsityConfig.allocation,
        protocol: Protocol = SparsityConfig.protocol,
        trim: bool = SparsityConfig.trim_rows,
        owl_m: float = SparsityConfig.owl_m,
        lam: float = SparsityConfig.lam,
        eps: float = SparsityConfig.eps,
        layer_scores: Sequence[float] | None = None,
        dsa_function: str = DSA_PAPER_FUNCTION,
        blocksize: int = SparsityConfig.blocksize,
        percdamp: float = SparsityConfig.percdamp,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        config = SparsityConfig.for_callback(
            criterion=criterion,
            sparsity=sparsity,
            n_m=n_m,
            allocation=allocation,
            protocol=protocol,
            trim_rows=trim,
            owl_m=owl_m,
            lam=lam,
            eps=eps,
            layer_scores=None if layer_scores is None else tuple(layer_scores),
            dsa_function=dsa_function,
            blocksize=blocksize,
            percdamp=percdamp,
        )
        self.config = config
        """The validated options (:class:`~lit_prune.sparse.config.SparsityConfig`) every pruning step uses."""
        self.last_result: SparsityResult | None = None
        """What the last pruning step did (masks, block ratios, exact counts, seconds)."""

    @property
    def criterion(self) -> str:
        """The sparse criterion (``config.criterion``)."""
        return self.config.criterion

    @property
    def state_key(self) -> str:
        """Distinguishes several SparsityPruning callbacks in one checkpoint."""
        return self._generate_state_key(
            criterion=self.criterion, sparsity=float(self.config.sparsity), at_epoch=self.at_epoch
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not getattr(pl_module, _RESTORES_MASKS, False):  # CausalLMModule registers it itself
            restore_masks_on_load(pl_module)  # a resumed checkpoint's `weight_mask` buffers load into a fresh model
            setattr(pl_module, _RESTORES_MASKS, True)

    @override
    def check_model(self, pl_module: pl.LightningModule) -> None:
        """Fail before calibration if the family is unsupported or a projection is not a plain ``nn.Linear``."""
        try:
            block_linears(pl_module)
        except TypeError as err:
            raise MisconfigurationException(f"SparsityPruning: {err}") from None

    @override
    def prune(self, pl_module: pl.LightningModule, calibration: DataLoader) -> PruningPlan:
        """Score, mask (and for SparseGPT update) every block's projections; return a plan recording the result.

        The masks are made by :func:`~lit_prune.sparse.prune.prune_sparse`, the function a replay of the plan
        (:func:`lit_prune.surgery.apply_plan`) runs again; the plan's ``sparsity`` is its result's ``record``.
        """
        self.check_model(pl_module)
        model = unwrap(pl_module)
        result = prune_sparse(
            model, calibration, config=self.config, max_batches=self.calibration_batches, progress=self.verbose > 0
        )
        self.last_result = result
        report = sparsity_report(model)
        adapter = adapter_for(model)
        total = adapter.total_params(model)
        plan = PruningPlan(
            num_layers=adapter.num_blocks(model),
            method=f"sparsity:{self.criterion}",
            params_before=total,
            params_after=total,
            sparsity=result.record,
            meta={
                **result.meta,
                "sparsity": report.overall,
                "zeros": report.zeros,
                "prunable": report.total,
                "block_ratios": result.block_ratios,
                "block_sparsity": list(report.blocks),
                "seconds": result.seconds,
            },
        )
        if self.verbose:
            cfg = self.config
            rank_zero_info(
                f"SparsityPruning ({cfg.criterion}, {cfg.allocation}, {cfg.protocol}"
                f"{', TRIM' if cfg.trim_rows else ''}): {report.zeros:,} of {report.total:,} prunable weights are zero "
                f"({100 * report.overall:.2f}%) after {result.seconds:.1f} s"
            )
        if self.verbose > 1:
            for b, value in enumerate(report.blocks):
                rank_zero_info(f"SparsityPruning block {b:2d}: {100 * value:.2f}%")
        return plan

    @override
    def metrics_to_log(self, plan: PruningPlan) -> dict[str, float]:
        """The achieved overall sparsity and every block's."""
        metrics = {f"{self.name}/overall": float(plan.meta["sparsity"])}
        metrics.update({f"{self.name}/block_{b:02d}": float(v) for b, v in enumerate(plan.meta["block_sparsity"])})
        return metrics

    # --- keep the zeros while training ----------------------------------------------------------------------------
    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.plans:
            return
        for module in unwrap(pl_module).modules():
            mask = module._buffers.get(MASK_BUFFER)
            weight = getattr(module, "weight", None)
            if mask is not None and mask.dtype == torch.bool and weight is not None and weight.grad is not None:
                weight.grad.masked_fill_(~mask, 0)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.plans:
            apply_masks(pl_module)
