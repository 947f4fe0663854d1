"""What unstructured sparsity buys in bytes and speed: encoded sizes, and 2:4 semi-structured conversion.

Zeros in a dense tensor save nothing. Sizes here are computed from the actual weights (their zeros and dtype):

- dense: ``numel · element_size``.
- bitmask: one bit per weight plus the nonzero values, ``⌈numel / 8⌉ + nnz · element_size``.
- CSR: values, a column index per value (int16 when ``in_features ≤ 32768``, else int32) and ``out + 1`` row pointers
  (int32 when ``nnz < 2³¹``, else int64).
- 2:4 semi-structured (only when every group of 4 consecutive inputs has at most 2 nonzeros): half the values plus
  2 index bits per kept value, ``numel / 2 · element_size + numel / 8`` (the cuSPARSELt/CUTLASS layout for 16-bit
  types: 56.25% of dense).

Bitmask and CSR shrink files but need a sparse kernel (or decompression) to run; only 2:4 runs faster on NVIDIA GPUs
(Ampere and later) through :func:`to_semi_structured`. ``torch.sparse.to_sparse_semi_structured`` (the name in
torch 2.13; there is no ``to_semi_structured``) supports CUDA tensors only: on CPU it raises
``RuntimeError: ... Only CUDA tensors are currently supported``, so there is no CPU speed-up from sparsity here.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn

from lit_prune.sparse.masks import fold_masks, prunable_linears

log = logging.getLogger(__name__)

_SIZE_KEYS = ("numel", "nnz", "dense_bytes", "bitmask_bytes", "csr_bytes", "semi_structured_bytes")


def is_n_m_sparse(weight: Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every ``m`` consecutive inputs of every output row hold at most ``n`` nonzeros (``(out, in)``).

    Example:
        >>> is_n_m_sparse(torch.tensor([[1.0, 0.0, 2.0, 0.0]])), is_n_m_sparse(torch.tensor([[1.0, 1.0, 2.0, 0.0]]))
        (True, False)
    """
    if weight.dim() != 2 or weight.shape[1] % m:
        return False
    groups = (weight != 0).reshape(weight.shape[0], weight.shape[1] // m, m)  # (out, in/m, m)
    return bool(groups.sum(-1).le(n).all())


def tensor_sizes(weight: Tensor) -> dict[str, int | None]:
    """Bytes of one ``(out, in)`` weight stored dense, as bitmask, as CSR and as 2:4 (None unless 2:4).

    Example:
        >>> w = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0]], dtype=torch.float16)
        >>> tensor_sizes(w)
        {'numel': 8, 'nnz': 3, 'dense_bytes': 16, 'bitmask_bytes': 7, 'csr_bytes': 24, 'semi_structured_bytes': 9}
    """
    if weight.dim() != 2:
        raise ValueError(f"`weight` must be 2-D (out, in), got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    numel, item = weight.numel(), weight.element_size()
    nnz = int(torch.count_nonzero(weight.detach()))
    col_bytes = 2 if cols <= 2**15 else 4
    ptr_bytes = 4 if nnz < 2**31 else 8
    semi = numel // 2 * item + math.ceil(numel / 8) if is_n_m_sparse(weight) else None
    return {
        "numel": numel,
        "nnz": nnz,
        "dense_bytes": numel * item,
        "bitmask_bytes": math.ceil(numel / 8) + nnz * item,
        "csr_bytes": nnz * (item + col_bytes) + (rows + 1) * ptr_bytes,
        "semi_structured_bytes": semi,
    }


def compressed_size(model: nn.Module) -> dict[str, int | None]:
    """:func:`tensor_sizes` summed over the prunable Linears' weights (biases, norms and embeddings excluded).

    ``semi_structured_bytes`` is None unless every prunable weight is 2:4 sparse.
    """
    totals: dict[str, int | None] = dict.fromkeys(_SIZE_KEYS, 0)
    for linear in prunable_linears(model).values():
        for key, value in tensor_sizes(linear.weight).items():
            current = totals[key]
            totals[key] = None if current is None or value is None else current + value
    return totals


def _semi_structured_class() -> type:
    """The backend ``to_sparse_semi_structured`` will use (cuSPARSELt unless CUTLASS is forced)."""
    from torch.sparse import SparseSemiStructuredTensor, SparseSemiStructuredTensorCUSPARSELT
    from torch.sparse import SparseSemiStructuredTensorCUTLASS as Cutlass

    return Cutlass if SparseSemiStructuredTensor._FORCE_CUTLASS else SparseSemiStructuredTensorCUSPARSELT


def _semi_structured_problem(weight: Tensor, backend: type) -> str | None:
    """Why ``weight`` cannot become a semi-structured tensor on ``backend`` (device aside), or None."""
    constraints = backend._DTYPE_SHAPE_CONSTRAINTS  # type: ignore[attr-defined]
    if weight.dtype not in constraints:
        return f"dtype {weight.dtype} is not one of {sorted(str(d) for d in constraints)}"
    rows, cols = constraints[weight.dtype].sparse_min_rows, constraints[weight.dtype].sparse_min_cols
    if weight.shape[0] % rows or weight.shape[1] % cols:
        return f"shape {tuple(weight.shape)} is not a multiple of ({rows}, {cols})"
    if not is_n_m_sparse(weight):
        return "weight is not 2:4 sparse (some group of 4 inputs has more than 2 nonzeros)"
    return None


def to_semi_structured(model: nn.Module, skip_unsupported: bool = False) -> list[str]:
    """Fold the masks and turn 2:4-sparse prunable weights into ``SparseSemiStructuredTensor`` parameters (inference).

    Every weight is checked before any is converted. The converted weights are frozen (``requires_grad=False``).

    Args:
        model: a model on a CUDA device whose prunable weights are 2:4 sparse.
        skip_unsupported: leave Linears that cannot be converted dense (logged) instead of raising.

    Returns:
        The names of the converted Linears.

    Raises:
        RuntimeError: if CUDA is unavailable or a weight is not on a CUDA device (torch only has CUDA kernels).
        ValueError: naming the Linears that cannot be converted and why (dtype, shape, not 2:4).
    """
    linears = prunable_linears(model)
    off_cuda = sorted({str(lin.weight.device) for lin in linears.values() if lin.weight.device.type != "cuda"})
    if not torch.cuda.is_available() or off_cuda:
        raise RuntimeError(
            "to_semi_structured needs the model on a CUDA device: torch.sparse.to_sparse_semi_structured only has "
            f"CUDA (cuSPARSELt/CUTLASS) kernels and rejects other tensors; CUDA available={torch.cuda.is_available()}, "
            f"weights on {off_cuda or ['cuda']}"
        )
    from torch.sparse import to_sparse_semi_structured

    backend = _semi_structured_class()
    problems = {name: _semi_structured_problem(lin.weight, backend) for name, lin in linears.items()}
    bad = {name: why for name, why in problems.items() if why is not None}
    if bad and not skip_unsupported:
        listed = "; ".join(f"{name}: {why}" for name, why in list(bad.items())[:5])
        raise ValueError(f"{len(bad)} of {len(linears)} prunable Linears cannot be made semi-structured: {listed}")
    fold_masks(model)
    converted = []
    for name, linear in linears.items():
        if name in bad:
            log.info("Left %s dense: %s", name, bad[name])
            continue
        sparse = to_sparse_semi_structured(linear.weight.detach().contiguous())
        linear.weight = nn.Parameter(sparse, requires_grad=False)
        converted.append(name)
    return converted
