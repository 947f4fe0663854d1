"""Least-squares reconstruction: refit the Linears that read what width pruning removed (METHODS.md §7).

When query heads of a block go, its ``o_proj`` loses their input columns; when MLP neurons go, ``down_proj`` loses
theirs. Cutting alone drops their contribution. The refit keeps the surviving columns ``K`` but re-solves them so
that, over the calibration tokens, the Linear's output stays as close as possible to the dense one:

    W' = argmin Σ‖W x − W' x_K‖² + λ‖W'‖² = W · C[:, K] · (C[K, K] + λI)⁻¹,    C = Σ x xᵀ (the input Gram)

with ``λ = ridge · mean(diag C[K, K])`` (a relative ridge, so it does not depend on the scale of the activations or
on the number of tokens). The Gram is the per-Linear ``hessian`` statistic of :mod:`lit_prune.stats.linear`, float64,
from the same calibration pass as the scores; the solve is a float64 Cholesky (a least-squares solve when
``C[K, K] + λI`` is singular, e.g. a dead input with ``ridge=0``). Biases are left as they are (the fit is of the
weights given the bias). Pure functions: :func:`refit_columns` (what a plan cuts), :func:`lsq_refit` (the solve),
:func:`compute_refits` (every refit of a plan, before the cut); :func:`~lit_prune.surgery.apply_plan` assigns them.
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lit_prune._config import MethodConfig
from lit_prune._validation import check_choice, check_number
from lit_prune.arch import Projection, adapter_for, unwrap
from lit_prune.plan import PruningPlan
from lit_prune.sparse.record import calibration_digest, reiterable
from lit_prune.stats._common import Batches
from lit_prune.stats.collect import StatisticsRequest, collect_statistics
from lit_prune.stats.linear import LinearStats

log = logging.getLogger(__name__)

Reconstruct = Literal["none", "lsq"]
"""``none``: cut only; ``lsq``: least-squares refit of ``o_proj`` / ``down_proj`` on the kept inputs."""
RECONSTRUCT_METHODS: tuple[str, ...] = typing.get_args(Reconstruct)
ReconstructProtocol = Literal["one_shot"]
"""``one_shot``: the Grams of the dense model, from the scoring pass."""
RECONSTRUCT_PROTOCOLS: tuple[str, ...] = typing.get_args(ReconstructProtocol)


@dataclass(frozen=True)
class ReconstructConfig(MethodConfig):
    """How the weights that survive a structured cut are refit (shared by the callbacks and the functional API).

    Example:
        >>> ReconstructConfig(reconstruct="lsq").ridge
        0.001
        >>> ReconstructConfig(reconstruct="ols")
        Traceback (most recent call last):
        ...
        ValueError: `reconstruct` must be one of ['none', 'lsq'], got 'ols'
    """

    reconstruct: Reconstruct = "none"
    """``none`` (cut only) or ``lsq`` (refit ``o_proj`` after heads and ``down_proj`` after neurons go)."""
    ridge: float = 1e-3
    """λ relative to the mean diagonal of the kept inputs' Gram, >= 0 (0: plain least squares)."""
    protocol: ReconstructProtocol = "one_shot"
    """Where the Grams come from: ``one_shot``, the dense model's calibration pass (the scoring pass)."""

    def __post_init__(self) -> None:
        """Check every field.

        Raises:
            ValueError: naming the field, its value and what is allowed.
        """
        check_choice("reconstruct", self.reconstruct, RECONSTRUCT_METHODS)
        check_number("ridge", self.ridge, 0.0)
        check_choice("protocol", self.protocol, RECONSTRUCT_PROTOCOLS)

    @property
    def enabled(self) -> bool:
        """Whether anything is refit."""
        return self.reconstruct != "none"


def _names(hf_model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in hf_model.named_modules()}


def reader_linears(model: nn.Module) -> list[str]:
    """The names of the Linears a width cut refits, every block: ``o_proj`` (reads the heads) and ``down_proj``.

    What the scoring pass collects Grams of when reconstruction is on (before the plan says which blocks change).
    """
    hf_model = unwrap(model)
    adapter = adapter_for(hf_model)
    names = _names(hf_model)
    out = []
    for attn, mlp in zip(adapter.attentions(hf_model), adapter.mlps(hf_model), strict=True):
        out += [names[id(attn.o.module)], names[id(mlp.down.module)]]  # as block_linears names them
    return out


def _kept_columns(proj: Projection, kept_units: Sequence[int]) -> Tensor:
    """The input columns of ``proj``'s Linear that survive when only ``kept_units`` of its units do (sorted)."""
    removed = sorted(set(range(proj.count)) - set(kept_units))
    drop = set(proj.indices(removed).tolist())
    return torch.tensor([c for c in range(int(proj.linear.in_features)) if c not in drop], dtype=torch.long)


