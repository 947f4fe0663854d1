"""``ZeroShotEval``: lm-eval zero-shot accuracy of the model a Trainer fits, logged to the Trainer's logger."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lit_prune.eval.zeroshot import DEFAULT_TASKS, ZeroShotResult, zero_shot

log = logging.getLogger(__name__)

When = Literal["fit_start", "fit_end"]


class ZeroShotEval(Callback):
    """Score the in-memory model with :func:`lit_prune.eval.zero_shot` during ``Trainer.fit`` and log the numbers.

    ``when="fit_start"`` evaluates on fit start, after the callbacks listed before this one (e.g. right after a
    pruning callback, before any recovery training); ``"fit_end"`` evaluates when the fit ends (after the LoRA
    callbacks listed before it merged their adapters). Under DDP rank 0 evaluates and the other ranks wait.
    Logged: ``zeroshot/<task>/acc``, ``zeroshot/<task>/acc_norm`` (where the task has it), ``zeroshot/avg_acc``.

    Args:
        tasks: local task names (:data:`lit_prune.eval.tasks.LOCAL_TASKS`) or stock lm-eval names.
        limit: score only the first ``limit`` items of each task (None: all).
        batch_size: lm-eval batch size.
        data_dir: folder of the local task files; None = the shared data folder (``$LIT_PRUNE_DATA_DIR``).
        when: ``"fit_start"`` or ``"fit_end"``.
        verbose: 0 silent, 1 (or 2) log the scores.

    Raises:
        MisconfigurationException: for an empty task list, ``limit``/``batch_size`` < 1 or an unknown ``when``.

    Example::

        trainer = pl.Trainer(callbacks=[MixtureOfPruners(target=0.25), ZeroShotEval(limit=200, when="fit_start")])
    """

    def __init__(
        self,
        tasks: Sequence[str] = DEFAULT_TASKS,
        limit: int | None = None,
        batch_size: int = 8,
        data_dir: str | None = None,
        when: When = "fit_end",
        verbose: int = 1,
    ) -> None:
        if isinstance(tasks, str) or not tasks:
            raise MisconfigurationException(f"`tasks` must be a non-empty list of task names, got {tasks!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise MisconfigurationException(f"`limit` must be None or an int >= 1, got {limit!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise MisconfigurationException(f"`batch_size` must be an int >= 1, got {batch_size!r}")
        if when not in ("fit_start", "fit_end"):
            raise MisconfigurationException(f"`when` must be 'fit_start' or 'fit_end', got {when!r}")
        if verbose not in (0, 1, 2):
            raise MisconfigurationException(f"`verbose` must be 0, 1 or 2, got {verbose!r}")
        self.tasks = tuple(tasks)
        self.limit = limit
        self.batch_size = batch_size
        self.data_dir = data_dir
        self.when = when
        self.verbose = verbose
        self.results: list[ZeroShotResult] = []
        """Every evaluation this callback ran (rank 0 only)."""

    @property
    def state_key(self) -> str:
        """Distinguishes several ZeroShotEval callbacks in one checkpoint."""
        return self._generate_state_key(when=self.when, tasks=self.tasks)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "fit_start":
            self.evaluate(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "fit_end":
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ZeroShotResult | None:
        """Run the evaluation on rank 0, log it, and return it (None on the other ranks)."""
        result = None
        if trainer.is_global_zero:
            tokenizer = getattr(pl_module, "tokenizer", None)
            if tokenizer is None:
                raise MisconfigurationException("ZeroShotEval needs the module's `tokenizer` (CausalLMModule has one)")
            result = zero_shot(
                pl_module, tokenizer, self.tasks, limit=self.limit, batch_size=self.batch_size, data_dir=self.data_dir
            )
            self.results.append(result)
            self._log(trainer, result)
        trainer.strategy.barrier("zeroshot")
        return result

    def _log(self, trainer: pl.Trainer, result: ZeroShotResult) -> None:
        metrics = {f"zeroshot/{task}/acc": value for task, value in result.acc.items()}
        metrics.update({f"zeroshot/{task}/acc_norm": value for task, value in result.acc_norm.items()})
        metrics["zeroshot/avg_acc"] = result.avg
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        if self.verbose:
            scores = ", ".join(f"{task} {100 * acc:.1f}" for task, acc in result.acc.items())
            rank_zero_info(
                f"ZeroShotEval ({self.when}, {sum(result.n_items.values())} items in {result.seconds:.0f} s): "
                f"{scores}; avg acc {100 * result.avg:.2f}"
            )
