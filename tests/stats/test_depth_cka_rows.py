"""The rows (n × n) form of the CKA depth statistic: same scores as the d × d sums, merges and syncs over ranks.

CKA-LoRA collects this statistic (need ``cka_last``) and scores it with the ``cka`` depth criterion.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import identity_model, spawn_ranks
from conftest import padded_batches as make_batches
from transformers import LlamaForCausalLM

from lit_prune.criteria import depth
from lit_prune.functional.similarity import cka_from_rows
from lit_prune.recovery import cka_importance
from lit_prune.stats import DepthStatistics, collect_depth_statistics
from lit_prune.stats.depth import CKARows

IDENTITY = (2, 4)
CKA_NEEDS = ("cka_last", "cka_all")


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return identity_model()


@pytest.mark.parametrize("tokens", ["last", "all"])
def test_rows_form_gives_the_scores_of_the_sums_form(model: LlamaForCausalLM, tokens: str) -> None:
    batches = make_batches()
    sums = collect_depth_statistics(model, batches, CKA_NEEDS, progress=False).compute()
    rows = collect_depth_statistics(model, batches, CKA_NEEDS, progress=False, cka_form="rows").compute()
    kept = rows.cka_last if tokens == "last" else rows.cka_all
    assert isinstance(kept, CKARows) and kept.rows.dtype == torch.float64
    n = 12 if tokens == "last" else 3 * 3 * 10 + 7 + 8 + 12
    assert tuple(kept.rows.shape) == (7, n, 64)  # (L+1, n, d)
    expected = depth.cka(sums, tokens)  # type: ignore[arg-type]
    got = depth.cka(rows, tokens)  # type: ignore[arg-type]
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert got[list(IDENTITY)].abs().max() < 1e-9 < got[[0, 1, 3, 5]].min()


def test_rows_form_states_merge_and_an_interrupted_batch_is_dropped(model: LlamaForCausalLM) -> None:
    batches = make_batches(5)
    # torchmetrics' merge_state puts the incoming rows first (CKA does not depend on the order of the rows)
    full = collect_depth_statistics(
        model, batches[3:] + batches[:3], ["cka_last"], progress=False, cka_form="rows"
    ).compute()
    rank0 = collect_depth_statistics(model, batches[:3], ["cka_last"], progress=False, cka_form="rows")
    rank0.merge_state(collect_depth_statistics(model, batches[3:], ["cka_last"], progress=False, cka_form="rows"))
    merged = rank0.compute()
    assert isinstance(merged.cka_last, CKARows) and isinstance(full.cka_last, CKARows)
    torch.testing.assert_close(merged.cka_last.rows, full.cka_last.rows, rtol=0, atol=0)

    metric = DepthStatistics(3, 4, ["cka_last"], cka_form="rows")
    x = torch.randn(2, 5, 4)
    metric.update(0, x, x + 1)
    metric.update(1, x + 1, x + 2)  # interrupted before block 2: its rows never reach the state
    for i in range(3):
        metric.update(i, x + i, x + i + 1)
    stats = metric.compute()
    assert isinstance(stats.cka_last, CKARows)
    expected = torch.stack([x[:, -1] + i for i in range(4)]).double()  # (L+1, B, d) at the last token
    torch.testing.assert_close(stats.cka_last.rows, expected, rtol=0, atol=0)
    metric.reset()
    assert metric.cka_last_rows == [] and metric._cka_rows == {"last": [], "all": []}


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric DepthStatistics was called before")
def test_rows_form_allocates_only_a_list_state_and_validates() -> None:
    metric = DepthStatistics(3, 8, ["cka_last", "bi"], cka_form="rows")
    assert sorted(metric._defaults) == ["bi_count", "bi_sum", "cka_last_rows"]
    assert DepthStatistics(3, 8, ["cka_last"]).cka_form == "sums"  # the default: depth pruning is unchanged
    with pytest.raises(ValueError, match=r"`cka_form` must be one of \['sums', 'rows'\], got 'nxn'"):
        DepthStatistics(3, 8, ["cka_last"], cka_form="nxn")  # type: ignore[arg-type]
    empty = DepthStatistics(3, 8, ["cka_last"], cka_form="rows").compute()
    assert isinstance(empty.cka_last, CKARows) and tuple(empty.cka_last.rows.shape) == (4, 0, 8)
    with pytest.raises(ValueError, match=r"No calibration rows behind the CKA rows \(count 0\)"):
        depth.cka(empty)


def test_cka_importance_is_the_cka_criterion_in_either_form(model: LlamaForCausalLM) -> None:
    """CKA-LoRA's n < d (rows) and n >= d (sums) choices agree with the depth criterion's rows formula."""
    g = torch.Generator().manual_seed(5)
    batches = [{"input_ids": torch.randint(4, 256, (10, 6), generator=g)} for _ in range(8)]  # 80 rows, d = 64
    for n in (40, 80):  # rows form, then sums form
        importance = cka_importance(model, batches, n_samples=n)
        stats = collect_depth_statistics(model, batches[: n // 10], ["cka_last"], progress=False, cka_form="rows")
        kept = stats.compute().cka_last
        assert isinstance(kept, CKARows) and kept.rows.size(1) == n
        torch.testing.assert_close(importance, 1 - cka_from_rows(kept.rows[:-1], kept.rows[1:]), rtol=1e-9, atol=1e-12)
        assert importance[list(IDENTITY)].abs().max() < 1e-9
    with pytest.raises(ValueError, match="CKA layer importance needs at least 2 samples, got 1"):
        cka_importance(model, batches, n_samples=1)


def _ddp_worker(rank: int, world_size: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = identity_model()
        halves = (make_batches(2, seed=1), make_batches(1, seed=2))  # ranks see different batches
        stats = collect_depth_statistics(model, halves[rank], CKA_NEEDS, progress=False, cka_form="rows").compute()
        assert isinstance(stats.cka_last, CKARows) and isinstance(stats.cka_all, CKARows)
        torch.save(
            {"rows": stats.cka_last.rows, "cka": depth.cka(stats), "cka_all": depth.cka(stats, "all")}, f"{out}.{rank}"
        )
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_concatenate_their_rows_in_rank_order(tmp_path: Path) -> None:
    """Real gloo ranks: the rows state is gathered (``dist_reduce_fx="cat"``), so both ranks score every row."""
    out = str(tmp_path / "rows")
    spawn_ranks(_ddp_worker, out)
    ranks = [torch.load(f"{out}.{r}") for r in (0, 1)]
    model = identity_model()
    one = collect_depth_statistics(
        model, make_batches(2, seed=1) + make_batches(1, seed=2), CKA_NEEDS, progress=False, cka_form="rows"
    ).compute()
    assert isinstance(one.cka_last, CKARows)
    assert tuple(ranks[0]["rows"].shape) == tuple(one.cka_last.rows.shape) == (7, 9 + 6, 64)
    # the ranks run 1 thread, this process the default: BLAS may differ by float32 rounding of the activations
    torch.testing.assert_close(ranks[0]["rows"], one.cka_last.rows, rtol=1e-5, atol=1e-5)
    for name, value in (("cka", depth.cka(one)), ("cka_all", depth.cka(one, "all"))):
        torch.testing.assert_close(ranks[0][name], value, atol=1e-5, rtol=0)
        torch.testing.assert_close(ranks[1][name], ranks[0][name], atol=0, rtol=0)
