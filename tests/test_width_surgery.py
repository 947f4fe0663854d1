import copy

import pytest
import torch
from conftest import tiny_config
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from lit_prune.arch import adapter_for
from lit_prune.plan import PruningPlan
from lit_prune.surgery import LAYER_SHAPES_KEY, BlockShape, apply_plan, block_shapes, prune_heads, prune_neurons

HD = 24  # tiny_config head_dim


def _ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(4, 256, (batch, length), generator=torch.Generator().manual_seed(1))


def _zero_heads(model: nn.Module, block: int, heads: list[int]) -> None:
    attn = model.model.layers[block].self_attn
    with torch.no_grad():
        for h in heads:
            attn.o_proj.weight[:, h * HD : (h + 1) * HD] = 0


def _zero_neurons(model: nn.Module, block: int, neurons: list[int]) -> None:
    with torch.no_grad():
        model.model.layers[block].mlp.down_proj.weight[:, neurons] = 0


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode", ["query", "group"])
def test_removing_zeroed_heads_and_neurons_keeps_logits(tiny_model, mode):
    ids = _ids()
    # query mode: one head of each KV group (heads 1 and 3); group mode: KV group 1 (heads 2 and 3)
    gone = [1, 3] if mode == "query" else [2, 3]
    for b in range(4):
        _zero_heads(tiny_model, b, gone)
        _zero_neurons(tiny_model, b, list(range(10, 40)))
    reference = tiny_model(ids).logits
    keep_heads = [h for h in range(4) if h not in gone]
    keep_neurons = [n for n in range(96) if not 10 <= n < 40]
    plan = PruningPlan(
        num_layers=4,
        keep_heads={b: keep_heads for b in range(4)},
        keep_neurons={b: keep_neurons for b in range(4)},
        heads_before=[4] * 4,
        neurons_before=[96] * 4,
    )
    apply_plan(tiny_model, plan)
    torch.testing.assert_close(tiny_model(ids).logits, reference, rtol=0, atol=1e-5)
    cfg = tiny_model.config
    assert (cfg.num_attention_heads, cfg.intermediate_size, cfg.head_dim) == (2, 66, HD)
    assert cfg.num_key_value_heads == (2 if mode == "query" else 1)
    attn = tiny_model.model.layers[0].self_attn
    assert attn.num_key_value_groups == (1 if mode == "query" else 2)
    assert attn.k_proj.out_features == cfg.num_key_value_heads * HD
    assert not hasattr(cfg, LAYER_SHAPES_KEY)


def test_kept_heads_carry_their_weights(tiny_model):
    attn = tiny_model.model.layers[2].self_attn
    q, k, o = attn.q_proj.weight.clone(), attn.k_proj.weight.clone(), attn.o_proj.weight.clone()
    prune_heads(tiny_model, 2, [2, 3])  # whole KV group 1
    attn = tiny_model.model.layers[2].self_attn
    torch.testing.assert_close(attn.q_proj.weight, q[2 * HD : 4 * HD])
    torch.testing.assert_close(attn.o_proj.weight, o[:, 2 * HD : 4 * HD])
    torch.testing.assert_close(attn.k_proj.weight, k[HD : 2 * HD])
    assert attn.num_key_value_groups == 2


def test_neurons_and_bias_are_sliced():
    model = LlamaForCausalLM(tiny_config(mlp_bias=True, attention_bias=True))
    mlp = model.model.layers[0].mlp
    gate_b, down_w = mlp.gate_proj.bias.clone(), mlp.down_proj.weight.clone()
    prune_neurons(model, 0, [5, 1, 7])
    mlp = model.model.layers[0].mlp
    torch.testing.assert_close(mlp.gate_proj.bias, gate_b[[1, 5, 7]])
    torch.testing.assert_close(mlp.down_proj.weight, down_w[:, [1, 5, 7]])
    assert mlp.down_proj.bias.shape == (64,)
    prune_heads(model, 0, [0, 2])
    assert model.model.layers[0].self_attn.q_proj.bias.shape == (2 * HD,)


def test_generation_with_kv_cache_after_nonuniform_pruning(tiny_model):
    plan = PruningPlan(num_layers=4, keep_heads={1: [0, 2], 2: [2, 3]}, keep_neurons={3: range(40), 0: [3, 5, 9]})
    apply_plan(tiny_model, plan)
    prompt = _ids(1, 6)
    cached = tiny_model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=3)
    uncached = tiny_model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=3)
    assert cached.shape == (1, 14)
    assert torch.equal(cached, uncached)
    assert block_shapes(tiny_model) == [
        BlockShape(4, 2, 3),
        BlockShape(2, 2, 96),
        BlockShape(2, 1, 96),
        BlockShape(4, 2, 40),
    ]
    record = getattr(tiny_model.config, LAYER_SHAPES_KEY)
    assert record[2] == {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 96}
    assert (tiny_model.config.num_attention_heads, tiny_model.config.num_key_value_heads) == (4, 2)


