"""Read a pruning run back from its folder: applied plans, the MoP trajectory, and dense-vs-pruned measurements.

A run folder is what the pruning callbacks write next to the checkpoints (``<name>-plan-<n>.json``,
``mop-trajectory.csv``), what :class:`~lit_prune.callbacks.PruningReport` adds (``report-measurements.json``), or a
saved model folder with ``pruning_plans.json`` (``lit-prune prune --output``, ``lora-merged/``). Everything here only
reads files; :func:`block_history` maps the plans back onto the blocks of the model the run started from.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lit_prune.eval.latency import LatencyResult
from lit_prune.eval.params import ParamCount
from lit_prune.eval.perplexity import PerplexityResult
from lit_prune.eval.summary import EvalSummary
from lit_prune.eval.zeroshot import ZeroShotResult
from lit_prune.plan import PruningPlan

MEASUREMENTS_FILE = "report-measurements.json"
"""Written by :class:`~lit_prune.callbacks.PruningReport`: ``{"dense": EvalSummary, "pruned": EvalSummary}``."""
TRAJECTORY_FILE = "mop-trajectory.csv"
PLANS_FILE = "pruning_plans.json"
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
class BlockHistory:
    """Per block of the model the run started from: kept or dropped, and its widths before and after.

    Widths are None where no plan recorded them (a depth-only run does not know head counts).
    """

    dropped: list[bool]
    heads_before: list[int | None]
    heads_after: list[int | None]
    neurons_before: list[int | None]
    neurons_after: list[int | None]
    block_scores: list[tuple[str, list[float]]]
    """Per plan with block scores: (label, one score per ORIGINAL block, NaN for blocks gone by then)."""
    head_scores: list[tuple[str, dict[int, list[float]]]]
    """Per width plan with head scores: (label, {original block: score of every query head})."""

    @property
    def num_blocks(self) -> int:
        """Blocks of the model the run started from."""
        return len(self.dropped)


def collect_run(folder: str | Path) -> RunRecord:
    """Read the plans, trajectory and measurements under ``folder`` (searched recursively).

    Raises:
        FileNotFoundError: if ``folder`` does not exist or holds no plan.
        ValueError: if plan files of more than one run sit under ``folder`` (pick the run's own folder).
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
        plans = [PruningPlan.from_json(f) for f in files]
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
    return [PruningPlan.from_dict(d) for d in json.loads(saved[0].read_text())]  # saved in applied order


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
        ValueError: if there is no plan or the first plan does not record ``num_layers``.
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
    block_scores: list[tuple[str, list[float]]] = []
    head_scores: list[tuple[str, dict[int, list[float]]]] = []
    for step, plan in enumerate(plans, start=1):
        if plan.num_layers is not None and plan.num_layers != len(alive):
            raise ValueError(f"Plan {step} ({plan.method}) is for {plan.num_layers} blocks, the run had {len(alive)}")
        label = f"{step}: {plan.method}"
        if plan.scores is not None:
            row = [math.nan] * n
            for i, value in enumerate(plan.scores):
                row[alive[i]] = float(value)
            block_scores.append((label, row))
        if plan.meta.get("head_scores"):
            head_scores.append((label, {alive[i]: list(v) for i, v in enumerate(plan.meta["head_scores"])}))
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
    return BlockHistory(
        dropped=dropped,
        heads_before=heads0,
        heads_after=[0 if d else h for d, h in zip(dropped, heads)],
        neurons_before=neurons0,
        neurons_after=[0 if d else m for d, m in zip(dropped, neurons)],
        block_scores=block_scores,
        head_scores=head_scores,
    )
