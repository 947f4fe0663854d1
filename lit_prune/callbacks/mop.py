"""``MixtureOfPruners``: MoP inside ``Trainer.fit``, one shot or with recovery epochs between steps, resumable."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from lit_prune.arch import adapter_for, unwrap
from lit_prune.callbacks.base import (
    PruningCallback,
    count_windows,
    merge_before_surgery,
    output_folder,
    rebuild_after_surgery,
    warn_small_calibration,
)
from lit_prune.criteria.width_config import GQAMode, WidthCriterion
from lit_prune.io import save_pretrained
from lit_prune.mop.config import DEFAULT_PROXY, DEPTH, MoPConfig, Proxy
from lit_prune.mop.search import MoPSearch, MoPStep
from lit_prune.plan import PruningPlan
from lit_prune.recovery.lora import merged_copy

log = logging.getLogger(__name__)

CSV_FIELDS = ("step", "branch", "params_before", "params_after", "proxy_depth", "proxy_width", "seconds")


class MixtureOfPruners(PruningCallback):
    """Prune ``target`` of all parameters by MoP: each step removes a block or heads + neurons, the proxy's choice.

    The search itself is :class:`lit_prune.mop.MoPSearch`; the options it shares with this callback and their
    defaults are those of :class:`~lit_prune.mop.config.MoPConfig`, built into :attr:`config`.

    Schedule: the first step runs on fit start (or at the start of ``at_epoch``). With
    ``recover_epochs_between_steps=0`` every step runs there, back to back (one shot); with ``k > 0`` one step runs
    every ``k`` epochs and the Trainer trains the pruned model in between (statistics are then recomputed on the
    trained weights). After each step the DDP wrapper and the optimizers are rebuilt, the plan is written as
    ``mop-plan-N.json``, and the step (branch, parameters, both proxy values, wall time) goes to the Trainer's logger
    and to ``mop-trajectory.csv`` next to the checkpoints. At the end of the fit the final model (pruned, and trained
    if the fit trained it) is saved with :func:`lit_prune.save_pretrained` to ``mop-final/`` there
    (``save_model=False`` skips it). The trajectory is the
    callback's checkpoint state, so a resumed run continues the same path.

    Args:
        target: fraction of all parameters to remove, in (0, 1).
        proxy: ``ppl``, ``kl`` (to the dense model), ``cosine`` (final hidden states) or ``random`` (seeded).
        depth_criterion: how the depth candidate's block is chosen (one-pass depth criteria, or ``position``: the
            third-to-last block, as the paper's code does).
        width_criterion: how the width candidate's heads and neurons are chosen: any registered width criterion
            (``amp`` by default, ``amp_act``, ``magnitude``, ``wanda_sp``, ``random``, ``reversed`` of ``amp``).
        gqa: GQA mode of the width candidate (``query`` or ``group``).
        round_to: MLP widths stay multiples of this.
        recover_epochs_between_steps: train this many epochs between steps; 0 prunes in one shot.
        decisions: replay this decision string (``L`` depth, ``G`` width per step) instead of searching.
        seed: seed of the ``random`` proxy.
        save_model: save the final model to ``mop-final/`` next to the checkpoints.
        **kwargs: ``at_epoch`` (the epoch of the first step), ``calibration`` (held-out windows),
            ``calibration_batches``, ``verbose`` (0 silent, 1 one line per step and one when MoP finishes): see
            :class:`~lit_prune.callbacks.PruningCallback`.

    Raises:
        MisconfigurationException: for any option :class:`~lit_prune.mop.config.MoPConfig` refuses (an unknown
            proxy, criterion or gqa mode, a target outside (0, 1), a decision string with letters other than ``L``
            and ``G``, ``round_to`` < 1), or a negative ``recover_epochs_between_steps``.
    """

    name = "mop"

    def __init__(
        self,
        target: float = MoPConfig.target,
        proxy: Proxy = DEFAULT_PROXY,
        depth_criterion: str = MoPConfig.depth_criterion,
        width_criterion: WidthCriterion = MoPConfig.width_criterion,
        gqa: GQAMode = MoPConfig.gqa,
        round_to: int = MoPConfig.round_to,
        recover_epochs_between_steps: int = 0,
        decisions: str | None = MoPConfig.decisions,
        seed: int = MoPConfig.seed,
        save_model: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        config = MoPConfig.for_callback(
            target=target,
            proxy=proxy,
            depth_criterion=depth_criterion,
            width_criterion=width_criterion,
            gqa=gqa,
            round_to=round_to,
            decisions=decisions,
            seed=seed,
        )
        epochs = recover_epochs_between_steps
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise MisconfigurationException(f"`recover_epochs_between_steps` must be an int >= 0, got {epochs!r}")
        self.config = config
        """The validated search options (:class:`~lit_prune.mop.config.MoPConfig`)."""
        self.recover_epochs = recover_epochs_between_steps
        self.save_model = save_model
        self.trajectory: list[dict[str, Any]] = []
        """Every step so far, as dicts (kept in the checkpoint)."""
        self.finished = False
        self._search: MoPSearch | None = None
        self._reference: list[Tensor] | None = None
        """The dense model's outputs on the held-out windows (``kl`` / ``cosine``), kept in the checkpoint state so a
        resumed run measures against the same dense model (for ``kl``: tokens × vocab × 2 bytes)."""
        self._written_to: Path | None = None
        """The folder the plans and ``mop-trajectory.csv`` are written to (named once, when MoP finishes)."""

    @property
    def target(self) -> float:
        """Fraction of all parameters to remove (``config.target``)."""
        return self.config.target

    @property
    def proxy(self) -> str:
        """The proxy that compares the candidates (``config.proxy``)."""
        return str(self.config.proxy)

    @property
    def width_criterion(self) -> str:
        """How the width candidate is chosen (``config.width_criterion``)."""
        return self.config.width_criterion

    @property
    def state_key(self) -> str:
        """Distinguishes several MixtureOfPruners callbacks in one checkpoint."""
        return self._generate_state_key(target=self.target, proxy=self.proxy)

    @property
    def done(self) -> bool:
        """Whether the target has been reached (read from the state after a resume)."""
        return self.finished

    @property
    def path(self) -> str:
        """The branches taken so far, e.g. ``"LGGL"``."""
        return "".join(step["branch"] for step in self.trajectory)

    # --- schedule ----------------------------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_epoch is None and not self.done and not self.trajectory:
            self._steps(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.done:
            return
        first = self.at_epoch or 0
        if not self.trajectory:
            due = self.at_epoch is not None and trainer.current_epoch >= first
        else:  # step i runs at the start of epoch first + i * k
            due = self.recover_epochs > 0 and trainer.current_epoch >= first + self.recover_epochs * len(
                self.trajectory
            )
        if due:
            self._steps(trainer, pl_module)

    # --- the steps -----------------------------------------------------------------------------------------------
    def search_for(self, pl_module: pl.LightningModule, calibration: DataLoader) -> MoPSearch:
        """The search over ``pl_module``'s model (created once; continues a restored trajectory)."""
        if self._search is None:
            record = getattr(pl_module, "apply_plan", None)
            self._search = MoPSearch(
                unwrap(pl_module),
                calibration if self.calibration_batches is None else list(calibration)[: self.calibration_batches],
                config=self.config,
                apply=record if callable(record) else None,
                progress=False,  # the callback reports each step once, on rank 0
                reference=self._reference,
            )
            self._reference = self._search.reference or None
            device = next(self._search.hf_model.parameters()).device
            windows = count_windows(calibration, self.calibration_batches, device)
            what = f"its candidates ({self.config.depth_criterion} / {self.width_criterion} scores, proxy)"
            warn_small_calibration("MixtureOfPruners", windows, what)
            if self.trajectory:
                self._search.resume_from(self.trajectory)
        return self._search

    def _steps(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._search is None or not self._search.done():
            merge_before_surgery(pl_module, "MixtureOfPruners", self.verbose)  # scores and surgery see plain weights
        search = self.search_for(pl_module, self.calibration_loader(getattr(trainer, "datamodule", None)))
        if self.recover_epochs > 0:
            search.invalidate()  # the weights were trained since the last step
        pruned = False
        while not search.done():
            step = search.step()
            if step is None:
                break
            pruned = True
            self._record(trainer, step)
            if self.recover_epochs > 0:
                break
        if pruned:  # once per call: optimizers and schedulers restart from the new parameters
            rebuild_after_surgery(trainer)
        if search.done():
            self._finish(trainer, pl_module)

    def _record(self, trainer: pl.Trainer, step: MoPStep) -> None:
        self.trajectory.append(step.as_dict())
        plan = PruningPlan.from_dict(step.plan)
        self.plans.append(step.plan)
        folder = self._write_plan(trainer, plan, announce=False)  # the folder is named once, when MoP finishes
        if trainer.is_global_zero and folder is not None:
            self._written_to = folder.parent
            self._append_csv(folder.parent / "mop-trajectory.csv", step)
        if trainer.logger is not None and trainer.is_global_zero:
            metrics = {
                "mop/step": float(step.step),
                "mop/branch_depth": 1.0 if step.branch == DEPTH else 0.0,
                "mop/params": float(step.params_after),
                "mop/seconds": step.seconds,
            }
            metrics.update(
                {
                    f"mop/proxy_{k}": v
                    for k, v in (("depth", step.proxy_depth), ("width", step.proxy_width))
                    if math.isfinite(v)
                }
            )
            metrics["mop/global_step"] = float(trainer.global_step)
            # one shot: every step happens at global step 0, so the MoP step is the x-axis
            trainer.logger.log_metrics(metrics, step=step.step if self.recover_epochs == 0 else trainer.global_step)
        if self.verbose:
            rank_zero_info(self._step_line(step))

    def _step_line(self, step: MoPStep) -> str:
        """One line per step: what was removed, the proxies compared, the parameters before and after."""
        plan = step.plan
        if step.branch == DEPTH:
            removed = f"block {list(plan.get('drop_layers', []))}"
        else:
            widths = []
            for unit, before_key, keep_key in (
                ("heads", "heads_before", "keep_heads"),
                ("neurons", "neurons_before", "keep_neurons"),
            ):
                before = list(plan.get(before_key) or ())
                after = list(before)
                for b, kept in (plan.get(keep_key) or {}).items():
                    after[int(b)] = len(kept)
                widths.append(f"{unit} {sum(before):,} -> {sum(after):,}")
            removed = ", ".join(widths)
        if math.isnan(step.proxy_depth) and math.isnan(step.proxy_width):
            why = "forced: one candidate, a replayed decision or the random proxy"
        else:
            why = f"proxy {self.proxy}: depth {step.proxy_depth:.4g}, width {step.proxy_width:.4g}"
        return (
            f"MoP step {step.step}: {'depth' if step.branch == DEPTH else 'width'} ({removed}; {why}); params "
            f"{step.params_before:,} -> {step.params_after:,}; {step.seconds:.1f} s"
        )

    @staticmethod
    def _append_csv(path: Path, step: MoPStep) -> None:
        new = not path.exists()
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow({k: v for k, v in step.as_dict().items() if k in CSV_FIELDS})

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.finished = True
        model = unwrap(pl_module)
        total = adapter_for(model).total_params(model)
        if self.verbose and self.trajectory:
            start = self.trajectory[0]["params_before"]
            where = f"; plans and mop-trajectory.csv in {self._written_to}" if self._written_to is not None else ""
            rank_zero_info(
                f"MoP reached {100 * (1 - total / start):.1f}% of parameters removed (target {100 * self.target:.1f}%)"
                f" in {len(self.trajectory)} steps: path {self.path}{where}"
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save the final model (pruned, and trained if the fit trained it) with its plans."""
        if not self.finished and self.trajectory:
            left = self._search.remaining if self._search is not None else float("nan")
            rank_zero_warn(
                f"MixtureOfPruners did not reach its target before the fit ended: {len(self.trajectory)} steps "
                f"({self.path}), {left:,} parameters still to remove; give the fit more epochs (one step every "
                f"{self.recover_epochs} epochs) or resume it"
            )
        if not (self.finished and self.save_model):
            return
        folder = output_folder(trainer)
        if trainer.is_global_zero:
            plans = [PruningPlan.from_dict(p) for p in self.plans]
            tokenizer = getattr(pl_module, "tokenizer", None)
            # adapters still attached (a LoRA callback listed after this one merges later): save a merged copy
            save_pretrained(merged_copy(pl_module), folder / "mop-final", tokenizer=tokenizer, plans=plans)

    # --- the PruningCallback interface (used by `lit-prune prune`) --------------------------------------------------
    @override
    def check_model(self, pl_module: pl.LightningModule) -> None:
        model = unwrap(pl_module)
        if adapter_for(model).num_blocks(model) < 2:
            raise MisconfigurationException("MoP needs a model with at least 2 blocks")

    @override
    def prune(self, pl_module: pl.LightningModule, calibration: DataLoader) -> PruningPlan:
        """Run every step at once (one shot, no Trainer) and return the last applied plan.

        Raises:
            RuntimeError: if no step could be taken (the target is below the smallest unit).
        """
        plans = self.prune_all(pl_module, calibration)
        if not plans:
            raise RuntimeError(f"MoP took no step: the target {self.target} is below the smallest unit it can remove")
        return plans[-1]

    def prune_all(self, pl_module: pl.LightningModule, calibration: DataLoader) -> list[PruningPlan]:
        """Run every step at once (one shot, no Trainer); returns the applied plans in order."""
        self.check_model(pl_module)
        search = self.search_for(pl_module, calibration)
        plans = []
        start = search.params_start
        while not search.done():
            step = search.step()
            if step is None:
                break
            self.trajectory.append(step.as_dict())
            plans.append(PruningPlan.from_dict(step.plan))
            if self.verbose:
                rank_zero_info(self._step_line(step))
        self.finished = True
        if self.verbose:
            total = search.adapter.total_params(search.hf_model)
            rank_zero_info(
                f"MoP one shot: {len(plans)} steps, path {self.path}; params {start:,} -> {total:,} "
                f"({100 * (1 - total / start):.1f}% removed, target {100 * self.target:.1f}%)"
            )
        return plans

    # --- checkpoint state --------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "plans": list(self.plans),
            "trajectory": list(self.trajectory),
            "finished": self.finished,
        }
        if self._reference and not self.finished:
            state["reference"] = [t.cpu() for t in self._reference]
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.plans = list(state_dict.get("plans", []))
        self.trajectory = list(state_dict.get("trajectory", []))
        self.finished = bool(state_dict.get("finished", False))
        self._reference = state_dict.get("reference")
        self._search = None
