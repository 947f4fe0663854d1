"""Lightning callbacks that prune (and later recover) the model a Trainer fits."""

from lit_prune.callbacks.base import PruningCallback, rebuild_after_surgery
from lit_prune.callbacks.depth import DepthPruning

__all__ = ["DepthPruning", "PruningCallback", "rebuild_after_surgery"]
