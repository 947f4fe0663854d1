"""Depth criteria: one score per transformer block, higher = more important (= removed last).

The scores are pure functions of the reduced sums in :mod:`lit_prune.stats` (formulas: METHODS.md §2):

* one pass over the calibration batches (:class:`~lit_prune.stats.DepthStats`): :func:`bi`, :func:`angular`,
  :func:`angular_block`, :func:`cka` (last-token or all-token features);
* one forward per candidate, prefix shared (:class:`~lit_prune.stats.GlobalStats`): :func:`cka_global`,
  :func:`cosine_global`, :func:`kl_global`;
* aggregation and controls: :func:`consensus` (Borda count), :func:`random_scores`, :func:`reversed_scores`.

:func:`scores_from_stats` scores statistics collected elsewhere; :func:`~lit_prune.criteria.scoring.score_blocks`
collects what a criterion needs in one pass, then scores. All scores are ``(L,)`` float64 tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lit_prune.criteria import registry
from lit_prune.criteria.depth_config import ONE_PASS, DepthConfig
from lit_prune.criteria.registry import ScoreInputs, register_criterion
from lit_prune.functional.similarity import cka_from_rows, cka_from_sums
from lit_prune.stats import CKASums, DepthStats, GlobalStats
from lit_prune.stats.depth import CKARows

log = logging.getLogger(__name__)


def _require(value: Tensor | CKASums | CKARows | None, need: str) -> None:
    """Raise when the statistics lack what a criterion needs."""
    if value is None:
        raise ValueError(f"The statistics have no {need!r} sums; collect them with `needs` including {need!r}")


def _mean(total: Tensor, count: Tensor, what: str) -> Tensor:
    """``total / count``, raising when nothing was counted."""
    if bool((count <= 0).any()):
        raise ValueError(f"No calibration {what} behind the statistics (count {count.tolist()})")
    return total / count


def bi(stats: DepthStats) -> Tensor:
    """Block Influence (ShortGPT): ``1 - mean cos(h_i, h_{i+1})`` over all non-pad tokens.

    Args:
        stats: reduced sums with ``bi``.

    Returns:
        ``(L,)`` float64; a block that changes its input little scores low.

    Raises:
        ValueError: if the statistics lack ``bi`` sums or saw no token.
    """
    _require(stats.bi_sum, "bi")
    assert stats.bi_sum is not None
    assert stats.bi_count is not None
    return 1.0 - _mean(stats.bi_sum.to(torch.float64), stats.bi_count.to(torch.float64), "tokens")


def _angular_distance(stats: DepthStats, n: int) -> Tensor:
    """``d(l, n) = mean_samples arccos(cos(h_l, h_{l+n})) / π`` for ``l = 0 .. L-n`` (last token)."""
    _require(stats.angular_sum, "angular")
    assert stats.angular_sum is not None
    assert stats.angular_count is not None
    start = torch.arange(stats.num_blocks - n + 1)
    total = stats.angular_sum[start, start + n].to(torch.float64)
    return _mean(total, stats.angular_count[start, start + n].to(torch.float64), "samples")


def angular(stats: DepthStats) -> Tensor:
    """Angular distance of each block's input and output at the last token: ``mean arccos(cos(h_i, h_{i+1}))/π``.

    Args:
        stats: reduced sums with ``angular``.

    Returns:
        ``(L,)`` float64 in ``[0, 1]``.

    Raises:
        ValueError: if the statistics lack ``angular`` sums or saw no sample.
    """
    return _angular_distance(stats, 1)


def angular_block(stats: DepthStats, n: int) -> Tensor:
    """Gromov et al.: scores that make the ``n`` lowest blocks the best contiguous window ``l* .. l*+n-1``.

    With ``d(l, n)`` the mean last-token angular distance between ``h_l`` and ``h_{l+n}`` and ``l* = argmin d``
    (the first on ties), the blocks of the best window score ``d(l*, n) - 1`` (< 0), and every other block scores
    the smallest ``d(l, n)`` over the windows that contain it (>= 0). So removing the ``n`` lowest-scoring blocks
    removes exactly the best window; outside it, a block sitting in a good window still ranks low. ``n = 1`` gives
    :func:`angular` except that the single best block is shifted down by 1.

    Args:
        stats: reduced sums with ``angular``.
        n: the window length, ``1 .. L``.

    Returns:
        ``(L,)`` float64.

    Raises:
        ValueError: if ``n`` is not an int in ``1 .. L``, or the statistics lack ``angular`` sums.
    """
    L = stats.num_blocks
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= L:
        raise ValueError(f"`n` must be an int in 1..{L} (the number of blocks), got {n!r}")
    distance = _angular_distance(stats, n)  # (L - n + 1,)
    best = int(distance.argmin())
    scores = torch.full((L,), float("inf"), dtype=torch.float64)
    for start, value in enumerate(distance.tolist()):
        window = slice(start, start + n)
        scores[window] = torch.minimum(scores[window], torch.tensor(value, dtype=torch.float64))
    scores[best : best + n] = distance[best] - 1.0
    return scores


def cka(stats: DepthStats, tokens: Literal["last", "all"] = "last") -> Tensor:
    """``1 - linear CKA(h_i, h_{i+1})`` of each block's input and output features.

    Args:
        stats: reduced statistics with ``cka_last`` (``tokens="last"``) or ``cka_all`` (``tokens="all"``), either
            ``d × d`` sums (:class:`~lit_prune.stats.CKASums`, :func:`~lit_prune.functional.similarity.cka_from_sums`)
            or kept rows (:class:`~lit_prune.stats.depth.CKARows`, the ``n × n`` form
            :func:`~lit_prune.functional.similarity.cka_from_rows`); both give the same CKA up to rounding.
        tokens: ``"last"``: the last non-pad token of each sample (separates blocks better on real models);
            ``"all"``: every non-pad token.

    Returns:
        ``(L,)`` float64 in ``[0, 1]``. Where a side's features are constant over the calibration rows, CKA is 1 if
        both are (score 0) and 0 otherwise (score 1).

    Raises:
        ValueError: if ``tokens`` is not "last" or "all", or the statistics lack the matching sums.
    """
    if tokens not in ("last", "all"):
        raise ValueError(f"`tokens` must be 'last' or 'all', got {tokens!r}")
    sums = stats.cka_last if tokens == "last" else stats.cka_all
    _require(sums, f"cka_{tokens}")
    assert sums is not None
    if isinstance(sums, CKARows):  # the n × n form: h_0 .. h_L rows kept
        if sums.rows.size(1) == 0:
            raise ValueError("No calibration rows behind the CKA rows (count 0)")
        similarity = cka_from_rows(sums.rows[:-1], sums.rows[1:])
    else:  # the d × d form: streamed sums
        similarity = cka_from_sums(
            sums.gram[:-1], sums.gram[1:], sums.cross, sums.colsum[:-1], sums.colsum[1:], sums.count
        )
    return 1.0 - similarity


def _global_part(gstats: GlobalStats, value: Tensor | None, metric: str) -> Tensor:
    """A per-candidate sum of ``gstats`` divided by the token count, raising when it was not collected."""
    if value is None:
        raise ValueError(f"The global statistics have no {metric!r} sums; collect them with metric {metric!r}")
    return _mean(value.to(torch.float64), gstats.tokens.to(torch.float64), "tokens")


def cka_global(gstats: GlobalStats) -> Tensor:
    """Pons et al.: ``1 - CKA(R, R_{-i})`` of the final representations (last token), original vs block skipped.

    Args:
        gstats: global sums with ``cka``.

    Returns:
        ``(L,)`` float64; high when skipping the block changes the output a lot.

    Raises:
        ValueError: if the sums lack ``cka``.
    """
    if gstats.cka is None:
        raise ValueError("The global statistics have no 'cka' sums; collect them with metric 'cka'")
    c = gstats.cka
    L = gstats.num_blocks
    similarity = cka_from_sums(
        c["reference_gram"].expand(L, -1, -1),
        c["gram"],
        c["cross"],
        c["reference_colsum"].expand(L, -1),
        c["colsum"],
        c["samples"].expand(L),
    )
    return 1.0 - similarity


def cosine_global(gstats: GlobalStats) -> Tensor:
    """``1 - mean cos(R, R_{-i})`` over non-pad tokens of the final representations.

    Args:
        gstats: global sums with ``cosine``.

    Returns:
        ``(L,)`` float64.

    Raises:
        ValueError: if the sums lack ``cosine`` or saw no token.
    """
    return 1.0 - _global_part(gstats, gstats.cosine_sum, "cosine")


def kl_global(gstats: GlobalStats) -> Tensor:
    """``mean KL(p ‖ p_{-i})`` over non-pad tokens of the next-token distributions (nats).

    Args:
        gstats: global sums with ``kl``.

    Returns:
        ``(L,)`` float64, >= 0 up to rounding.

    Raises:
        ValueError: if the sums lack ``kl`` or saw no token.
    """
    return _global_part(gstats, gstats.kl_sum, "kl")


def _average_ranks(values: Tensor) -> Tensor:
    """Ranks 1..L, lowest value first, ties sharing their average rank."""
    below = (values[None, :] < values[:, None]).sum(1)  # (L,)
    equal = (values[None, :] == values[:, None]).sum(1)  # (L,), includes itself
    return below.to(torch.float64) + (equal.to(torch.float64) + 1.0) / 2.0


def consensus(scores: Mapping[str, Tensor]) -> Tensor:
    """Borda count over several criteria: sum of per-criterion ranks (rank 1 = least important).

    Raw scores are never normalised: only each criterion's order counts, so a criterion with large values
    does not dominate. Tied blocks share their average rank.

    Args:
        scores: criterion name -> ``(L,)`` scores (higher = more important), at least one.

    Returns:
        ``(L,)`` float64 rank sums (higher = more important).

    Raises:
        ValueError: if ``scores`` is empty, the tensors are not 1-D of one length, or a score is NaN.

    Example:
        >>> import torch
        >>> consensus({"a": torch.tensor([0.1, 0.5, 0.3]), "b": torch.tensor([100.0, 900.0, 100.0])})
        tensor([2.5000, 6.0000, 3.5000], dtype=torch.float64)
    """
    if not scores:
        raise ValueError("`scores` must map at least one criterion name to its scores, got an empty mapping")
    shapes = {name: tuple(value.shape) for name, value in scores.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
        raise ValueError(f"Every score must be a 1-D tensor of the same length (one per block), got {shapes}")
    total = torch.zeros(next(iter(shapes.values())), dtype=torch.float64)
    for name, value in scores.items():
        if bool(torch.isnan(value).any()):
            raise ValueError(f"Scores of {name!r} contain NaN: {value.tolist()}")
        total += _average_ranks(value.detach().cpu().to(torch.float64))
    return total


def random_scores(num_blocks: int, seed: int) -> Tensor:
    """A seeded random order of the blocks (a control: any criterion should beat it).

    Args:
        num_blocks: ``L``.
        seed: the generator seed; the same seed gives the same scores.

    Returns:
        ``(L,)`` float64, a permutation of ``0 .. L-1``.

    Raises:
        ValueError: if ``num_blocks`` is not a positive int or ``seed`` not an int.
    """
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"`num_blocks` must be an int >= 1, got {num_blocks!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"`seed` must be an int, got {seed!r}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_blocks, generator=generator).to(torch.float64)


def reversed_scores(scores: Tensor) -> Tensor:
    """The opposite order of ``scores`` (a control: removes what the criterion deems most important).

    Args:
        scores: ``(L,)`` scores.

    Returns:
        ``-scores`` as float64.
    """
    return -scores.to(torch.float64)


register_criterion(
    "bi",
    "depth",
    bi,
    needs=("bi",),
    call=lambda i: bi(i.stats),
    description="Block Influence: 1 - mean cos(h_i, h_i+1)",
)
register_criterion(
    "angular",
    "depth",
    angular,
    needs=("angular",),
    call=lambda i: angular(i.stats),
    description="angular distance of a block's input and output at the last token",
)
register_criterion(
    "angular_block",
    "depth",
    angular_block,
    needs=("angular",),
    call=lambda i: angular_block(i.stats, i.n),
    description="Gromov et al.: the contiguous window of n blocks with the smallest angular distance",
)
register_criterion(
    "cka",
    "depth",
    cka,
    needs=("cka_last",),
    call=lambda i: cka(i.stats, "last"),
    description="1 - linear CKA of a block's input and output features, last token",
)
register_criterion(
    "cka_all",
    "depth",
    cka,
    needs=("cka_all",),
    call=lambda i: cka(i.stats, "all"),
    description="1 - linear CKA of a block's input and output features, all tokens",
)
register_criterion(
    "cka_global",
    "depth",
    cka_global,
    needs=("cka",),
    global_pass=True,
    call=lambda i: cka_global(i.global_stats),
    description="1 - CKA of the final representations with and without the block",
)
register_criterion(
    "cosine_global",
    "depth",
    cosine_global,
    needs=("cosine",),
    global_pass=True,
    call=lambda i: cosine_global(i.global_stats),
    description="1 - mean cos of the final representations with and without the block",
)
register_criterion(
    "kl_global",
    "depth",
    kl_global,
    needs=("kl",),
    global_pass=True,
    call=lambda i: kl_global(i.global_stats),
    description="mean KL of the next-token distributions with and without the block",
)
register_criterion(
    "consensus",
    "depth",
    consensus,
    of=ONE_PASS,
    many=True,
    call=lambda i: consensus({c: i.scores[c] for c in i.of}),
    description="Borda count over the ranks of `consensus_of`",
)
register_criterion(
    "random",
    "depth",
    random_scores,
    call=lambda i: random_scores(i.num_blocks, i.seed),
    description="a seeded random order (control)",
)
register_criterion(
    "reversed",
    "depth",
    reversed_scores,
    of=(DepthConfig.reversed_of,),
    of_composites=True,
    call=lambda i: reversed_scores(i.scores[i.of[0]]),
    description="the opposite order of `reversed_of` (control)",
)

DEPTH_CRITERIA = registry.names("depth")
"""Every name :func:`~lit_prune.criteria.scoring.score_blocks` accepts (read from the registry)."""

GLOBAL_CRITERIA = registry.names("depth", composite=False, global_pass=True)
"""Criteria that run the model once per candidate block (prefix shared)."""


def is_global(name: str) -> bool:
    """Whether criterion ``name`` runs the model once per candidate block (``*_global``).

    Args:
        name: a criterion name.

    Returns:
        True for ``cka_global``, ``cosine_global`` and ``kl_global``.
    """
    return name in GLOBAL_CRITERIA


def needs_for(
    criteria: Iterable[str],
    *,
    consensus_of: Sequence[str] = DepthConfig.consensus_of,
    reversed_of: str = DepthConfig.reversed_of,
) -> set[str]:
    """The :class:`~lit_prune.stats.DepthStatistics` needs of a set of criteria (global ones need none).

    Args:
        criteria: names from :data:`DEPTH_CRITERIA`.
        consensus_of: the members ``consensus`` expands to.
        reversed_of: the criterion ``reversed`` expands to.

    Returns:
        A subset of ``{"bi", "angular", "cka_last", "cka_all"}``.

    Raises:
        ValueError: if a name is unknown.

    Example:
        >>> sorted(needs_for(["consensus"]))
        ['angular', 'bi', 'cka_last']
    """
    return registry.needs("depth", criteria, {"consensus": consensus_of, "reversed": reversed_of})


def _config(config: DepthConfig | None, criterion: str | None, options: dict[str, Any]) -> DepthConfig:
    """``config`` (or the defaults) with ``criterion`` (when given) and ``options`` replaced."""
    given = {"criterion": criterion} if criterion is not None else {}
    return DepthConfig.build(config, **given, **options)


def scores_from_stats(
    stats: DepthStats,
    criterion: str | None = None,
    *,
    config: DepthConfig | None = None,
    n: int = 1,
    **options: Any,
) -> Tensor:
    """The scores of a criterion that needs no global pass, from statistics someone else collected.

    For callers that collect :class:`~lit_prune.stats.DepthStats` during another pass (MoP collects them while it
    evaluates a candidate). Use :func:`~lit_prune.criteria.scoring.score_blocks` to collect and score in one call.

    Args:
        stats: the reduced depth statistics.
        criterion: the config's ``criterion`` (None: keep the config's, by default ``bi``).
        config: the options (:class:`~lit_prune.criteria.depth_config.DepthConfig`); None: the defaults.
        n: the window length of ``angular_block``.
        **options: any other ``DepthConfig`` field (``consensus_of``, ``reversed_of``, ``seed``, ...).

    Raises:
        ValueError: if the criterion involves a global criterion (``*_global``) or an option is invalid.
        TypeError: for a keyword that is not a ``DepthConfig`` field.
    """
    cfg = _config(config, criterion, options)
    glob = [c for c in registry.components("depth", cfg.criterion, cfg.members) if is_global(c)]
    if glob:
        raise ValueError(f"Criterion {cfg.criterion!r} needs a global pass ({glob}); use score_blocks")
    inputs = ScoreInputs(stats=stats, num_blocks=stats.num_blocks, n=n, seed=cfg.seed)
    scores: Tensor = registry.compute("depth", cfg.criterion, inputs, cfg.members)[cfg.criterion]
    return scores.cpu()
