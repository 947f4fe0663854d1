"""Calibration engine: the per-Linear metric, one-shot vs sequential (pruned-inputs) protocol, padding, hooks, DDP."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import spawn_ranks, tiny_config
from torch import nn
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lit_prune.sparse import (
    LinearInputStatistics,
    LinearStats,
    attach_linear_statistics,
    attach_masks,
    masks_of,
    one_shot_stats,
    prunable_linears,
    prune_sparse,
    sequential_prune,
)
from lit_prune.stats import Hooks

ALL = ("input_sq", "hessian", "last_token")


def make_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config()).eval()


def make_batches(n: int = 3, seed: int = 0, padded: bool = True) -> list[dict[str, torch.Tensor]]:
    """Batches of 2 × 10 tokens; with ``padded`` the second row of every other batch is right-padded."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(4, 256, (2, 10), generator=g)
        mask = torch.ones_like(ids)
        if padded and i % 2 == 0:
            mask[1, 6:] = 0
            ids[1, 6:] = 3
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def sequential_stats(model, batches, needs=ALL, prune=None) -> dict[str, LinearStats]:
    seen: dict[str, LinearStats] = {}

    def prune_block(b: int, stats: dict[str, LinearStats]) -> None:
        seen.update(stats)
        if prune is not None:
            prune(b, stats)

    sequential_prune(model, batches, needs, prune_block)
    return seen


FORWARD_RTOL = 5e-5
"""Relative error of a Linear's float32 inputs when the same tokens go through a differently shaped or threaded
forward (padding, another rank's thread count): the GEMMs and the attention are blocked differently. Each
activation is a chain of float32 dot products of length K <= 96 (error <= K · 2⁻²⁴ ≈ 6e-6 of Σ|terms| each). Seen
(as ``2r`` on Σx²): <= 1.0e-5, i.e. r ≈ 5e-6, on down_proj inputs over AVX512/AVX2/default ATen kernels, MKL AVX2 and
MKL_CBWR=COMPATIBLE, 1 or 2 threads. A leaked pad token moves the sums by ~1e-1."""


