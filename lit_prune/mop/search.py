"""MoP, Mixture of Pruners: at every step build a depth and a width candidate, keep the better, repeat to the target.

One step (METHODS.md §3):

* depth candidate: remove one block, the lowest under ``depth_criterion`` (any one-pass depth criterion, scored on
  the current model) or, with ``"position"``, the paper code's rule: the third-to-last block;
* width candidate: heads and neurons at a uniform per-block ratio that removes about as many parameters as one
  current block, the lowest under ``width_criterion`` (AMP by default; any registered width criterion);
* both are scored by ``proxy`` on held-out calibration windows without copying the model (the depth candidate runs
  with the block skipped, the width candidate with the pruned heads and neurons masked: both exact), the better one
  is applied with real surgery, and the next step starts.

The statistics of the next step are not recomputed from scratch: they are collected by hooks during the candidate
passes, so the winner's pass already holds them for the pruned model (heads and neurons of a width winner are
re-indexed). Each one-shot step therefore costs two passes over the held-out windows. :meth:`MoPSearch.invalidate`
drops them when the weights change between steps (recovery training).

The last step may be partial: when what is left of the budget is less than a block, only a width candidate of
exactly that size is built, so the target is hit within one neuron per block (the uniform allocation's step).
A decision string (``"L"``: a layer, i.e. depth; ``"G"``: heads and neurons, i.e. width; e.g. ``"LGGL"``) replays
a path instead of searching.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lit_prune.allocation import make_depth_plan, make_width_plan
from lit_prune.arch import adapter_for, unwrap
from lit_prune.criteria import registry
from lit_prune.criteria.depth import needs_for, random_scores, scores_from_stats
from lit_prune.criteria.registry import ScoreInputs
from lit_prune.criteria.width import WidthScores, width_needs_for
from lit_prune.eval._common import evaluating, model_device
from lit_prune.mop.config import DEPTH, WIDTH, MoPConfig, ProxyFn
from lit_prune.mop.proxy import LossSums, proxy_loss, proxy_output, reference_outputs
from lit_prune.plan import PruningPlan
from lit_prune.stats._common import Batch
from lit_prune.stats.depth import attach_depth_statistics
from lit_prune.stats.engine import Attach, run_pass
from lit_prune.stats.hooks import Hooks
from lit_prune.stats.width import attach_width_statistics
from lit_prune.surgery import apply_plan
from lit_prune.surgery.masks import register_width_masks, skipping_block

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MoPStep:
    """One step of a MoP trajectory (what the callback logs and checkpoints)."""

    step: int
    branch: str
    params_before: int
    params_after: int
    proxy_depth: float
    proxy_width: float
    seconds: float
    plan: dict[str, Any] = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for JSON and CSV."""
        return asdict(self)


@dataclass
class _Scores:
    """Scores of the current model: one per block (depth) and per head / neuron (width).

    None where the criterion reads no statistics (``position`` / ``random`` depth, data-free width criteria such as
    ``magnitude``): those are scored when the candidate is built.
    """

    depth: Tensor | None
    width: WidthScores | None


