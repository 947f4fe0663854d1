"""Read a pruning run back from its folder: applied plans, the MoP trajectory, and dense-vs-pruned measurements.

A run folder is what the pruning callbacks write next to the checkpoints (``<name>-plan-<n>.json``,
``mop-trajectory.csv``), what :class:`~lit_prune.callbacks.PruningReport` adds (``report-measurements.json``), or a
saved model folder with ``pruning_plans.json`` (``lit-prune prune --output``, ``lora-merged/``). Everything here only
reads files; :func:`block_history` maps the plans back onto the blocks of the model the run started from.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_prune.eval.latency import LatencyResult
from lit_prune.eval.params import ParamCount
from lit_prune.eval.perplexity import PerplexityResult
from lit_prune.eval.summary import EvalSummary
from lit_prune.eval.zeroshot import ZeroShotResult
from lit_prune.plan import PLANS_FILE, PruningPlan, read_plans

log = logging.getLogger(__name__)

MEASUREMENTS_FILE = "report-measurements.json"
"""Written by :class:`~lit_prune.callbacks.PruningReport`: ``{"dense": EvalSummary, "pruned": EvalSummary}``."""
TRAJECTORY_FILE = "mop-trajectory.csv"
_PLAN_GLOB = "*-plan-*.json"


@dataclass
class RunRecord:
    """What a report shows about one run.

    Args:
        folder: the run folder the files were read from.
        plans: the applied plans in the order they were applied (``meta["written_at"]``; older plan files: by
            ``params_before``, which only goes down along structural steps).
        trajectory: MoP steps (``step``, ``branch``, ``params_before``, ``params_after``, proxies), if any.
        dense: measurements of the model before pruning, if a :class:`PruningReport` took them.
        pruned: measurements of the model at the end of the run.
    """

    folder: Path
    plans: list[PruningPlan]
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    dense: EvalSummary | None = None
    pruned: EvalSummary | None = None


@dataclass
class BlockScores:
    """One scoring step's block scores, mapped onto the blocks of the model the run started from.

    Args:
        label: ``"<step>: <method>"``.
        scores: the score the plan was chosen by, one per ORIGINAL block (NaN for blocks gone before this step).
        components: the sub-scores the plan's score was computed from (``meta["component_scores"]`` of depth plans,
            e.g. ``bi``, ``angular`` and ``cka`` for ``consensus``), laid out like ``scores``; empty when the plan
            did not record them.
        dropped: the original blocks this step removed.
    """

    label: str
    scores: list[float]
    components: dict[str, list[float]] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)


@dataclass
class HeadScores:
    """One width step's query-head scores, on the blocks of the model the run started from.

    Args:
        label: ``"<step>: <method>"``.
        scores: ``{original block: score of every query head}`` for the blocks alive at this step.
        removed: ``{original block: query heads this step cut}``, only blocks that lost heads (blocks removed
            entirely are in ``dropped``).
        dropped: original blocks that any step of the run removed entirely (before, at or after this one).
    """

    label: str
    scores: dict[int, list[float]]
    removed: dict[int, list[int]] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)


@dataclass
class BlockHistory:
    """Per block of the model the run started from: kept or dropped, and its widths before and after.

    Widths are None where no plan recorded them (a depth-only run does not know head counts).
    """

    dropped: list[bool]
    heads_before: list[int | None]
    heads_after: list[int | None]
    neurons_before: list[int | None]
    neurons_after: list[int | None]
    block_scores: list[BlockScores]
    """Per plan with block scores, in applied order."""
    head_scores: list[HeadScores]
    """Per width plan with head scores (``meta["head_scores"]``), in applied order."""

    @property
    def num_blocks(self) -> int:
        """Blocks of the model the run started from."""
        return len(self.dropped)


def collect_run(folder: str | Path) -> RunRecord:
    """Read the plans, trajectory and measurements under ``folder`` (searched recursively).

    Raises:
        FileNotFoundError: if ``folder`` does not exist or holds no plan.
        ValueError: if plan files of more than one run sit under ``folder`` (pick the run's own folder), or a plan
            file breaks the plan format rules (:func:`~lit_prune.plan.read_plans`).
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"Run folder {str(root)!r} does not exist")
    plans = _read_plans(root)
    trajectory_path = _one(root, TRAJECTORY_FILE)
    measurements_path = _one(root, MEASUREMENTS_FILE)
    record = RunRecord(folder=root, plans=plans)
    if trajectory_path is not None:
        record.trajectory = _read_trajectory(trajectory_path)
    if measurements_path is not None:
        data = json.loads(measurements_path.read_text())
        record.dense = summary_from_dict(data["dense"]) if data.get("dense") else None
        record.pruned = summary_from_dict(data["pruned"]) if data.get("pruned") else None
    return record


def _read_plans(root: Path) -> list[PruningPlan]:
    files = sorted(root.rglob(_PLAN_GLOB))
    folders = sorted({f.parent for f in files})
    if len(folders) > 1:
        raise ValueError(
            f"Plan files of several runs under {str(root)!r}: {[str(f) for f in folders]}; give the folder of one run"
        )
    if files:
        plans = [plan for f in files for plan in read_plans(f)]
        if all("written_at" in p.meta for p in plans):
            return sorted(plans, key=lambda p: float(p.meta["written_at"]))
        # older runs: every structural plan removes parameters, so the applied order is by params_before
        return sorted(plans, key=lambda p: -(p.params_before or 0))
    saved = sorted(root.rglob(PLANS_FILE))
    if not saved:
        raise FileNotFoundError(
            f"No pruning plan under {str(root)!r}: expected '<callback>-plan-<n>.json' files (written next to the "
            f"checkpoints by the pruning callbacks) or a saved model's {PLANS_FILE}"
        )
    return read_plans(saved[0])  # saved in applied order


