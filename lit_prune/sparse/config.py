"""``SparsityConfig``: every option of unstructured / N:M pruning, its default and its check, written once.

Both :func:`lit_prune.sparse.prune_sparse` (which takes a config, or its fields as keywords) and the
:class:`~lit_prune.callbacks.SparsityPruning` callback (whose flat keyword arguments, the YAML names, default to these
fields) build one, so a default or a rule lives here only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from lit_prune._config import MethodConfig
from lit_prune._validation import check_int, check_number
from lit_prune.allocation.sparsity import DSA_PAPER_FUNCTION, SPARSITY_ALLOCATIONS, AllocationFunction
from lit_prune.criteria import registry
from lit_prune.criteria.sparse import check_nm

PROTOCOLS = ("sequential", "one_shot")
Protocol = Literal["sequential", "one_shot"]
SparseCriterion = Literal["magnitude", "wanda", "sparsegpt"]
"""The registered sparse criteria (``registry.names("sparse")``; a test keeps the two equal)."""
Allocation = Literal["uniform", "owl", "linear_map", "dsa"]


def check_sparse_options(
    criterion: object,
    sparsity: object,
    n_m: object,
    allocation: object,
    protocol: object,
    layer_scores: object = None,
    trim_rows: object = False,
) -> tuple[int, int] | None:
    """Validate the choices of :class:`SparsityConfig` (criterion, target, pattern, allocation); return ``n_m`` parsed.

    Raises:
        ValueError: naming the bad option, its value and what is allowed.
    """
    registry.criterion("sparse", criterion)
    if allocation not in SPARSITY_ALLOCATIONS:
        raise ValueError(f"`allocation` must be one of {list(SPARSITY_ALLOCATIONS)}, got {allocation!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"`protocol` must be one of {list(PROTOCOLS)}, got {protocol!r}")
    nm = check_nm(n_m)  # type: ignore[arg-type]
    if nm is not None:
        if allocation != "uniform":
            raise ValueError(f"N:M sparsity ({nm[0]}:{nm[1]}) has a fixed ratio per layer: use allocation='uniform'")
        if trim_rows:
            raise ValueError(f"N:M sparsity ({nm[0]}:{nm[1]}) has a fixed count per row: TRIM does not apply")
        return nm
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float) or not 0 < sparsity < 1:
        raise ValueError(f"`sparsity` must be a fraction in (0, 1), got {sparsity!r}")
    if allocation == "linear_map" and layer_scores is None:
        raise ValueError("allocation='linear_map' needs `layer_scores`: one score per block (higher = sparser)")
    return None


@dataclass(frozen=True)
class SparsityConfig(MethodConfig):
    """What to prune and how: criterion, target, N:M pattern, allocation, protocol and the methods' constants.

    Every field is checked on construction (:meth:`__post_init__`); ``n_m`` is stored parsed, as ``(N, M)``.

    Example:
        >>> SparsityConfig(criterion="sparsegpt", n_m="2:4").n_m, SparsityConfig(sparsity=0.6).target
        ((2, 4), 0.6)
        >>> SparsityConfig(owl_m=0)
        Traceback (most recent call last):
        ...
        ValueError: `owl_m` must be a finite number in (0.0, inf), got 0
    """

    criterion: SparseCriterion = "wanda"
    """``magnitude`` (|W|, per layer), ``wanda`` (|W|·‖X_j‖, per output row) or ``sparsegpt`` (OBS mask selection
    and weight update from the Hessian of the inputs)."""
    sparsity: float = 0.5
    """Mean sparsity over all prunable weights, met exactly in integer counts; ignored with ``n_m`` (then N/M)."""
    n_m: tuple[int, int] | str | None = None
    """``"2:4"`` / ``(2, 4)``: N zeros in every M consecutive inputs of each row; None for unstructured."""
    allocation: Allocation = "uniform"
    """``uniform``; ``owl`` (dense Wanda outlier ratio > ``owl_m``·mean → less sparsity, band ±``lam``);
    ``linear_map`` of ``layer_scores`` into [S(1−eps), S(1+eps)] (higher = sparser); ``dsa`` (``dsa_function`` of
    the dense Wanda scores, band ±``lam``)."""
    protocol: Protocol = "sequential"
    """``sequential`` (block by block, inputs from the pruned blocks before) or ``one_shot`` (all statistics from
    one pass of the dense model)."""
    trim_rows: bool = False
    """TRIM: refine each Linear's count into per-row counts by output cosine on last-token inputs."""
    owl_m: float = 5.0
    """OWL's outlier threshold ``M``."""
    lam: float = 0.08
    """OWL / DSA band half-width λ."""
    eps: float = 0.2
    """``linear_map``'s relative band ε."""
    layer_scores: tuple[float, ...] | None = None
    """Per-block scores for ``linear_map`` (higher = sparser)."""
    dsa_function: AllocationFunction | str = DSA_PAPER_FUNCTION
    """DSA's allocation function: operators chained as a string (``"log|log|abs|geomean|cos|exp"``) or an
    :class:`~lit_prune.allocation.sparsity.AllocationFunction`."""
    blocksize: int = 128
    """SparseGPT's column block (a multiple of M with ``n_m``)."""
    percdamp: float = 0.01
    """SparseGPT's damping, as a fraction of the mean Hessian diagonal."""

    def __post_init__(self) -> None:
        """Check every field; store ``n_m`` as ``(N, M)`` and ``layer_scores`` as a tuple.

        Raises:
            ValueError: naming the field, its value and what is allowed.
            TypeError: if ``dsa_function`` is neither a str nor an ``AllocationFunction``.
        """
        nm = check_sparse_options(
            self.criterion, self.sparsity, self.n_m, self.allocation, self.protocol, self.layer_scores, self.trim_rows
        )
        object.__setattr__(self, "n_m", nm)
        if self.layer_scores is not None:
            if isinstance(self.layer_scores, str) or not isinstance(self.layer_scores, Sequence):
                raise ValueError(f"`layer_scores` must be None or a list of numbers, got {self.layer_scores!r}")
            object.__setattr__(self, "layer_scores", tuple(self.layer_scores))
        check_number("owl_m", self.owl_m, 0.0, open_low=True)
        check_number("lam", self.lam, 0.0, 1.0)
        check_number("eps", self.eps, 0.0, 1.0)
        check_number("percdamp", self.percdamp, 0.0)
        check_int("blocksize", self.blocksize)
        if nm is not None and self.criterion == "sparsegpt" and self.blocksize % nm[1]:
            raise ValueError(f"`blocksize` must be a multiple of M={nm[1]} with `n_m`, got {self.blocksize}")
        if isinstance(self.dsa_function, str):
            AllocationFunction.parse(self.dsa_function)  # raises naming the bad operator
        elif not isinstance(self.dsa_function, AllocationFunction):
            raise TypeError(
                f"`dsa_function` must be a str or an AllocationFunction, got {type(self.dsa_function).__name__}"
            )

    @property
    def pattern(self) -> tuple[int, int] | None:
        """``n_m`` as parsed: ``(N, M)`` or None."""
        return self.n_m if isinstance(self.n_m, tuple) else None

    @property
    def target(self) -> float:
        """The mean sparsity aimed at: N/M with a pattern, else ``sparsity``."""
        nm = self.pattern
        return nm[0] / nm[1] if nm is not None else float(self.sparsity)
