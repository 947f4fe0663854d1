"""Width statistics: AMP sums equal a hook-free brute-force reference, padding, accumulation, bf16, hooks, widths."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from conftest import tiny_config
from torch import Tensor, nn
from torchmetrics.utilities.data import dim_zero_sum
from transformers import LlamaForCausalLM

from lit_prune.criteria.width import amp, amp_act
from lit_prune.stats import WIDTH_NEEDS, WidthStatistics, WidthStats, collect_width_statistics

D, HEAD_DIM = 64, 24


def make_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config()).eval()


def ids(batch: int, seq_len: int, seed: int) -> Tensor:
    return torch.randint(4, 256, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def _keep_rows(linear: nn.Linear, rows: Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, len(rows), bias=linear.bias is not None)
    new.weight.data.copy_(linear.weight.data[rows])
    return new


def _keep_columns(linear: nn.Linear, columns: Tensor) -> nn.Linear:
    new = nn.Linear(len(columns), linear.out_features, bias=linear.bias is not None)
    new.weight.data.copy_(linear.weight.data[:, columns])
    return new


def shrink(model: LlamaForCausalLM, block: int, heads: list[int] | None, neurons: int | None) -> LlamaForCausalLM:
    """Keep query heads ``heads`` (one per KV group: group size 1) and the first ``neurons`` MLP neurons."""
    layer = model.model.layers[block]
    attn, mlp = layer.self_attn, layer.mlp
    if heads is not None:
        columns = torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in heads])
        attn.q_proj, attn.o_proj = _keep_rows(attn.q_proj, columns), _keep_columns(attn.o_proj, columns)
        attn.num_key_value_groups = len(heads) // (attn.k_proj.out_features // HEAD_DIM)
    if neurons is not None:
        keep = torch.arange(neurons)
        mlp.gate_proj, mlp.up_proj = _keep_rows(mlp.gate_proj, keep), _keep_rows(mlp.up_proj, keep)
        mlp.down_proj = _keep_columns(mlp.down_proj, keep)
    return model


def non_uniform_model() -> LlamaForCausalLM:
    model = make_model()
    shrink(model, 1, heads=[0, 2], neurons=40)
    return shrink(model, 2, heads=None, neurons=64)


@contextmanager
def zeroed(linear: nn.Linear, columns: Tensor | slice | int) -> Iterator[None]:
    saved = linear.weight.data.clone()
    linear.weight.data[:, columns] = 0
    try:
        yield
    finally:
        linear.weight.data.copy_(saved)


@torch.no_grad()
def reference(model: LlamaForCausalLM, batches: list[Tensor]) -> dict[str, list[Tensor]]:
    """Per block, without hooks: AMP means by zeroing each unit, and the summed squares of q/gate/down inputs."""
    layers = model.model.layers
    keys = ("amp_heads", "amp_neurons", "amp_act_neurons", "attn_in_sq", "mlp_in_sq", "down_sq")
    out: dict[str, list[Tensor]] = {k: [] for k in keys}
    sums: dict[str, list[Tensor]] = {k: [torch.zeros(0)] * len(layers) for k in out}
    tokens = 0
    for batch in batches:
        B, T = batch.shape
        tokens += B * T
        hidden = model(batch, output_hidden_states=True).hidden_states
        for b, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = hidden[b]
            pe = model.model.rotary_emb(h, torch.arange(T)[None].expand(B, T))
            x = layer.input_layernorm(h)
            full = attn(x, position_embeddings=pe, attention_mask=None)[0]
            H = attn.q_proj.out_features // HEAD_DIM
            head_l1 = []
            for head in range(H):
                with zeroed(attn.o_proj, slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)):
                    without = attn(x, position_embeddings=pe, attention_mask=None)[0]
                head_l1.append((full - without).abs().sum(-1).sum())
            m = layer.post_attention_layernorm(h + full)
            mlp_full = mlp(m)
            if b + 1 < len(layers):  # the last hidden state is after the final norm
                torch.testing.assert_close(h + full + mlp_full, hidden[b + 1], atol=1e-5, rtol=1e-5)
            neuron_l1, neuron_act = [], []
            for j in range(mlp.down_proj.in_features):
                with zeroed(mlp.down_proj, j):
                    delta = (mlp_full - mlp(m)).abs().sum(-1).sum()
                neuron_l1.append(delta)  # what the output loses: AMP's neuron score
                neuron_act.append(delta / mlp.down_proj.weight[:, j].abs().sum())  # = Σ|a_j|: the paper's score
            a = mlp.act_fn(mlp.gate_proj(m)) * mlp.up_proj(m)
            parts = {
                "amp_heads": torch.stack(head_l1),
                "amp_neurons": torch.stack(neuron_l1),
                "amp_act_neurons": torch.stack(neuron_act),
                "attn_in_sq": x.pow(2).sum((0, 1)),
                "mlp_in_sq": m.pow(2).sum((0, 1)),
                "down_sq": a.pow(2).sum((0, 1)),
            }
            for key, value in parts.items():
                sums[key][b] = value.double() if sums[key][b].numel() == 0 else sums[key][b] + value.double()
    for key in out:
        out[key] = [s / tokens if key.startswith("amp") else s for s in sums[key]]
    return out


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return make_model()


def test_amp_and_squares_equal_brute_force_reference(model: LlamaForCausalLM) -> None:
    batches = [ids(2, 9, seed=1), ids(1, 13, seed=2)]
    stats = collect_width_statistics(model, batches)
    ref = reference(model, batches)
    scores = amp(stats, model)
    paper = amp_act(stats)
    assert stats.count.tolist() == [31.0] * 4
    for b in range(4):
        torch.testing.assert_close(scores.heads[b].double(), ref["amp_heads"][b], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(scores.neurons[b].double(), ref["amp_neurons"][b], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(paper.heads[b], scores.heads[b])
        torch.testing.assert_close(paper.neurons[b].double(), ref["amp_act_neurons"][b], rtol=1e-4, atol=1e-7)
        assert stats.attn_in_sq is not None and stats.mlp_in_sq is not None and stats.down_in_sq is not None
        torch.testing.assert_close(stats.attn_in_sq[b], ref["attn_in_sq"][b], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(stats.mlp_in_sq[b], ref["mlp_in_sq"][b], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(stats.down_in_sq[b], ref["down_sq"][b], rtol=1e-5, atol=1e-10)


def test_o_proj_input_squares_equal_captured_inputs(model: LlamaForCausalLM) -> None:
    batch = ids(2, 11, seed=3)
    seen: list[Tensor] = []
    handles = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].double()))
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            model.model(input_ids=batch)
    finally:
        for handle in handles:
            handle.remove()
    stats = collect_width_statistics(model, batch, needs=["o_in_sq"])
    assert stats.o_in_sq is not None and stats.amp_heads is None and stats.attn_in_sq is None
    for b, z in enumerate(seen):
        assert stats.o_in_sq[b].shape == (4 * HEAD_DIM,)
        torch.testing.assert_close(stats.o_in_sq[b], z.pow(2).sum((0, 1)), rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_is_ignored(model: LlamaForCausalLM, side: str) -> None:
    full, short = ids(1, 10, seed=4), ids(1, 6, seed=5)
    padded = torch.full((2, 10), 3)
    mask = torch.zeros(2, 10, dtype=torch.long)
    padded[0], mask[0] = full[0], 1
    span = slice(0, 6) if side == "right" else slice(4, 10)
    padded[1, span], mask[1, span] = short[0], 1
    with_padding = collect_width_statistics(model, [{"input_ids": padded, "attention_mask": mask}])
    alone = collect_width_statistics(model, [full, short])
    assert with_padding.count.tolist() == alone.count.tolist() == [16.0] * 4
    # left padding shifts RoPE positions by a constant, which attention scores do not see (up to rounding)
    for name in WIDTH_NEEDS:
        for got, expected in zip(getattr(with_padding, name), getattr(alone, name), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def test_two_batches_accumulate_like_one_concatenated_batch(model: LlamaForCausalLM) -> None:
    first, second = ids(2, 8, seed=6), ids(3, 8, seed=7)
    split = collect_width_statistics(model, [first, second])
    joined = collect_width_statistics(model, torch.cat([first, second]))
    limited = collect_width_statistics(model, [first, second, second], max_batches=2)
    for name in WIDTH_NEEDS:
        for a, b, c in zip(getattr(split, name), getattr(joined, name), getattr(limited, name), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(a, c)


def test_merged_metrics_equal_one_metric_like_a_ddp_sum(model: LlamaForCausalLM) -> None:
    """Two "ranks" that saw different batches, merged by the states' sum reduction, equal one pass over both."""
    first, second = ids(2, 8, seed=8), ids(1, 8, seed=9)
    views = [layer.self_attn.o_proj.weight for layer in model.model.layers]

    def metric_over(batches: list[Tensor]) -> WidthStatistics:
        metric = WidthStatistics([4] * 4, [96] * 4, HEAD_DIM, D, ["amp_heads", "o_in_sq"])
        for batch in batches:
            seen: list[Tensor] = []
            handles = [
                layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
                for layer in model.model.layers
            ]
            with torch.no_grad():
                model.model(input_ids=batch)
            for handle in handles:
                handle.remove()
            for b, z in enumerate(seen):
                metric.update(b, "o_in", z, None, views[b])
        return metric

    assert all(reduce is dim_zero_sum for reduce in metric_over([])._reductions.values())
    rank0, rank1 = metric_over([first]), metric_over([second])
    rank0.merge_state(rank1)
    merged, both = rank0.compute(), metric_over([first, second]).compute()
    assert merged.count.tolist() == both.count.tolist() == [24.0] * 4
    for a, b in zip(merged.amp_heads or (), both.amp_heads or (), strict=True):
        torch.testing.assert_close(a, b)


