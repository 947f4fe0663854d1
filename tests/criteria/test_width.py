"""Width criteria: magnitude / Wanda-SP formulas, seeded random, reversed, the dispatcher and non-uniform widths."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch import Tensor, nn
from transformers import LlamaForCausalLM

import lit_prune.criteria.scoring as scoring
from lit_prune.criteria import (
    WIDTH_CRITERIA,
    WidthScores,
    amp,
    magnitude,
    random_width_scores,
    reversed_width_scores,
    score_width,
    wanda_sp,
    width_needs_for,
)
from lit_prune.stats import WidthStats, collect_width_statistics

HEAD_DIM = 24


def flat(scores: WidthScores) -> tuple[Tensor, ...]:
    return (*scores.heads, *scores.neurons)


def make_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


def batches() -> list[Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(4, 256, (2, 9), generator=g) for _ in range(2)]


def non_uniform_model() -> LlamaForCausalLM:
    """Block 1 keeps query heads 0 and 2 (one per KV group) and 40 neurons; block 3 keeps 64 neurons."""
    model = make_model()

    def linear(weight: Tensor) -> nn.Linear:
        new = nn.Linear(weight.size(1), weight.size(0), bias=False)
        new.weight.data.copy_(weight)
        return new

    attn = model.model.layers[1].self_attn
    cols = torch.cat([torch.arange(0, HEAD_DIM), torch.arange(2 * HEAD_DIM, 3 * HEAD_DIM)])
    attn.q_proj, attn.o_proj = linear(attn.q_proj.weight[cols]), linear(attn.o_proj.weight[:, cols])
    attn.num_key_value_groups = 1
    for b, keep in ((1, 40), (3, 64)):
        mlp = model.model.layers[b].mlp
        mlp.gate_proj, mlp.up_proj = linear(mlp.gate_proj.weight[:keep]), linear(mlp.up_proj.weight[:keep])
        mlp.down_proj = linear(mlp.down_proj.weight[:, :keep])
    return model


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return make_model()


def test_magnitude_is_the_norm_of_the_weights_each_unit_owns(model: LlamaForCausalLM) -> None:
    scores = magnitude(model)
    layer = model.model.layers[1]
    q, o = layer.self_attn.q_proj.weight.double(), layer.self_attn.o_proj.weight.double()
    gate, up, down = (getattr(layer.mlp, n).weight.double() for n in ("gate_proj", "up_proj", "down_proj"))
    heads = [
        torch.cat([q[h * HEAD_DIM : (h + 1) * HEAD_DIM].flatten(), o[:, h * HEAD_DIM : (h + 1) * HEAD_DIM].flatten()])
        for h in range(4)
    ]
    expected_heads = torch.stack([w.norm() for w in heads])
    expected_neurons = torch.stack([torch.cat([gate[j], up[j], down[:, j]]).norm() for j in range(96)])
    assert scores.criterion == "magnitude" and scores.num_blocks == 4
    torch.testing.assert_close(scores.heads[1].double(), expected_heads, rtol=1e-5, atol=0)
    torch.testing.assert_close(scores.neurons[1].double(), expected_neurons, rtol=1e-5, atol=0)


def test_wanda_sp_sums_weight_times_input_column_norm(model: LlamaForCausalLM) -> None:
    stats = collect_width_statistics(model, batches(), ["attn_in_sq", "o_in_sq", "mlp_in_sq", "down_in_sq"])
    scores = wanda_sp(model, stats)
    b = 2
    layer = model.model.layers[b]
    q, o = layer.self_attn.q_proj.weight.double(), layer.self_attn.o_proj.weight.double()
    gate, up, down = (getattr(layer.mlp, n).weight.double() for n in ("gate_proj", "up_proj", "down_proj"))
    assert stats.attn_in_sq and stats.o_in_sq and stats.mlp_in_sq and stats.down_in_sq
    x, z = stats.attn_in_sq[b].sqrt(), stats.o_in_sq[b].sqrt()
    m, a = stats.mlp_in_sq[b].sqrt(), stats.down_in_sq[b].sqrt()
    expected_heads = []
    for h in range(4):
        rows = range(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        total = sum((q[r].abs() * x).sum() for r in rows) + sum((o[:, c].abs() * z[c]).sum() for c in rows)
        expected_heads.append(total)
    expected_neurons = [
        (gate[j].abs() * m).sum() + (up[j].abs() * m).sum() + (down[:, j].abs() * a[j]).sum() for j in range(96)
    ]
    assert scores.criterion == "wanda_sp"
    torch.testing.assert_close(scores.heads[b].double(), torch.stack(expected_heads), rtol=1e-5, atol=0)
    torch.testing.assert_close(scores.neurons[b].double(), torch.stack(expected_neurons), rtol=1e-5, atol=0)


def test_random_is_seeded_and_reversed_is_the_negation(model: LlamaForCausalLM) -> None:
    first, again, other = (random_width_scores(model, seed) for seed in (0, 0, 1))
    shapes = random_width_scores([(4, 96)] * 4, seed=0)
    for a, b, c, d in zip(flat(first), flat(again), flat(other), flat(shapes), strict=True):
        assert torch.equal(a, b) and torch.equal(a, d) and not torch.equal(a, c)
    assert first.criterion == "random"
    flipped = reversed_width_scores(first)
    assert flipped.criterion == "reversed"
    for a, b in zip(flat(first), flat(flipped), strict=True):
        assert torch.equal(b, -a)
    via_dispatch = score_width(model, None, "reversed", reversed_of="random", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(via_dispatch.neurons, flipped.neurons, strict=True))


def test_score_width_runs_one_pass_with_only_what_the_criterion_needs(
    model: LlamaForCausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[set[str]] = []

    def spy(*args: object, **kwargs: object) -> WidthStats:
        calls.append(set(args[2]))  # type: ignore[call-overload]
        return collect_width_statistics(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(scoring, "collect_width_statistics", spy)
    data = batches()
    scores = score_width(model, data, "amp")
    assert calls == [{"amp_heads", "amp_neurons"}]
    direct = amp(collect_width_statistics(model, data, ["amp_heads", "amp_neurons"]))
    assert all(torch.equal(a, b) for a, b in zip(scores.heads, direct.heads, strict=True))
    score_width(model, data, "reversed", reversed_of="wanda_sp")
    assert calls[-1] == {"attn_in_sq", "o_in_sq", "mlp_in_sq", "down_in_sq"}
    for criterion in ("magnitude", "random"):
        score_width(model, None, criterion)
    assert len(calls) == 2
    assert width_needs_for("magnitude") == set()


def test_score_width_works_through_wrappers(model: LlamaForCausalLM) -> None:
    peft = pytest.importorskip("peft")

    class Holder(nn.Module):  # like a LightningModule holding the HF model
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.model = inner

    data = batches()
    plain = score_width(model, data, "amp")
    held = score_width(Holder(model), data, "amp")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj", "gate_proj", "down_proj"])
    lora = peft.get_peft_model(make_model(), config)  # LoRA B starts at zero: same function, same base weights
    wrapped = score_width(lora, data, "amp")
    wanda_plain, wanda_lora = score_width(model, data, "wanda_sp"), score_width(lora, data, "wanda_sp")
    for a, b, c in zip(flat(plain), flat(held), flat(wrapped), strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    for a, b in zip(wanda_plain.heads, wanda_lora.heads, strict=True):
        torch.testing.assert_close(a, b)
    assert sum(len(m._forward_pre_hooks) for m in lora.modules()) == 0


def test_non_uniform_widths_score_with_every_criterion() -> None:
    model = non_uniform_model()
    for criterion in WIDTH_CRITERIA:
        scores = score_width(model, batches(), criterion)
        assert [t.numel() for t in scores.heads] == [4, 2, 4, 4], criterion
        assert [t.numel() for t in scores.neurons] == [96, 40, 96, 64], criterion
        assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in scores.heads)


def test_width_criteria_misconfiguration(model: LlamaForCausalLM) -> None:
    with pytest.raises(ValueError, match=r"`criterion` must be one of \['amp', .*\], got 'ampp'"):
        score_width(model, batches(), "ampp")
    with pytest.raises(ValueError, match="`reversed_of` must be one of .* got 'reversed'"):
        score_width(model, batches(), "reversed", reversed_of="reversed")
    with pytest.raises(ValueError, match="Criterion 'amp' needs calibration `batches`, got None"):
        score_width(model, None, "amp")
    with pytest.raises(ValueError, match="`seed` must be an int"):
        random_width_scores(model, seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`model_or_shapes\[0\]` must be \(num_heads, num_neurons\)"):
        random_width_scores([(0, 3)], seed=0)
    only_squares = collect_width_statistics(model, batches(), ["attn_in_sq"])
    with pytest.raises(ValueError, match="no 'amp_heads' sums"):
        amp(only_squares)
    with pytest.raises(ValueError, match="no 'o_in_sq' sums"):
        wanda_sp(model, only_squares)
    empty = WidthStats(
        (4,), (96,), HEAD_DIM, 64, torch.zeros(1), amp_heads=(torch.zeros(4),), amp_neurons=(torch.zeros(96),)
    )
    with pytest.raises(ValueError, match="No calibration tokens"):
        amp(empty)
    full = collect_width_statistics(model, batches())
    with pytest.raises(ValueError, match="collected on a model with heads"):
        wanda_sp(non_uniform_model(), full)
    with pytest.raises(ValueError, match="WidthScores needs one head and one neuron tensor per block"):
        WidthScores((torch.ones(2),), (), "x")
