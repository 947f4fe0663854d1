"""LoRA through PEFT on a Hugging Face causal LM: attach, count, merge, and the spec that reproduces it.

The spec (:class:`LoRASpec`) is plain data so it goes into checkpoints: a resumed run re-attaches the same
adapters before the weights are loaded. Merging folds every adapter into its base weight and restores which base
parameters were trainable before the adapters froze them, so training (or surgery) continues on a plain model.
Detecting and merging adapters (:func:`is_lora`, :func:`merge_lora`) live in :mod:`lit_prune.sparse.lora`, next to
the masks a merge re-applies, and are re-exported here.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from lit_prune.arch import adapter_for, unwrap
from lit_prune.io import save_pretrained
from lit_prune.sparse.lora import RECORD_ATTR, is_lora, mask_lora_deltas, merge_lora

log = logging.getLogger(__name__)

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The 7 projections of a LLaMA-family block. The default targets are the family's own
(:meth:`~lit_prune.arch.ModelAdapter.lora_targets`): these for LLaMA, ``qkv_proj``/``gate_up_proj``/... for Phi-3."""


@dataclass(frozen=True)
class LoRASpec:
    """What to attach: LoRA rank, scale, dropout, target projections and blocks (None = every block).

    Checked on construction (:meth:`__post_init__`); the :class:`~lit_prune.callbacks.LoRA` callbacks default to
    these fields.

    Args:
        r: adapter rank.
        alpha: LoRA alpha; the update is scaled by ``alpha / r``.
        dropout: dropout on the adapter input during training.
        target_modules: names of the Linear modules (last name component) that get adapters; None = every
            prunable projection of the model's family (:meth:`~lit_prune.arch.ModelAdapter.lora_targets`),
            resolved by :meth:`for_model`.
        layers: block indices that get adapters (PEFT ``layers_to_transform``); None = all blocks.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        """Check the hyperparameters (:func:`check_lora_args`) and ``layers``; store both lists as tuples.

        Raises:
            ValueError: naming the bad field and its value.
        """
        check_lora_args(self.r, self.alpha, self.dropout, self.target_modules)
        layers = self.layers
        if layers is not None and (
            isinstance(layers, str)
            or not layers
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers)
        ):
            got = list(layers) if isinstance(layers, tuple | list) else layers
            raise ValueError(f"`layers` must be None or a non-empty list of block indices, got {got!r}")
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if layers is not None:
            object.__setattr__(self, "layers", tuple(layers))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (lists instead of tuples)."""
        data = asdict(self)
        data["target_modules"] = None if self.target_modules is None else list(self.target_modules)
        data["layers"] = None if self.layers is None else list(self.layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoRASpec:
        """Inverse of :meth:`to_dict`."""
        layers = data.get("layers")
        return cls(
            r=int(data["r"]),
            alpha=float(data["alpha"]),
            dropout=float(data["dropout"]),
            target_modules=None if data.get("target_modules") is None else tuple(data["target_modules"]),
            layers=None if layers is None else tuple(int(i) for i in layers),
        )

    def for_model(self, model: nn.Module) -> LoRASpec:
        """This spec with ``target_modules=None`` replaced by the family's default targets of ``model``."""
        if self.target_modules is not None:
            return self
        targets = adapter_for(unwrap(model)).lora_targets()
        return LoRASpec(self.r, self.alpha, self.dropout, targets, self.layers)

    def targets(self) -> tuple[str, ...]:
        """The resolved target names (call :meth:`for_model` first when they may be None)."""
        if self.target_modules is None:
            raise ValueError("LoRASpec.target_modules is None: resolve it with spec.for_model(model) first")
        return self.target_modules

    def peft_config(self) -> Any:
        """The PEFT ``LoraConfig`` for this spec."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,  # type: ignore[arg-type]  # PEFT annotates int; a float scale works
            lora_dropout=self.dropout,
            target_modules=list(self.targets()),
            layers_to_transform=None if self.layers is None else list(self.layers),
            bias="none",
            task_type="CAUSAL_LM",
        )


def check_lora_args(r: int, alpha: float, dropout: float, target_modules: Sequence[str] | None) -> None:
    """Raise ``ValueError`` naming the bad value when a LoRA hyperparameter is out of range."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"`r` must be an int >= 1, got {r!r}")
    if not alpha > 0:
        raise ValueError(f"`alpha` must be positive, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}")
    if target_modules is None:
        return
    if isinstance(target_modules, str) or not target_modules or not all(isinstance(t, str) for t in target_modules):
        raise ValueError(
            f"`target_modules` must be a non-empty list of module names, got {target_modules!r} "
            "(or None: every prunable projection of the model's family)"
        )


def target_linears(model: nn.Module, target_modules: Sequence[str]) -> dict[int, dict[str, nn.Linear]]:
    """``{block: {qualified name inside the block: Linear}}`` for every target projection of every block.

    A projection that already carries a PEFT adapter counts as its base ``Linear``.
    """
    hf_model = unwrap(model)
    wanted = set(target_modules)
    found: dict[int, dict[str, nn.Linear]] = {}
    for b, block in enumerate(adapter_for(hf_model).blocks(hf_model)):
        found[b] = {}
        for name, module in block.named_modules():
            base = _base_linear(module)
            if name.rsplit(".", 1)[-1] in wanted and isinstance(base, nn.Linear):
                found[b][name] = base
    return found


def _base_linear(module: nn.Module) -> nn.Module:
    """The Linear under a PEFT LoRA layer (its ``base_layer``), or ``module`` itself."""
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Module) else module