def test_bf16_model_gives_finite_float32_scores_close_to_fp32(model: LlamaForCausalLM) -> None:
    batch = ids(2, 12, seed=10)
    reference_scores = amp(collect_width_statistics(model, batch))
    half = copy.deepcopy(model).to(torch.bfloat16)
    stats = collect_width_statistics(half, batch)
    assert all(s.dtype == torch.float64 for s in (*(stats.amp_heads or ()), *(stats.down_in_sq or ())))
    scores = amp(stats)
    for got, expected in zip((*scores.heads, *scores.neurons), (*reference_scores.heads, *reference_scores.neurons)):
        assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
        torch.testing.assert_close(got, expected, rtol=0.05, atol=1e-3)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_hooks_are_removed_and_modes_restored_also_when_the_forward_raises() -> None:
    model = make_model().train()
    collect_width_statistics(model, ids(1, 5, seed=11))
    assert _hook_count(model) == 0 and model.training

    def boom(*args: object, **kwargs: object) -> Tensor:
        raise RuntimeError("boom")

    model.model.layers[2].mlp.forward = boom  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="boom"):
        collect_width_statistics(model, ids(1, 5, seed=11))
    assert _hook_count(model) == 0
    assert all(m.training for m in model.modules())


def test_non_uniform_widths_are_scored_per_block() -> None:
    model = non_uniform_model()
    batches = [ids(2, 7, seed=12)]
    with torch.no_grad():
        model(batches[0])  # the hand-shrunk model still runs
    stats = collect_width_statistics(model, batches)
    assert stats.heads == (4, 2, 4, 4) and stats.neurons == (96, 40, 64, 96)
    assert stats.o_in_sq is not None
    assert [t.numel() for t in stats.o_in_sq] == [96, 48, 96, 96]
    scores, ref = amp(stats, model), reference(model, batches)
    assert [t.numel() for t in scores.heads] == [4, 2, 4, 4]
    assert [t.numel() for t in scores.neurons] == [96, 40, 64, 96]
    for b in range(4):
        torch.testing.assert_close(scores.heads[b].double(), ref["amp_heads"][b], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(scores.neurons[b].double(), ref["amp_neurons"][b], rtol=1e-4, atol=1e-7)


def test_memory_does_not_grow_with_calibration_tokens(model: LlamaForCausalLM) -> None:
    def state_bytes(batches: int) -> int:
        metric = WidthStatistics([4] * 4, [96] * 4, HEAD_DIM, D, WIDTH_NEEDS)
        for _ in range(batches):
            metric.update(0, "down_in", torch.randn(2, 5, 96))
        return sum(getattr(metric, name).numel() * 8 for name in metric._defaults)

    assert state_bytes(1) == state_bytes(5)


def test_width_statistics_misconfiguration(model: LlamaForCausalLM) -> None:
    with pytest.raises(ValueError, match="`needs` must be a non-empty subset"):
        WidthStatistics([4], [96], HEAD_DIM, D, ["amp", "amp_heads"])
    with pytest.raises(ValueError, match="`heads` and `neurons` must give one width per block"):
        WidthStatistics([4, 4], [96], HEAD_DIM, D, WIDTH_NEEDS)
    with pytest.raises(ValueError, match=r"`neurons\[0\]` must be an int >= 1, got 0"):
        WidthStatistics([4], [0], HEAD_DIM, D, WIDTH_NEEDS)
    metric = WidthStatistics([4], [96], HEAD_DIM, D, WIDTH_NEEDS)
    with pytest.raises(ValueError, match="`block` must be in 0..0, got 1"):
        metric.update(1, "o_in", torch.zeros(1, 2, 96))
    with pytest.raises(ValueError, match="`site` must be one of"):
        metric.update(0, "v_in", torch.zeros(1, 2, 96))
    with pytest.raises(ValueError, match=r"must be \(batch, seq_len, 96\), got \(1, 2, 64\)"):
        metric.update(0, "o_in", torch.zeros(1, 2, 64))
    with pytest.raises(ValueError, match="`o_weight` must be the o_proj weight"):
        metric.update(0, "o_in", torch.zeros(1, 2, 96))
    with pytest.raises(ValueError, match="`attention_mask` must have shape"):
        metric.update(0, "attn_in", torch.zeros(1, 2, D), torch.ones(1, 3))
    with pytest.raises(ValueError, match="`batches` is empty"):
        collect_width_statistics(model, [])
    with pytest.raises(ValueError, match="`max_batches` must be"):
        collect_width_statistics(model, [ids(1, 4, seed=0)], max_batches=0)
    with pytest.raises(AttributeError, match="read-only"):
        WidthStats((4,), (96,), HEAD_DIM, D, torch.zeros(1)).count = torch.ones(1)  # type: ignore[misc]
