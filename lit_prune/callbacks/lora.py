"""``LoRA`` and ``CKALoRA``: recovery fine-tuning with PEFT adapters in the Trainer that pruned the model.

Lifecycle:

* ``setup`` checks the arguments against the model (nothing modified on error) and, with ``distill=True``, takes
  a frozen copy of the model as it is before any pruning callback runs (the teacher).
* ``on_fit_start``, ``on_train_epoch_start`` and ``on_train_batch_start``: once every pruning callback listed
  *before* this one has pruned (immediately if there is none), attach the adapters, freeze everything else, and
  rebuild the DDP wrapper and the optimizers over the trainable (LoRA) parameters only. A pruning callback that
  runs later merges the adapters before its surgery; this callback then attaches fresh ones to the pruned model
  (``CKALoRA`` re-selects its blocks).
* ``on_train_end``: optionally save the adapter alone, merge it into the weights, and save the merged model as a
  plain Hugging Face checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

from lit_prune import loading  # the module, so a patched `loading.load_model` is the one called
from lit_prune.arch import adapter_for, unwrap
from lit_prune.callbacks.base import PruningCallback, output_folder, rebuild_after_surgery
from lit_prune.io import save_pretrained
from lit_prune.plan import PruningPlan
from lit_prune.recovery.cka import cka_importance, select_blocks
from lit_prune.recovery.distill import Distillation, freeze, frozen_copy
from lit_prune.recovery.lora import (
    LoRASpec,
    attach_to_module,
    check_spec,
    is_lora,
    lora_param_count,
    merge_adapters,
    save_adapter,
    trainable_params,
)

log = logging.getLogger(__name__)


class LoRA(Callback):
    """Attach PEFT LoRA adapters for recovery fine-tuning; merge them before later surgery and at the end.

    Args:
        r: adapter rank.
        alpha: LoRA alpha (the update is scaled by ``alpha / r``).
        dropout: dropout on the adapter input.
        target_modules: projection names that get adapters (default None: every prunable projection of the
            model's family, e.g. the 7 of LLaMA, ``qkv_proj``/``o_proj``/``gate_up_proj``/``down_proj`` of Phi-3).
        layers: block indices that get adapters; None = every block.
        distill: add ``distill_alpha · KL(teacher ‖ student)`` to the loss, the teacher being a frozen copy of the
            model taken in ``setup``, i.e. before any pruning callback of the same fit ran. Costs a second copy of
            the unpruned weights and one teacher forward per step (see :mod:`lit_prune.recovery.distill`).
        distill_alpha: weight of the KL term.
        temperature: distillation temperature.
        teacher: a model reference (hub id, folder, ``builtin:`` alias) or ``PreTrainedModel`` to distil from
            instead of the copy, e.g. the dense model when recovering a checkpoint pruned earlier.
        teacher_device: where the teacher runs (e.g. ``"cpu"`` while training on a GPU); None = the student's device.
        merge_at_end: merge the adapters into the weights when training ends.
        save_model: when merged at the end, save the model (plain HF checkpoint, plus the pruning plans) to
            ``lora-merged/`` next to the checkpoints.
        save_adapter: also save the adapter alone (PEFT format) to ``lora-adapter/`` before merging.
        verbose: 0 silent; 1 log attaching (which blocks, trainable parameters), merging and saving; 2 also
            (CKALoRA) every block's importance.

    Raises:
        MisconfigurationException: for out-of-range hyperparameters; in ``setup``: under FSDP, for a module without
            ``.model``, or for target modules / layers the model does not have.

    Example::

        trainer = pl.Trainer(callbacks=[DepthPruning(num_layers=6), LoRA(r=8, alpha=16)])
        trainer.fit(CausalLMModule(model="builtin:smollm2-135m-instruct"), datamodule=InstructionDataModule(...))
    """

    name = "lora"

    def __init__(
        self,
        r: int = LoRASpec.r,
        alpha: float = LoRASpec.alpha,
        dropout: float = LoRASpec.dropout,
        target_modules: Sequence[str] | None = None,
        layers: Sequence[int] | None = None,
        distill: bool = False,
        distill_alpha: float = 1.0,
        temperature: float = 1.0,
        teacher: Any = None,
        teacher_device: str | None = None,
        merge_at_end: bool = True,
        save_model: bool = True,
        save_adapter: bool = False,
        verbose: int = 1,
    ) -> None:
        try:
            # lists from YAML: LoRASpec checks them and stores tuples
            spec = LoRASpec(r, alpha, dropout, target_modules, layers)  # type: ignore[arg-type]
        except ValueError as err:
            raise MisconfigurationException(f"{type(self).__name__}: {err}") from None
        if not distill_alpha >= 0:
            raise MisconfigurationException(f"`distill_alpha` must be >= 0, got {distill_alpha!r}")
        if not temperature > 0:
            raise MisconfigurationException(f"`temperature` must be positive, got {temperature!r}")
        if teacher is not None and not distill:
            raise MisconfigurationException("`teacher` is only used with `distill=True`; set it or drop `teacher`")
        if verbose not in (0, 1, 2):
            raise MisconfigurationException(f"`verbose` must be 0, 1 or 2, got {verbose!r}")
        self.r = spec.r
        self.alpha = spec.alpha
        self.dropout = spec.dropout
        self.target_modules = spec.target_modules
        self.layers = None if spec.layers is None else tuple(sorted(set(spec.layers)))
        self.distill = distill
        self.distill_alpha = distill_alpha
        self.temperature = temperature
        self.teacher = teacher
        self.teacher_device = teacher_device
        self.merge_at_end = merge_at_end
        self.save_model = save_model
        self.save_adapter = save_adapter
        self.verbose = verbose
        self.attachments: list[dict[str, Any]] = []
        """One record per attach: blocks, trainable parameters, what all-block LoRA would train, global step."""
        self._distillation: Distillation | None = None
        self._layers_now: list[int] | None = None  # ``layers`` renumbered through later depth pruning
        self._plans_seen: int | None = None  # how many of the module's pruning plans ``_layers_now`` accounts for

    @property
    def state_key(self) -> str:
        """Distinguishes several LoRA callbacks in one checkpoint."""
        return self._generate_state_key(r=self.r, layers=self.layers)

    # --- what to attach ------------------------------------------------------------------------------------------
    def spec(self, layers: Sequence[int] | None) -> LoRASpec:
        """The adapter spec for ``layers`` (None = every block)."""
        return LoRASpec(
            r=self.r,
            alpha=self.alpha,
            dropout=self.dropout,
            target_modules=self.target_modules,
            layers=None if layers is None else tuple(layers),
        )

    def choose_layers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[int] | None:
        """Blocks that get adapters on the current model (None = all); ``CKALoRA`` overrides this.

        Fixed ``layers`` name blocks of the model as it is at the first attach; when a pruning callback removes
        blocks later in the fit, the indices follow the surviving blocks (removed ones are dropped).

        Raises:
            MisconfigurationException: if depth pruning removed every block ``layers`` named.
        """
        if self.layers is None:
            return None
        plans = list(getattr(pl_module, "pruning_plans", []))
        if self._layers_now is None or self._plans_seen is None:
            self._layers_now, self._plans_seen = list(self.layers), len(plans)
        for plan in plans[self._plans_seen :]:
            dropped = set(plan.get("drop_layers") or [])
            self._layers_now = [i - sum(d < i for d in dropped) for i in self._layers_now if i not in dropped]
        self._plans_seen = len(plans)
        if not self._layers_now:
            raise MisconfigurationException(
                f"{type(self).__name__}: depth pruning removed every block of `layers`={list(self.layers)}; "
                "nothing left to attach adapters to"
            )
        return list(self._layers_now)

    # --- hooks ---------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy)):
            raise MisconfigurationException(
                f"{type(self).__name__} cannot yet rebuild a {type(trainer.strategy).__name__} after attaching "
                "adapters; use strategy='ddp'"
            )
        if not isinstance(getattr(pl_module, "model", None), torch.nn.Module):
            raise MisconfigurationException(
                f"{type(self).__name__} needs a LightningModule that holds its Hugging Face model as `.model` "
                f"(like CausalLMModule), got {type(pl_module).__name__}"
            )
        self.check_model(pl_module)
        if self.distill and self._distillation is None:
            try:
                teacher = self._make_teacher(pl_module)
            except TypeError as err:
                raise MisconfigurationException(f"{type(self).__name__}(distill=True): {err}") from None
            self._distillation = Distillation(teacher, self.distill_alpha, self.temperature)

    def check_model(self, pl_module: pl.LightningModule) -> None:
        """Raise ``MisconfigurationException`` if the adapters do not fit ``pl_module`` (nothing modified)."""
        try:
            check_spec(unwrap(pl_module), self.spec(self.layers))
        except ValueError as err:
            raise MisconfigurationException(f"{type(self).__name__}: {err}") from None

    def _make_teacher(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        student = unwrap(pl_module)
        if self.teacher is None:
            teacher = frozen_copy(student)
        elif isinstance(self.teacher, str):
            dtype = str(next(student.parameters()).dtype).removeprefix("torch.")
            teacher = freeze(loading.load_model(self.teacher, dtype=dtype))  # loaded for us: no copy needed
        else:
            teacher = frozen_copy(self.teacher)
        if self.verbose:
            params = sum(p.numel() * p.element_size() for p in teacher.parameters())
            rank_zero_info(f"{type(self).__name__}: distillation teacher holds {params / 2**20:.0f} MiB of weights")
        return teacher

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._distillation is not None:
            # the student was just converted by the precision plugin (e.g. "bf16-true"); the teacher follows
            trainer.precision_plugin.convert_module(self._distillation.teacher)
            self._distillation.to(self.teacher_device or pl_module.device)
            if hasattr(pl_module, "distillation"):
                setattr(pl_module, "distillation", self._distillation)
            else:
                raise MisconfigurationException(
                    f"distill=True needs a module whose training step adds the distillation term (CausalLMModule); "
                    f"got {type(pl_module).__name__}"
                )
        self._maybe_attach(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_attach(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._maybe_attach(trainer, pl_module)  # a pruning callback listed after this one merged in the same hook

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save the adapter (optional), merge it, save the merged model, and free the teacher.

        Runs after the Trainer's own end-of-training checkpoint, which therefore still holds the adapters (and the
        optimizer state that belongs to them), so a run resumed from it continues the same adapters.
        """
        try:
            if not self.attachments:
                rank_zero_warn(
                    f"{type(self).__name__} never attached adapters in this fit: a pruning callback listed before it "
                    "did not run (e.g. its `at_epoch` was not reached), so the whole model trained"
                )
            held: Any = getattr(pl_module, "model", None)
            if held is not None and is_lora(held):
                self._finish(trainer, pl_module, held)
        finally:
            self._drop_teacher(pl_module)

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, held: Any) -> None:
        folder = output_folder(trainer)  # every rank: a collective under DDP
        if self.save_adapter and trainer.is_global_zero:
            save_adapter(held, folder / "lora-adapter", folder / "lora-base", getattr(pl_module, "tokenizer", None))
            if self.verbose:
                rank_zero_info(
                    f"{type(self).__name__}: saved the adapter to {folder / 'lora-adapter'} and the model it applies "
                    f"to (pruned, unmerged) to {folder / 'lora-base'}"
                )
        if not self.merge_at_end:
            return
        merge_adapters(pl_module)
        if self.verbose:
            rank_zero_info(f"{type(self).__name__}: merged the adapters into the weights at the end of the fit")
        if self.save_model and trainer.is_global_zero:
            plans = [PruningPlan.from_dict(p) for p in getattr(pl_module, "pruning_plans", [])]
            tokenizer = getattr(pl_module, "tokenizer", None)
            save_pretrained(unwrap(pl_module), folder / "lora-merged", tokenizer=tokenizer, plans=plans)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._drop_teacher(pl_module)

    def _drop_teacher(self, pl_module: pl.LightningModule) -> None:
        """The teacher is not used outside this fit: free it."""
        if getattr(pl_module, "distillation", None) is self._distillation and self._distillation is not None:
            setattr(pl_module, "distillation", None)
        self._distillation = None

    # --- attaching -----------------------------------------------------------------------------------------------
    def due(self, trainer: pl.Trainer) -> bool:
        """Whether every pruning callback listed before this one has pruned or finished (True when there is none)."""
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if callback is self:
                return True
            if isinstance(callback, PruningCallback) and not (callback.plans or callback.done):
                return False
        return True

    def _maybe_attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if is_lora(getattr(pl_module, "model")) or not self.due(trainer):
            return
        layers = self.choose_layers(trainer, pl_module)
        spec = self.spec(layers)
        model = unwrap(pl_module)
        all_blocks = lora_param_count(model, self.spec(None))
        try:
            attach_to_module(pl_module, spec)
        except ValueError as err:
            raise MisconfigurationException(f"{type(self).__name__}: {err}") from None
        rebuild_after_surgery(trainer)
        trainable = trainable_params(pl_module)
        num_blocks = adapter_for(model).num_blocks(model)
        chosen = list(range(num_blocks)) if layers is None else list(layers)
        self.attachments.append(
            {"layers": chosen, "trainable": trainable, "all_blocks": all_blocks, "global_step": trainer.global_step}
        )
        if self.verbose:
            rank_zero_info(
                f"{type(self).__name__}: attached r={self.r} adapters to {len(chosen)}/{num_blocks} blocks {chosen}: "
                f"{trainable:,} trainable parameters ({100 * trainable / max(all_blocks, 1):.0f}% of the "
                f"{all_blocks:,} LoRA on all blocks would train)"
            )
        if trainer.logger is not None and trainer.is_global_zero:
            metrics = {
                f"{self.name}/trainable_params": float(trainable),
                f"{self.name}/all_blocks_params": float(all_blocks),
                f"{self.name}/num_blocks": float(len(chosen)),
            }
            metrics.update({f"{self.name}/selected/block_{i:02d}": 1.0 for i in chosen})
            metrics.update(self.extra_metrics())
            trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def extra_metrics(self) -> dict[str, float]:
        """More numbers logged when adapters are attached (``CKALoRA``: the block importances)."""
        return {}

    # --- checkpoint state ----------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"attachments": list(self.attachments), "layers_now": self._layers_now, "plans_seen": self._plans_seen}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.attachments = list(state_dict.get("attachments", []))
        self._layers_now = state_dict.get("layers_now")
        self._plans_seen = state_dict.get("plans_seen")