def check_spec(model: nn.Module, spec: LoRASpec) -> None:
    """Raise ``ValueError`` if ``spec`` cannot be attached to ``model`` (nothing is modified).

    Checks that every target name exists as a Linear in the blocks and that ``layers`` are valid block indices.
    """
    hf_model = unwrap(model)
    spec = spec.for_model(hf_model)
    per_block = target_linears(hf_model, spec.targets())
    present = {name.rsplit(".", 1)[-1] for linears in per_block.values() for name in linears}
    missing = sorted(set(spec.targets()) - present)
    if missing:
        available = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in adapter_for(hf_model).blocks(hf_model)[0].named_modules()
                if isinstance(_base_linear(m), nn.Linear) and not {"base_layer", "lora_A", "lora_B"} & set(n.split("."))
            }
        )
        raise ValueError(
            f"`target_modules` {missing} match no Linear in the model's blocks; the blocks have {available}"
        )
    if spec.layers is not None:
        num_blocks = len(per_block)
        bad = [i for i in spec.layers if not 0 <= i < num_blocks]
        if bad or not spec.layers:
            raise ValueError(
                f"`layers` must be a non-empty list of block indices in 0..{num_blocks - 1}, got {list(spec.layers)}"
            )


def lora_param_count(model: nn.Module, spec: LoRASpec) -> int:
    """Trainable parameters LoRA with ``spec`` adds: ``r · (in + out)`` for each target Linear of each chosen block."""
    per_block = target_linears(model, spec.for_model(model).targets())
    chosen = per_block if spec.layers is None else {b: per_block[b] for b in spec.layers}
    return sum(spec.r * (lin.in_features + lin.out_features) for linears in chosen.values() for lin in linears.values())


