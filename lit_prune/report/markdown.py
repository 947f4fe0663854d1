"""``report.md``: one Markdown page per pruning run, with its PNG figures in ``report/`` beside it.

Sections: a dense-vs-pruned table (parameters always; perplexity, latency and zero-shot accuracy when
:class:`~lit_prune.callbacks.PruningReport` measured them), the applied steps, sparsity per block (figure and table),
the structure per block (figure and table), block and head importance heatmaps, and the MoP path. Without matplotlib
the page keeps its tables and says how to get the figures.

Rewriting a report into a folder that already holds one removes the figures an earlier report wrote there and this
one does not draw (only the report's own figure names in ``report/``: nothing else in the folder is touched).
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from lit_prune.eval.summary import EvalSummary
from lit_prune.report.collect import BlockHistory, RunRecord, block_history, collect_run
from lit_prune.report.plots import (
    have_matplotlib,
    plot_block_scores,
    plot_head_scores,
    plot_mop_path,
    plot_sparsity,
    plot_structure,
)

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
FIGURES_FOLDER = "report"
FIGURES = ("structure", "block_scores", "head_scores", "sparsity", "mop_path")
"""The figures a report may draw, each written as ``report/<name>.png``."""


def write_report(run: str | Path | RunRecord, output: str | Path | None = None) -> Path:
    """Write ``report.md`` (and its figures) for the run in ``run`` (a folder or a :class:`RunRecord`).

    Args:
        run: the run folder (read with :func:`~lit_prune.report.collect_run`) or an already collected record.
        output: the folder to write into; default the run folder.

    Returns:
        The path of ``report.md``.

    Raises:
        FileNotFoundError: if ``run`` is a folder that does not exist or holds no plan.
        ValueError: if ``run`` holds plan files of several runs, or a plan file breaks the plan format rules.
    """
    record = run if isinstance(run, RunRecord) else collect_run(run)
    folder = Path(output) if output is not None else record.folder
    folder.mkdir(parents=True, exist_ok=True)
    history = block_history(record.plans)
    figures = _figures(record, history, folder / FIGURES_FOLDER)
    _remove_stale_figures(folder / FIGURES_FOLDER, figures)
    lines = [
        "# Pruning report",
        "",
        f"Run folder `{record.folder}`; written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by lit-prune "
        f"{_version()}.",
        "",
        "## Dense vs pruned",
        "",
        *_comparison(record),
        "",
        "## Steps",
        "",
        *_steps(record),
        "",
        *_sparsity(record, figures),
        "## Structure per block",
        "",
        *_image(figures, "structure", "kept blocks, heads and neurons per block"),
        *_block_table(history),
        "",
        "## Importance",
        "",
        *_image(figures, "block_scores", "block importance heatmap"),
        *_image(figures, "head_scores", "head importance heatmap"),
    ]
    if not history.block_scores and not history.head_scores:
        lines += ["No plan of this run recorded block or head scores.", ""]
    if record.trajectory:
        lines += ["## MoP path", "", *_image(figures, "mop_path", "MoP path"), *_trajectory(record)]
    path = folder / REPORT_FILE
    path.write_text("\n".join(lines).rstrip() + "\n")
    log.info("Wrote the pruning report %s", path)
    return path


def _version() -> str:
    try:
        return version("lit-prune")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "(source tree)"


def _figures(record: RunRecord, history: BlockHistory, folder: Path) -> dict[str, Path]:
    if not have_matplotlib():
        log.warning("matplotlib is not installed: the report has no figures (pip install 'lit-prune[eval]')")
        return {}
    drawn = {
        "structure": plot_structure(history, folder / "structure.png"),
        "block_scores": plot_block_scores(history, folder / "block_scores.png"),
        "head_scores": plot_head_scores(history, folder / "head_scores.png"),
        "sparsity": plot_sparsity(record.plans, folder / "sparsity.png"),
        "mop_path": plot_mop_path(record.trajectory, folder / "mop_path.png"),
    }
    return {name: path for name, path in drawn.items() if path is not None}


def _remove_stale_figures(folder: Path, figures: dict[str, Path]) -> None:
    """Delete this writer's figures in ``folder`` that the report just written does not show (an earlier run's)."""
    stale = [folder / f"{name}.png" for name in FIGURES if name not in figures and (folder / f"{name}.png").is_file()]
    for path in stale:
        path.unlink()
    if stale:
        log.info("Removed %d figure(s) of an earlier report from %s: %s", len(stale), folder, [p.name for p in stale])
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _image(figures: dict[str, Path], name: str, alt: str) -> list[str]:
    if name not in figures:
        return []
    return [f"![{alt}]({FIGURES_FOLDER}/{figures[name].name})", ""]


def _change(before: float, after: float) -> str:
    return f"{after / before:.2f}×" if before else "-"


def _comparison(record: RunRecord) -> list[str]:
    first, last = record.plans[0], record.plans[-1]
    dense, pruned = record.dense, record.pruned
    rows: list[tuple[str, str, str, str]] = []
    total_before = dense.params.total if dense else first.params_before
    total_after = pruned.params.total if pruned else last.params_after
    if total_before and total_after:
        removed = 1 - total_after / total_before
        rows.append(("parameters (all)", f"{total_before:,}", f"{total_after:,}", f"−{100 * removed:.1f}%"))
    ne_before = dense.params.non_embedding if dense else first.non_embedding_before
    ne_after = pruned.params.non_embedding if pruned else last.non_embedding_after
    if ne_before and ne_after:
        removed = 1 - ne_after / ne_before
        rows.append(("parameters (non-embedding)", f"{ne_before:,}", f"{ne_after:,}", f"−{100 * removed:.1f}%"))
    if dense is not None and pruned is not None:
        rows += _measured_rows(dense, pruned)
    lines = ["| | dense | pruned | pruned / dense |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    if dense is None or pruned is None:
        lines += [
            "",
            "Perplexity, latency and zero-shot accuracy were not measured in this run: add the "
            "`lit_prune.callbacks.PruningReport` callback to the Trainer to measure the dense and the pruned model.",
        ]
    else:
        lines += ["", *_protocol(dense, pruned)]
    return lines


def _measured_rows(dense: EvalSummary, pruned: EvalSummary) -> list[tuple[str, str, str, str]]:
    rows = []
    if dense.ppl and pruned.ppl:
        rows.append(
            ("perplexity", f"{dense.ppl.ppl:.2f}", f"{pruned.ppl.ppl:.2f}", _change(dense.ppl.ppl, pruned.ppl.ppl))
        )
    if dense.latency and pruned.latency:
        for b, ms in sorted(dense.latency.prefill_ms.items()):
            if b in pruned.latency.prefill_ms:
                after = pruned.latency.prefill_ms[b]
                rows.append((f"prefill latency, batch {b}", f"{ms:.1f} ms", f"{after:.1f} ms", _change(ms, after)))
        d, p = dense.latency.decode_tokens_per_s, pruned.latency.decode_tokens_per_s
        rows.append(("decode, batch 1", f"{d:.1f} tok/s", f"{p:.1f} tok/s", _change(d, p)))
    if dense.zeroshot and pruned.zeroshot:
        for task, acc in dense.zeroshot.acc.items():
            if task in pruned.zeroshot.acc:
                after = pruned.zeroshot.acc[task]
                rows.append(
                    (f"{task} acc, %", f"{100 * acc:.1f}", f"{100 * after:.1f}", f"{100 * (after - acc):+.1f} pt")
                )
                if task in dense.zeroshot.acc_norm and task in pruned.zeroshot.acc_norm:
                    n0, n1 = dense.zeroshot.acc_norm[task], pruned.zeroshot.acc_norm[task]
                    rows.append(
                        (f"{task} acc_norm, %", f"{100 * n0:.1f}", f"{100 * n1:.1f}", f"{100 * (n1 - n0):+.1f} pt")
                    )
        avg0, avg1 = dense.zeroshot.avg, pruned.zeroshot.avg
        rows.append(
            ("zero-shot avg acc, %", f"{100 * avg0:.2f}", f"{100 * avg1:.2f}", f"{100 * (avg1 - avg0):+.2f} pt")
        )
    return rows


def _protocol(dense: EvalSummary, pruned: EvalSummary) -> list[str]:
    notes = []
    if dense.ppl:
        notes.append(
            f"Perplexity: exp(mean next-token NLL) on {dense.ppl_source or 'the validation windows'}, "
            f"{dense.ppl.windows} windows of {dense.ppl.seq_len} tokens."
        )
    if dense.latency:
        r = dense.latency
        notes.append(
            f"Latency: {r.device}, prompt {r.prompt_len} tokens, decode {r.new_tokens} tokens with the KV cache, "
            f"median of {r.repeats} runs; dense measured before pruning, pruned after the fit (same device)."
        )
    if dense.zeroshot:
        counts = ", ".join(f"{t} {n}" for t, n in dense.zeroshot.n_items.items())
        notes.append(f"Zero-shot: lm-eval, 0-shot, items per task: {counts}; avg = mean acc.")
    return [f"- {n}" for n in notes]


def _steps(record: RunRecord) -> list[str]:
    lines = [
        "| # | method | parameters before → after | removed | blocks dropped | blocks narrowed |",
        "|---|---|---|---|---|---|",
    ]
    for i, plan in enumerate(record.plans, start=1):
        before, after = plan.params_before or 0, plan.params_after or 0
        share = f"{100 * (before - after) / before:.2f}%" if before else "-"
        narrowed = sorted(set(plan.keep_heads or {}) | set(plan.keep_neurons or {}))
        lines.append(
            f"| {i} | `{plan.method}` | {before:,} → {after:,} | {share} | {list(plan.drop_layers) or '-'} | "
            f"{len(narrowed) or '-'} |"
        )
    lines += ["", "Block indices in this table refer to the model each step was applied to."]
    return lines


def _sparsity(record: RunRecord, figures: dict[str, Path]) -> list[str]:
    """Per sparsity step: overall and per-block fraction of zero weights in the blocks' projections."""
    steps = [(i, p) for i, p in enumerate(record.plans, start=1) if "block_sparsity" in p.meta]
    if not steps:
        return []
    lines = ["## Sparsity", "", *_image(figures, "sparsity", "sparsity per block")]
    for i, plan in steps:
        meta = plan.meta
        nm = meta.get("n_m")
        pattern = f", {nm[0]}:{nm[1]}" if nm else ""
        lines.append(
            f"Step {i} (`{plan.method}`, {meta.get('allocation')}{pattern}, {meta.get('protocol')}"
            f"{', TRIM' if meta.get('trim') else ''}): {meta.get('zeros', 0):,} of {meta.get('prunable', 0):,} "
            f"projection weights are zero ({100 * float(meta.get('sparsity', 0)):.2f}%). Zeros are stored densely "
            "(no parameter is removed): see `lit_prune.sparse.compressed_size` for compressed sizes."
        )
        lines += ["", "| block | " + " | ".join(str(b) for b in range(len(meta["block_sparsity"]))) + " |"]
        lines.append("|---" * (len(meta["block_sparsity"]) + 1) + "|")
        lines.append("| sparsity, % | " + " | ".join(f"{100 * v:.1f}" for v in meta["block_sparsity"]) + " |")
        lines.append("")
    return lines


