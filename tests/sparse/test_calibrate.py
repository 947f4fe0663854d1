"""Calibration engine: one-shot hooks vs the sequential (pruned-inputs) protocol, padding, hooks, DDP."""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_config
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lit_prune.sparse import (
    LinearStats,
    all_reduce_stats,
    attach_masks,
    masks_of,
    one_shot_stats,
    prunable_linears,
    sequential_prune,
)

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


def test_all_reduce_is_a_no_op_in_one_process() -> None:
    stats = one_shot_stats(make_model(), make_batches(1), ALL)
    before = {name: s.input_sq.clone() for name, s in stats.items()}
    assert all_reduce_stats(stats) is stats
    assert all(torch.equal(stats[name].input_sq, before[name]) for name in stats)


def _ddp_worker(rank: int, world_size: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = make_model()
        shards = (make_batches(2, seed=1), make_batches(1, seed=2))  # ranks see different batches

        def prune(b: int, stats: dict[str, LinearStats]) -> None:
            linears = prunable_linears(model)
            # rank-dependent weights and (bool) masks: the broadcast must make rank 0's win
            attach_masks(
                model,
                {n: (torch.arange(linears[n].in_features) % 2 != rank).expand_as(linears[n].weight) for n in stats},
            )

        got = sequential_stats(model, shards[rank], prune=prune)
        weights = {name: lin.weight.detach().clone() for name, lin in prunable_linears(model).items()}
        one_shot = one_shot_stats(make_model(), shards[rank], ALL)
        saved = {"sequential": got, "one_shot": one_shot, "weights": weights, "masks": masks_of(model)}
        torch.save(saved, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_sum_statistics_and_share_pruned_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real gloo ranks with different batches end with the statistics and weights of one process on all batches."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))  # spawned ranks import tests.sparse.*
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "stats")
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in (0, 1)]
    all_batches = make_batches(2, seed=1) + make_batches(1, seed=2)
    model = make_model()

    def prune_like_rank0(b: int, stats: dict[str, LinearStats]) -> None:
        for name in stats:
            prunable_linears(model)[name].weight.data[:, 0::2] = 0

    expected = sequential_stats(model, all_batches, prune=prune_like_rank0)
    expected_one_shot = one_shot_stats(make_model(), all_batches, ALL)
    for name in expected:
        for rank in ranks:
            # the ranks run 1 thread, this process the default (all cores): GEMMs may be blocked differently
            assert_stats_close(rank["sequential"][name], expected[name], input_rtol=FORWARD_RTOL)
            assert_stats_close(rank["one_shot"][name], expected_one_shot[name], input_rtol=FORWARD_RTOL)
            torch.testing.assert_close(rank["weights"][name], prunable_linears(model)[name].weight, rtol=0, atol=0)
            assert torch.equal(rank["masks"][name], prunable_linears(model)[name].weight != 0)
