import logging

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from lit_prune import adapter_for
from lit_prune.allocation import make_depth_plan
from lit_prune.plan import PruningPlan
from lit_prune.surgery import apply_plan, remove_blocks


def _llama(num_layers=6, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(num_hidden_layers=num_layers)).eval()


def _qwen3_sliding(num_layers=6, seed=0):
    """Layers 0-1 full attention, 2.. sliding (window 4): ``config.layer_types`` is not uniform."""
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    return Qwen3ForCausalLM(cfg).eval()


def _ids(length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 256, (2, length), generator=g)


def _layer_idx(model):
    return [b.self_attn.layer_idx for b in adapter_for(model).blocks(model)]


def _snapshot(model):
    blocks = adapter_for(model).blocks(model)
    cfg = model.config
    return (
        list(model.state_dict()),
        id(blocks),
        len(blocks),
        cfg.num_hidden_layers,
        list(getattr(cfg, "layer_types", None) or []),
        _layer_idx(model),
    )


def _fresh_without(model, drop):
    """A freshly built model of the same family without blocks ``drop``, holding the surviving weights."""
    num_layers = model.config.num_hidden_layers
    keep = [i for i in range(num_layers) if i not in set(drop)]
    new_of_old = {old: new for new, old in enumerate(keep)}
    cfg = model.config.to_dict()
    cfg["num_hidden_layers"] = len(keep)
    if cfg.get("layer_types") is not None:
        cfg["layer_types"] = [cfg["layer_types"][i] for i in keep]
    fresh = type(model)(type(model.config).from_dict(cfg)).eval()
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.layers."):
            old = int(key.split(".")[2])
            if old not in new_of_old:
                continue
            key = key.replace(f"model.layers.{old}.", f"model.layers.{new_of_old[old]}.", 1)
        state[key] = value.clone()
    fresh.load_state_dict(state, strict=True)
    return fresh


def _greedy(model, ids, use_cache=True):
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, use_cache=use_cache
    )


@torch.no_grad()
def test_removing_identity_blocks_leaves_logits_unchanged():
    model = _llama(6)
    for i in (1, 4):  # non-adjacent identity blocks: both residual branches write zeros
        block = model.model.layers[i]
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    ids = _ids()
    before = model(ids).logits
    assert remove_blocks(model, [4, 1]) == [1, 4]
    after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert len(model.model.layers) == 4


@torch.no_grad()
def test_generation_matches_a_freshly_built_model(caplog):
    model = _llama(6)
    fresh = _fresh_without(model, [1, 3])
    original_layers = [model.model.layers[i] for i in (0, 2, 4, 5)]
    identity = id(model)
    with caplog.at_level(logging.DEBUG, logger="lit_prune.surgery"):
        remove_blocks(model, (3, 1))
    assert "Removed blocks [1, 3]: 6 -> 4 blocks" in caplog.text
    assert id(model) == identity
    assert list(model.model.layers) == original_layers  # the same block objects, in order
    assert model.config.num_hidden_layers == 4
    assert _layer_idx(model) == [0, 1, 2, 3]

    ids = _ids()
    torch.testing.assert_close(model(ids).logits, fresh(ids).logits, atol=1e-5, rtol=0)
    cached = _greedy(model, ids)
    assert cached.shape == (2, ids.shape[1] + 8)
    assert torch.equal(cached, _greedy(fresh, ids))
    assert torch.equal(cached, _greedy(model, ids, use_cache=False))


@torch.no_grad()
def test_layer_types_follow_the_surviving_blocks():
    model = _qwen3_sliding(6)
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 4
    fresh = _fresh_without(model, [1, 3])
    remove_blocks(model, [1, 3])
    assert model.config.layer_types == ["full_attention"] + ["sliding_attention"] * 3
    assert model.config.max_window_layers == 1  # one surviving block before the old index 2
    assert [b.self_attn.layer_type for b in model.model.layers] == model.config.layer_types
    assert _layer_idx(model) == [0, 1, 2, 3]

    ids = _ids(length=12)  # longer than the window of 4: the sliding masks matter
    torch.testing.assert_close(model(ids).logits, fresh(ids).logits, atol=1e-5, rtol=0)
    cached = _greedy(model, ids)
    assert torch.equal(cached, _greedy(fresh, ids))
    assert torch.equal(cached, _greedy(model, ids, use_cache=False))


@torch.no_grad()
def test_no_sliding_layers_left_updates_the_decoder_flag():
    model = _qwen3_sliding(4)
    remove_blocks(model, [2, 3])
    assert model.config.layer_types == ["full_attention"] * 2
    assert model.model.has_sliding_layers is False
    model(_ids())