class MoPSearch:
    """The MoP loop over one model; the model is pruned in place, one :meth:`step` at a time.

    The options are a :class:`~lit_prune.mop.config.MoPConfig` (shared with
    :class:`~lit_prune.callbacks.MixtureOfPruners`): pass one as ``config``, or its fields as keywords, which replace
    the config's (or the defaults'), e.g. ``MoPSearch(model, batches, 0.25, proxy="kl", branches="L")``.

    Args:
        model: a Hugging Face causal LM (or a wrapper); pruned in place.
        batches: held-out calibration batches; materialised once (they are reused by every step).
        target: the config's ``target``: fraction of ALL parameters (embeddings included) to remove, in (0, 1),
            counted from the model as it is when the search starts (None: keep the config's, by default 0.25).
        config: the options; None: the defaults.
        apply: how a chosen plan is applied (default :func:`lit_prune.surgery.apply_plan`; the callback passes
            ``CausalLMModule.apply_plan`` so plans are recorded for checkpoints).
        progress: log each step at INFO level.
        reference: the dense model's outputs on ``batches`` for ``kl`` / ``cosine`` (see :attr:`reference`); given
            when a search is resumed on a model that is no longer dense. None computes them from ``model``.
        **options: any other ``MoPConfig`` field: ``proxy`` (``ppl``, ``kl``, ``cosine``, ``random``, or a
            callable ``proxy(branch, model) -> loss``), ``depth_criterion`` (one of :data:`MOP_DEPTH_CRITERIA`),
            ``width_criterion`` (any registered width criterion: those that read statistics, ``amp``, ``amp_act``,
            ``wanda_sp``, collect them during the candidate passes; the data-free ones, ``magnitude`` and
            ``random`` seeded by ``seed`` and the step, score the current weights), ``gqa`` and ``round_to`` (of the
            width candidate), ``decisions`` (a decision string to replay), ``branches`` (``"LG"``; ``"L"`` or
            ``"G"`` give the single-branch baselines without measuring any proxy; a depth-only search still ends
            with a partial width step when less than a block is left), ``seed``.

    Raises:
        ValueError: for any option ``MoPConfig`` refuses (an unknown proxy, depth or width criterion, or gqa mode,
            a target outside (0, 1), a decision string with other letters), no batches, or a width branch on a
            model whose heads cannot be removed (nothing is modified then).
        TypeError: for a keyword that is not a ``MoPConfig`` field.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Batch],
        target: float | None = None,
        *,
        config: MoPConfig | None = None,
        apply: Callable[[PruningPlan], None] | None = None,
        progress: bool = False,
        reference: list[Tensor] | None = None,
        **options: Any,
    ) -> None:
        cfg = MoPConfig.build(config, **({"target": target} if target is not None else {}), **options)
        if WIDTH in cfg.branches:  # the width branch removes heads: a family quirk may refuse that (Phi qk_layernorm)
            adapter = adapter_for(model)  # an unsupported family raises UnsupportedModelError here, unchanged
            try:
                adapter.check_head_pruning(model)
            except ValueError as err:
                raise ValueError(f"{err}; or run MoP with branches='L' (depth only)") from None
        self.config = cfg
        """The validated options (:class:`~lit_prune.mop.config.MoPConfig`)."""
        self.model = model
        self.hf_model = unwrap(model)
        self.batches = list(batches)
        if not self.batches:
            raise ValueError("MoP needs at least one held-out calibration batch, got none")
        self.adapter = adapter_for(self.hf_model)
        self.proxy: str | ProxyFn = cfg.proxy
        self.depth_criterion = cfg.depth_criterion
        self.width_criterion = cfg.width_criterion
        self.gqa = cfg.gqa
        self.round_to = cfg.round_to
        self.decisions = cfg.decisions
        self.branches = cfg.branches
        self.seed = cfg.seed
        self.apply = apply or (lambda plan: apply_plan(self.hf_model, plan))
        self.progress = progress
        self.target = cfg.target
        self.params_start = self.adapter.total_params(self.hf_model)
        self.target_removed = round(self.target * self.params_start)
        self._stuck = False
        self.trajectory: list[MoPStep] = []
        self._scores: _Scores | None = None
        self.reference: list[Tensor] = []
        """The dense model's outputs for ``kl`` (float16 log-probs) / ``cosine`` (hidden states), kept on the CPU:
        ``tokens × vocab × 2`` bytes for ``kl`` (200 MB for 8 windows of 256 tokens of SmolLM2)."""
        proxy = cfg.proxy
        measured = cfg.decisions is None and len(set(cfg.branches)) > 1
        if isinstance(proxy, str) and proxy in ("kl", "cosine") and measured:
            if reference is not None:
                if len(reference) != len(self.batches):
                    raise ValueError(f"`reference` has {len(reference)} entries for {len(self.batches)} batches")
                self.reference = list(reference)
            else:
                self.reference = reference_outputs(self.hf_model, self.batches, proxy)

    # --- state ---------------------------------------------------------------------------------------------------
    @property
    def removed(self) -> int:
        """Parameters removed so far."""
        return self.params_start - self.adapter.total_params(self.hf_model)

    @property
    def remaining(self) -> int:
        """Parameters still to remove."""
        return self.target_removed - self.removed

    @property
    def path(self) -> str:
        """The branches taken so far, e.g. ``"LGGL"``."""
        return "".join(s.branch for s in self.trajectory)

    def done(self) -> bool:
        """Whether the target is reached (or nothing more can be removed)."""
        return self._stuck or self.remaining <= 0 or self._smallest_unit() > self.remaining

    def invalidate(self) -> None:
        """Forget the statistics carried over from the last step (call after the weights change)."""
        self._scores = None

    def resume_from(self, trajectory: Sequence[dict[str, Any]]) -> None:
        """Continue a trajectory whose plans the model already carries (a run resumed from a checkpoint).

        Raises:
            ValueError: if the model's parameter count is not the one the trajectory ended with (its plans were not
                replayed, or another model was given).
        """
        if trajectory:
            current = self.adapter.total_params(self.hf_model)
            if int(trajectory[-1]["params_after"]) != current:
                raise ValueError(
                    f"The MoP trajectory ended at {int(trajectory[-1]['params_after']):,} parameters but the model has "
                    f"{current:,}: replay its plans first (CausalLMModule does so when it loads the checkpoint)"
                )
            self.params_start = int(trajectory[0]["params_before"])  # the budget is a fraction of the first model
            self.target_removed = round(self.target * self.params_start)
        self.trajectory = [MoPStep(**entry) for entry in trajectory]
        self._scores = None

    def branch_off(self, target: float) -> MoPSearch:
        """A search with another ``target`` on a deep copy of the current model, continuing this one's state.

        Running it gives exactly what a search started with ``target`` would have ended with, as long as that
        search would have made the same steps so far (see :meth:`full_step_fits`): used to read a whole frontier
        (10%, 20%, ...) off one run.
        """
        fork = copy.copy(self)
        fork.hf_model = copy.deepcopy(self.hf_model)
        fork.model = fork.hf_model
        fork.apply = lambda plan: apply_plan(fork.hf_model, plan)
        fork.trajectory = list(self.trajectory)
        fork.target = float(target)
        fork.target_removed = round(fork.target * self.params_start)
        fork._stuck = False
        return fork

    def full_step_fits(self, target: float) -> bool:
        """Whether a search with ``target`` would still take a full step (a whole block's worth) from here."""
        left = round(float(target) * self.params_start) - self.removed
        return max(self.adapter.block_params(self.hf_model)) <= left

    # --- one step ------------------------------------------------------------------------------------------------
    def step(self) -> MoPStep | None:
        """Build the candidates, score them, apply the better; returns the recorded step.

        Returns None (and :meth:`done` becomes true) when what is left of the budget is smaller than any candidate
        can remove.

        Raises:
            RuntimeError: if the target is already reached, or a decision string asks for an impossible branch.
        """
        if self.done():
            raise RuntimeError(f"MoP already reached its target ({self.removed:,} of {self.target_removed:,} removed)")
        start = time.perf_counter()
        scores = self._scores or self._fresh_scores()
        before = self.adapter.total_params(self.hf_model)
        depth_plan = self._depth_plan(scores)
        width_plan = self._width_plan(scores, depth_plan)
        if depth_plan is None and width_plan is None:
            log.debug("MoP stops: no candidate fits the remaining %s parameters", f"{self.remaining:,}")
            self._stuck = True
            return None

        forced = self._forced_branch(depth_plan, width_plan)
        values = {DEPTH: math.nan, WIDTH: math.nan}
        carried: dict[str, _Scores] = {}
        for branch, plan in ((DEPTH, depth_plan), (WIDTH, width_plan)):
            if plan is None or (forced is not None and branch != forced):
                continue
            values[branch], carried[branch] = self._evaluate(branch, plan, measure=forced is None)
        branch = forced or (DEPTH if values[DEPTH] <= values[WIDTH] else WIDTH)
        plan = depth_plan if branch == DEPTH else width_plan
        assert plan is not None
        self.apply(plan)
        self._scores = _carry(carried[branch], plan) if branch in carried else None
        record = MoPStep(
            step=len(self.trajectory),
            branch=branch,
            params_before=before,
            params_after=self.adapter.total_params(self.hf_model),
            proxy_depth=values[DEPTH],
            proxy_width=values[WIDTH],
            seconds=time.perf_counter() - start,
            plan=plan.to_dict(),
        )
        self.trajectory.append(record)
        if self.progress:
            log.info(
                "MoP step %d: %s (proxy depth %.4g, width %.4g); params %s -> %s; %.1f s",
                record.step,
                branch,
                values[DEPTH],
                values[WIDTH],
                f"{before:,}",
                f"{record.params_after:,}",
                record.seconds,
            )
        return record

    def run(self) -> list[MoPStep]:
        """Step until the target is reached; returns the whole trajectory."""
        while not self.done():
            self.step()
        return self.trajectory

    # --- candidates ----------------------------------------------------------------------------------------------
    def _depth_plan(self, scores: _Scores) -> PruningPlan | None:
        """Remove one block (None when a block is more than what is left, or only one block remains)."""
        num_blocks = self.adapter.num_blocks(self.hf_model)
        if num_blocks < 2:
            return None
        if self.depth_criterion == "position":
            index = max(num_blocks - 3, 0)
            values = torch.ones(num_blocks, dtype=torch.float64)
            values[index] = 0.0
        elif self.depth_criterion == "random":
            values = random_scores(num_blocks, self.seed + len(self.trajectory))
        else:
            assert scores.depth is not None
            values = scores.depth
        plan = make_depth_plan(self.hf_model, values, num_remove=1, method=f"mop:depth:{self.depth_criterion}")
        removed = (plan.params_before or 0) - (plan.params_after or 0)
        return plan if removed <= self.remaining else None

    def _width_plan(self, scores: _Scores, depth_plan: PruningPlan | None) -> PruningPlan | None:
        """The width candidate: ``width_criterion`` at a uniform ratio removing about one current block.

        On a last, partial step it removes exactly what is left.
        """
        if depth_plan is not None:  # the same size as the depth candidate
            amount = (depth_plan.params_before or 0) - (depth_plan.params_after or 0)
        else:
            amount = self.remaining
        width = scores.width
        if width is None:  # a data-free criterion: score the current weights
            width = self._width_scores(None, self.hf_model, self.seed + len(self.trajectory))
        try:
            return make_width_plan(
                self.hf_model,
                width,
                int(amount),
                gqa=self.gqa,  # type: ignore[arg-type]  # validated in __init__
                allocation="uniform",
                round_to=self.round_to,
                method=f"mop:width:{self.width_criterion}",
            )
        except ValueError as err:
            log.debug("MoP: no width candidate this step (%s)", err)
            return None

    def _forced_branch(self, depth_plan: PruningPlan | None, width_plan: PruningPlan | None) -> str | None:
        """The branch to take without comparing proxies: replayed, drawn at random, or the only one possible."""
        if self.decisions is not None:
            if len(self.trajectory) >= len(self.decisions):
                raise RuntimeError(f"The decision string {self.decisions!r} ended before the target was reached")
            wanted = self.decisions[len(self.trajectory)]
            if (depth_plan if wanted == DEPTH else width_plan) is None:
                raise RuntimeError(
                    f"Step {len(self.trajectory)} of {self.decisions!r} asks for {wanted!r}, impossible now"
                )
            return wanted
        if depth_plan is None or width_plan is None:
            return DEPTH if width_plan is None else WIDTH
        if len(set(self.branches)) == 1:
            return self.branches[0]
        if self.proxy == "random":  # one draw per step from (seed, step): the same on every rank and after a resume
            draw = torch.rand((), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + len(self.trajectory)))
            return DEPTH if float(draw) < 0.5 else WIDTH
        return None

    def _evaluate(self, branch: str, plan: PruningPlan, measure: bool) -> tuple[float, _Scores]:
        """The proxy of a candidate and the statistics of the model it would leave, in one pass (no copy).

        With ``measure=False`` only the statistics are collected (the decoder runs without the LM head).
        """
        model = self.hf_model
        losses = LossSums().to(model_device(model))
        named = isinstance(self.proxy, str) and self.proxy in ("ppl", "kl", "cosine")
        scored = measure and named
        value = math.nan
        with self._candidate(branch, plan):
            attach: dict[str, Attach] = {}
            depth_needs = self._depth_needs()
            if depth_needs:
                attach["depth"] = lambda hf, hooks, current: attach_depth_statistics(hf, depth_needs, hooks, current)
            width_needs = width_needs_for(self.width_criterion)
            if width_needs:
                attach["width"] = lambda hf, hooks, current: attach_width_statistics(hf, width_needs, hooks, current)
            batch_index = itertools.count()

            def score(hf: nn.Module, ids: Tensor, mask: Tensor | None, output: Any) -> None:
                i = next(batch_index)
                reference = self.reference[i] if self.reference else None
                losses.update(*proxy_loss(output, ids, mask, str(self.proxy), reference))

            collected: dict[str, Any] = {}
            if scored or attach:  # the decoder alone when only the statistics are needed
                output = proxy_output(str(self.proxy)) if scored else "hidden"
                collected = run_pass(model, self.batches, attach, on_batch=score if scored else None, output=output)
            if measure and callable(self.proxy):
                value = float(self.proxy(branch, model))
            width_scores = None  # inside: the weights of the candidate's blocks (e.g. AMP's down_proj norms)
            if "width" in collected:
                width_scores = self._width_scores(collected["width"].compute(), model, self.seed)
        if measure and named:
            value = float(losses.compute())
            if self.proxy == "ppl":
                value = math.exp(value) if math.isfinite(value) else value
        if measure and math.isnan(value):
            raise RuntimeError(
                f"The {self.proxy!r} proxy of the {branch} candidate is NaN; the model or data is broken"
            )
        depth_scores = None
        if "depth" in collected:
            depth_scores = scores_from_stats(collected["depth"].compute(), self.depth_criterion, seed=self.seed)
        return value, _Scores(depth_scores, width_scores)

    def _candidate(self, branch: str, plan: PruningPlan) -> _CandidateContext:
        return _CandidateContext(self, branch, plan)

    # --- statistics ----------------------------------------------------------------------------------------------
    def _depth_needs(self) -> set[str]:
        if self.depth_criterion in ("position", "random"):
            return set()
        return needs_for([self.depth_criterion])

    def _width_scores(self, stats: Any, model: nn.Module, seed: int) -> WidthScores:
        """``width_criterion``'s scores of ``model`` from reduced statistics (``stats`` None: a data-free one)."""
        inputs = ScoreInputs(stats=stats, model=model, seed=seed)
        scores: WidthScores = registry.compute("width", self.width_criterion, inputs)[self.width_criterion]
        return scores

    def _fresh_scores(self) -> _Scores:
        """Score the current model from scratch (first step, or after the weights changed)."""
        _, scores = self._evaluate(WIDTH, PruningPlan(num_layers=self.adapter.num_blocks(self.hf_model)), False)
        return scores

    def _smallest_unit(self) -> int:
        attn = self.adapter.attentions(self.hf_model)[0]
        mlp = self.adapter.mlps(self.hf_model)[0]
        return min(self.adapter.neuron_params(mlp) * self.round_to, self.adapter.head_params(attn))