def _one(root: Path, name: str) -> Path | None:
    found = sorted(root.rglob(name))
    return found[0] if found else None


def _read_trajectory(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    ints = ("step", "params_before", "params_after")
    floats = ("proxy_depth", "proxy_width", "seconds")
    return [
        {k: (int(v) if k in ints else float(v) if k in floats else v) for k, v in row.items() if v != ""}
        for row in rows
    ]


def summary_from_dict(data: dict[str, Any]) -> EvalSummary:
    """The inverse of :meth:`EvalSummary.as_dict` (JSON turns the prefill batch sizes into strings)."""
    latency = data.get("latency")
    if latency is not None:
        latency = LatencyResult(**{**latency, "prefill_ms": {int(b): v for b, v in latency["prefill_ms"].items()}})
    return EvalSummary(
        name=data["name"],
        params=ParamCount(**data["params"]),
        ppl=PerplexityResult(**data["ppl"]) if data.get("ppl") else None,
        ppl_source=data.get("ppl_source"),
        latency=latency,
        zeroshot=ZeroShotResult(**data["zeroshot"]) if data.get("zeroshot") else None,
        extra=data.get("extra") or {},
    )


def block_history(plans: list[PruningPlan]) -> BlockHistory:
    """Follow every block of the first plan's model through the plans (width cuts first, then drops, per plan).

    Raises:
        ValueError: if there is no plan, the first plan does not record ``num_layers``, or a plan's ``num_layers``
            is not the number of blocks left by the plans before it.
    """
    if not plans or plans[0].num_layers is None:
        raise ValueError("block_history needs at least one plan with `num_layers`")
    n = plans[0].num_layers
    alive = list(range(n))  # original index of every current block
    dropped = [False] * n
    heads0: list[int | None] = [None] * n
    neurons0: list[int | None] = [None] * n
    heads: list[int | None] = [None] * n
    neurons: list[int | None] = [None] * n
    block_scores: list[BlockScores] = []
    head_scores: list[HeadScores] = []
    for step, plan in enumerate(plans, start=1):
        if plan.num_layers is not None and plan.num_layers != len(alive):
            raise ValueError(f"Plan {step} ({plan.method}) is for {plan.num_layers} blocks, the run had {len(alive)}")
        label = f"{step}: {plan.method}"
        if plan.scores is not None:
            block_scores.append(
                BlockScores(
                    label=label,
                    scores=_on_original(plan.scores, alive, n),
                    components=_components(plan, alive, n),
                    dropped=sorted(alive[i] for i in plan.drop_layers),
                )
            )
        if plan.meta.get("head_scores"):
            head_scores.append(_head_scores(plan, label, alive))
        for widths, first, now, keep in (
            (plan.heads_before, heads0, heads, plan.keep_heads),
            (plan.neurons_before, neurons0, neurons, plan.keep_neurons),
        ):
            for i, width in enumerate(widths or ()):
                if first[alive[i]] is None:
                    first[alive[i]] = width
                now[alive[i]] = len(keep[i]) if keep and i in keep else width
        for i in sorted(plan.drop_layers, reverse=True):
            dropped[alive[i]] = True
            del alive[i]
    for entry in head_scores:
        entry.dropped = [b for b in range(n) if dropped[b]]
    return BlockHistory(
        dropped=dropped,
        heads_before=heads0,
        heads_after=[0 if d else h for d, h in zip(dropped, heads)],
        neurons_before=neurons0,
        neurons_after=[0 if d else m for d, m in zip(dropped, neurons)],
        block_scores=block_scores,
        head_scores=head_scores,
    )


def _on_original(values: Any, alive: list[int], n: int) -> list[float]:
    """Per-current-block ``values`` laid out on the ``n`` original blocks (NaN where a block is gone)."""
    row = [math.nan] * n
    for i, value in enumerate(values):
        row[alive[i]] = float(value)
    return row


def _components(plan: PruningPlan, alive: list[int], n: int) -> dict[str, list[float]]:
    """The sub-scores a depth plan recorded (``meta["component_scores"]``), except the plan's own score."""
    recorded = plan.meta.get("component_scores")
    if not isinstance(recorded, dict):
        return {}
    own = plan.meta.get("criterion")
    out = {}
    for name, values in recorded.items():
        if name == own or not isinstance(values, list) or len(values) != len(alive):
            continue  # the plan's own score is its main row; a malformed entry is left out
        out[str(name)] = _on_original(values, alive, n)
    return out


def _head_scores(plan: PruningPlan, label: str, alive: list[int]) -> HeadScores:
    """A width plan's head scores and removed heads, keyed by original block."""
    scores = {alive[i]: [float(v) for v in values] for i, values in enumerate(plan.meta["head_scores"])}
    removed: dict[int, list[int]] = {}
    for i, kept in (plan.keep_heads or {}).items():
        width = plan.heads_before[i] if plan.heads_before else len(plan.meta["head_scores"][i])
        gone = sorted(set(range(width)) - set(kept))
        if gone:
            removed[alive[i]] = gone
    return HeadScores(label=label, scores=scores, removed=dict(sorted(removed.items())))
