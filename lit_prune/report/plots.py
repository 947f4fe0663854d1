"""The report's PNG figures: structure before/after, block and head importance heatmaps, the MoP path.

Each function draws one figure from already collected data (:mod:`lit_prune.report.collect`), writes it, and
returns its path, or None when the run has nothing to draw. matplotlib is imported lazily with the non-interactive
``Agg`` backend (it ships with the ``eval`` extra); :func:`have_matplotlib` tells whether figures can be drawn.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

from lit_prune.mop.search import DEPTH, WIDTH
from lit_prune.report.collect import BlockHistory

_DPI = 110
_COLORS = {"before": "#c7c7c7", "after": "#1f77b4", "dropped": "#d62728"}


def have_matplotlib() -> bool:
    """Whether matplotlib is installed (``pip install 'lit-prune[eval]'``)."""
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    _pyplot().close(fig)
    return path


def plot_structure(history: BlockHistory, path: Path) -> Path:
    """Bars per original block: kept or dropped, and query heads / MLP neurons before (grey) and after (blue)."""
    plt = _pyplot()
    rows = [
        ("heads", history.heads_before, history.heads_after),
        ("neurons", history.neurons_before, history.neurons_after),
    ]
    rows = [r for r in rows if any(v is not None for v in r[1])]
    fig, axes = plt.subplots(len(rows) + 1, 1, figsize=(max(6.0, 0.28 * history.num_blocks + 2), 2.2 * (len(rows) + 1)))
    axes = list(axes) if len(rows) else [axes]
    blocks = list(range(history.num_blocks))
    kept = [0 if d else 1 for d in history.dropped]
    axes[0].bar(blocks, [1] * len(blocks), color=_COLORS["dropped"], label="dropped")
    axes[0].bar(blocks, kept, color=_COLORS["after"], label="kept")
    axes[0].set_yticks([])
    axes[0].set_title(f"Blocks: {sum(kept)} of {len(blocks)} kept")
    axes[0].legend(loc="upper right", fontsize=7, ncols=2)
    for ax, (name, before, after) in zip(axes[1:], rows):
        ax.bar(blocks, [b or 0 for b in before], color=_COLORS["before"], label="before")
        ax.bar(blocks, [a or 0 for a in after], color=_COLORS["after"], label="after", width=0.6)
        ax.set_ylabel(name)
        total_before = sum(b or 0 for b in before)
        total_after = sum(a or 0 for a in after)
        ax.set_title(f"{name.capitalize()} per block: {total_after:,} of {total_before:,} kept")
        ax.legend(loc="upper right", fontsize=7, ncols=2)
    axes[-1].set_xlabel("block (index in the model before pruning)")
    for ax in axes:
        ax.set_xticks(blocks[:: max(1, len(blocks) // 15)])
    return _save(fig, path)


def plot_block_scores(history: BlockHistory, path: Path) -> Path | None:
    """Heatmap: one row per plan that scored blocks, one column per original block (blank: already removed)."""
    if not history.block_scores:
        return None
    plt = _pyplot()
    labels = [label for label, _ in history.block_scores]
    matrix = [_min_max(row) for _, row in history.block_scores]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * history.num_blocks + 3), 1.0 + 0.32 * len(labels)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels=labels, fontsize=7)
    ax.set_xlabel("block (index in the model before pruning)")
    ax.set_title("Block importance per scoring step (min-max scaled per row; higher = kept)")
    fig.colorbar(image, ax=ax, fraction=0.03)
    return _save(fig, path)


def plot_head_scores(history: BlockHistory, path: Path) -> Path | None:
    """Heatmap of the first width plan's query-head scores: one row per block, one column per head."""
    if not history.head_scores:
        return None
    plt = _pyplot()
    label, scores = history.head_scores[0]
    width = max(len(v) for v in scores.values())
    matrix = [_padded(scores.get(b, []), width) for b in range(history.num_blocks)]  # blanks: gone / narrower
    fig, ax = plt.subplots(figsize=(2.0 + 0.45 * width, 1.2 + 0.22 * history.num_blocks))
    image = ax.imshow(matrix, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel("query head")
    ax.set_ylabel("block (before pruning)")
    ax.set_title(f"Head importance ({label})", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    return _save(fig, path)


def plot_mop_path(trajectory: list[dict[str, Any]], path: Path) -> Path | None:
    """Parameters after each MoP step, marked by the branch the proxy chose (depth or width)."""
    if not trajectory:
        return None
    plt = _pyplot()
    steps = [int(s["step"]) + 1 for s in trajectory]
    params = [int(s["params_after"]) / 1e6 for s in trajectory]
    start = int(trajectory[0]["params_before"]) / 1e6
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.plot([0, *steps], [start, *params], color="#7f7f7f", linewidth=1, zorder=1)
    for code, name, marker, color in ((DEPTH, "depth", "s", "#d62728"), (WIDTH, "width", "o", "#1f77b4")):
        xs = [x for x, s in zip(steps, trajectory) if s["branch"] == code]
        ys = [y for y, s in zip(params, trajectory) if s["branch"] == code]
        if xs:
            ax.scatter(xs, ys, marker=marker, color=color, label=f"{name} ({code}, {len(xs)} steps)", zorder=2)
    ax.set_xlabel("MoP step")
    ax.set_ylabel("parameters (M)")
    ax.set_title("MoP path: " + "".join(str(s["branch"]) for s in trajectory))
    ax.legend(fontsize=8)
    return _save(fig, path)


def _padded(row: list[float], width: int) -> list[float]:
    return [float(v) for v in row] + [math.nan] * (width - len(row))


def _min_max(row: list[float]) -> list[float]:
    finite = [v for v in row if not math.isnan(v)]
    if not finite:
        return row
    low, high = min(finite), max(finite)
    span = high - low
    return [v if math.isnan(v) else ((v - low) / span if span > 0 else 0.5) for v in row]