@pytest.mark.parametrize("build", [_llama, _qwen3_sliding], ids=["llama", "qwen3-layer_types"])
@torch.no_grad()
def test_save_pretrained_reloads_with_plain_from_pretrained(build, tmp_path):
    model = build(6)
    remove_blocks(model, [0, 2, 5])
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert reloaded.config.num_hidden_layers == 3
    assert getattr(reloaded.config, "layer_types", None) == getattr(model.config, "layer_types", None)
    ids = _ids()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_apply_plan_counts_match_the_adapter():
    model = _llama(6)
    adapter = adapter_for(model)
    before = (adapter.total_params(model), adapter.non_embedding_params(model))
    plan = make_depth_plan(model, [5.0, 1.0, 4.0, 0.5, 3.0, 6.0], num_remove=2, method="depth:test")
    assert (adapter.total_params(model), adapter.non_embedding_params(model)) == before  # read only
    assert model.config.num_hidden_layers == 6
    assert plan.drop_layers == (1, 3) and plan.num_layers == 6 and plan.method == "depth:test"
    assert (plan.params_before, plan.non_embedding_before) == before
    replayed = PruningPlan.from_json(plan.to_json())
    apply_plan(model, replayed)
    assert plan.params_after == adapter.total_params(model)
    assert plan.non_embedding_after == adapter.non_embedding_params(model)
    assert plan.fraction_removed == pytest.approx(1 - adapter.total_params(model) / before[0])


def test_apply_plan_on_a_tied_model_counts_embeddings_once():
    model = _qwen3_sliding(4)  # tie_word_embeddings=True
    plan = make_depth_plan(model, torch.tensor([3.0, 2.0, 1.0, 4.0]), num_remove=1)
    apply_plan(model, plan)
    assert plan.params_after == adapter_for(model).total_params(model)


def test_make_depth_plan_ranking_ties_and_protect():
    model = _llama(6)
    # ties: the deeper block goes first
    assert make_depth_plan(model, [1.0] * 6, num_remove=2).drop_layers == (4, 5)
    assert make_depth_plan(model, [0.0, 0.0, 1.0, 1.0, 0.0, 2.0], num_remove=2).drop_layers == (1, 4)
    # protected blocks are never chosen, even when they score lowest
    plan = make_depth_plan(
        model, torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, -1.0]), num_remove=2, protect=[0, 5], meta={"criterion": "x"}
    )
    assert plan.drop_layers == (1, 2)
    assert plan.meta == {"criterion": "x", "protect": [0, 5]}
    assert plan.scores == pytest.approx((0.0, 0.1, 0.2, 0.3, 0.4, -1.0))
    # all unprotected blocks may go (here L - |protect| = 4 < L)
    assert make_depth_plan(model, [0.0] * 6, num_remove=4, protect=(0, 5)).drop_layers == (1, 2, 3, 4)


def test_remove_nothing_is_a_no_op():
    model = _llama(4)
    snap = _snapshot(model)
    assert remove_blocks(model, []) == []
    assert _snapshot(model) == snap
    apply_plan(model, PruningPlan(num_layers=4))
    assert _snapshot(model) == snap


def test_peft_wrapped_model():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_llama(4), LoraConfig(r=4, target_modules=["q_proj"]))
    adapter = adapter_for(model)
    assert remove_blocks(model, [1]) == [1]
    base = model.get_base_model()
    assert base.config.num_hidden_layers == 3 and len(adapter.blocks(model)) == 3
    assert _layer_idx(base) == [0, 1, 2]
    assert sum(name.endswith("lora_A") for name, _ in model.named_modules()) == 3
    out = model(input_ids=_ids(), labels=_ids())
    out.loss.backward()  # adapters still train
    assert base.model.layers[0].self_attn.q_proj.lora_B["default"].weight.grad is not None


def test_peft_layers_to_transform_renumbered(caplog):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[1, 3, 4], layers_pattern="layers")
    model = get_peft_model(_llama(6), cfg)
    remove_blocks(model, [0, 3])  # old 1 -> 0, old 4 -> 2
    assert model.peft_config["default"].layers_to_transform == [0, 2]
    with caplog.at_level(logging.WARNING, logger="lit_prune.surgery"):
        remove_blocks(model, [0, 2])
    assert model.peft_config["default"].layers_to_transform == []
    assert "Every block listed in PEFT layers_to_transform [0, 2] was removed" in caplog.text


