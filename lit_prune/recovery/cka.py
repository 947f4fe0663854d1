"""Layer-wise LoRA with CKA: which blocks get adapters (METHODS.md §4).

R_0 … R_L are the hidden states at the last non-pad token of each sample: R_0 entering block 0, R_i leaving block
i (the block's own output, not Hugging Face's post-final-norm ``last_hidden_state``, which would make the last
block look important). A block's importance is ``I_i = 1 − linear CKA(R_{i−1}, R_i)``; the blocks that change the
representation most get adapters.

Memory is bounded by the samples, not the width: the rows are kept (``(L+1) × n × d`` float64 on the CPU, 138 MB
for a 7B LLaMA at n = 128) and CKA is computed from ``n × n`` Gram matrices, never from ``d × d`` ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lit_prune.arch import adapter_for
from lit_prune.criteria.depth import _CONSTANT_RTOL  # the same rule as the depth criterion's CKA
from lit_prune.stats._common import _block_input, _block_output, _last_tokens, hooked_pass
from lit_prune.stats.hooks import Hooks


def take_samples(batches: Iterable[dict[str, Any]], n_samples: int) -> list[dict[str, Any]]:
    """The first ``n_samples`` rows of ``batches`` (the last batch is cut), as a list of batches.

    Raises:
        ValueError: if ``n_samples`` < 1, a batch has no ``input_ids``, or there are no rows at all.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"`n_samples` must be an int >= 1, got {n_samples!r}")
    taken: list[dict[str, Any]] = []
    seen = 0
    for batch in _as_batches(batches):
        rows = int(batch["input_ids"].size(0))
        keep = min(rows, n_samples - seen)
        taken.append({k: v[:keep] if isinstance(v, Tensor) else v for k, v in batch.items()})
        seen += keep
        if seen >= n_samples:
            break
    if seen == 0:
        raise ValueError("No samples to compute CKA layer importance from: the data yielded no rows")
    return taken


class LastTokenStates:
    """R_0 … R_L at the last non-pad token of every sample, filled by forward hooks on the blocks."""

    def __init__(self, num_blocks: int) -> None:
        self.rows: list[list[Tensor]] = [[] for _ in range(num_blocks + 1)]

    def to(self, device: torch.device | str) -> LastTokenStates:
        """Rows are always kept on the CPU (for :func:`~lit_prune.stats._common.hooked_pass`)."""
        return self

    def add(self, index: int, hidden: Tensor, attention_mask: Tensor | None) -> None:
        """Keep ``hidden[b, last non-pad position of b]`` of every sample as a float64 CPU row of R_index."""
        batch, seq_len = hidden.shape[:2]
        rows, positions = _last_tokens(attention_mask, batch, seq_len, hidden.device)
        self.rows[index].append(hidden[rows, positions].to(device="cpu", dtype=torch.float64))  # (n_b, d)

    def stacked(self) -> list[Tensor]:
        """``[R_0, …, R_L]``, each ``(n, d)``."""
        return [torch.cat(rows) for rows in self.rows]


def last_token_states(model: nn.Module, batches: Iterable[dict[str, Any]], progress: bool = False) -> list[Tensor]:
    """``[R_0, …, R_L]`` (each ``(n, d)`` float64 on the CPU) over ``batches``, one pass in eval mode, no LM head."""

    def attach(hf_model: nn.Module, hooks: Hooks, current: dict[str, Tensor | None]) -> LastTokenStates:
        blocks = adapter_for(hf_model).blocks(hf_model)
        states = LastTokenStates(len(blocks))

        def hook_for(index: int) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
                if index == 0:
                    states.add(0, _block_input(args, kwargs), current["attention_mask"])
                states.add(index + 1, _block_output(output), current["attention_mask"])

            return hook

        for index, block in enumerate(blocks):
            hooks.forward(block, hook_for(index))
        return states

    states = hooked_pass(
        model, batches, attach, max_batches=None, progress=progress, device=None, desc="CKA layer importance"
    )
    return states.stacked()


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of two ``(n, d)`` representations of the same n samples, from ``n × n`` Gram matrices.

    ``CKA = ⟨K, L⟩ / (‖K‖ ‖L‖)`` with ``K = X̃X̃ᵀ``, ``L = ỸỸᵀ`` of the column-centred features (equal to
    ``‖ỸᵀX̃‖² / (‖X̃ᵀX̃‖ ‖ỸᵀỸ‖)``). Constant features (a zero centred Gram): 1 if both sides are constant, else 0.

    Raises:
        ValueError: if the shapes differ in the number of rows or there are fewer than 2 rows.
    """
    if x.dim() != 2 or y.dim() != 2 or x.size(0) != y.size(0) or x.size(0) < 2:
        raise ValueError(
            f"linear_cka needs (n, d) inputs with the same n >= 2, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    x, y = x.to(torch.float64), y.to(torch.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    k, l_ = xc @ xc.T, yc @ yc.T  # (n, n)
    k_norm, l_norm = k.norm(), l_.norm()
    x_constant = bool(k_norm <= _CONSTANT_RTOL * (x @ x.T).norm())
    y_constant = bool(l_norm <= _CONSTANT_RTOL * (y @ y.T).norm())
    if x_constant or y_constant:
        return 1.0 if x_constant and y_constant else 0.0
    return float((k * l_).sum() / (k_norm * l_norm))


def cka_importance(
    model: nn.Module, batches: Iterable[dict[str, Any]], n_samples: int = 128, progress: bool = False
) -> Tensor:
    """``I_i = 1 − linear CKA(R_{i−1}, R_i)`` of every block, ``(L,)`` float64 in ``[0, 1]``, from ``n_samples`` rows.

    An exact identity block has importance 0. Runs one forward pass of the decoder in eval mode under ``no_grad``.

    Raises:
        ValueError: if the batches hold fewer than 2 samples (CKA compares samples).
    """
    samples = take_samples(batches, n_samples)
    states = last_token_states(model, samples, progress=progress)
    if states[0].size(0) < 2:
        raise ValueError(f"CKA layer importance needs at least 2 samples, got {states[0].size(0)}")
    return torch.tensor(
        [1.0 - linear_cka(states[i], states[i + 1]) for i in range(len(states) - 1)], dtype=torch.float64
    )


def select_blocks(importance: Tensor, ratio: float) -> list[int]:
    """The ``floor(ratio · L)`` most important blocks, in ascending index order (ties go to the lower index).

    Raises:
        ValueError: if ``ratio`` is not in (0, 1] or selects no block.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"`ratio` must be in (0, 1], got {ratio!r}")
    num_blocks = int(importance.numel())
    k = math.floor(ratio * num_blocks + 1e-9)
    if k < 1:
        raise ValueError(f"`ratio`={ratio} selects no block of {num_blocks} (floor(ratio · L) = 0); raise it")
    order = sorted(range(num_blocks), key=lambda i: (-float(importance[i]), i))
    return sorted(order[:k])


def _as_batches(batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for batch in batches:
        if not isinstance(batch, dict) or "input_ids" not in batch:
            got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"CKA layer selection needs batches as dicts with `input_ids`, got {got}")
        yield batch