class CKALoRA(LoRA):
    """Layer-wise LoRA with CKA: adapters only on the ``floor(ratio · L)`` blocks that change the representation most.

    Importance ``I_i = 1 − linear CKA(R_{i−1}, R_i)`` over ``n_samples`` rows, R_i being the hidden state at the last
    non-pad token after block i (the block's own output, also for the last block). The selection is computed on the
    model as it is when the adapters are attached, i.e. after the pruning callbacks listed before this one, and
    rank 0's selection is broadcast so every DDP rank attaches the same adapters.

    Args:
        ratio: fraction of the blocks that get adapters (floor(ratio · L) blocks, at least one).
        n_samples: rows used for CKA.
        calibration: a DataLoader to take them from; None = the training data.
        **kwargs: ``r``, ``alpha``, ``dropout``, ``target_modules``, ``distill``, ``distill_alpha``,
            ``temperature``, ``teacher``, ``teacher_device``, ``merge_at_end``, ``save_model``, ``save_adapter``,
            ``verbose``: as in :class:`LoRA` (the blocks are chosen by CKA, so there is no ``layers``).

    Raises:
        MisconfigurationException: for ``ratio`` outside (0, 1], ``n_samples`` < 1, the :class:`LoRA` errors, or (in
            ``setup``) a ratio that selects no block of the model.

    Example::

        trainer = pl.Trainer(callbacks=[MixtureOfPruners(target=0.25), CKALoRA(ratio=0.5, r=32, alpha=10)])
    """

    name = "cka_lora"

    def __init__(
        self,
        ratio: float = 0.5,
        n_samples: int = 128,
        calibration: DataLoader | None = None,
        **kwargs: Any,
    ) -> None:
        if "layers" in kwargs:
            raise TypeError("CKALoRA got an unexpected keyword argument 'layers': CKA chooses the blocks (see `ratio`)")
        super().__init__(layers=None, **kwargs)
        if not 0.0 < ratio <= 1.0:
            raise MisconfigurationException(f"`ratio` must be in (0, 1], got {ratio!r}")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise MisconfigurationException(f"`n_samples` must be an int >= 1, got {n_samples!r}")
        self.ratio = ratio
        self.n_samples = n_samples
        self.calibration = calibration
        self.last_importance: torch.Tensor | None = None
        """``I_i`` of every block at the last attach."""

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(r=self.r, ratio=self.ratio)

    @override
    def check_model(self, pl_module: pl.LightningModule) -> None:
        super().check_model(pl_module)
        model = unwrap(pl_module)
        num_blocks = adapter_for(model).num_blocks(model)
        try:
            select_blocks(torch.zeros(num_blocks), self.ratio)
        except ValueError as err:
            raise MisconfigurationException(f"CKALoRA: {err}") from None

    @override
    def choose_layers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[int] | None:
        """Score every block by ``1 − CKA`` on ``n_samples`` rows and keep the top ``floor(ratio · L)``."""
        loader = sequential(self.calibration if self.calibration is not None else training_loader(trainer))
        model = unwrap(pl_module)
        importance = cka_importance(model, loader, self.n_samples, progress=self.verbose > 0)
        num_blocks = int(importance.numel())
        if self.ratio * num_blocks < 1:  # setup checked the unpruned depth; pruning in this fit made it smaller
            rank_zero_warn(
                f"CKALoRA: ratio {self.ratio} of {num_blocks} blocks selects none after pruning; using the top block"
            )
        selected = select_blocks(importance, max(self.ratio, 1 / num_blocks))
        selected = list(trainer.strategy.broadcast(selected, src=0))
        self.last_importance = importance
        if self.verbose > 1:  # the score vector; at 1 the attach line names the chosen blocks
            ranked = ", ".join(f"{i}:{float(v):.3f}" for i, v in enumerate(importance.tolist()))
            rank_zero_info(f"CKALoRA: block importance 1 - CKA = [{ranked}]; selected {selected}")
        return selected

    @override
    def extra_metrics(self) -> dict[str, float]:
        if self.last_importance is None:
            return {}
        return {f"{self.name}/importance/block_{i:02d}": float(v) for i, v in enumerate(self.last_importance.tolist())}


def sequential(loader: Any) -> Any:
    """A private, unshuffled DataLoader over ``loader``'s dataset: the first rows, the same on every rank.

    Iterating the training loader itself would advance its shuffle generator (changing the order of later epochs)
    and, with persistent workers, reset the iterator the fit loop is using.
    """
    if not isinstance(loader, DataLoader):
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size or 1, shuffle=False, collate_fn=loader.collate_fn)


def training_loader(trainer: pl.Trainer) -> Any:
    """The fit's training DataLoader, also before the fit loop has built it (in ``on_fit_start``).

    Raises:
        MisconfigurationException: if the fit has no training data.
    """
    if trainer.train_dataloader is not None:
        return trainer.train_dataloader
    source = getattr(trainer.fit_loop, "_data_source", None)
    if source is not None and source.is_defined():
        return source.dataloader()
    raise MisconfigurationException(
        "CKALoRA needs samples: pass `calibration=` (a DataLoader) or fit with training data"
    )
