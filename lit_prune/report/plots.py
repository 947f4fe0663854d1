"""The report's PNG figures: structure before/after, block and head importance heatmaps, sparsity, the MoP path.

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
from lit_prune.plan import PruningPlan
from lit_prune.report.collect import BlockHistory, HeadScores

_DPI = 110
_COLORS = {"before": "#c7c7c7", "after": "#1f77b4", "dropped": "#d62728", "missing": "#e8e8e8"}


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


def _legend_above(ax: Any, title: str) -> None:
    """Title on the left and legend on the right, both above the axes, so neither covers a bar."""
    ax.set_title(title, loc="left", fontsize=9)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=7, ncols=3, frameon=False, borderaxespad=0.2)


def _block_ticks(ax: Any, n: int) -> None:
    blocks = list(range(n))
    ax.set_xticks(blocks[:: max(1, -(-n // 30))])
    ax.set_xlim(-0.6, n - 0.4)
    ax.tick_params(axis="x", labelsize=7)


def plot_structure(history: BlockHistory, path: Path) -> Path:
    """Bars per original block: kept or dropped, and query heads / MLP neurons before (grey) and after (blue)."""
    plt = _pyplot()
    rows = [
        ("heads", history.heads_before, history.heads_after),
        ("neurons", history.neurons_before, history.neurons_after),
    ]
    rows = [r for r in rows if any(v is not None for v in r[1])]
    size = (max(6.5, 0.24 * history.num_blocks + 2), 1.3 + 1.9 * len(rows))
    fig, axes = plt.subplots(
        len(rows) + 1, 1, figsize=size, sharex=True, squeeze=False, height_ratios=[0.45] + [1.0] * len(rows)
    )
    axes = list(axes[:, 0])
    blocks = list(range(history.num_blocks))
    kept = [0 if d else 1 for d in history.dropped]
    axes[0].bar(blocks, [1] * len(blocks), color=_COLORS["dropped"], label="dropped")
    axes[0].bar(blocks, kept, color=_COLORS["after"], label="kept")
    axes[0].set_yticks([])
    _legend_above(axes[0], f"Blocks: {sum(kept)} of {len(blocks)} kept")
    for ax, (name, before, after) in zip(axes[1:], rows):
        ax.bar(blocks, [b or 0 for b in before], color=_COLORS["before"], label="before")
        ax.bar(blocks, [a or 0 for a in after], color=_COLORS["after"], label="after", width=0.6)
        gone = [b for b in blocks if history.dropped[b]]
        if gone:
            top = max(b or 0 for b in before)
            ax.scatter(gone, [0.04 * top] * len(gone), marker="x", color=_COLORS["dropped"], s=18, label="dropped")
        ax.set_ylabel(name, fontsize=8)
        total_before = sum(b or 0 for b in before)
        total_after = sum(a or 0 for a in after)
        _legend_above(ax, f"{name.capitalize()} per block: {total_after:,} of {total_before:,} kept")
    axes[-1].set_xlabel("block (index in the model before pruning)")
    _block_ticks(axes[-1], history.num_blocks)
    return _save(fig, path)


def block_score_rows(history: BlockHistory) -> list[tuple[str, list[float], list[int]]]:
    """The rows of :func:`plot_block_scores`: (label, scores per original block, blocks to mark as removed).

    Per scoring step its own score, then each recorded sub-score (indented), each marked with the blocks that step
    removed.
    """
    rows = []
    for entry in history.block_scores:
        rows.append((entry.label, entry.scores, entry.dropped))
        rows += [(f"    {name}", values, entry.dropped) for name, values in entry.components.items()]
    return rows


def plot_block_scores(history: BlockHistory, path: Path) -> Path | None:
    """Heatmap: per scoring step its score and each sub-score as a row, one column per original block.

    Each row is min-max scaled (its raw range is in the label); blocks the step removed carry an ``x``, blocks
    gone before the step are blank. A plan without recorded sub-scores (``meta["component_scores"]``) gets its one
    row.
    """
    if not history.block_scores:
        return None
    plt = _pyplot()
    rows = block_score_rows(history)
    labels = [f"{label}  [{_range(values)}]" for label, values, _ in rows]
    matrix = [_min_max(values) for _, values, _ in rows]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.26 * history.num_blocks + 4.5), 1.8 + 0.34 * len(rows)))
    cmap = plt.get_cmap("viridis").with_extremes(bad=_COLORS["missing"])
    image = ax.imshow(matrix, aspect="auto", cmap=cmap, interpolation="nearest", vmin=0, vmax=1)
    xs = [b for _, _, marked in rows for b in marked]
    ys = [r for r, (_, _, marked) in enumerate(rows) for _ in marked]
    if xs:
        ax.scatter(xs, ys, marker="x", color=_COLORS["dropped"], s=36, linewidths=1.6)
    starts = [r for r, (label, _, _) in enumerate(rows) if not label.startswith(" ")]
    for r in starts[1:]:
        ax.axhline(r - 0.5, color="white", linewidth=3)
    ax.set_yticks(range(len(rows)), labels=labels, fontsize=7)
    for r in starts:
        ax.get_yticklabels()[r].set_fontweight("bold")
    ax.set_xlabel("block (index in the model before pruning)")
    _block_ticks(ax, history.num_blocks)
    ax.set_title(
        "Block importance per scoring step (bold: the score the step used; below it: its sub-scores)\n"
        "each row min-max scaled, raw range in brackets; higher = more important; red x: removed by the step",
        fontsize=8,
        loc="left",
    )
    fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)
    return _save(fig, path)


def head_marks(entry: HeadScores) -> tuple[list[tuple[int, int]], list[int]]:
    """What :func:`plot_head_scores` marks: ``(block, head)`` cells of cut heads, and blocks removed entirely."""
    cells = [(block, head) for block, heads in entry.removed.items() for head in heads]
    return cells, list(entry.dropped)


def plot_head_scores(history: BlockHistory, path: Path) -> Path | None:
    """Heatmap of the first width plan's query-head scores (one row per block), with the removed heads marked.

    Heads the plan cut carry an ``x``; blocks removed entirely (by any step) are hatched and their label reads
    ``dropped`` (blank cells: blocks gone before the plan, or heads a block never had).
    """
    if not history.head_scores:
        return None
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    entry = history.head_scores[0]
    width = max(len(v) for v in entry.scores.values())
    matrix = [_padded(entry.scores.get(b, []), width) for b in range(history.num_blocks)]  # blanks: gone / narrower
    fig, ax = plt.subplots(figsize=(3.6 + 0.42 * width, 1.6 + 0.24 * history.num_blocks))
    cmap = plt.get_cmap("magma").with_extremes(bad=_COLORS["missing"])
    image = ax.imshow(matrix, aspect="auto", cmap=cmap, interpolation="nearest")
    cells, dropped = head_marks(entry)
    if cells:
        ax.scatter([h for _, h in cells], [b for b, _ in cells], marker="x", color="#00e5ff", s=30, linewidths=1.6)
    for block in dropped:
        ax.add_patch(
            Rectangle((-0.5, block - 0.5), width, 1, fill=False, hatch="///", edgecolor=_COLORS["dropped"], lw=0)
        )
    ax.set_yticks(
        range(history.num_blocks),
        labels=[f"{b} dropped" if b in dropped else str(b) for b in range(history.num_blocks)],
        fontsize=7,
    )
    for tick, b in zip(ax.get_yticklabels(), range(history.num_blocks)):
        if b in dropped:
            tick.set_color(_COLORS["dropped"])
    ax.set_xticks(range(width))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("query head")
    ax.set_ylabel("block (before pruning)")
    cut = f"{len(cells)} heads removed" if cells else "no head removed"
    ax.set_title(f"Head importance ({entry.label}): {cut}", fontsize=9, loc="left")
    handles = [
        Line2D([], [], marker="x", color="#00e5ff", linestyle="", markeredgewidth=1.6, label="head removed"),
        Patch(facecolor="white", hatch="///", edgecolor=_COLORS["dropped"], label="block removed"),
    ]
    below = {"loc": "upper center", "bbox_to_anchor": (0.5, 0.0), "borderaxespad": 4.5}  # under the x label
    ax.legend(handles=handles, fontsize=7, frameon=False, ncols=2, **below)
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.03)
    return _save(fig, path)


def sparsity_steps(plans: list[PruningPlan]) -> list[tuple[int, PruningPlan]]:
    """The (step, plan) pairs :func:`plot_sparsity` draws: every plan that recorded ``meta["block_sparsity"]``."""
    return [(i, p) for i, p in enumerate(plans, start=1) if p.meta.get("block_sparsity")]


def linear_sparsity(meta: dict[str, Any], num_blocks: int) -> tuple[list[str], list[list[float]]] | None:
    """``meta["layer_sparsity"]`` (``{linear name: zero fraction}``) as (projection names, rows of per-block values).

    The block of a Linear is the first integer in its dotted name (``model.layers.3.self_attn.q_proj`` is block 3
    ``q_proj``); None when the plan did not record per-Linear sparsity or the names do not parse.
    """
    layers = meta.get("layer_sparsity")
    if not isinstance(layers, dict) or not layers:
        return None
    grid: dict[str, list[float]] = {}
    first: dict[str, tuple[int, int]] = {}  # (block, rank inside the block) where a projection name first appears
    ranks: dict[int, int] = {}
    for name, value in layers.items():
        parts = str(name).split(".")
        block = next((int(p) for p in parts if p.isdigit()), None)
        if block is None or block >= num_blocks:
            return None
        grid.setdefault(parts[-1], [math.nan] * num_blocks)[block] = float(value)
        rank = ranks[block] = ranks.get(block, -1) + 1
        first[parts[-1]] = min(first.get(parts[-1], (block, rank)), (block, rank))
    names = sorted(grid, key=first.__getitem__)  # the recorded (adapter) order inside a block, not name order
    return names, [grid[k] for k in names]


def plot_sparsity(plans: list[PruningPlan], path: Path) -> Path | None:
    """Per sparsity step: achieved zero fraction per block (bars) against its target, and per Linear when recorded.

    Bars are the achieved sparsity of each block's projections, ``-`` marks the allocated target
    (``meta["block_ratios"]``) and the dashed line the overall sparsity; with ``meta["layer_sparsity"]`` a heatmap
    below shows every projection of every block. Blocks are indexed on the model the step was applied to.
    """
    steps = sparsity_steps(plans)
    if not steps:
        return None
    plt = _pyplot()
    panels = []
    for i, plan in steps:
        blocks = [float(v) for v in plan.meta["block_sparsity"]]
        panels.append((i, plan, blocks, linear_sparsity(plan.meta, len(blocks))))
    n = max(len(p[2]) for p in panels)
    ratios = [h for _, _, _, grid in panels for h in ([1.0, 0.8] if grid else [1.0])]
    fig, axes = plt.subplots(
        len(ratios), 1, figsize=(max(8.0, 0.26 * n + 3), 0.8 + 2.6 * len(ratios)), squeeze=False, height_ratios=ratios
    )
    axes = list(axes[:, 0])
    for i, plan, blocks, grid in panels:
        ax = axes.pop(0)
        xs = list(range(len(blocks)))
        ax.bar(xs, [100 * v for v in blocks], color=_COLORS["after"], label="achieved")
        targets = plan.meta.get("block_ratios")
        if isinstance(targets, list) and len(targets) == len(blocks):
            target = [100 * float(t) for t in targets]
            ax.scatter(xs, target, marker="_", s=260, linewidths=2, color="black", label="target")
        overall = 100 * float(plan.meta.get("sparsity", sum(blocks) / len(blocks)))
        ax.axhline(overall, color=_COLORS["dropped"], linestyle="--", linewidth=1, label=f"overall {overall:.1f}%")
        ax.set_ylabel("zero weights, %", fontsize=8)
        ax.set_ylim(0, min(100.0, max(100 * max(blocks), overall) * 1.15 + 1))
        _legend_above(ax, f"Step {i} ({plan.method}): sparsity per block")
        _block_ticks(ax, len(blocks))
        ax.set_xlabel("block (index at this step)", fontsize=8)
        if grid:
            names, rows = grid
            hax = axes.pop(0)
            cmap = plt.get_cmap("Blues").with_extremes(bad=_COLORS["missing"])
            image = hax.imshow([[100 * v for v in r] for r in rows], aspect="auto", cmap=cmap, vmin=0, vmax=100)
            hax.set_yticks(range(len(names)), labels=names, fontsize=7)
            _block_ticks(hax, len(blocks))
            hax.set_xlabel("block (index at this step)", fontsize=8)
            if len(blocks) <= 16:  # few enough cells to print every value
                for r, row in enumerate(rows):
                    for b, value in enumerate(row):
                        if not math.isnan(value):
                            color = "white" if value > 0.6 else "black"
                            hax.text(b, r, f"{100 * value:.0f}", ha="center", va="center", fontsize=6, color=color)
            hax.set_title("Zero weights per projection, %", loc="left", fontsize=9)
            fig.colorbar(image, ax=hax, location="bottom", fraction=0.08, pad=0.22, aspect=60)  # keeps the x aligned
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


def _range(values: list[float]) -> str:
    finite = [v for v in values if not math.isnan(v)]
    return f"{min(finite):.3g} .. {max(finite):.3g}" if finite else "none"