def trainable_params(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def attach_lora(model: PreTrainedModel, spec: LoRASpec) -> nn.Module:
    """Wrap ``model`` with PEFT LoRA adapters as in ``spec``; every other parameter is frozen.

    Returns the PEFT model (it shares its weights with ``model``). It remembers ``spec`` and which base parameters
    were trainable, so :func:`merge_lora` can restore them. On a sparse model (``weight_mask`` buffers, see
    :mod:`lit_prune.sparse`) each adapter's update ``B·A`` is trained through the mask
    (:func:`lit_prune.sparse.lora.mask_lora_deltas`), so merging keeps both the outputs and the sparsity.

    Raises:
        TypeError: if ``model`` already carries adapters.
        ValueError: if ``spec`` does not fit ``model`` (see :func:`check_spec`).
    """
    from peft import get_peft_model

    if is_lora(model):
        raise TypeError("The model already carries LoRA adapters; merge them (merge_lora) before attaching new ones")
    spec = spec.for_model(model)
    check_spec(model, spec)
    trainable_before = [name for name, p in model.named_parameters() if p.requires_grad]
    wrapped = get_peft_model(model, spec.peft_config())
    setattr(wrapped, RECORD_ATTR, {"spec": spec.to_dict(), "trainable_before": trainable_before})
    mask_lora_deltas(wrapped)  # on a sparse base (weight_mask buffers) the update trains through the mask
    return wrapped


def lora_record(model: nn.Module) -> dict[str, Any] | None:
    """``{"spec", "trainable_before"}`` of an adapter-wrapped model (None for a plain one)."""
    record = getattr(model, RECORD_ATTR, None) if is_lora(model) else None
    return dict(record) if record is not None else None


def restore_lora(model: PreTrainedModel, record: dict[str, Any]) -> nn.Module:
    """Re-attach adapters from a :func:`lora_record` (a resumed checkpoint), keeping its trainable-before list."""
    wrapped = attach_lora(model, LoRASpec.from_dict(record["spec"]))
    setattr(wrapped, RECORD_ATTR, dict(record))
    return wrapped


def attach_to_module(pl_module: nn.Module, spec: LoRASpec) -> nn.Module:
    """Attach LoRA to the model a LightningModule holds in ``.model`` (e.g. :class:`~lit_prune.CausalLMModule`).

    Raises:
        TypeError: if ``pl_module`` has no ``.model`` or it already carries adapters.
        ValueError: if ``spec`` does not fit the model.
    """
    model = _held_model(pl_module)
    wrapped = attach_lora(model, spec)  # type: ignore[arg-type]
    pl_module.model = wrapped
    return wrapped


def merge_adapters(pl_module: nn.Module) -> bool:
    """Merge the LoRA adapters of ``pl_module.model`` in place, if it has any; return whether it had.

    Pruning callbacks call this before any structural surgery: surgery on a merged model keeps its outputs,
    while surgery on adapter-wrapped projections would drop or misalign the adapters.
    """
    model = getattr(pl_module, "model", None)
    if model is None or not is_lora(model):
        return False
    pl_module.model = merge_lora(model)
    log.debug("Merged LoRA adapters into the base weights")
    return True


def merged_copy(model: nn.Module) -> nn.Module:
    """The plain model with the adapters of ``model`` merged, leaving ``model`` itself untouched (a deep copy).

    A model without adapters is returned as is (the Hugging Face model under a LightningModule, not a copy).
    """
    held = model if is_lora(model) else getattr(model, "model", None)
    if held is None or not is_lora(held):
        return unwrap(model)
    return merge_lora(copy.deepcopy(held))


def save_adapter(model: nn.Module, adapter_dir: str | Path, base_dir: str | Path, tokenizer: Any = None) -> None:
    """Save the adapter alone (PEFT format) to ``adapter_dir`` and the model it applies to to ``base_dir``.

    The base is the current (pruned, unmerged) model, saved with :func:`lit_prune.save_pretrained`; the adapter's
    ``base_model_name_or_path`` points at it, so ``PeftModel.from_pretrained(load_pretrained(base_dir),
    adapter_dir)`` rebuilds the adapter model. Needs one transient copy of the model.
    """
    if not is_lora(model):
        raise TypeError(f"save_adapter needs a model with LoRA adapters, got {type(model).__name__}")
    base = copy.deepcopy(model).unload()  # type: ignore[operator]  # adapters removed, not merged
    save_pretrained(base, base_dir, tokenizer=tokenizer)
    for config in model.peft_config.values():  # type: ignore[union-attr,operator]
        config.base_model_name_or_path = str(Path(base_dir).resolve())
    model.save_pretrained(adapter_dir)  # type: ignore[operator]


def _held_model(pl_module: nn.Module) -> nn.Module:
    model = getattr(pl_module, "model", None)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"LoRA needs a LightningModule that holds its Hugging Face model as `.model` (like CausalLMModule), "
            f"got {type(pl_module).__name__}"
        )
    return model
