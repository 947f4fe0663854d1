"""Recovery after pruning: LoRA through PEFT, CKA layer selection, and distillation from the unpruned model.

The callbacks that use these stages are :class:`~lit_prune.callbacks.LoRA` and :class:`~lit_prune.callbacks.CKALoRA`.
"""

from lit_prune.recovery.cka import cka_importance, linear_cka, select_blocks, take_samples
from lit_prune.recovery.distill import Distillation, freeze, frozen_copy
from lit_prune.recovery.lora import (
    LLAMA_TARGETS,
    LoRASpec,
    attach_lora,
    attach_to_module,
    is_lora,
    lora_param_count,
    lora_record,
    merge_adapters,
    merge_lora,
    merged_copy,
    restore_lora,
    save_adapter,
    trainable_params,
)

__all__ = [
    "LLAMA_TARGETS",
    "Distillation",
    "LoRASpec",
    "attach_lora",
    "attach_to_module",
    "cka_importance",
    "freeze",
    "frozen_copy",
    "is_lora",
    "linear_cka",
    "lora_param_count",
    "lora_record",
    "merge_adapters",
    "merge_lora",
    "merged_copy",
    "restore_lora",
    "save_adapter",
    "select_blocks",
    "take_samples",
    "trainable_params",
]
