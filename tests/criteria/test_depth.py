"""Depth criteria: identity blocks rank last, Gromov windows, Borda consensus, controls, the dispatcher."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch import Tensor
from transformers import LlamaForCausalLM

from lit_prune.criteria import (
    DEPTH_CRITERIA,
    ONE_PASS,
    angular_block,
    bi,
    cka,
    cka_global,
    consensus,
    cosine_global,
    is_global,
    kl_global,
    needs_for,
    random_scores,
    reversed_scores,
    score_blocks,
)
from lit_prune.stats import CKASums, DepthStats, GlobalStats

IDENTITY = {2, 4}


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(num_hidden_layers=6)).eval()
    for i in IDENTITY:
        torch.nn.init.zeros_(model.model.layers[i].self_attn.o_proj.weight)
        torch.nn.init.zeros_(model.model.layers[i].mlp.down_proj.weight)
    return model


@pytest.fixture(scope="module")
def batches() -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = [{"input_ids": torch.randint(4, 256, (4, 12), generator=g)} for _ in range(2)]
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[0, 9:] = 0
    mask[1, :5] = 0
    out.append({"input_ids": torch.randint(4, 256, (4, 12), generator=g), "attention_mask": mask})
    return out


def lowest(scores: Tensor, k: int = 2) -> set[int]:
    return set(torch.argsort(scores, stable=True)[:k].tolist())


@pytest.mark.parametrize(
    "criterion", ["bi", "angular", "cka", "cka_all", "consensus", "cka_global", "cosine_global", "kl_global"]
)
def test_identity_blocks_rank_least_important(
    model: LlamaForCausalLM, batches: list[dict[str, Tensor]], criterion: str
) -> None:
    scores = score_blocks(model, batches, criterion, progress=False)[criterion]
    assert scores.shape == (6,)
    assert scores.dtype == torch.float64
    assert lowest(scores) == IDENTITY
    if is_global(criterion):  # skipping an identity changes nothing
        assert scores[sorted(IDENTITY)].abs().max() < 1e-6
        assert scores[[0, 1, 3, 5]].min() > 1e-4


def test_score_blocks_returns_components_and_controls(
    model: LlamaForCausalLM, batches: list[dict[str, Tensor]]
) -> None:
    scores = score_blocks(model, batches, "consensus", progress=False)
    assert sorted(scores) == ["angular", "bi", "cka", "consensus"]
    torch.testing.assert_close(scores["consensus"], consensus({k: scores[k] for k in ONE_PASS}))
    mixed = score_blocks(
        model, iter(batches), "consensus", consensus_of=("bi", "kl_global"), progress=False
    )  # a one-shot iterator feeds both passes
    assert sorted(mixed) == ["bi", "consensus", "kl_global"]
    torch.testing.assert_close(mixed["bi"], scores["bi"])
    rev = score_blocks(model, batches, "reversed", progress=False)
    torch.testing.assert_close(rev["reversed"], -scores["bi"])
    rev_cons = score_blocks(model, batches, "reversed", reversed_of="consensus", progress=False)
    torch.testing.assert_close(rev_cons["reversed"], -scores["consensus"])
    window = score_blocks(model, batches, "angular_block", n=2, progress=False)["angular_block"]
    assert window.shape == (6,)
    rand = score_blocks(model, batches, "random", seed=3, progress=False)
    assert list(rand) == ["random"]
    torch.testing.assert_close(rand["random"], random_scores(6, 3))
    with_random = score_blocks(model, batches, "consensus", consensus_of=("bi", "random"), seed=3, progress=False)
    assert sorted(with_random) == ["bi", "consensus", "random"]
    torch.testing.assert_close(with_random["consensus"], consensus({"bi": scores["bi"], "random": random_scores(6, 3)}))


def test_random_is_seeded_and_reversed_negates() -> None:
    a, b, c = random_scores(8, 0), random_scores(8, 0), random_scores(8, 1)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    assert sorted(a.tolist()) == list(range(8))
    base = torch.tensor([0.3, -1.0, 2.0])
    torch.testing.assert_close(reversed_scores(base), -base.double())


def _stats_with_angular(distance: Tensor) -> DepthStats:
    """DepthStats whose mean angular distance between h_i and h_j is ``distance[i, j]`` (2 samples)."""
    L = distance.size(0) - 1
    return DepthStats(L, 4, angular_sum=2 * distance.double(), angular_count=torch.full((L + 1, L + 1), 2.0))


@pytest.mark.parametrize("seed", range(4))
def test_angular_block_selects_the_argmin_window(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    L = 7
    distance = torch.rand(L + 1, L + 1, generator=g).triu(1)
    stats = _stats_with_angular(distance)
    for n in range(1, L + 1):
        windows = {start: float(distance[start, start + n]) for start in range(L - n + 1)}
        best = min(windows, key=lambda s: (windows[s], s))  # brute force, first on ties
        assert lowest(angular_block(stats, n), n) == set(range(best, best + n))


def test_angular_block_ties_take_the_first_window() -> None:
    distance = torch.zeros(5, 5)
    stats = _stats_with_angular(distance)
    assert lowest(angular_block(stats, 2), 2) == {0, 1}
    with pytest.raises(ValueError, match=r"`n` must be an int in 1..4 \(the number of blocks\), got 5"):
        angular_block(stats, 5)
    with pytest.raises(ValueError, match=r"`n` must be an int in 1..4 \(the number of blocks\), got 0"):
        angular_block(stats, 0)


def test_consensus_borda_counts_with_ties_and_raw_scores_not_normalised() -> None:
    scores = {
        "a": torch.tensor([0.1, 0.2, 0.3, 0.4]),  # ranks 1 2 3 4
        "b": torch.tensor([5.0, 5.0, 1.0, 9.0]),  # ranks 2.5 2.5 1 4
        "huge": torch.tensor([1e9, 1.0, 2.0, 3.0]),  # ranks 4 1 2 3
    }
    torch.testing.assert_close(consensus(scores), torch.tensor([7.5, 5.5, 6.0, 11.0], dtype=torch.float64))
    # scaling a metric changes nothing: only its order counts
    scaled = {**scores, "huge": scores["huge"] * 1e6}
    torch.testing.assert_close(consensus(scaled), consensus(scores))
    torch.testing.assert_close(consensus({"x": torch.ones(3)}), torch.full((3,), 2.0, dtype=torch.float64))


def test_cka_from_sums_degenerate_features() -> None:
    rows = torch.randn(6, 3, dtype=torch.float64)
    const = torch.ones(6, 3, dtype=torch.float64)

    def sums(x: Tensor, y: Tensor) -> CKASums:
        return CKASums(
            gram=torch.stack([x.T @ x, y.T @ y]),
            cross=(x.T @ y)[None],
            colsum=torch.stack([x.sum(0), y.sum(0)]),
            count=torch.tensor([6.0], dtype=torch.float64),
        )

    assert cka(DepthStats(1, 3, cka_last=sums(const, 2 * const))).tolist() == [0.0]  # both constant: CKA 1
    assert cka(DepthStats(1, 3, cka_last=sums(rows, const))).tolist() == [1.0]  # one constant: CKA 0
    assert cka(DepthStats(1, 3, cka_last=sums(rows, 3 * rows + 1))).item() == pytest.approx(0.0, abs=1e-12)


def test_needs_for_and_is_global() -> None:
    assert needs_for(["consensus"]) == {"bi", "angular", "cka_last"}
    assert needs_for("cka_all") == {"cka_all"}
    assert needs_for(["angular_block", "kl_global", "random"]) == {"angular"}
    assert needs_for(["reversed"], reversed_of="cka") == {"cka_last"}
    assert needs_for(["consensus"], consensus_of=("cka_global", "bi")) == {"bi"}
    assert [c for c in DEPTH_CRITERIA if is_global(c)] == ["cka_global", "cosine_global", "kl_global"]


def test_criteria_misconfiguration(model: LlamaForCausalLM, batches: list[dict[str, Tensor]]) -> None:
    with pytest.raises(ValueError, match=r"`criterion` must be one of \['bi', 'angular'.*'reversed'\], got 'ppl'"):
        score_blocks(model, batches, "ppl", progress=False)
    with pytest.raises(ValueError, match=r"`n` must be an int in 1..6 \(the number of blocks\), got 7"):
        score_blocks(model, batches, "angular_block", n=7, progress=False)
    with pytest.raises(ValueError, match=r"`consensus_of` must be one of \[.*'random'\], got 'consensus'"):
        score_blocks(model, batches, "consensus", consensus_of=("bi", "consensus"), progress=False)
    with pytest.raises(ValueError, match=r"`consensus_of` must be a non-empty list of \[.*\], got \(\)"):
        needs_for(["consensus"], consensus_of=())
    with pytest.raises(ValueError, match=r"`reversed_of` must be one of \[.*\], got 'reversed'"):
        needs_for(["reversed"], reversed_of="reversed")
    with pytest.raises(ValueError, match="`scores` must map at least one criterion name"):
        consensus({})
    with pytest.raises(ValueError, match=r"Every score must be a 1-D tensor of the same length .*'b': \(2,\)"):
        consensus({"a": torch.zeros(3), "b": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"Scores of 'a' contain NaN"):
        consensus({"a": torch.tensor([0.0, float("nan")])})
    with pytest.raises(ValueError, match="`num_blocks` must be an int >= 1, got 0"):
        random_scores(0, 1)
    with pytest.raises(ValueError, match="`seed` must be an int, got 1.5"):
        random_scores(3, 1.5)  # type: ignore[arg-type]
    empty = DepthStats(2, 4)
    with pytest.raises(ValueError, match="The statistics have no 'bi' sums; collect them with `needs` including 'bi'"):
        bi(empty)
    with pytest.raises(ValueError, match="no 'angular' sums"):
        angular_block(empty, 1)
    with pytest.raises(ValueError, match="no 'cka_all' sums"):
        cka(empty, "all")
    with pytest.raises(ValueError, match="`tokens` must be 'last' or 'all', got 'first'"):
        cka(empty, "first")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"No calibration tokens behind the statistics \(count \[0.0, 0.0\]\)"):
        bi(DepthStats(2, 4, bi_sum=torch.zeros(2), bi_count=torch.zeros(2)))
    zero = torch.zeros(2, 4, 4, dtype=torch.float64)
    unseen = CKASums(zero, zero[:1], torch.zeros(2, 4), torch.zeros(1))
    with pytest.raises(ValueError, match=r"No calibration rows behind the CKA sums"):
        cka(DepthStats(1, 4, cka_last=unseen))
    gempty = GlobalStats(2, 4, tokens=torch.tensor(5.0))
    with pytest.raises(ValueError, match="The global statistics have no 'cka' sums"):
        cka_global(gempty)
    with pytest.raises(ValueError, match="The global statistics have no 'cosine' sums"):
        cosine_global(gempty)
    with pytest.raises(ValueError, match="The global statistics have no 'kl' sums"):
        kl_global(gempty)
    with pytest.raises(AttributeError, match="DepthStats is read-only"):
        empty.bi_sum = torch.zeros(2)  # type: ignore[misc]
