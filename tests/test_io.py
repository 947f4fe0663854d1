import json

import pytest
import torch
from conftest import tiny_config
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from lit_prune import CausalLMModule, load_pretrained, save_pretrained
from lit_prune.io import MODEL_TYPE_KEY, PLANS_FILE, check_record_against_weights
from lit_prune.plan import PruningPlan
from lit_prune.surgery import LAYER_SHAPES_KEY, apply_plan, block_shapes

NONUNIFORM = PruningPlan(
    num_layers=4,
    keep_heads={1: [0, 2], 2: [2, 3]},
    keep_neurons={0: [3, 5, 9], 3: range(40)},
    heads_before=[4] * 4,
    neurons_before=[96] * 4,
)


def _ids() -> torch.Tensor:
    return torch.randint(4, 256, (2, 10), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("tied", [False, True])
def test_nonuniform_round_trip_through_load_pretrained(tmp_path, tied, tiny_tokenizer):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(tie_word_embeddings=tied)).eval()
    apply_plan(model, NONUNIFORM)
    ids = _ids()
    expected = model(ids).logits
    folder = save_pretrained(model, tmp_path / "pruned", tokenizer=tiny_tokenizer, plans=[NONUNIFORM])
    saved = json.loads((folder / "config.json").read_text())
    assert len(saved[LAYER_SHAPES_KEY]) == 4 and saved["head_dim"] == 24
    assert "load_pretrained" in saved["model_type"]
    assert PruningPlan.from_dict(json.loads((folder / PLANS_FILE).read_text())[0]) == NONUNIFORM
    assert (folder / "tokenizer.json").is_file()

    again = load_pretrained(folder)
    assert type(again) is LlamaForCausalLM and not again.training
    assert block_shapes(again) == block_shapes(model)
    torch.testing.assert_close(again(ids).logits, expected, rtol=0, atol=0)
    if tied:
        assert again.lm_head.weight is again.model.embed_tokens.weight
    # generation with the KV cache works on the reloaded model
    out = again.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=3)
    assert out.shape == (1, 9)
    # save again from the reloaded model: still non-uniform, still loads
    again2 = load_pretrained(save_pretrained(again, tmp_path / "again"), dtype=torch.bfloat16)
    assert again2.dtype == torch.bfloat16 and block_shapes(again2) == block_shapes(model)


def test_plain_transformers_refuses_nonuniform_and_names_load_pretrained(tmp_path):
    model = LlamaForCausalLM(tiny_config())
    apply_plan(model, NONUNIFORM)
    folder = save_pretrained(model, tmp_path / "pruned")
    saved = json.loads((folder / "config.json").read_text())
    assert saved[MODEL_TYPE_KEY] == "llama"
    for load in (AutoModelForCausalLM.from_pretrained, AutoConfig.from_pretrained):
        with pytest.raises(ValueError, match=r"load it with lit_prune\.load_pretrained"):
            load(folder)
    # a folder written by transformers' own save_pretrained still loads through load_pretrained
    model.save_pretrained(tmp_path / "hf")
    assert block_shapes(load_pretrained(tmp_path / "hf")) == block_shapes(model)


def test_uniform_save_is_a_stock_checkpoint(tmp_path):
    model = LlamaForCausalLM(tiny_config()).eval()
    apply_plan(model, PruningPlan(num_layers=4, keep_neurons={b: range(48) for b in range(4)}))
    folder = save_pretrained(model, tmp_path / "pruned")
    assert LAYER_SHAPES_KEY not in json.loads((folder / "config.json").read_text())
    ids = _ids()
    for loaded in (AutoModelForCausalLM.from_pretrained(folder), load_pretrained(folder)):
        torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_causal_lm_module_loads_a_nonuniform_folder(tmp_path, tiny_tokenizer):
    model = LlamaForCausalLM(tiny_config())
    apply_plan(model, NONUNIFORM)
    folder = save_pretrained(model, tmp_path / "pruned", tokenizer=tiny_tokenizer)
    module = CausalLMModule(model=str(folder))
    assert block_shapes(module.model) == block_shapes(model)


