"""lit-prune: prune Hugging Face causal LMs and recover them with LoRA, as PyTorch Lightning callbacks."""

from lit_prune.arch import ModelAdapter, UnsupportedModelError, adapter_for
from lit_prune.io import load_pretrained, save_pretrained
from lit_prune.module import CausalLMModule
from lit_prune.plan import read_plans
from lit_prune.presets import CPU_PROTOCOL, SMOLLM2

__all__ = [
    "CPU_PROTOCOL",
    "SMOLLM2",
    "CausalLMModule",
    "ModelAdapter",
    "UnsupportedModelError",
    "adapter_for",
    "load_pretrained",
    "read_plans",
    "save_pretrained",
]
__version__ = "0.1.0"
