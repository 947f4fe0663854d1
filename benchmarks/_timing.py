"""Latency of a pruned model next to its dense original, timed alternately in the same run (shared by benchmarks).

The alternation itself is :func:`lit_prune.eval.latency.compare_latency` (also used by ``lit-prune demo``); this
module only flattens its result into the numbers the benchmark tables print.
"""

from __future__ import annotations

import torch

from lit_prune import CPU_PROTOCOL
from lit_prune.eval.latency import compare_latency


def alternating(pruned: torch.nn.Module, dense: torch.nn.Module, rounds: int = 3) -> dict[str, float]:
    """Median over ``rounds`` of the CPU-protocol latency of ``pruned`` and of its ratio to ``dense``.

    Dense and pruned are timed one after the other in every round, so load on the machine hits both alike.
    Keys: ``p1`` / ``p8`` prefill ms at batch 1 / 8, ``dec`` decode tokens/s, and ``r1`` / ``r8`` / ``rdec`` the
    same as ratios to dense (decode: pruned tokens/s over dense tokens/s).
    """
    cmp = compare_latency(pruned, dense, rounds=rounds, **CPU_PROTOCOL.latency_kwargs())
    p = cmp.median_model()
    return {
        "p1": p.prefill_ms[1],
        "p8": p.prefill_ms[8],
        "dec": p.decode_tokens_per_s,
        "r1": cmp.prefill_ratio(1).median,
        "r8": cmp.prefill_ratio(8).median,
        "rdec": cmp.decode_ratio().median,
    }