def _block_table(history: BlockHistory) -> list[str]:
    def width(before: int | None, after: int | None) -> str:
        return "-" if before is None else f"{before} → {after if after is not None else before}"

    lines = ["| block | kept | query heads | MLP neurons |", "|---|---|---|---|"]
    for b in range(history.num_blocks):
        kept = "dropped" if history.dropped[b] else "yes"
        heads = width(history.heads_before[b], history.heads_after[b])
        neurons = width(history.neurons_before[b], history.neurons_after[b])
        lines.append(f"| {b} | {kept} | {heads} | {neurons} |")
    return [*lines, ""]


def _trajectory(record: RunRecord) -> list[str]:
    path = "".join(str(s["branch"]) for s in record.trajectory)
    lines = [
        f"Path `{path}` (L = a block removed, G = heads and neurons removed; the proxy picked the lower loss).",
        "",
    ]
    lines += [
        "| step | branch | parameters after | proxy (depth) | proxy (width) | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for s in record.trajectory:
        lines.append(
            f"| {s['step']} | {s['branch']} | {s['params_after']:,} | {s.get('proxy_depth', float('nan')):.4g} | "
            f"{s.get('proxy_width', float('nan')):.4g} | {s.get('seconds', float('nan')):.1f} |"
        )
    return [*lines, ""]