def assert_stats_close(a: LinearStats, b: LinearStats, input_rtol: float = 0.0) -> None:
    """Same count, and sums within what inputs off by ``input_rtol`` (relative, per feature over the tokens) allow.

    If ``‖x'_j - x_j‖ <= r ‖x_j‖`` for every feature column ``j``: ``|Σx'_j² - Σx_j²| <= (2r + r²) Σx_j²`` and, by
    Cauchy-Schwarz, ``|Σx'_i x'_j - Σx_i x_j| <= (2r + r²) sqrt(H_ii H_jj)``; the float64 accumulation adds < 1e-12
    of that scale. ``input_rtol = 0``: bit-identical inputs (same batches, shapes and ops), only float64 rounding.
    """
    assert a.count == b.count
    bound = 2 * input_rtol + input_rtol**2 + 1e-12
    for field in ("input_sq", "hessian_sum", "last_inputs"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is None:
            continue
        if field == "hessian_sum":  # compare (H' - H) / sqrt(H_ii H_jj) with the bound
            scale = torch.outer(y.diagonal(), y.diagonal()).sqrt().clamp_min(1e-300)
            torch.testing.assert_close((x - y) / scale, torch.zeros_like(y), rtol=0, atol=bound, msg=field)
        elif field == "input_sq":
            torch.testing.assert_close(x, y, rtol=bound, atol=0, msg=field)
        else:  # float32 activations: the error is relative to the row scale, not to each (possibly tiny) entry
            atol = input_rtol * float(y.abs().max()) if y.numel() else 0.0
            torch.testing.assert_close(x, y, rtol=input_rtol, atol=atol, msg=field)


def test_one_shot_matches_a_hand_computed_reference() -> None:
    model = make_model()
    batches = make_batches(1, padded=True)
    stats = one_shot_stats(model, batches, ALL)
    assert list(stats) == list(prunable_linears(model))
    ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"].bool()
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))  # (B, T, d)
    tokens = x[mask].double()
    q = stats["model.layers.0.self_attn.q_proj"]
    assert q.count == int(mask.sum()) == 16
    # the same float32 inputs, cast to float64 before any product: only float64 summation order differs
    # (<= 16 tokens · 2⁻⁵³ ≈ 2e-15 of Σ|x_i x_j| <= ~20); float32 partial sums would be off by ~1e-6 and fail
    torch.testing.assert_close(q.input_sq, tokens.square().sum(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q.hessian_sum, tokens.T @ tokens, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q.last_inputs, torch.stack([x[0, 9], x[1, 5]]))
    torch.testing.assert_close(q.input_norm(), tokens.square().sum(0).sqrt())
    assert stats["model.layers.0.mlp.down_proj"].input_sq.shape == (96,)
    assert all(s.hessian_sum is None for s in one_shot_stats(model, batches, {"input_sq"}).values())


def test_sequential_without_pruning_equals_one_shot() -> None:
    model = make_model()
    batches = make_batches(3)
    expected = one_shot_stats(model, batches, ALL)
    got = sequential_stats(model, batches)
    assert list(got) == list(expected)
    for name in expected:
        assert_stats_close(got[name], expected[name])  # same batches, shapes and ops: bit-identical inputs


def test_sequential_calibrates_each_block_on_the_pruned_outputs() -> None:
    model = make_model()
    dense = copy.deepcopy(model)
    batches = make_batches(2)

    def zero_half_of_block0(b: int, stats: dict[str, LinearStats]) -> None:
        for name in stats if b == 0 else ():
            prunable_linears(model)[name].weight.data[:, ::2] = 0

    got = sequential_stats(model, batches, prune=zero_half_of_block0)
    dense_stats = one_shot_stats(dense, batches, ALL)
    pruned_stats = one_shot_stats(model, batches, ALL)  # block 0 is pruned now, the others are not
    assert (model.model.layers[0].self_attn.q_proj.weight[:, ::2] == 0).all()
    block0, block1 = "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"
    assert_stats_close(got[block0], dense_stats[block0])  # collected before pruning
    assert not torch.allclose(got[block1].input_sq, dense_stats[block1].input_sq)
    for name in pruned_stats:
        if not name.startswith("model.layers.0."):
            assert_stats_close(got[name], pruned_stats[name])  # same batches, shapes and weights


def test_pad_tokens_are_excluded() -> None:
    model = make_model()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 256, (1, 7), generator=g)
    padded = {"input_ids": torch.cat([ids, torch.full((1, 5), 3)], 1), "attention_mask": torch.ones(1, 12)}
    padded["attention_mask"][0, 7:] = 0
    for collect in (lambda b: one_shot_stats(model, b, ALL), lambda b: sequential_stats(model, b)):
        plain, with_pads = collect([ids]), collect([padded])
        for name in plain:
            assert_stats_close(with_pads[name], plain[name], input_rtol=FORWARD_RTOL)  # (1, 12) vs (1, 7) GEMMs


def test_mixed_layer_types_get_their_own_attention_mask() -> None:
    """Qwen2 with alternating sliding-window (window 4) and full attention: each type is captured separately."""
    cfg = Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=0,
        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    batches = make_batches(2)
    expected = one_shot_stats(model, batches, {"input_sq"})
    got = sequential_stats(model, batches, {"input_sq"})
    for name in expected:
        assert_stats_close(got[name], expected[name])


def test_peft_wrapped_model_calibrates_its_base_linears() -> None:
    from lit_prune.recovery.lora import LoRASpec, attach_lora  # imported here: keeps the DDP ranks' imports light

    model = make_model()
    batches = make_batches(1)
    expected = one_shot_stats(model, batches, {"input_sq"})
    wrapped = attach_lora(model, LoRASpec(r=2, dropout=0.0))
    got = one_shot_stats(wrapped, batches, {"input_sq"})
    assert list(got) == list(expected)
    for name in expected:
        assert_stats_close(got[name], expected[name])