def refit_columns(model: nn.Module, plan: PruningPlan) -> dict[str, Tensor]:
    """``{Linear name: kept input columns}`` of every Linear the plan's width changes cut (o_proj, down_proj).

    Read on the model *before* the plan is applied (names and indices in its current numbering).
    """
    hf_model = unwrap(model)
    adapter = adapter_for(hf_model)
    names = _names(hf_model)
    attentions, mlps = adapter.attentions(hf_model), adapter.mlps(hf_model)
    out: dict[str, Tensor] = {}
    for block, keep in sorted((plan.keep_heads or {}).items()):
        if len(keep) < attentions[block].num_heads:
            proj = attentions[block].o
            out[names[id(proj.module)]] = _kept_columns(proj, keep)
    for block, keep in sorted((plan.keep_neurons or {}).items()):
        if len(keep) < mlps[block].intermediate_size:
            proj = mlps[block].down
            out[names[id(proj.module)]] = _kept_columns(proj, keep)
    return out


def ridge_lambda(gram: Tensor, columns: Tensor, ridge: float) -> float:
    """``λ = ridge · mean(diag C[K, K])``: the absolute ridge of one refit."""
    diagonal = gram.diagonal().index_select(0, columns.to(gram.device))
    return float(ridge) * float(diagonal.double().mean()) if diagonal.numel() else 0.0


def lsq_refit(weight: Tensor, gram: Tensor, columns: Tensor, lam: float) -> Tensor:
    """``W · C[:, K] · (C[K, K] + λI)⁻¹`` in float64: the kept columns re-solved, ``(out, |K|)`` float64.

    Args:
        weight: ``(out, in)``, the dense Linear's weight.
        gram: ``(in, in)``, ``Σ x xᵀ`` of its inputs (any positive scale).
        columns: the kept input columns ``K``.
        lam: the absolute ridge λ >= 0 (see :func:`ridge_lambda`).

    Raises:
        ValueError: if the shapes disagree or ``columns`` is empty.
    """
    out_features, in_features = weight.shape
    if gram.shape != (in_features, in_features):
        raise ValueError(f"`gram` must be ({in_features}, {in_features}) for a weight {tuple(weight.shape)}, "
                         f"got {tuple(gram.shape)}")
    if columns.numel() == 0:
        raise ValueError("`columns` is empty: at least one input column must survive")
    c = gram.to(torch.float64)
    cols = columns.to(c.device)
    c_k = c.index_select(1, cols)  # (in, k)
    a = c_k.index_select(0, cols)  # (k, k)
    a = a + lam * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    rhs = c_k.T @ weight.detach().to(device=c.device, dtype=torch.float64).T  # (k, out) = C[K, :] Wᵀ
    factor, info = torch.linalg.cholesky_ex(a)
    singular = int(info) != 0  # a dead input without ridge: the minimum-norm least-squares solution
    solution = torch.linalg.pinv(a, hermitian=True) @ rhs if singular else torch.cholesky_solve(rhs, factor)
    return solution.T.contiguous()  # (out, k)


def compute_refits(
    model: nn.Module, plan: PruningPlan, grams: Mapping[str, LinearStats | Tensor], ridge: float
) -> dict[str, tuple[Tensor, float]]:
    """``{Linear name: (refit weight (out, |K|) float64, λ)}`` for every Linear the plan's width changes cut.

    Computed on the model before the plan is applied (the dense weights are read).

    Raises:
        ValueError: if a Gram the plan needs is missing (naming it).
    """
    hf_model = unwrap(model)
    modules = dict(hf_model.named_modules())
    out: dict[str, tuple[Tensor, float]] = {}
    for name, columns in refit_columns(hf_model, plan).items():
        gram = _gram(grams, name)
        lam = ridge_lambda(gram, columns, ridge)
        weight: Tensor = modules[name].weight  # type: ignore[assignment]
        out[name] = (lsq_refit(weight, gram, columns, lam), lam)
    return out


def assign_refits(model: nn.Module, refits: Mapping[str, tuple[Tensor, float]]) -> None:
    """Write the refit weights into the (already cut) Linears, in their dtype; a sparsity mask is kept."""
    modules = dict(unwrap(model).named_modules())
    for name, (weight, _) in refits.items():
        linear = modules[name]
        target: Tensor = linear.weight  # type: ignore[assignment]
        if tuple(target.shape) != tuple(weight.shape):
            raise RuntimeError(f"`{name}` is {tuple(target.shape)} after the cut, its refit {tuple(weight.shape)}")
        with torch.no_grad():
            target.copy_(weight.to(target.dtype))
            mask = linear._buffers.get("weight_mask")
            if mask is not None and mask.dtype == torch.bool:
                target.mul_(mask.to(target.dtype))


