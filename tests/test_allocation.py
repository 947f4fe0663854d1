from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
from conftest import tiny_config
from torch import nn
from transformers import LlamaForCausalLM

from lit_prune.allocation import make_width_plan, params_to_remove, uniform_ratio
from lit_prune.arch import adapter_for
from lit_prune.criteria.width import WidthScores
from lit_prune.plan import PruningPlan

AMOUNTS = (0.1, 0.2, 0.3)


def _model(**overrides: object) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(**overrides)).eval()


def _random_scores(model: nn.Module, seed: int = 0) -> WidthScores:
    adapter = adapter_for(model)
    gen = torch.Generator().manual_seed(seed)
    heads = tuple(torch.rand(v.num_heads, generator=gen) for v in adapter.attentions(model))
    neurons = tuple(torch.rand(v.intermediate_size, generator=gen) for v in adapter.mlps(model))
    return WidthScores(heads=heads, neurons=neurons, criterion="test")


def _granularity(model: nn.Module, round_to: int = 1) -> int:
    """One round_to step of neurons in every block: how close to the target the total may land."""
    adapter = adapter_for(model)
    return sum(adapter.neuron_params(v) * round_to for v in adapter.mlps(model))


def _kept_groups(plan: PruningPlan, block: int, group_size: int, num_heads: int) -> dict[int, int]:
    kept = plan.keep_heads.get(block, tuple(range(num_heads))) if plan.keep_heads else tuple(range(num_heads))
    counts: dict[int, int] = {}
    for h in kept:
        counts[h // group_size] = counts.get(h // group_size, 0) + 1
    return counts


def _rebuilt(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """A copy whose projections are new Linears at the kept shapes (as surgery will make them; weights random)."""
    pruned = copy.deepcopy(model)
    adapter = adapter_for(pruned)
    hd = adapter.head_dim(pruned)
    for b, (attn, mlp) in enumerate(zip(adapter.attentions(pruned), adapter.mlps(pruned))):
        gs = attn.group_size
        heads = (plan.keep_heads or {}).get(b, tuple(range(attn.num_heads)))
        groups = sorted({h // gs for h in heads})
        neurons = len((plan.keep_neurons or {}).get(b, range(mlp.intermediate_size)))
        q, k, v, o = (p.linear for p in (attn.q, attn.k, attn.v, attn.o))
        gate, up, down = (p.linear for p in (mlp.gate, mlp.up, mlp.down))
        hidden = q.in_features
        attn.module.q_proj = nn.Linear(hidden, len(heads) * hd, bias=q.bias is not None)
        attn.module.k_proj = nn.Linear(hidden, len(groups) * hd, bias=k.bias is not None)
        attn.module.v_proj = nn.Linear(hidden, len(groups) * hd, bias=v.bias is not None)
        attn.module.o_proj = nn.Linear(len(heads) * hd, hidden, bias=o.bias is not None)
        mlp.module.gate_proj = nn.Linear(hidden, neurons, bias=gate.bias is not None)
        mlp.module.up_proj = nn.Linear(hidden, neurons, bias=up.bias is not None)
        mlp.module.down_proj = nn.Linear(neurons, hidden, bias=down.bias is not None)
    return pruned


def _shape_count(model: nn.Module, plan: PruningPlan) -> int:
    """Independent count: the parameters of :func:`_rebuilt`."""
    pruned = _rebuilt(model, plan)
    return adapter_for(pruned).total_params(pruned)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


# --- accounting against independent counts -----------------------------------------------------------------------
@pytest.mark.parametrize("amount", AMOUNTS)
@pytest.mark.parametrize("gqa", ["query", "group"])
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_key_value_heads": 4, "hidden_size": 48},
        {"attention_bias": True, "mlp_bias": True},
        {"tie_word_embeddings": True},
    ],
    ids=["gqa", "mha", "bias", "tied"],
)
def test_uniform_params_after_matches_fresh_model(amount: float, gqa: str, overrides: dict[str, object]) -> None:
    model = _model(**overrides)
    cfg = model.config
    plan = make_width_plan(model, _random_scores(model), amount, gqa=gqa)  # type: ignore[arg-type]
    gs = cfg.num_attention_heads // cfg.num_key_value_heads

    kept_heads = {len(plan.keep_heads.get(b, range(4))) for b in range(4)}
    kept_groups = {len(_kept_groups(plan, b, gs, 4)) for b in range(4)}
    kept_neurons = set(plan.meta["kept_neurons"])
    assert len(kept_heads) == len(kept_groups) == len(kept_neurons) == 1  # uniform: every block alike
    fresh = LlamaForCausalLM(
        tiny_config(
            **{
                **overrides,
                "num_attention_heads": kept_heads.pop(),
                "num_key_value_heads": kept_groups.pop(),
                "intermediate_size": kept_neurons.pop(),
                "head_dim": 24,
            }
        )
    )
    adapter = adapter_for(fresh)
    assert plan.params_after == adapter.total_params(fresh)
    assert plan.non_embedding_after == adapter.non_embedding_params(fresh)
    assert plan.params_before == adapter_for(model).total_params(model)
    assert plan.params_before - plan.params_after == plan.meta["params_removed"]


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("gqa", ["query", "group"])
@pytest.mark.parametrize("overrides", [{}, {"attention_bias": True, "mlp_bias": True}], ids=["plain", "bias"])
def test_params_after_matches_rebuilt_shapes(allocation: str, gqa: str, overrides: dict[str, object]) -> None:
    model = _model(**overrides)
    for amount in AMOUNTS:
        plan = make_width_plan(model, _random_scores(model, seed=3), amount, gqa=gqa, allocation=allocation)  # type: ignore[arg-type]
        assert plan.params_after == _shape_count(model, plan)


# --- budget ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("amount", AMOUNTS)
@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("gqa", ["query", "group"])
def test_removed_within_one_granularity_of_target(amount: float, allocation: str, gqa: str) -> None:
    model = _model()
    plan = make_width_plan(model, _random_scores(model), amount, gqa=gqa, allocation=allocation)  # type: ignore[arg-type]
    target = params_to_remove(model, amount)
    assert plan.meta["target_params_removed"] == target
    removed = plan.params_before - plan.params_after
    assert abs(removed - target) <= _granularity(model)
    assert plan.fraction_removed == pytest.approx(amount, abs=_granularity(model) / plan.params_before)
    assert plan.meta["ratio"] == pytest.approx(uniform_ratio(model, target))


def test_uniform_ratio_is_amp_p() -> None:
    model = _model()
    # per block: q 64*96, k/v 64*48 each, o 96*64; gate/up/down 64*96 each -> 36864 per block, 4 blocks
    assert uniform_ratio(model, 147456 // 4) == pytest.approx(0.25)


def test_int_amount_and_non_embedding() -> None:
    model = _model()
    adapter = adapter_for(model)
    plan = make_width_plan(model, _random_scores(model), 30000)
    assert plan.meta["target_params_removed"] == 30000
    assert abs(plan.params_before - plan.params_after - 30000) <= _granularity(model)

    plan = make_width_plan(model, _random_scores(model), 0.25, of="non_embedding", allocation="global")
    target = round(0.25 * adapter.non_embedding_params(model))
    assert plan.meta["target_params_removed"] == target == params_to_remove(model, 0.25, of="non_embedding")
    assert plan.non_embedding_before == adapter.non_embedding_params(model)
    assert plan.fraction_removed_non_embedding == pytest.approx(0.25, abs=_granularity(model) / target)
    assert plan.params_before - plan.params_after == plan.non_embedding_before - plan.non_embedding_after


@pytest.mark.parametrize("gqa", ["query", "group"])
def test_uniform_on_a_non_uniform_model_uses_each_blocks_width(gqa: str) -> None:
    model = _model(intermediate_size=128)
    # block 0 already lost half its heads (one per group) and half its neurons
    model = _rebuilt(model, PruningPlan(num_layers=4, keep_heads={0: (0, 2)}, keep_neurons={0: tuple(range(64))}))
    scores = _random_scores(model)
    assert scores.heads[0].numel() == 2 and scores.neurons[0].numel() == 64
    plan = make_width_plan(model, scores, 0.3, gqa=gqa)  # type: ignore[arg-type]
    assert plan.heads_before == (2, 4, 4, 4) and plan.neurons_before == (64, 128, 128, 128)
    kept = plan.meta["kept_neurons"]
    assert kept[1] == kept[2] == kept[3]
    assert kept[0] / 64 == pytest.approx(kept[1] / 128, abs=1 / 64)  # the same ratio, from each block's own width
    # block 0 has one head per group, so even in query mode its unit is a whole group (k/v rows go too)
    assert plan.meta["kept_heads"] == [1, 2, 2, 2]
    assert plan.params_after == _shape_count(model, plan)


def test_numpy_amounts_are_accepted_and_recorded_as_python_numbers() -> None:
    np = pytest.importorskip("numpy")
    model = _model()
    plan = make_width_plan(model, _random_scores(model), np.float64(0.2), min_keep=np.float32(0.25))
    same = make_width_plan(model, _random_scores(model), 0.2, min_keep=0.25)
    assert plan == same
    plan = make_width_plan(model, _random_scores(model), np.int64(30000))
    assert type(plan.meta["amount"]) is int and plan.meta["target_params_removed"] == 30000
    PruningPlan.from_json(plan.to_json())


# --- which units go ----------------------------------------------------------------------------------------------
def test_lowest_scored_heads_and_neurons_go_uniform_query() -> None:
    model = _model()
    heads = torch.tensor([0.9, 0.1, 0.2, 0.8])  # groups (0, 1) and (2, 3): heads 1 and 2 are their lowest
    neurons = torch.arange(96.0).flip(0)  # the highest indices score lowest
    scores = WidthScores(heads=(heads,) * 4, neurons=(neurons,) * 4, criterion="amp")
    plan = make_width_plan(model, scores, 0.3)
    assert plan.keep_heads == {b: (0, 3) for b in range(4)}
    kept = plan.meta["kept_neurons"][0]
    assert plan.keep_neurons is not None
    assert plan.keep_neurons[0] == tuple(range(kept))  # the lowest-scored (highest indices) went
    assert plan.method == "width:amp"


def test_group_mode_drops_the_lowest_mean_group_whole() -> None:
    model = _model()
    heads = torch.tensor([0.1, 0.9, 0.3, 0.4])  # group means 0.5 and 0.35: group 1 goes, despite head 0's 0.1
    scores = WidthScores(heads=(heads,) * 4, neurons=(torch.rand(96),) * 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = make_width_plan(model, scores, 0.3, gqa="group")
    assert plan.keep_heads == {b: (0, 1) for b in range(4)}
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1  # once per plan, not once per block
    assert re.search(
        r"gqa='group' removes 1 of the 2 KV groups of block 0 \(2 of its 4 query heads with their k/v rows\); "
        r"4 of 4 blocks lose at least 33% of their KV groups.*consider gqa='query'",
        messages[0],
    )


def test_group_mode_warns_only_when_a_large_share_of_kv_groups_goes() -> None:
    """Threshold 1/3 of a GQA block's KV groups; query mode and MHA (one head per group) never warn."""
    gqa8 = _model(num_attention_heads=16, num_key_value_heads=8, head_dim=8)  # 8 groups of 2 heads
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        small = make_width_plan(gqa8, _random_scores(gqa8), 0.1, gqa="group")  # 1-2 of 8 groups per block
        make_width_plan(gqa8, _random_scores(gqa8), 0.4, gqa="query")
        mha = _model(num_key_value_heads=4)
        make_width_plan(mha, _random_scores(mha), 0.4, gqa="group")
    assert max(8 - len(_kept_groups(small, b, 2, 16)) for b in range(4)) * 3 < 8
    with pytest.warns(UserWarning, match=r"removes [3-9] of the 8 KV groups of block \d"):
        make_width_plan(gqa8, _random_scores(gqa8), 0.4, gqa="group")


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("gqa", ["query", "group"])
def test_gqa_structure(allocation: str, gqa: str) -> None:
    model = _model(num_attention_heads=8, num_key_value_heads=2, head_dim=8)  # 4 heads per group
    for amount in (0.2, 0.4):
        plan = make_width_plan(model, _random_scores(model), amount, gqa=gqa, allocation=allocation)  # type: ignore[arg-type]
        assert plan.keep_heads, "something must go at these amounts"
        for b in range(4):
            per_group = _kept_groups(plan, b, 4, 8)
            if gqa == "query":
                assert sorted(per_group) == [0, 1]  # both KV groups stay
                assert len(set(per_group.values())) == 1  # with equal heads
            else:
                assert set(per_group.values()) == {4} and len(per_group) >= 1  # whole groups only


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_mha_query_mode_is_group_mode(allocation: str) -> None:
    model = _model(num_key_value_heads=4)
    scores = _random_scores(model)
    query = make_width_plan(model, scores, 0.3, gqa="query", allocation=allocation)  # type: ignore[arg-type]
    group = make_width_plan(model, scores, 0.3, gqa="group", allocation=allocation)  # type: ignore[arg-type]
    assert query.keep_heads == group.keep_heads and query.keep_heads
    assert query.params_after == group.params_after == _shape_count(model, query)


# --- global allocation -------------------------------------------------------------------------------------------
def test_global_ignores_block_scale() -> None:
    """Scores divided by their block's mean: a block scored 1000x higher overall is not spared for that alone."""
    model = _model()
    gen = torch.Generator().manual_seed(0)
    heads, neurons = torch.rand(4, generator=gen), torch.rand(96, generator=gen)
    scales = (1.0, 10.0, 100.0, 1000.0)
    scores = WidthScores(heads=tuple(heads * s for s in scales), neurons=tuple(neurons * s for s in scales))
    plan = make_width_plan(model, scores, 0.2, allocation="global")
    kept_neurons, kept_heads = plan.meta["kept_neurons"], plan.meta["kept_heads"]
    assert max(kept_neurons) - min(kept_neurons) <= 1  # equal but for ties at the margin
    assert max(kept_heads) - min(kept_heads) <= 2  # one unit: a head from each of the 2 groups
    assert max(kept_neurons) < 96 and min(kept_heads) < 4


def test_global_prefers_the_block_with_more_low_units() -> None:
    model = _model()
    flat = torch.ones(96)
    skewed = torch.cat([torch.full((64,), 0.01), torch.full((32,), 10.0)])  # most neurons far below the mean
    scores = WidthScores(heads=(torch.ones(4),) * 4, neurons=(skewed, flat, flat, flat))
    plan = make_width_plan(model, scores, 0.1, allocation="global")
    kept = plan.meta["kept_neurons"]
    assert kept[0] < min(kept[1:])
    assert plan.keep_neurons is not None and set(plan.keep_neurons[0]) >= set(range(64, 96))


@pytest.mark.parametrize("min_keep", [0.25, 0.5, 0.8])
def test_global_respects_min_keep(min_keep: float) -> None:
    model = _model(num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    tiny = torch.cat([torch.full((90,), 1e-3), torch.full((6,), 100.0)])
    scores = WidthScores(
        heads=(torch.tensor([1e-3] * 7 + [100.0]),) + (torch.ones(8),) * 3,
        neurons=(tiny,) + (torch.ones(96),) * 3,
    )
    amount = 0.05 if min_keep == 0.8 else 0.3
    plan = make_width_plan(model, scores, amount, allocation="global", gqa="query", min_keep=min_keep)
    for b in range(4):
        assert plan.meta["kept_neurons"][b] >= math.ceil(min_keep * 96)
        assert plan.meta["kept_heads"][b] >= math.ceil(min_keep * 8)
        assert min(_kept_groups(plan, b, 4, 8).values()) >= 1
    assert plan.meta["kept_neurons"][0] == min(plan.meta["kept_neurons"])  # the low block hit its floor


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("round_to", [8, 16, 32])
def test_round_to_makes_kept_widths_multiples(allocation: str, round_to: int) -> None:
    model = _model(intermediate_size=200)  # not a multiple of 16 or 32
    for amount in AMOUNTS:
        plan = make_width_plan(model, _random_scores(model), amount, allocation=allocation, round_to=round_to)  # type: ignore[arg-type]
        for b, kept in enumerate(plan.meta["kept_neurons"]):
            assert kept % round_to == 0 or kept == 200
            assert kept == len((plan.keep_neurons or {}).get(b, range(200)))
        target = plan.meta["target_params_removed"]
        assert abs(plan.params_before - plan.params_after - target) <= _granularity(model, round_to)
        assert plan.params_after == _shape_count(model, plan)


def test_plan_round_trips_through_json() -> None:
    model = _model()
    plan = make_width_plan(model, _random_scores(model), 0.3, allocation="global", meta={"calibration": "tiny"})
    again = PruningPlan.from_json(plan.to_json())
    assert again == plan and again.keep_heads == plan.keep_heads and again.keep_neurons == plan.keep_neurons
    assert again.meta["calibration"] == "tiny" and again.meta["allocation"] == "global"
    assert plan.heads_before == (4, 4, 4, 4) and plan.neurons_before == (96, 96, 96, 96)


def test_make_width_plan_logs(caplog: pytest.LogCaptureFixture) -> None:
    model = _model()
    with caplog.at_level("DEBUG", logger="lit_prune.allocation.structured"):
        make_width_plan(model, _random_scores(model), 0.2, method="width:custom")
    assert "Width plan (width:custom, uniform, gqa=query)" in caplog.text


# --- misconfiguration --------------------------------------------------------------------------------------------
def _bad_calls() -> list[tuple[dict[str, object], str]]:
    ok_heads, ok_neurons = (torch.ones(4),) * 4, (torch.ones(96),) * 4
    return [
        ({"gqa": "kv"}, r"`gqa` must be one of \['query', 'group'\], got 'kv'"),
        ({"allocation": "owl"}, r"`allocation` must be one of \['uniform', 'global'\], got 'owl'"),
        ({"of": "embedding"}, r"`of` must be one of \['total', 'non_embedding'\], got 'embedding'"),
        ({"round_to": 0}, r"`round_to` must be an int >= 1, got 0"),
        ({"round_to": 2.0}, r"`round_to` must be an int >= 1, got 2.0"),
        ({"round_to": True}, r"`round_to` must be an int >= 1, got True"),
        ({"min_keep": 0.0}, r"`min_keep` must be a number in \(0, 1\], got 0.0"),
        ({"min_keep": 1.5}, r"`min_keep` must be a number in \(0, 1\], got 1.5"),
        ({"min_keep": float("nan")}, r"`min_keep` must be a number in \(0, 1\], got nan"),
        ({"amount": True}, r"`amount` must be a float in \(0, 1\) or an int >= 1, got True"),
        ({"amount": float("nan")}, r"`amount` must be a float in \(0, 1\) or an int >= 1, got nan"),
        ({"amount": 0.0}, r"got 0.0"),
        ({"amount": -0.1}, r"got -0.1"),
        ({"amount": 1.0}, r"got 1.0"),
        ({"amount": 0}, r"or an int >= 1, got 0"),
        ({"amount": -5}, r"got -5"),
        ({"amount": "0.1"}, r"got '0.1'"),
        ({"amount": 1e-9}, r"rounds to no parameter"),
        ({"amount": 147456}, r"the attention and MLP projections hold only 147,456"),
        ({"amount": 0.7}, r"at most 90,624 .* can be removed with gqa='query'"),
        ({"amount": 0.1, "min_keep": 1.0}, r"at most 0 "),
        ({"scores": WidthScores(heads=ok_heads[:3], neurons=ok_neurons[:3])}, r"one entry per block \(4\), got 3"),
        (
            {"scores": WidthScores(heads=(torch.ones(8),) + ok_heads[1:], neurons=ok_neurons)},
            r"`scores.heads\[0\]` must hold 4 scores \(block 0's current heads\), got 8",
        ),
        (
            {"scores": WidthScores(heads=ok_heads, neurons=ok_neurons[:3] + (torch.ones(95),))},
            r"`scores.neurons\[3\]` must hold 96 scores \(block 3's current neurons\), got 95",
        ),
    ]


@pytest.mark.parametrize(("kwargs", "match"), _bad_calls())
def test_make_width_plan_misconfiguration(kwargs: dict[str, object], match: str) -> None:
    model = _model()
    before = _snapshot(model)
    call: dict[str, object] = {"scores": _random_scores(model), "amount": 0.2, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_width_plan(model, **call)  # type: ignore[arg-type]
    _assert_untouched(model, before)


def test_make_width_plan_type_errors() -> None:
    model = _model()
    with pytest.raises(TypeError, match="`scores` must be a WidthScores, got tuple"):
        make_width_plan(model, ((torch.ones(4),), (torch.ones(96),)), 0.2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`meta` must be a dict or None, got list"):
        make_width_plan(model, _random_scores(model), 0.2, meta=[1])  # type: ignore[arg-type]


def test_uniform_rounding_that_leaves_the_mlp_too_much_raises() -> None:
    # MHA, 4 groups of one head: p = 0.62 removes round(2.48) = 2 groups per block, and min_keep=0.22 keeps 22 of 96
    # neurons, so the MLPs cannot take the rest although a third group per block could have.
    model = _model(num_key_value_heads=4)
    with pytest.raises(ValueError, match=r"allocation='uniform' at ratio p=0.6200 removes 49,152 from attention"):
        make_width_plan(model, _random_scores(model), 106660, gqa="group", min_keep=0.22)


def test_uniform_ratio_misconfiguration() -> None:
    model = _model()
    with pytest.raises(ValueError, match="`num_params` must be an int >= 1, got 0"):
        uniform_ratio(model, 0)
    with pytest.raises(ValueError, match=r"`num_params`=147,456 must be below the 147,456"):
        uniform_ratio(model, 147456)
