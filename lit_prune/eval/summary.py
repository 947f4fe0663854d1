"""One table of what a user wants to know about a model: size, perplexity (with its protocol) and speed."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lit_prune.eval.latency import LatencyResult, latency
from lit_prune.eval.params import ParamCount, count_params
from lit_prune.eval.perplexity import PerplexityResult, perplexity_details
from lit_prune.eval.zeroshot import ZeroShotResult


@dataclass
class EvalSummary:
    """Parameters, perplexity and latency of one model, with everything needed to reproduce the numbers."""

    name: str
    params: ParamCount
    ppl: PerplexityResult | None = None
    ppl_source: str | None = None
    """The text the perplexity windows came from (file or dataset)."""
    latency: LatencyResult | None = None
    zeroshot: ZeroShotResult | None = None
    """lm-eval zero-shot accuracies (``lit-prune eval --tasks ...``)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict."""
        return dataclasses.asdict(self)


def evaluate_model(
    model: nn.Module,
    name: str,
    windows: torch.Tensor | None = None,
    ppl_source: str | None = None,
    batch_size: int = 4,
    latency_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> EvalSummary:
    """Measure ``model``: parameter counts always, PPL when ``windows`` are given, latency unless it is None.

    Args:
        model: a Hugging Face causal LM (or a wrapper holding one).
        name: label of the table column.
        windows: ``(N, T)`` token windows to score, or None to skip perplexity.
        ppl_source: where the windows came from, printed next to the number.
        batch_size: windows per forward pass for perplexity.
        latency_kwargs: arguments of :func:`lit_prune.eval.latency`; None skips latency.
        progress: show progress bars.
    """
    summary = EvalSummary(name=name, params=count_params(model), ppl_source=ppl_source)
    if windows is not None:
        summary.ppl = perplexity_details(model, windows, batch_size=batch_size, progress=progress)
    if latency_kwargs is not None:
        summary.latency = latency(model, **latency_kwargs)
    return summary


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def format_table(summaries: Sequence[EvalSummary]) -> str:
    """A Markdown table with one column per model and a protocol line under it."""
    if not summaries:
        raise ValueError("format_table needs at least one EvalSummary")
    rows: list[tuple[str, list[str]]] = [
        ("params (all)", [_millions(s.params.total) for s in summaries]),
        ("params (non-embedding)", [_millions(s.params.non_embedding) for s in summaries]),
    ]
    if any(s.ppl is not None for s in summaries):
        rows.append(("perplexity", [f"{s.ppl.ppl:.3f}" if s.ppl else "-" for s in summaries]))
    lat = [s.latency for s in summaries]
    batch_sizes = sorted({b for r in lat if r is not None for b in r.prefill_ms})
    for b in batch_sizes:
        values = [f"{r.prefill_ms[b]:.1f} ms" if r is not None and b in r.prefill_ms else "-" for r in lat]
        rows.append((f"prefill latency, batch {b}", values))
    if any(r is not None for r in lat):
        rows.append(("decode, batch 1", [f"{r.decode_tokens_per_s:.1f} tok/s" if r else "-" for r in lat]))
    zs = [s.zeroshot for s in summaries]
    tasks = list(dict.fromkeys(t for z in zs if z is not None for t in z.acc))
    for task in tasks:
        values = []
        for z in zs:
            if z is None or task not in z.acc:
                values.append("-")
                continue
            norm = z.acc_norm.get(task)
            values.append(f"{100 * z.acc[task]:.1f}" + (f" ({100 * norm:.1f})" if norm is not None else ""))
        rows.append((f"{task} acc (acc_norm), %", values))
    if tasks:
        rows.append(("zero-shot avg acc, %", [f"{100 * z.avg:.2f}" if z is not None else "-" for z in zs]))
    header = "| | " + " | ".join(s.name for s in summaries) + " |"
    lines = [header, "|---" * (len(summaries) + 1) + "|"]
    lines += ["| " + label + " | " + " | ".join(values) + " |" for label, values in rows]
    notes: dict[str, list[str]] = {}  # note -> the models it holds for (one line when they share a protocol)
    for s in summaries:
        if s.ppl is not None:
            note = (
                f"PPL = exp(mean next-token NLL) on {s.ppl_source or 'the given windows'}, "
                f"{s.ppl.windows} windows of {s.ppl.seq_len} tokens ({s.ppl.tokens} scored tokens)."
            )
            notes.setdefault(note, []).append(s.name)
        if s.latency is not None:
            r = s.latency
            note = (
                f"latency on {r.device} ({r.dtype}, {r.threads} threads), prompt {r.prompt_len} tokens, "
                f"decode {r.new_tokens} tokens with KV cache, median of {r.repeats} runs."
            )
            notes.setdefault(note, []).append(s.name)
    lines_out = [f"{', '.join(names)}: {note}" for note, names in notes.items()]
    for s in summaries:
        if s.zeroshot is not None:
            counts = ", ".join(f"{t} {n}" for t, n in s.zeroshot.n_items.items())
            lines_out.append(
                f"{s.name}: zero-shot accuracy with lm-eval (local task files, 0-shot), items per task: {counts}; "
                f"avg = mean acc over the tasks ({s.zeroshot.seconds:.0f} s)."
            )
    return "\n".join(lines + [""] + lines_out)
