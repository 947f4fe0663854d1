import pytest
import torch
from conftest import tiny_config
from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lit_prune import UnsupportedModelError, adapter_for
from lit_prune.arch import LlamaAdapter, supported_model_types, unwrap


def test_supported_types_cover_the_llama_family():
    assert {"llama", "mistral", "qwen2", "qwen3"} <= set(supported_model_types())


def test_structure_views(tiny_model):
    ad = adapter_for(tiny_model)
    assert isinstance(ad, LlamaAdapter)
    assert ad.num_blocks(tiny_model) == 4
    assert ad.head_dim(tiny_model) == 24  # from the config, not 64 // 4
    views = ad.attentions(tiny_model)
    assert [(v.num_heads, v.num_kv_heads, v.group_size) for v in views] == [(4, 2, 2)] * 4
    assert views[0].q.linear is tiny_model.model.layers[0].self_attn.q_proj
    assert views[0].o.linear.in_features == 4 * 24
    assert views[0].o.weight().shape == (64, 4 * 24)
    mlp = ad.mlp(ad.blocks(tiny_model)[2])
    assert mlp.down.linear is tiny_model.model.layers[2].mlp.down_proj
    assert mlp.intermediate_size == 96
    assert ad.embeddings(tiny_model) is tiny_model.model.embed_tokens
    assert ad.lm_head(tiny_model) is tiny_model.lm_head
    assert ad.final_norm(tiny_model) is tiny_model.model.norm


def test_head_counts_follow_module_shapes(tiny_model):
    """After a (simulated) head removal the views report the new width."""
    attn = tiny_model.model.layers[1].self_attn
    attn.q_proj = torch.nn.Linear(64, 2 * 24, bias=False)
    attn.o_proj = torch.nn.Linear(2 * 24, 64, bias=False)
    ad = adapter_for(tiny_model)
    assert ad.attention(tiny_model.model.layers[1], ad.head_dim(tiny_model)).num_heads == 2


