"""What every pruning callback shares: when to prune, calibration source, state, and the rebuild after surgery.

A pruning callback only decides *when*; the stages (statistics, criteria, plan, surgery) do the work. After
surgery the callback rebuilds what the Trainer holds on to (the DDP wrapper, optimizers and schedulers), writes
the applied plan as JSON next to the checkpoints, and records it in its ``state_dict`` so a resumed run neither
prunes twice nor fails to load the pruned weights (the module replays recorded plans before loading them).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from typing_extensions import override

from lit_prune.allocation.depth import MIN_CALIBRATION_WINDOWS
from lit_prune.plan import PruningPlan
from lit_prune.recovery.lora import merge_adapters
from lit_prune.report import write_report

log = logging.getLogger(__name__)


class PruningCallback(Callback):
    """Base of the structural pruning callbacks: schedule, calibration source, state, rebuild, plan JSON.

    Subclasses implement :meth:`prune` (score on calibration batches, plan, apply to the module) and may validate
    the model in :meth:`check_model`.

    Args:
        at_epoch: prune at the start of this training epoch; None prunes on fit start (before the first step).
        calibration: a DataLoader of calibration batches (dicts with ``input_ids``); None uses the datamodule's
            ``calibration_dataloader()``.
        calibration_batches: use at most this many calibration batches; None uses them all.
        verbose: 0 logs nothing, 1 one line per pruning step (what was removed, parameters before and after)
            and where the plan went, 2 also every score vector (once each).

    Raises:
        MisconfigurationException: for a negative ``at_epoch`` or a non-positive ``calibration_batches``.
    """

    name = "pruning"

    def __init__(
        self,
        at_epoch: int | None = None,
        calibration: DataLoader | None = None,
        calibration_batches: int | None = None,
        verbose: int = 1,
    ) -> None:
        if at_epoch is not None and (isinstance(at_epoch, bool) or not isinstance(at_epoch, int) or at_epoch < 0):
            raise MisconfigurationException(f"`at_epoch` must be None or an int >= 0, got {at_epoch!r}")
        if calibration_batches is not None and (
            isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1
        ):
            raise MisconfigurationException(
                f"`calibration_batches` must be None or an int >= 1, got {calibration_batches!r}"
            )
        if verbose not in (0, 1, 2):
            raise MisconfigurationException(f"`verbose` must be 0, 1 or 2, got {verbose!r}")
        self.at_epoch = at_epoch
        self.calibration = calibration
        self.calibration_batches = calibration_batches
        self.verbose = verbose
        self.plans: list[dict[str, Any]] = []
        """Plans this callback applied, as dicts (kept in the checkpoint)."""

    # --- to implement ------------------------------------------------------------------------------------------
    def prune(self, pl_module: pl.LightningModule, calibration: DataLoader) -> PruningPlan:
        """Score, plan and apply one pruning step to ``pl_module``; return the applied plan."""
        raise NotImplementedError

    def prune_all(self, pl_module: pl.LightningModule, calibration: DataLoader) -> list[PruningPlan]:
        """Everything this callback would prune, at once and without a Trainer (``lit-prune prune``): the plans."""
        return [self.prune(pl_module, calibration)]

    def check_model(self, pl_module: pl.LightningModule) -> None:
        """Raise ``MisconfigurationException`` if this callback cannot prune ``pl_module`` (nothing modified)."""

    # --- schedule ----------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """Whether this callback has already pruned (read from its state after a resume)."""
        return bool(self.plans)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not self.done:
            if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
                raise MisconfigurationException(
                    f"{type(self).__name__} cannot yet rebuild a {type(trainer.strategy).__name__} after surgery; "
                    "use strategy='ddp' (or prune with `lit-prune prune` first and train the saved model)."
                )
            self.check_model(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_epoch is None and not self.done:
            self._run(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_epoch is not None and trainer.current_epoch == self.at_epoch and not self.done:
            self._run(trainer, pl_module)

    # --- the step ----------------------------------------------------------------------------------------------
    def calibration_loader(self, datamodule: pl.LightningDataModule | None) -> DataLoader:
        """The calibration DataLoader: ``calibration=`` if given, else ``datamodule.calibration_dataloader()``.

        Raises:
            MisconfigurationException: if neither exists.
        """
        if self.calibration is not None:
            return self.calibration
        factory = getattr(datamodule, "calibration_dataloader", None)
        if factory is None:
            raise MisconfigurationException(
                f"{type(self).__name__} needs calibration data: pass `calibration=` (a DataLoader of token "
                "windows) or fit with a datamodule that has `calibration_dataloader()` (e.g. TextDataModule)."
            )
        return factory()

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        merge_before_surgery(pl_module, type(self).__name__, self.verbose)
        plan = self.prune(pl_module, self.calibration_loader(getattr(trainer, "datamodule", None)))
        self.plans.append(plan.to_dict())
        rebuild_after_surgery(trainer)
        self._write_plan(trainer, plan)
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics(self.metrics_to_log(plan), step=trainer.global_step)

    def metrics_to_log(self, plan: PruningPlan) -> dict[str, float]:
        """Numbers sent to the Trainer's logger after a pruning step (subclasses add their scores)."""
        metrics = {f"{self.name}/params_after": float(plan.params_after or 0)}
        if plan.fraction_removed is not None:
            metrics[f"{self.name}/fraction_removed"] = plan.fraction_removed
        return metrics

    def _write_plan(self, trainer: pl.Trainer, plan: PruningPlan, announce: bool = True) -> Path | None:
        """Write the plan as JSON next to the checkpoints (rank 0 only); return the path (logged if ``announce``)."""
        folder = output_folder(trainer)
        if not trainer.is_global_zero:
            return None
        path = folder / f"{self.name}-plan-{len(self.plans)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        plan.meta.setdefault("written_at", time.time())  # the order plans of several callbacks were applied in
        plan.to_json(path)
        if self.verbose and announce:
            rank_zero_info(f"{type(self).__name__}: wrote the applied plan to {path}")
        return path

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """After a fit, the last pruning callback writes ``report.md`` next to the plans (see ``PruningReport``)."""
        if stage == "fit":
            report_after_fit(trainer, self)

    # --- checkpoint state --------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"plans": list(self.plans)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.plans = list(state_dict.get("plans", []))