def test_hooks_removed_and_modes_restored_after_errors() -> None:
    model = make_model().train()

    def boom(b: int, stats: dict[str, LinearStats]) -> None:
        raise RuntimeError("criterion failed")

    with pytest.raises(RuntimeError, match="criterion failed"):
        sequential_prune(model, make_batches(1), {"input_sq"}, boom)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="`input_ids` must be a 2-D integer tensor"):
        one_shot_stats(model, [torch.zeros(2, 3)], {"input_sq"})
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_calibration_misconfiguration() -> None:
    model = make_model()
    with pytest.raises(ValueError, match=r"`needs` must be a non-empty subset of .*got \['norms'\]"):
        one_shot_stats(model, make_batches(1), {"norms"})
    with pytest.raises(ValueError, match=r"`needs` must be a non-empty subset"):
        sequential_prune(model, make_batches(1), set(), lambda b, s: None)
    with pytest.raises(ValueError, match="`batches` is empty"):
        one_shot_stats(model, [], {"input_sq"})
    with pytest.raises(ValueError, match="`batches` is empty"):
        sequential_prune(model, [], {"input_sq"}, lambda b, s: None)
    with pytest.raises(ValueError, match="`max_batches` must be an int >= 1 or None, got 0"):
        sequential_prune(model, make_batches(1), {"input_sq"}, lambda b, s: None, max_batches=0)
    with pytest.raises(ValueError, match='needs the "input_sq" statistic'):
        LinearStats().input_norm()
    model.config.num_hidden_layers = 0  # the model's forward skips every block
    with pytest.raises(RuntimeError, match="The decoder never called block 0"):
        sequential_prune(model, make_batches(1), {"input_sq"}, lambda b, s: None)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    qwen.config.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match=r"`config.layer_types` has 2 entries for 4 blocks"):
        sequential_prune(qwen, make_batches(1), {"input_sq"}, lambda b, s: None)


def _reference_sums(
    inputs: list[tuple[torch.Tensor, torch.Tensor | None]], in_features: int, chunk_tokens: int
) -> LinearStats:
    """The sums as lit-prune computed them before they became metric states (in place, float64 chunks)."""
    count, input_sq = 0, torch.zeros(in_features, dtype=torch.float64)
    hessian, rows = torch.zeros(in_features, in_features, dtype=torch.float64), []
    for x, mask in inputs:
        tokens = x[mask.bool()] if mask is not None else x.reshape(-1, in_features)
        count += tokens.shape[0]
        for start in range(0, tokens.shape[0], chunk_tokens):
            chunk = tokens[start : start + chunk_tokens].double()
            input_sq += chunk.square().sum(0)
            hessian.addmm_(chunk.T, chunk)
        if x.dim() == 2:
            rows.append(x[-1:])
        else:
            last = (mask.bool() * torch.arange(1, x.shape[1] + 1)).argmax(1) if mask is not None else None
            keep = mask.bool().any(1) if mask is not None else torch.ones(x.shape[0], dtype=torch.bool)
            positions = last if last is not None else torch.full((x.shape[0],), x.shape[1] - 1)
            rows.append(x[torch.arange(x.shape[0])[keep], positions[keep]])
    return LinearStats(count, input_sq, hessian, torch.cat(rows).float())


HESSIAN_ULPS = 1e-14
"""Where a Hessian sum summed over ranks may differ from one process's (relative to ``sqrt(H_ii H_jj)``): the
batch's ``Σ x xᵀ`` is added inside the GEMM (``addmm_``, today's arithmetic, kept for identical masks), so
``S + X_bᵀX_b`` rounds differently from ``S + (X_bᵀX_b)`` computed on another rank (MKL: ~4e-16 relative)."""


def assert_stats_equal(a: LinearStats, b: LinearStats, hessian_rtol: float = 0.0) -> None:
    """Bit-identical statistics (same dtype, same values); the Hessian within ``hessian_rtol`` of its scale."""
    assert a.count == b.count
    for field in ("input_sq", "hessian_sum", "last_inputs"):
        x, y = getattr(a, field), getattr(b, field)
        assert (x is None) == (y is None), field
        if x is None:
            continue
        assert x.dtype == y.dtype, field
        if field == "hessian_sum" and hessian_rtol:
            scale = torch.outer(y.diagonal(), y.diagonal()).sqrt().clamp_min(1e-300)
            torch.testing.assert_close((x - y) / scale, torch.zeros_like(y), rtol=0, atol=hessian_rtol, msg=field)
        else:
            assert torch.equal(x, y), field