class _CandidateContext:
    """Inside: the model computes what the candidate would (a block skipped, or units masked); hooks live here."""

    def __init__(self, search: MoPSearch, branch: str, plan: PruningPlan) -> None:
        self.search, self.branch, self.plan = search, branch, plan
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Hooks:
        model = self.search.hf_model
        with contextlib.ExitStack() as stack:
            stack.enter_context(evaluating(model, None))
            stack.enter_context(torch.no_grad())
            hooks = stack.enter_context(Hooks())
            if self.branch == DEPTH and self.plan.drop_layers:
                stack.enter_context(skipping_block(model, self.plan.drop_layers[0]))
            elif self.branch == WIDTH:
                register_width_masks(model, self.plan.keep_heads or {}, self.plan.keep_neurons or {}, hooks)
            self._stack = stack.pop_all()  # everything entered: hand the exits to __exit__
        return hooks

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def _carry(scores: _Scores, plan: PruningPlan) -> _Scores:
    """Scores collected on the masked/skipping model, re-indexed for the model after the plan is applied."""
    if plan.drop_layers or scores.width is None:  # sizes match the pruned model (the pass skipped the block)
        return scores
    heads = list(scores.width.heads)
    neurons = list(scores.width.neurons)
    for b, keep in (plan.keep_heads or {}).items():
        heads[b] = heads[b][list(keep)]
    for b, keep in (plan.keep_neurons or {}).items():
        neurons[b] = neurons[b][list(keep)]
    return _Scores(scores.depth, WidthScores(tuple(heads), tuple(neurons), scores.width.criterion))
