"""Depth and global statistics: streaming sums equal direct computations, hooks always come off, DDP-style merge."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import identity_model, spawn_ranks, tiny_config
from conftest import padded_batches as make_batches
from torch import Tensor
from transformers import LlamaForCausalLM, LlamaModel

from lit_prune.criteria import depth
from lit_prune.stats import (
    DepthStatistics,
    GlobalStatistics,
    Hooks,
    collect_depth_statistics,
    collect_global_statistics,
)

ALL_NEEDS = ("bi", "angular", "cka_last", "cka_all")
IDENTITY = (2, 4)


def capture(model: LlamaForCausalLM, batches: list[dict[str, Tensor]]) -> list[tuple[list[Tensor], Tensor]]:
    """Reference: per batch, the boundaries h_0..h_L (B, T, d) float64 from plain hooks, and the token mask."""
    out = []
    for batch in batches:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask", torch.ones_like(ids))
        seen: list[Tensor] = []
        handles = [b.register_forward_hook(lambda m, a, o: seen.append(o.double())) for b in model.model.layers]
        first = model.model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].double()))
        try:
            with torch.no_grad():
                model.model(input_ids=ids, attention_mask=batch.get("attention_mask"))
        finally:
            for h in [*handles, first]:
                h.remove()
        out.append((seen, mask.bool()))
    return out


def last_rows(boundary: Tensor, mask: Tensor) -> Tensor:
    positions = torch.tensor([int(row.nonzero().max()) for row in mask])
    return boundary[torch.arange(boundary.size(0)), positions]  # (B, d)


def direct_cka(x: Tensor, y: Tensor) -> float:
    x, y = x - x.mean(0), y - y.mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return identity_model()


@pytest.fixture(scope="module")
def batches() -> list[dict[str, Tensor]]:
    return make_batches()


@pytest.fixture(scope="module")
def stats(model: LlamaForCausalLM, batches: list[dict[str, Tensor]]) -> depth.DepthStats:
    return collect_depth_statistics(model, batches, ALL_NEEDS, progress=False).compute()


def test_bi_and_angular_equal_direct_computation(
    model: LlamaForCausalLM, batches: list[dict[str, Tensor]], stats: depth.DepthStats
) -> None:
    ref = capture(model, batches)
    L = len(model.model.layers)
    bi_ref = torch.stack(
        [torch.cat([torch.cosine_similarity(h[i], h[i + 1], dim=-1)[m] for h, m in ref]).mean() for i in range(L)]
    )
    torch.testing.assert_close(depth.bi(stats), 1 - bi_ref, atol=1e-6, rtol=0)
    rows = [torch.stack([last_rows(b, m) for b in h]) for h, m in ref]  # per batch (L+1, B, d)
    last = torch.cat(rows, dim=1)  # (L+1, N, d)
    for n in range(1, L + 1):
        dist = torch.stack(
            [
                (torch.arccos(torch.cosine_similarity(last[i], last[i + n], dim=-1).clamp(-1, 1)) / math.pi).mean()
                for i in range(L - n + 1)
            ]
        )
        torch.testing.assert_close(depth._angular_distance(stats, n), dist, atol=1e-6, rtol=0)
    torch.testing.assert_close(depth.angular(stats), depth._angular_distance(stats, 1))
    assert stats.bi_count is not None
    assert stats.bi_count.tolist() == [3 * 3 * 10 + 7 + 8 + 12] * L


@pytest.mark.parametrize("tokens", ["last", "all"])
def test_streaming_cka_equals_direct_cka(
    model: LlamaForCausalLM, batches: list[dict[str, Tensor]], stats: depth.DepthStats, tokens: str
) -> None:
    ref = capture(model, batches)
    L = len(model.model.layers)
    if tokens == "last":
        feats = torch.cat([torch.stack([last_rows(b, m) for b in h]) for h, m in ref], dim=1)  # (L+1, N, d)
    else:
        feats = torch.cat([torch.stack([b[m] for b in h]) for h, m in ref], dim=1)  # (L+1, tokens, d)
    expected = torch.tensor([1 - direct_cka(feats[i], feats[i + 1]) for i in range(L)], dtype=torch.float64)
    torch.testing.assert_close(depth.cka(stats, tokens), expected, atol=1e-6, rtol=0)  # type: ignore[arg-type]


def test_statistics_are_float64_and_memory_independent_of_calibration_size(model: LlamaForCausalLM) -> None:
    def state_bytes(n: int) -> int:
        metric = collect_depth_statistics(model, make_batches(n), ALL_NEEDS, progress=False)
        states = [getattr(metric, name) for name in metric._defaults]
        assert all(s.dtype == torch.float64 for s in states)
        return sum(s.numel() * s.element_size() for s in states)

    assert state_bytes(1) == state_bytes(7)  # 2 vs 8 batches


def test_only_needed_states_are_allocated() -> None:
    metric = DepthStatistics(3, 8, ["bi"])
    assert sorted(metric._defaults) == ["bi_count", "bi_sum"]
    metric = DepthStatistics(3, 8, "cka_last")
    assert sorted(metric._defaults) == ["cka_last_colsum", "cka_last_count", "cka_last_cross", "cka_last_gram"]
    assert tuple(metric.cka_last_gram.shape) == (4, 8, 8)
    assert tuple(metric.cka_last_cross.shape) == (3, 8, 8)
    assert DepthStatistics(1, 4, ["bi"]).sync_on_compute  # compute() sums over ranks under DDP


def test_ddp_style_merge_equals_one_metric_over_all_batches(model: LlamaForCausalLM) -> None:
    all_batches = make_batches(5)
    full = collect_depth_statistics(model, all_batches, ALL_NEEDS, progress=False).compute()
    rank0 = collect_depth_statistics(model, all_batches[:3], ALL_NEEDS, progress=False)
    rank1 = collect_depth_statistics(model, all_batches[3:], ALL_NEEDS, progress=False)
    rank0.merge_state(rank1)
    merged = rank0.compute()
    for name in ("bi_sum", "bi_count", "angular_sum", "angular_count"):
        torch.testing.assert_close(getattr(merged, name), getattr(full, name), atol=1e-12, rtol=1e-12)
    for kind in ("cka_last", "cka_all"):
        for part in ("gram", "cross", "colsum", "count"):
            torch.testing.assert_close(
                getattr(getattr(merged, kind), part), getattr(getattr(full, kind), part), atol=1e-12, rtol=1e-12
            )
    g_full = collect_global_statistics(model, all_batches, progress=False).compute()
    g0 = collect_global_statistics(model, all_batches[:2], progress=False)
    g0.merge_state(collect_global_statistics(model, all_batches[2:], progress=False))
    merged_global = g0.compute()
    for criterion in (depth.kl_global, depth.cosine_global, depth.cka_global):
        torch.testing.assert_close(criterion(merged_global), criterion(g_full), atol=1e-10, rtol=1e-10)


def test_max_batches_and_plain_tensors(model: LlamaForCausalLM) -> None:
    ids = [b["input_ids"] for b in make_batches(4)[:4]]
    two = collect_depth_statistics(model, iter(ids), ["bi"], max_batches=2, progress=False).compute()
    assert two.bi_count is not None
    assert two.bi_count.tolist() == [60.0] * 6
    single = collect_depth_statistics(model, ids[0], ["bi"], progress=False).compute()  # one 2-D tensor = one batch
    assert single.bi_count is not None
    assert single.bi_count.tolist() == [30.0] * 6


def test_one_block_model_keeps_vector_shapes() -> None:
    torch.manual_seed(0)
    one = LlamaForCausalLM(tiny_config(num_hidden_layers=1)).eval()
    stats = collect_depth_statistics(one, make_batches(1), ALL_NEEDS, progress=False).compute()
    for score in (depth.bi(stats), depth.angular(stats), depth.cka(stats), depth.cka(stats, "all")):
        assert score.shape == (1,)
    gstats = collect_global_statistics(one, make_batches(1), progress=False).compute()
    assert depth.kl_global(gstats).shape == (1,)


def _without_block(model: LlamaForCausalLM, index: int) -> LlamaForCausalLM:
    pruned = copy.deepcopy(model)
    del pruned.model.layers[index]
    pruned.config.num_hidden_layers -= 1
    for i, layer in enumerate(pruned.model.layers):
        layer.self_attn.layer_idx = i
    return pruned


def test_global_statistics_equal_brute_force_block_removal() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()
    batches = make_batches(2)
    gstats = collect_global_statistics(model, batches, progress=False).compute()
    cos_ref, kl_ref, cka_ref = [], [], []
    with torch.no_grad():
        refs = [model.model(**b).last_hidden_state for b in batches]
        for i in range(len(model.model.layers)):
            pruned = _without_block(model, i)
            cos, kl, x_rows, y_rows = [], [], [], []
            for batch, ref in zip(batches, refs):
                mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
                out = pruned.model(**batch).last_hidden_state
                cos.append(torch.cosine_similarity(ref.double(), out.double(), dim=-1)[mask])
                p = torch.log_softmax(model.lm_head(ref).double(), -1)
                q = torch.log_softmax(pruned.lm_head(out).double(), -1)
                kl.append((p.exp() * (p - q)).sum(-1)[mask])
                x_rows.append(last_rows(ref.double(), mask))
                y_rows.append(last_rows(out.double(), mask))
            cos_ref.append(1 - torch.cat(cos).mean())
            kl_ref.append(torch.cat(kl).mean())
            cka_ref.append(1 - direct_cka(torch.cat(x_rows), torch.cat(y_rows)))
    torch.testing.assert_close(depth.cosine_global(gstats), torch.stack(cos_ref), atol=1e-5, rtol=0)
    torch.testing.assert_close(depth.kl_global(gstats), torch.stack(kl_ref), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(depth.cka_global(gstats), torch.tensor(cka_ref, dtype=torch.float64), atol=1e-5, rtol=0)


def _fail(module: torch.nn.Module, args: object) -> None:
    raise RuntimeError("boom in block 1")


@pytest.mark.parametrize("collect", [collect_depth_statistics, collect_global_statistics])
def test_hooks_are_removed_after_success_and_after_an_error(collect: object) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).train()
    blocks = model.model.layers
    needs = ["bi", "angular", "cka_last"] if collect is collect_depth_statistics else ["kl"]
    collect(model, make_batches(1), needs, progress=False)  # type: ignore[operator]
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in blocks)
    assert all(m.training for m in model.modules())
    failing = blocks[1].mlp.register_forward_pre_hook(_fail)
    try:
        with pytest.raises(RuntimeError, match="boom in block 1"):
            collect(model, make_batches(1), needs, progress=False)  # type: ignore[operator]
    finally:
        failing.remove()
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in blocks)
    assert all(m.training for m in model.modules())


def test_hooks_class_removes_on_error() -> None:
    layer = torch.nn.Linear(2, 2)
    registered: list[int] = []

    def fail_inside() -> None:
        with Hooks() as hooks:
            hooks.forward(layer, lambda *a: None)
            hooks.forward_pre(layer, lambda *a: None)
            registered.extend([len(layer._forward_hooks), len(layer._forward_pre_hooks)])
            raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        fail_inside()
    assert registered == [1, 1]
    assert not layer._forward_hooks
    assert not layer._forward_pre_hooks


def test_an_interrupted_batch_does_not_block_the_next() -> None:
    metric = DepthStatistics(3, 4, ["angular", "bi"])
    x = torch.randn(2, 5, 4)
    metric.update(0, x, x + 1)
    metric.update(1, x + 1, x + 2)  # batch interrupted before block 2
    for i in range(3):
        metric.update(i, x + i, x + i + 1)
    assert metric.angular_count[0, 3] == 2  # the complete batch reached boundary 3
    assert metric.angular_count[0, 1] == 4
    metric.reset()
    assert metric._next_block == 0
    assert metric.angular_count.sum() == 0


def test_statistics_misconfiguration(model: LlamaForCausalLM) -> None:
    with pytest.raises(ValueError, match=r"`needs` must be a non-empty subset of .*got \['cka', 'foo'\]"):
        DepthStatistics(2, 4, ["cka", "foo"])
    with pytest.raises(ValueError, match=r"`needs` must be a non-empty subset"):
        DepthStatistics(2, 4, [])
    with pytest.raises(ValueError, match="`num_blocks` must be an int >= 1, got 0"):
        DepthStatistics(0, 4, ["bi"])
    with pytest.raises(ValueError, match="`hidden_size` must be an int >= 1, got 2.5"):
        GlobalStatistics(2, 2.5, ["kl"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`metrics` must be a non-empty subset of \['cka', 'cosine', 'kl'\]"):
        GlobalStatistics(2, 4, ["ppl"])
    metric = DepthStatistics(3, 4, ["bi"])
    x = torch.randn(2, 5, 4)
    with pytest.raises(
        ValueError, match="`block` must be updated in order 0..2 within a batch: expected 0 or 0, got 1"
    ):
        metric.update(1, x, x)
    with pytest.raises(ValueError, match=r"`x_in` and `x_out` must both be \(batch, seq_len, hidden_size=4\)"):
        metric.update(0, x, torch.randn(2, 4, 4))
    with pytest.raises(
        ValueError, match=r"`attention_mask` must have shape \(batch, seq_len\) = \(2, 5\), got \(2, 4\)"
    ):
        metric.update(0, x, x, torch.ones(2, 4))
    gmetric = GlobalStatistics(3, 4, ["cosine", "cka"])
    with pytest.raises(ValueError, match=r"`cosine_sum` must be a \(3,\) tensor for metric 'cosine', got None"):
        gmetric.update(10)
    with pytest.raises(ValueError, match=r"`reference_last` \(B, 4\) and `candidate_last` \(3, B, 4\) are needed"):
        gmetric.update(10, cosine_sum=torch.zeros(3))
    with pytest.raises(ValueError, match=r"`candidate_last` must be \(3, 2, 4\), got \(2, 2, 4\)"):
        gmetric.update(
            10, cosine_sum=torch.zeros(3), reference_last=torch.zeros(2, 4), candidate_last=torch.zeros(2, 2, 4)
        )


def test_collect_misconfiguration(model: LlamaForCausalLM) -> None:
    with pytest.raises(ValueError, match="`max_batches` must be an int >= 1 or None, got 0"):
        collect_depth_statistics(model, make_batches(1), ["bi"], max_batches=0, progress=False)
    with pytest.raises(ValueError, match="`batches` is empty"):
        collect_depth_statistics(model, [], ["bi"], progress=False)
    with pytest.raises(ValueError, match="`batches` is empty"):
        collect_global_statistics(model, [], ["kl"], progress=False)
    with pytest.raises(
        TypeError, match=r"Each batch must be a LongTensor \(B, T\) or a dict with `input_ids`, got \['x'\]"
    ):
        collect_depth_statistics(model, [{"x": torch.zeros(1, 2)}], ["bi"], progress=False)
    with pytest.raises(
        ValueError, match=r"`input_ids` must be a 2-D integer tensor .*got shape \(2, 3\) and dtype torch.float32"
    ):
        collect_depth_statistics(model, [torch.zeros(2, 3)], ["bi"], progress=False)
    bad_mask = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 4)}
    with pytest.raises(ValueError, match=r"`attention_mask` must have the shape of `input_ids` \(2, 3\), got \(2, 4\)"):
        collect_depth_statistics(model, [bad_mask], ["bi"], progress=False)
    torch.manual_seed(0)
    bare = LlamaModel(tiny_config())
    with pytest.raises(ValueError, match="metric 'kl' needs an LM head, but LlamaModel has none"):
        collect_global_statistics(bare, make_batches(1), ["kl"], progress=False)
    assert collect_global_statistics(bare, make_batches(1), ["cosine"], progress=False).compute().kl_sum is None


def _ddp_worker(rank: int, world_size: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = identity_model()
        halves = (make_batches(2, seed=1), make_batches(1, seed=2))  # ranks see different batches
        stats = collect_depth_statistics(model, halves[rank], ALL_NEEDS, progress=False).compute()
        gstats = collect_global_statistics(model, halves[rank], progress=False).compute()
        scores = {"bi": depth.bi(stats), "angular": depth.angular(stats), "cka": depth.cka(stats)}
        scores |= {"cka_all": depth.cka(stats, "all"), "kl_global": depth.kl_global(gstats)}
        scores["cka_global"] = depth.cka_global(gstats)
        torch.save(scores, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_with_different_batches_reduce_to_the_same_statistics(tmp_path: Path) -> None:
    """Real gloo ranks: compute() sums the states over ranks (torchmetrics sync_on_compute), so scores agree."""
    out = str(tmp_path / "scores")
    spawn_ranks(_ddp_worker, out)
    ranks = [torch.load(f"{out}.{r}") for r in (0, 1)]
    model = identity_model()
    all_batches = make_batches(2, seed=1) + make_batches(1, seed=2)
    stats = collect_depth_statistics(model, all_batches, ALL_NEEDS, progress=False).compute()
    gstats = collect_global_statistics(model, all_batches, progress=False).compute()
    expected = {"bi": depth.bi(stats), "angular": depth.angular(stats), "cka": depth.cka(stats)}
    expected |= {"cka_all": depth.cka(stats, "all"), "kl_global": depth.kl_global(gstats)}
    expected["cka_global"] = depth.cka_global(gstats)
    for name, value in expected.items():
        # the ranks run 1 thread, this process the default: BLAS results may differ by float32 rounding (~1e-7 of
        # the activations), which moves these O(0.1-1) scores by ~1e-7; a rank's missing sums move them by >1e-3
        torch.testing.assert_close(ranks[0][name], value, atol=1e-5, rtol=0)
        torch.testing.assert_close(ranks[1][name], ranks[0][name], atol=0, rtol=0)