def test_save_refuses_peft_models(tmp_path):
    peft = pytest.importorskip("peft")
    model = LlamaForCausalLM(tiny_config())
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="with LoRA adapters; merge the adapters first"):
        save_pretrained(wrapped, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_malformed_record_is_reported(tmp_path):
    model = LlamaForCausalLM(tiny_config())
    apply_plan(model, NONUNIFORM)
    folder = save_pretrained(model, tmp_path / "pruned")
    config = json.loads((folder / "config.json").read_text())
    config[LAYER_SHAPES_KEY] = config[LAYER_SHAPES_KEY][:2]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"has 2 entries for 4 blocks \(num_hidden_layers\); the checkpoint is "
                                         r"inconsistent: restore the config\.json"):
        load_pretrained(folder)


def test_uniform_head_count_the_config_class_rejects_is_recorded(tmp_path):
    # transformers' LlamaConfig refuses hidden_size (64) not divisible by the head count (3) when loading
    model = LlamaForCausalLM(tiny_config(num_key_value_heads=4, head_dim=16)).eval()
    apply_plan(model, PruningPlan(num_layers=4, keep_heads={b: [0, 1, 3] for b in range(4)}))
    folder = save_pretrained(model, tmp_path / "pruned")
    saved = json.loads((folder / "config.json").read_text())
    assert saved[LAYER_SHAPES_KEY][0]["num_attention_heads"] == 3
    assert 64 % saved["num_attention_heads"] == 0 and saved["num_attention_heads"] >= 3
    ids = _ids()
    torch.testing.assert_close(load_pretrained(folder)(ids).logits, model(ids).logits, rtol=0, atol=0)


def _edit_record(folder, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("sharded", [False, True])
def test_record_that_disagrees_with_the_weights_names_block_and_tensor(tmp_path, sharded):
    model = LlamaForCausalLM(tiny_config())
    apply_plan(model, NONUNIFORM)  # block 0: 3 neurons; block 1: 2 heads (one per KV group)
    folder = save_pretrained(model, tmp_path / "pruned", **({"max_shard_size": "40KB"} if sharded else {}))
    assert (folder / "model.safetensors.index.json").is_file() == sharded
    good = (folder / "config.json").read_text()

    _edit_record(folder, lambda c: c[LAYER_SHAPES_KEY][0].update(intermediate_size=5))
    expected = (
        r"^Block 0: config\.json records num_attention_heads=4, num_key_value_heads=2, intermediate_size=5 "
        r"\(head_dim=24, hidden_size=64\), so model\.layers\.0\.mlp\.gate_proj\.weight should have shape \[5, 64\], "
        r"but model.*\.safetensors stores \[3, 64\]; the lit_prune_layer_shapes record"
    )
    with pytest.raises(ValueError, match=expected):
        load_pretrained(folder)

    (folder / "config.json").write_text(good)
    _edit_record(folder, lambda c: c[LAYER_SHAPES_KEY][1].update(num_attention_heads=4))
    expected = (
        r"^Block 1: .*q_proj\.weight should have shape \[96, 64\], but .* stores \[48, 64\]; "
        r".*restore the config\.json that lit_prune\.save_pretrained wrote"
    )
    with pytest.raises(ValueError, match=expected):
        load_pretrained(folder)

    (folder / "config.json").write_text(good)

    def drop_last_block(config):  # consistent with itself, not with the weights
        config[LAYER_SHAPES_KEY] = config[LAYER_SHAPES_KEY][:3]
        config["num_hidden_layers"] = 3

    _edit_record(folder, drop_last_block)
    with pytest.raises(ValueError, match=r"hold 4 blocks but config\.json records 3 \(num_hidden_layers=3\); the "):
        load_pretrained(folder)
    (folder / "config.json").write_text(good)
    assert block_shapes(load_pretrained(folder)) == block_shapes(model)


def test_record_check_names_missing_tensors(tmp_path):
    model = LlamaForCausalLM(tiny_config())
    apply_plan(model, NONUNIFORM)
    folder = save_pretrained(model, tmp_path / "pruned")
    config = load_pretrained(folder).config
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.2.self_attn.v_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"^Block 2: the weights in .* have no tensor for 'self_attn\.v_proj\.weight'"):
        load_pretrained(folder)
    check_record_against_weights(tmp_path, config, block_shapes(model))  # no safetensors there: nothing to check