def _expected_counts(model):
    cfg = model.config
    d, hd, h, g = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    bias = 1 if getattr(cfg, "attention_bias", False) else 0
    head = hd * (d + bias) + hd * d
    group = (h // g) * head + 2 * hd * (d + bias)
    neuron = 3 * d
    return head, group, neuron


@pytest.mark.parametrize("bias", [False, True])
def test_parameter_accounting(bias):
    model = LlamaForCausalLM(tiny_config(attention_bias=bias))
    ad = adapter_for(model)
    view = ad.attentions(model)[0]
    head, group, neuron = _expected_counts(model)
    assert ad.head_params(view) == head
    assert ad.kv_group_params(view) == group
    assert ad.neuron_params(ad.mlps(model)[0]) == neuron
    # a block = all KV groups + all neurons + two RMSNorm weights (+ the o_proj bias)
    cfg = model.config
    o_bias = cfg.hidden_size if bias else 0  # shared by all heads, owned by none
    expected_block = cfg.num_key_value_heads * group + cfg.intermediate_size * neuron + 2 * cfg.hidden_size + o_bias
    assert ad.block_params(model) == [expected_block] * cfg.num_hidden_layers
    total = sum(p.numel() for p in model.parameters())
    assert ad.total_params(model) == total
    assert ad.embedding_params(model) == 2 * cfg.vocab_size * cfg.hidden_size  # untied head
    assert ad.non_embedding_params(model) == sum(ad.block_params(model)) + cfg.hidden_size  # + final norm


def test_tied_embeddings_count_once():
    model = LlamaForCausalLM(tiny_config(tie_word_embeddings=True))
    ad = adapter_for(model)
    cfg = model.config
    assert ad.embedding_params(model) == cfg.vocab_size * cfg.hidden_size
    assert ad.total_params(model) == ad.embedding_params(model) + ad.non_embedding_params(model)


@pytest.mark.parametrize(
    ("config_cls", "model_cls"), [(MistralConfig, MistralForCausalLM), (Qwen2Config, Qwen2ForCausalLM)]
)
def test_other_family_members(config_cls, model_cls):
    cfg = config_cls(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
    model = model_cls(cfg)
    ad = adapter_for(model)
    assert ad.num_blocks(model) == 2
    assert ad.attentions(model)[1].num_kv_heads == 2
    assert ad.total_params(model) == sum(p.numel() for p in model.parameters())


def test_unwraps_peft_and_module(tiny_model):
    from peft import LoraConfig, get_peft_model

    from lit_prune import CausalLMModule

    peft_model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert unwrap(peft_model) is tiny_model
    assert adapter_for(peft_model).blocks(peft_model) is tiny_model.model.layers
    module = CausalLMModule(model=tiny_model)
    assert adapter_for(module).num_blocks(module) == 4


def test_unsupported_model_type_names_it():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    supported = r"supported: \['gemma3_text', 'llama', 'mistral', 'phi', 'phi3', 'qwen2', 'qwen3'\]"
    with pytest.raises(UnsupportedModelError, match=rf"model_type='gpt2'.*{supported}"):
        adapter_for(model)
    with pytest.raises(UnsupportedModelError, match="model_type=None"):
        adapter_for(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("target_modules", [["q_proj", "lm_head"], ["q_proj", "v_proj", "embed_tokens", "lm_head"]])
def test_counts_ignore_unmerged_lora(tiny_model, target_modules):
    """LoRA A/B weights (even on lm_head or the embedding) are not counted: the counts describe the base model."""
    from peft import LoraConfig, get_peft_model

    from lit_prune.eval import count_params

    ad = adapter_for(tiny_model)
    bare = (ad.total_params(tiny_model), ad.embedding_params(tiny_model), ad.non_embedding_params(tiny_model))
    bare_blocks = ad.block_params(tiny_model)
    peft_model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=target_modules))
    assert sum(p.numel() for p in peft_model.parameters()) > bare[0]  # the adapters are there
    assert tiny_model.lm_head.base_layer is not None  # lm_head is a lora.Linear now
    assert (ad.total_params(peft_model), ad.embedding_params(peft_model), ad.non_embedding_params(peft_model)) == bare
    assert ad.block_params(peft_model) == bare_blocks
    counts = count_params(peft_model)
    assert (counts.total, counts.embedding, counts.non_embedding) == bare


# peft >= 0.18 suggests ensure_weight_tying (not in older peft)
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
def test_counts_ignore_lora_on_a_tied_head():
    from peft import LoraConfig, get_peft_model

    model = LlamaForCausalLM(tiny_config(tie_word_embeddings=True))
    ad = adapter_for(model)
    bare = (ad.total_params(model), ad.embedding_params(model))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert (ad.total_params(peft_model), ad.embedding_params(peft_model)) == bare
    assert bare[1] == model.config.vocab_size * model.config.hidden_size


def test_blocks_rejects_layers_that_are_not_a_module_list(tiny_model):
    ad = adapter_for(tiny_model)
    object.__setattr__(tiny_model.model, "layers", list(tiny_model.model.layers))  # shadows the ModuleList
    with pytest.raises(TypeError, match="Expected `layers` to be an nn.ModuleList, got list"):
        ad.blocks(tiny_model)

    class WrongLayers(LlamaAdapter):
        layers_attr = "norm"

    with pytest.raises(TypeError, match="Expected `norm` to be an nn.ModuleList, got LlamaRMSNorm"):
        WrongLayers().blocks(LlamaForCausalLM(tiny_config(num_hidden_layers=1)))


def test_attention_rejects_widths_not_multiple_of_head_dim(tiny_model):
    block = tiny_model.model.layers[0]
    block.self_attn.q_proj = torch.nn.Linear(64, 50, bias=False)
    ad = adapter_for(tiny_model)
    with pytest.raises(ValueError, match=r"q_proj has 50 rows but o_proj takes 96 inputs \(4 heads of head_dim=24\)"):
        ad.attention(block, ad.head_dim(tiny_model))
    block.self_attn.q_proj = torch.nn.Linear(64, 96, bias=False)
    block.self_attn.k_proj = torch.nn.Linear(64, 30, bias=False)
    with pytest.raises(ValueError, match=r"k/v widths \(30\) are not positive multiples of head_dim=24"):
        ad.attention(block, ad.head_dim(tiny_model))
    block.self_attn.o_proj = torch.nn.Linear(50, 64, bias=False)
    with pytest.raises(ValueError, match=r"o_proj width 50 is not a multiple of head_dim=24"):
        ad.attention(block, ad.head_dim(tiny_model))