def test_param_count_matches_plan_accounting(tiny_model):
    adapter = adapter_for(tiny_model)
    view = adapter.attentions(tiny_model)[0]
    mlp = adapter.mlps(tiny_model)[0]
    before = adapter.total_params(tiny_model)
    per_head, per_group, per_neuron = (
        adapter.head_params(view),
        adapter.kv_group_params(view),
        adapter.neuron_params(mlp),
    )
    prune_heads(tiny_model, 0, [0, 2])  # two query heads, no group
    prune_heads(tiny_model, 1, [0, 1])  # one whole group
    prune_neurons(tiny_model, 2, range(90))
    assert adapter.total_params(tiny_model) == before - 2 * per_head - per_group - 6 * per_neuron


def test_depth_after_width_drops_record_entries(tiny_model):
    apply_plan(tiny_model, PruningPlan(num_layers=4, keep_neurons={1: range(10)}))
    assert len(getattr(tiny_model.config, LAYER_SHAPES_KEY)) == 4
    apply_plan(tiny_model, PruningPlan(num_layers=4, drop_layers=[1]))
    # the only narrow block is gone: the model is uniform again and the record is removed
    assert not hasattr(tiny_model.config, LAYER_SHAPES_KEY)
    assert tiny_model.config.num_hidden_layers == 3 and tiny_model.config.intermediate_size == 96


def test_width_and_depth_in_one_plan(tiny_model):
    plan = PruningPlan(num_layers=4, drop_layers=[3], keep_heads={0: [0, 2], 1: [0, 2], 2: [0, 2]})
    apply_plan(tiny_model, plan)
    assert [s.num_attention_heads for s in block_shapes(tiny_model)] == [2, 2, 2]
    assert tiny_model.config.num_attention_heads == 2


@pytest.mark.parametrize(
    ("plan", "error", "message"),
    [
        (PruningPlan(num_layers=4, keep_heads={0: [0, 1, 2]}), ValueError, r"same number of query heads"),
        (PruningPlan(num_layers=4, keep_heads={0: [0, 4]}), ValueError, r"integer indices in \[0, 4\), got \[4\]"),
        (PruningPlan(num_layers=4, keep_neurons={0: [96]}), ValueError, r"in \[0, 96\), got \[96\]"),
        (PruningPlan(num_layers=3, keep_neurons={0: [1]}), ValueError, r"made for a model with 3 blocks"),
        (PruningPlan(num_layers=4, keep_neurons={0: [1]}, neurons_before=[90] * 4), ValueError, r"neurons_before"),
        # block 0 is valid, block 3 is not: nothing may change
        (PruningPlan(num_layers=4, keep_heads={0: [0, 2], 3: [0, 1, 3]}), ValueError, r"same number of query heads"),
        (PruningPlan(num_layers=5, drop_layers=[4], keep_neurons={0: [1]}), ValueError, r"made for a model with 5"),
    ],
)
def test_bad_plans_modify_nothing(tiny_model, plan, error, message):
    state = _state(tiny_model)
    cfg = copy.deepcopy(tiny_model.config.to_dict())
    with pytest.raises(error, match=message):
        apply_plan(tiny_model, plan)
    after = tiny_model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert tiny_model.config.to_dict() == cfg


def test_direct_calls_reject_bad_input(tiny_model):
    with pytest.raises(ValueError, match=r"At least one of the 4 query heads"):
        prune_heads(tiny_model, 0, [])
    with pytest.raises(ValueError, match=r"`block` must be an index in \[0, 4\)"):
        prune_neurons(tiny_model, 7, [0])
    with pytest.raises(ValueError, match=r"must not repeat an index"):
        prune_neurons(tiny_model, 0, [1, 1])
    tiny_model.model.layers[0].mlp.up_proj = nn.Sequential(nn.Linear(64, 96, bias=False))
    with pytest.raises(TypeError, match=r"merge LoRA adapters"):
        prune_neurons(tiny_model, 0, [0])


def test_uniform_result_reloads_with_plain_from_pretrained(tiny_model, tmp_path):
    ids = _ids()
    keep = {b: [1, 3] for b in range(4)}
    apply_plan(
        tiny_model, PruningPlan(num_layers=4, keep_heads=keep, keep_neurons={b: range(0, 96, 2) for b in range(4)})
    )
    expected = tiny_model(ids).logits
    tiny_model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(again(ids).logits, expected, rtol=0, atol=0)
