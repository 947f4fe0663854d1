"""Unstructured (and N:M) sparsity: masks on a live model, calibration statistics, sizes and 2:4 conversion.

The pieces a sparsity criterion and a pruning callback need: :func:`prunable_linears` names what can be pruned;
:func:`one_shot_stats` and :func:`sequential_prune` collect what criteria score with (per-Linear
:class:`LinearInputStatistics` metrics, filled by :func:`attach_linear_statistics`); :func:`attach_masks` and
:func:`apply_masks` keep the zeros through training and checkpoints; :func:`replay_sparsity` re-computes the masks a
sparsity plan records; :func:`sparsity_report` and :func:`compressed_size` say what was achieved.
"""

from lit_prune.sparse.calibrate import one_shot_stats, sequential_prune
from lit_prune.sparse.config import SparsityConfig
from lit_prune.sparse.lora import merge_lora_masked
from lit_prune.sparse.masks import (
    MASK_BUFFER,
    apply_masks,
    attach_masks,
    block_linears,
    detach_masks,
    fold_masks,
    masks_of,
    prunable_linears,
    reapply_masks_after_merge,
    restore_masks_on_load,
)
from lit_prune.sparse.prune import PROTOCOLS, SparsityResult, check_sparse_options, prune_sparse, replay_sparsity
from lit_prune.sparse.report import SparsityReport, sparsity_report
from lit_prune.sparse.storage import compressed_size, is_n_m_sparse, tensor_sizes, to_semi_structured
from lit_prune.stats.linear import (
    NEEDS,
    LinearInputCollector,
    LinearInputStatistics,
    LinearStats,
    attach_linear_statistics,
)

__all__ = [
    "MASK_BUFFER",
    "NEEDS",
    "PROTOCOLS",
    "LinearInputCollector",
    "LinearInputStatistics",
    "LinearStats",
    "SparsityConfig",
    "SparsityReport",
    "SparsityResult",
    "apply_masks",
    "attach_linear_statistics",
    "attach_masks",
    "block_linears",
    "check_sparse_options",
    "compressed_size",
    "detach_masks",
    "fold_masks",
    "is_n_m_sparse",
    "masks_of",
    "merge_lora_masked",
    "one_shot_stats",
    "prunable_linears",
    "prune_sparse",
    "reapply_masks_after_merge",
    "replay_sparsity",
    "restore_masks_on_load",
    "sequential_prune",
    "sparsity_report",
    "tensor_sizes",
    "to_semi_structured",
]
