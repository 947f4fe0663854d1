"""Lightning callbacks that prune (and later recover) the model a Trainer fits."""

from lit_prune.callbacks.base import PruningCallback, rebuild_after_surgery
from lit_prune.callbacks.depth import DepthPruning
from lit_prune.callbacks.lora import CKALoRA, LoRA
from lit_prune.callbacks.mop import MixtureOfPruners
from lit_prune.callbacks.report import PruningReport
from lit_prune.callbacks.sparsity import SparsityPruning
from lit_prune.callbacks.width import WidthPruning
from lit_prune.callbacks.zeroshot import ZeroShotEval

__all__ = [
    "CKALoRA",
    "DepthPruning",
    "LoRA",
    "MixtureOfPruners",
    "PruningCallback",
    "PruningReport",
    "SparsityPruning",
    "WidthPruning",
    "ZeroShotEval",
    "rebuild_after_surgery",
]