def output_folder(trainer: pl.Trainer) -> Path:
    """Where callbacks write plans and models: the checkpoint folder, else the log folder, else the root folder.

    Every rank must call this: ``trainer.log_dir`` is a collective (a broadcast) under DDP.
    """
    ckpt = trainer.checkpoint_callback
    return Path(getattr(ckpt, "dirpath", None) or trainer.log_dir or trainer.default_root_dir)


def merge_before_surgery(pl_module: pl.LightningModule, who: str, verbose: int = 1, why: str = "pruning") -> None:
    """Merge LoRA adapters (if attached) so structural surgery acts on plain projections with the merged weights."""
    if merge_adapters(pl_module) and verbose:
        rank_zero_info(f"{who}: merged the LoRA adapters into the weights before {why}")


def rebuild_after_surgery(trainer: pl.Trainer) -> None:
    """Re-create what the Trainer built around the old parameters: the DDP wrapper, optimizers and schedulers.

    Every rank must have applied the same surgery before this is called (DDP broadcasts rank 0's parameters
    when it wraps the module again).
    """
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
        module = strategy.lightning_module
        assert module is not None
        strategy.model = strategy._setup_model(module)
        strategy._register_ddp_hooks()
    if trainer.state.fn == TrainerFn.FITTING:
        strategy.setup_optimizers(trainer)
        _optimizers_to_device(strategy.optimizers, strategy.root_device)


def count_windows(loader: Any, max_batches: int | None = None, device: torch.device | None = None) -> int | None:
    """How many calibration windows a pass over ``loader`` sees, summed over DDP ranks; None when unknown.

    Counts ``len(loader.dataset)`` (capped at ``max_batches * batch_size``) for a DataLoader of single windows; a
    loader without a sized dataset or a fixed ``batch_size`` gives None. Under ``torch.distributed`` every rank
    must call it (the counts are all-reduced on ``device``, the model's device).
    """
    dataset = getattr(loader, "dataset", None)
    batch_size = getattr(loader, "batch_size", None)
    if dataset is None or not hasattr(dataset, "__len__") or not isinstance(batch_size, int):
        return None
    n = len(dataset)
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        total = torch.tensor([n], dtype=torch.long, device=device)
        dist.all_reduce(total)
        n = int(total.item())
    return n


def warn_small_calibration(who: str, windows: int | None, what: str) -> None:
    """Warn (rank 0) that ``what`` may change with another sample when fewer than 16 windows were used."""
    if windows is not None and windows < MIN_CALIBRATION_WINDOWS:
        rank_zero_warn(
            f"{who} scored {what} on only {windows} calibration windows (fewer than {MIN_CALIBRATION_WINDOWS}): the "
            "result may change with another calibration sample. Use more calibration windows (32 or more, e.g. the "
            "datamodule's `calibration_windows: 64`).",
            category=UserWarning,
        )


def report_after_fit(trainer: pl.Trainer, caller: PruningCallback) -> Path | None:
    """Write ``report.md`` once per fit, from the last pruning callback, unless a :class:`PruningReport` will.

    A callback whose class sets ``writes_report = True`` (:class:`~lit_prune.callbacks.PruningReport`) writes the
    report itself, with its measurements; this module does not import it (it imports this one).

    A failure to draw or write is logged, never raised: the fit itself succeeded.
    """
    callbacks = list(getattr(trainer, "callbacks", []))
    if any(getattr(cb, "writes_report", False) for cb in callbacks):  # a PruningReport writes it with its numbers
        return None
    pruning = [cb for cb in callbacks if isinstance(cb, PruningCallback)]
    if not pruning or pruning[-1] is not caller or not any(cb.plans for cb in pruning):
        return None
    folder = output_folder(trainer)  # a collective under DDP: every rank calls it
    if not trainer.is_global_zero:
        return None
    try:
        path = write_report(folder)
    except (OSError, ValueError, RuntimeError) as err:
        rank_zero_warn(f"Could not write the pruning report into {folder}: {err}")
        return None
    if caller.verbose:
        rank_zero_info(f"{type(caller).__name__}: wrote the pruning report {path}")
    return path