def test_through_a_lightning_module():
    from lit_prune import CausalLMModule

    module = CausalLMModule(model=_llama(4))
    remove_blocks(module, [2])
    assert module.model.config.num_hidden_layers == 3
    assert _layer_idx(module.model) == [0, 1, 2]


def test_heterogeneous_per_layer_config_is_rekeyed():
    model = _llama(4)
    model.config.per_layer_config = {1: {"rms_norm_eps": 1e-5}, 3: {"rms_norm_eps": 1e-4}}
    remove_blocks(model, [0, 2])
    assert model.config.to_dict()["per_layer_config"] == {"0": {"rms_norm_eps": 1e-5}, "1": {"rms_norm_eps": 1e-4}}
    remove_blocks(model, [0])
    remove_blocks(model, [])
    assert model.config.to_dict()["per_layer_config"] == {"0": {"rms_norm_eps": 1e-4}}
    model2 = _llama(4)
    model2.config.per_layer_config = {1: {"rms_norm_eps": 1e-5}}
    remove_blocks(model2, [1])
    assert not model2.config.is_heterogeneous


def test_compiled_call_is_dropped():
    model = _llama(4)
    model._compiled_call = object()
    remove_blocks(model, [3])
    assert "_compiled_call" not in model.__dict__


def test_surgery_misconfiguration():
    model = _llama(4)
    snap = _snapshot(model)
    cases = [
        (lambda: remove_blocks(model, [3, 0, 1, 2]), r"Cannot remove all 4 blocks \(got `indices`=\[0, 1, 2, 3\]\)"),
        (lambda: remove_blocks(model, [1, 4]), r"`indices` must be in \[0, 4\) .* got \[4\]"),
        (lambda: remove_blocks(model, [-1]), r"negative indices are not accepted\), got \[-1\]"),
        (lambda: remove_blocks(model, [2, 1, 2]), r"must not repeat a block, got \[2\] more than once"),
        (lambda: remove_blocks(model, [1.0, True]), r"must hold integer block indices, got \[1.0, True\]"),
        (lambda: remove_blocks(model, "12"), "must be an iterable of block indices, got '12'"),
        (lambda: remove_blocks(model, 1), "must be an iterable of block indices, got 1"),
        (lambda: apply_plan(model, PruningPlan(drop_layers=(1,), num_layers=6)), "made for a model with 6 blocks"),
        (lambda: make_depth_plan(model, [0.0] * 4, 1, protect=[7]), r"`protect` must be in \[0, 4\) .* got \[7\]"),
        (lambda: make_depth_plan(model, [0.0] * 4, 1, protect=[-1]), r"`protect` must be in \[0, 4\) .* got \[-1\]"),
        (lambda: make_depth_plan(model, [0.0] * 4, 3, protect=[0, 3]), r"\[1, 2\]: the model has 4 blocks, 2 prot"),
        (lambda: make_depth_plan(model, [0.0] * 4, 4), r"`num_remove` must be an int in \[1, 3\]"),
        (lambda: make_depth_plan(model, [0.0] * 4, 0), r"`num_remove` must be an int in \[1, 3\].*got 0"),
        (lambda: make_depth_plan(model, [0.0] * 4, True), r"`num_remove` must be an int .*got True"),
        (lambda: make_depth_plan(model, [0.0] * 3, 1), r"one score per block \(4\), got 3"),
        (lambda: make_depth_plan(model, torch.zeros(2, 2), 1), r"must be 1-D .* got shape \(2, 2\)"),
        (
            lambda: make_depth_plan(model, [0.0, float("nan"), 0.0, 0.0], 1),
            r"must be finite, got \[nan\] at blocks \[1\]",
        ),
        (lambda: make_depth_plan(model, ["a"] * 4, 1), "`scores` must be a sequence of numbers"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
        assert _snapshot(model) == snap, match
    with pytest.raises(TypeError, match="`plan` must be a PruningPlan, got dict"):
        apply_plan(model, {"drop_layers": [1]})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`meta` must be a dict or None, got str"):
        make_depth_plan(model, [0.0] * 4, 1, meta="x")  # type: ignore[arg-type]
    assert _snapshot(model) == snap


def test_inconsistent_layer_types_refused_before_surgery():
    model = _qwen3_sliding(4)
    model.config.__dict__["layer_types"] = ["full_attention"] * 3
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="config.layer_types has 3 entries but the model has 4 blocks"):
        remove_blocks(model, [1])
    assert _snapshot(model) == snap
