"""Latency of a pruned model next to its dense original, timed alternately in the same run (shared by benchmarks)."""

from __future__ import annotations

import statistics

import torch

from lit_prune import CPU_PROTOCOL
from lit_prune.eval import latency


def alternating(pruned: torch.nn.Module, dense: torch.nn.Module, rounds: int = 3) -> dict[str, float]:
    """Median over ``rounds`` of the CPU-protocol latency of ``pruned`` and of its ratio to ``dense``.

    Dense and pruned are timed one after the other in every round, so load on the machine hits both alike.
    Keys: ``p1`` / ``p8`` prefill ms at batch 1 / 8, ``dec`` decode tokens/s, and ``r1`` / ``r8`` / ``rdec`` the
    same as ratios to dense (decode: pruned tokens/s over dense tokens/s).
    """
    kwargs = CPU_PROTOCOL.latency_kwargs()
    rows: dict[str, list[float]] = {"p1": [], "p8": [], "dec": [], "r1": [], "r8": [], "rdec": []}
    for _ in range(rounds):
        d = latency(dense, **kwargs)
        p = latency(pruned, **kwargs)
        rows["p1"].append(p.prefill_ms[1])
        rows["p8"].append(p.prefill_ms[8])
        rows["dec"].append(p.decode_tokens_per_s)
        rows["r1"].append(p.prefill_ms[1] / d.prefill_ms[1])
        rows["r8"].append(p.prefill_ms[8] / d.prefill_ms[8])
        rows["rdec"].append(p.decode_tokens_per_s / d.decode_tokens_per_s)
    return {k: statistics.median(v) for k, v in rows.items()}