def _gram(grams: Mapping[str, LinearStats | Tensor], name: str) -> Tensor:
    entry = grams.get(name)
    gram = entry.hessian_sum if isinstance(entry, LinearStats) else entry
    if gram is None:
        raise ValueError(
            f"Reconstruction needs the input Gram of `{name}` (the `hessian` statistic), which was not collected; "
            f"collected: {sorted(grams)[:4]}{' ...' if len(grams) > 4 else ''}"
        )
    return gram


def plan_lambdas(
    model: nn.Module, plan: PruningPlan, grams: Mapping[str, LinearStats | Tensor], ridge: float
) -> dict[str, float]:
    """``{Linear name: absolute ridge λ}`` of every refit the plan's width changes need (no solve)."""
    return {name: ridge_lambda(_gram(grams, name), cols, ridge) for name, cols in refit_columns(model, plan).items()}


def reconstruction_record(
    config: ReconstructConfig,
    lambdas: Mapping[str, float],
    calibration: Mapping[str, Any] | None,
    max_batches: int | None,
) -> dict[str, Any]:
    """What a plan records of its reconstruction (:data:`lit_prune.plan.RECONSTRUCTION_KEYS`)."""
    return {
        "method": config.reconstruct,
        "ridge": float(config.ridge),
        "protocol": config.protocol,
        "max_batches": max_batches,
        "calibration": None if calibration is None else dict(calibration),
        "lambdas": dict(lambdas),
    }


def config_of(record: Mapping[str, Any]) -> ReconstructConfig:
    """The :class:`ReconstructConfig` a plan's ``reconstruction`` record was made with.

    Raises:
        ValueError: if the record names a method or protocol this lit-prune does not know.
    """
    return ReconstructConfig(reconstruct=record["method"], ridge=record["ridge"], protocol=record["protocol"])


def collect_grams(
    model: nn.Module,
    batches: Batches,
    names: Sequence[str],
    *,
    max_batches: int | None = None,
    progress: bool = False,
) -> dict[str, LinearStats]:
    """The input Grams (``hessian`` statistic) of the Linears ``names``, in one pass of the pass driver."""
    request = StatisticsRequest(linear={"hessian"}, linears=names)
    stats = collect_statistics(model, batches, request, max_batches=max_batches, progress=progress)
    assert stats.linear is not None  # noqa: S101  # asked for
    return stats.linear


def plan_refits(
    model: nn.Module,
    plan: PruningPlan,
    calibration: Batches | None,
    statistics: Mapping[str, LinearStats | Tensor] | None,
    *,
    progress: bool = False,
) -> dict[str, tuple[Tensor, float]]:
    """The refits a plan with a ``reconstruction`` record asks for, computed on the model before it is cut.

    The Grams are ``statistics`` when given (the scoring pass's), else collected on ``calibration``, which must be
    the calibration the plan was made on when it records one (its token digest is compared first).

    Raises:
        ValueError: if there are neither statistics nor calibration, the calibration is not the recorded one, or
            the record is invalid. Nothing is modified.
    """
    record = plan.reconstruction
    if record is None:
        return {}
    config = config_of(record)
    if not config.enabled:
        return {}
    if statistics is None:
        if calibration is None:
            raise ValueError(
                f"The plan refits the surviving weights ({record['method']}, ridge {record['ridge']}): pass "
                "`calibration=` (the batches it was made on) to refit them the same way, or `reconstruct=False` to "
                "change the shapes only (e.g. when the weights come from a checkpoint). Nothing was modified"
            )
        calibration = reiterable(calibration)
        assert calibration is not None  # noqa: S101  # not None going in
        recorded = record.get("calibration")
        if recorded is not None:
            seen = calibration_digest(calibration, record.get("max_batches"))
            if seen != recorded:
                raise ValueError(
                    f"The plan's reconstruction was made on other calibration data ({recorded['tokens']} tokens, "
                    f"sha256 {recorded['sha256'][:12]}...) than given ({seen['tokens']} tokens, sha256 "
                    f"{seen['sha256'][:12]}...); nothing was modified. Pass the calibration it was made on"
                )
        statistics = collect_grams(
            model, calibration, list(refit_columns(model, plan)), max_batches=record.get("max_batches"),
            progress=progress,
        )  # fmt: skip
    refits = compute_refits(model, plan, statistics, config.ridge)
    recorded_lambdas = record.get("lambdas") or {}
    for name, (_, lam) in refits.items():
        expected = recorded_lambdas.get(name)
        if expected is not None and abs(lam - expected) > 1e-6 * max(abs(expected), 1e-30):
            log.warning("Reconstruction of `%s`: ridge λ %.6g differs from the plan's %.6g (other numerics?)",
                        name, lam, expected)  # fmt: skip
    return refits