@pytest.mark.parametrize("chunk_tokens", [None, 7])
def test_linear_input_statistics_match_the_reference_arithmetic(
    monkeypatch: pytest.MonkeyPatch, chunk_tokens: int | None
) -> None:
    """Bit-identical to in-place float64 sums of inputs cast before the products, also over several chunks."""
    d = 33
    if chunk_tokens is not None:
        # the globals the chunking runs with (a doctest run may have imported the module file a second time)
        chunks = LinearInputStatistics.update.__globals__["_f64_chunks"]
        monkeypatch.setitem(chunks.__globals__, "_CHUNK_ELEMENTS", chunk_tokens * d)
    g = torch.Generator().manual_seed(0)
    inputs: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    for scale in (1e-3, 1.0, 1e3):
        mask = (torch.rand(3, 11, generator=g) > 0.3).long()
        mask[2] = 0  # a fully padded row has no last token
        inputs += [(torch.randn(3, 11, d, generator=g) * scale, mask), (torch.randn(5, d, generator=g), None)]
    metric = LinearInputStatistics(d, ALL)
    for x, mask in inputs:
        metric.update(x, mask)
    got = metric.compute()
    assert_stats_equal(got, _reference_sums(inputs, d, chunk_tokens or 1 << 30))
    tokens = torch.cat([x[m.bool()] if m is not None else x for x, m in inputs]).double()
    torch.testing.assert_close(got.hessian_sum, tokens.T @ tokens, rtol=1e-12, atol=1e-9)
    assert got.count == tokens.shape[0] and got.last_inputs.shape == (3 * 2 + 3, d)


def test_linear_input_statistics_results_are_read_only_and_kept() -> None:
    metric = LinearInputStatistics(4, {"input_sq", "hessian"})
    metric.update(torch.ones(2, 4))
    first = metric.compute()
    with pytest.raises(AttributeError, match="LinearStats is read-only"):
        first.count = 3  # type: ignore[misc]
    metric.update(torch.ones(3, 4))
    assert first.count == 2 and first.input_sq.tolist() == [2.0] * 4  # later updates do not write into it
    assert metric.compute().count == 5 and first.last_inputs is None
    saved = copy.deepcopy(metric.compute())  # picklable (torch.save of results, as the DDP test does)
    assert saved.count == 5 and torch.equal(saved.hessian_sum, torch.full((4, 4), 5.0, dtype=torch.float64))
    metric.reset()
    assert metric.hessian.shape == (4, 4) and metric.hessian.is_contiguous() and not metric.hessian.any()
    assert int(metric.count) == 0


def test_shared_inputs_share_one_metric_and_get_cloned_results() -> None:
    a, b, c = nn.Linear(4, 2), nn.Linear(4, 3), nn.Linear(4, 2)
    current: dict[str, torch.Tensor | None] = {"attention_mask": None}
    x, y = torch.randn(2, 4), torch.randn(3, 4)
    with Hooks() as hooks:
        collector = attach_linear_statistics(hooks, {"a": a, "b": b, "c": c}, {"input_sq"}, current)
        a(x), b(x), c(y)  # b shares a's input tensor, c has its own
    stats = collector.compute()
    assert list(stats) == ["a", "b", "c"] and sorted(collector.metrics) == ["a", "c"]
    assert torch.equal(stats["b"].input_sq, stats["a"].input_sq) and stats["b"].input_sq is not stats["a"].input_sq
    assert stats["c"].count == 3 and torch.equal(stats["c"].input_sq, y.double().square().sum(0))
    model = make_model()
    one_shot = one_shot_stats(model, make_batches(1), {"input_sq"})
    q, k = one_shot["model.layers.0.self_attn.q_proj"], one_shot["model.layers.0.self_attn.k_proj"]
    assert torch.equal(q.input_sq, k.input_sq) and q.input_sq is not k.input_sq


def test_linear_statistics_misconfiguration() -> None:
    with pytest.raises(ValueError, match="`in_features` must be an int >= 1, got 0"):
        LinearInputStatistics(0, {"input_sq"})
    with pytest.raises(ValueError, match=r"`needs` must be a non-empty subset of .*got \['norms'\]"):
        LinearInputStatistics(4, {"norms"})
    with pytest.raises(ValueError, match=r"`needs` must be a non-empty subset"):
        attach_linear_statistics(Hooks(), {}, set(), {"attention_mask": None})
    with pytest.raises(ValueError, match=r"`x` must be \(batch, seq_len, 4\) or \(tokens, 4\), got \(2, 5\)"):
        LinearInputStatistics(4, {"input_sq"}).update(torch.ones(2, 5))
    a, b = nn.Linear(4, 2), nn.Linear(4, 2)
    with Hooks() as hooks:
        collector = attach_linear_statistics(hooks, {"a": a, "b": b}, {"input_sq"}, {"attention_mask": None})
        x = torch.ones(1, 4)
        a(x), b(x), b(torch.ones(1, 4))
    with pytest.raises(RuntimeError, match=r"Linears \['b'\] shared another Linear's input in some calls only"):
        collector.compute()


def _calibrate_everything(batches: list[dict[str, torch.Tensor]], rank: int) -> dict[str, object]:
    """What the DDP test compares: statistics, pruned weights and masks (summed over the ranks when a group is up)."""

    def prune(b: int, stats: dict[str, LinearStats]) -> None:
        linears = prunable_linears(model)
        # rank-dependent weights and (bool) masks: the broadcast must make rank 0's win
        attach_masks(
            model, {n: (torch.arange(linears[n].in_features) % 2 != rank).expand_as(linears[n].weight) for n in stats}
        )

    model = make_model()
    out: dict[str, object] = {"sequential": sequential_stats(model, batches, prune=prune)}
    out["weights"] = {name: lin.weight.detach().clone() for name, lin in prunable_linears(model).items()}
    out["masks"] = masks_of(model)
    out["one_shot"] = one_shot_stats(make_model(), batches, ALL)
    out["local"] = one_shot_stats(make_model(), batches, ALL, sync=False)
    for criterion, protocol, options in (
        ("wanda", "sequential", {"allocation": "owl", "trim_rows": True}),  # OWL's dense pass and TRIM's rows too
        ("sparsegpt", "one_shot", {}),
    ):
        pruned = make_model()
        prune_sparse(pruned, batches, criterion, 0.5, protocol=protocol, **options)
        out[criterion] = {
            "masks": masks_of(pruned),
            "weights": {n: lin.weight.detach().clone() for n, lin in prunable_linears(pruned).items()},
        }
    return out


def _ddp_worker(rank: int, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)  # the one-process reference below runs with the same kernels
    shards = (make_batches(2, seed=1), make_batches(1, seed=2))  # ranks see different batches
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        saved = {"ddp": _calibrate_everything(shards[rank], rank)}
    finally:
        dist.destroy_process_group()
    if rank == 0:  # one process over every rank's batches, in rank order
        saved["one_process"] = _calibrate_everything(shards[0] + shards[1], rank=0)
    torch.save(saved, f"{out}.{rank}")


def test_ddp_ranks_sum_statistics_and_share_pruned_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real gloo ranks with different batches end with the statistics, weights and masks of one process on all.

    Exact (bit for bit): counts, ``Σ x²`` (rank 0's sum over its batches plus rank 1's is the one-process sum over
    the batches in the same order: the reference runs in a rank's process with the same thread count, so the
    forward's float32 inputs are the same bits), the last-token rows (rank order), every mask and the zeroed
    weights. The Hessian sums within :data:`HESSIAN_ULPS`.
    """
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))  # spawned ranks import tests.sparse.*
    out = str(tmp_path / "stats")
    spawn_ranks(_ddp_worker, out)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in (0, 1)]
    expected = ranks[0]["one_process"]
    local = [rank["ddp"]["local"] for rank in ranks]
    for name in expected["one_shot"]:
        assert local[0][name].count != local[1][name].count  # the ranks did see different data
        summed = local[0][name].input_sq + local[1][name].input_sq
        for rank in ranks:
            got = rank["ddp"]
            assert_stats_equal(got["sequential"][name], expected["sequential"][name], HESSIAN_ULPS)
            assert_stats_equal(got["one_shot"][name], expected["one_shot"][name], HESSIAN_ULPS)
            assert torch.equal(got["one_shot"][name].input_sq, summed)
            assert torch.equal(got["weights"][name], expected["weights"][name])
            assert torch.equal(got["masks"][name], expected["masks"][name])
            for criterion in ("wanda", "sparsegpt"):
                assert torch.equal(got[criterion]["masks"][name], expected[criterion]["masks"][name]), criterion
                if criterion == "wanda":  # zeros only
                    assert torch.equal(got[criterion]["weights"][name], expected[criterion]["weights"][name])
                else:  # float32 OBS updates from H⁻¹: equal here, allowed a float32 ulp where H's rounding differs
                    torch.testing.assert_close(got[criterion]["weights"][name], expected[criterion]["weights"][name])
