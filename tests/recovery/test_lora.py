import json

import pytest
import torch
from conftest import tiny_config
from torch import nn
from transformers import LlamaForCausalLM

from lit_prune import CausalLMModule, save_pretrained
from lit_prune.recovery import (
    LLAMA_TARGETS,
    LoRASpec,
    attach_lora,
    attach_to_module,
    is_lora,
    lora_param_count,
    lora_record,
    merge_adapters,
    merge_lora,
    restore_lora,
    trainable_params,
)
from lit_prune.recovery.lora import check_lora_args, check_spec


def _model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config())


def _analytic_count(r: int, num_blocks: int, targets=LLAMA_TARGETS) -> int:
    """r · (in + out) per target projection, from the tiny config's dimensions (not from the modules)."""
    cfg = tiny_config()
    hidden, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    in_out = {
        "q_proj": hidden + q,
        "k_proj": hidden + kv,
        "v_proj": hidden + kv,
        "o_proj": q + hidden,
        "gate_proj": hidden + inter,
        "up_proj": hidden + inter,
        "down_proj": inter + hidden,
    }
    return num_blocks * r * sum(in_out[t] for t in targets)


def _lora_sites(model: nn.Module) -> set[tuple[int, str]]:
    """``(block, projection)`` of every module that carries a LoRA adapter."""
    sites = set()
    for name, module in model.named_modules():
        if hasattr(module, "lora_A"):
            parts = name.split(".")
            sites.add((int(parts[parts.index("layers") + 1]), parts[-1]))
    return sites


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=x).logits


def test_adapters_only_on_selected_blocks_with_the_analytic_parameter_count():
    model = _model()
    spec = LoRASpec(r=4, layers=(1, 3))
    assert _analytic_count(4, 2) == 4 * 2 * 1024  # the numbers behind the tiny config, spelled out once
    assert lora_param_count(model, spec) == _analytic_count(4, 2)
    wrapped = attach_lora(model, spec)
    assert is_lora(wrapped) and not is_lora(model)
    assert _lora_sites(wrapped) == {(b, t) for b in (1, 3) for t in LLAMA_TARGETS}
    assert trainable_params(wrapped) == _analytic_count(4, 2)
    assert all("lora_" in n for n, p in wrapped.named_parameters() if p.requires_grad)


def test_only_a_subset_of_projections_and_all_blocks():
    targets = ("q_proj", "v_proj", "down_proj")
    spec = LoRASpec(r=2, target_modules=targets)
    wrapped = attach_lora(_model(), spec)
    assert _lora_sites(wrapped) == {(b, t) for b in range(4) for t in targets}
    assert trainable_params(wrapped) == _analytic_count(2, 4, targets) == lora_param_count(_model(), spec)


def test_gradients_reach_only_lora_parameters():
    torch.manual_seed(0)
    wrapped = attach_lora(_model(), LoRASpec(r=4, dropout=0.0, layers=(0, 2)))
    wrapped.train()
    lora = {n: p for n, p in wrapped.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.5)
    x = torch.randint(4, 256, (2, 12))

    def backward() -> None:
        optimizer.zero_grad(set_to_none=True)
        wrapped(input_ids=x, labels=x).loss.backward()

    backward()
    for name, p in wrapped.named_parameters():
        if name not in lora:
            assert p.grad is None, name
    # lora_B starts at zero: on the first step only lora_B gets a gradient, lora_A's is exactly zero
    for name, p in lora.items():
        if "lora_B" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name
    optimizer.step()
    assert all(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    backward()  # lora_B is now non-zero: every adapter parameter gets a gradient
    for name, p in wrapped.named_parameters():
        if name in lora:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_merge_keeps_the_logits_and_returns_the_plain_model():
    model = _model()
    x = torch.randint(4, 256, (2, 10))
    base = _logits(model, x)
    wrapped = attach_lora(model, LoRASpec(r=4, layers=(0, 3)))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    adapted = _logits(wrapped, x)
    assert (adapted - base).abs().max() > 1e-2  # the adapters do change the outputs
    merged = merge_lora(wrapped)
    assert merged is model and type(merged) is LlamaForCausalLM
    assert not any(hasattr(m, "lora_A") for m in merged.modules())
    torch.testing.assert_close(_logits(merged, x), adapted, atol=1e-5, rtol=0)


def test_merge_restores_which_base_parameters_were_trainable():
    model = _model()
    model.model.embed_tokens.requires_grad_(False)  # frozen before the adapters came
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    assert not all(before.values()) and any(before.values())
    wrapped = attach_lora(model, LoRASpec(r=2))
    assert not any(p.requires_grad for n, p in wrapped.named_parameters() if "lora_" not in n)
    merged = merge_lora(wrapped)
    assert {n: p.requires_grad for n, p in merged.named_parameters()} == before


def test_attach_twice_is_refused():
    wrapped = attach_lora(_model(), LoRASpec(r=2))
    with pytest.raises(TypeError, match="already carries LoRA adapters"):
        attach_lora(wrapped, LoRASpec(r=2))


def test_count_and_checks_see_through_attached_adapters():
    """A projection that carries an adapter still counts as its base Linear (not as 0, not as `base_layer`)."""
    spec = LoRASpec(r=4, layers=(0, 2))
    wrapped = attach_lora(_model(), spec)
    assert lora_param_count(wrapped, spec) == lora_param_count(_model(), spec) == _analytic_count(4, 2)
    assert lora_param_count(wrapped, LoRASpec(r=1)) == _analytic_count(1, 4)
    check_spec(wrapped, LoRASpec(r=2, layers=(3,)))
    with pytest.raises(
        ValueError,
        match=r"\['nope'\] match no Linear .* have \['down_proj', 'gate_proj', 'k_proj', "
        r"'o_proj', 'q_proj', 'up_proj', 'v_proj'\]$",
    ):
        check_spec(wrapped, LoRASpec(target_modules=("q_proj", "nope")))


def test_record_restores_the_same_adapters_and_trainable_list():
    model = _model()
    model.lm_head.requires_grad_(False)
    wrapped = attach_lora(
        model, LoRASpec(r=3, alpha=6.0, dropout=0.0, target_modules=("q_proj", "up_proj"), layers=(2,))
    )
    record = lora_record(wrapped)
    assert record is not None and lora_record(model) is None
    record = json.loads(json.dumps(record))  # plain data: it goes into checkpoints
    assert record["spec"] == {
        "r": 3,
        "alpha": 6.0,
        "dropout": 0.0,
        "target_modules": ["q_proj", "up_proj"],
        "layers": [2],
    }
    assert "lm_head.weight" not in record["trainable_before"]
    assert "model.embed_tokens.weight" in record["trainable_before"]
    restored = restore_lora(_model(seed=1), record)
    assert sorted(restored.state_dict()) == sorted(wrapped.state_dict())
    assert _lora_sites(restored) == {(2, "q_proj"), (2, "up_proj")}
    merged = merge_lora(restored)
    assert not merged.lm_head.weight.requires_grad and merged.model.embed_tokens.weight.requires_grad


def test_spec_round_trip():
    spec = LoRASpec(r=16, alpha=32.0, dropout=0.1, target_modules=("q_proj",), layers=(0, 5))
    assert LoRASpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert LoRASpec.from_dict(LoRASpec().to_dict()) == LoRASpec()
    config = spec.peft_config()
    assert config.r == 16 and config.lora_alpha == 32.0 and config.layers_to_transform == [0, 5]
    assert set(config.target_modules) == {"q_proj"}


def test_attach_to_module_and_merge_adapters():
    module = CausalLMModule(model=_model())
    plain = module.model
    assert merge_adapters(module) is False  # nothing attached: nothing to do
    wrapped = attach_to_module(module, LoRASpec(r=2, layers=(1,)))
    assert module.model is wrapped and is_lora(module.model)
    assert trainable_params(module) == _analytic_count(2, 1)
    assert merge_adapters(module) is True
    assert module.model is plain and not is_lora(module.model)
    assert trainable_params(module) == sum(p.numel() for p in plain.parameters())
    with pytest.raises(TypeError, match="holds its Hugging Face model as `.model`"):
        attach_to_module(nn.Linear(2, 2), LoRASpec())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, "`r` must be an int >= 1, got 0"),
        ({"r": True}, "`r` must be an int >= 1, got True"),
        ({"r": 2.0}, "`r` must be an int >= 1, got 2.0"),
        ({"alpha": 0.0}, "`alpha` must be positive, got 0.0"),
        ({"dropout": 1.0}, r"`dropout` must be in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"`dropout` must be in \[0, 1\), got -0.1"),
        ({"target_modules": "q_proj"}, "`target_modules` must be a non-empty list of module names, got 'q_proj'"),
        ({"target_modules": []}, r"`target_modules` must be a non-empty list of module names, got \[\]"),
        ({"target_modules": ["q_proj", 3]}, "`target_modules` must be a non-empty list of module names"),
    ],
)
def test_check_lora_args(kwargs, match):
    args = {"r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": LLAMA_TARGETS, **kwargs}
    with pytest.raises(ValueError, match=match):
        check_lora_args(**args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, "`r` must be an int >= 1, got 0"),
        ({"alpha": 0.0}, "`alpha` must be positive, got 0.0"),
        ({"target_modules": "q_proj"}, "`target_modules` must be a non-empty list of module names"),
        ({"layers": (-1,)}, r"`layers` must be None or a non-empty list of block indices, got \[-1\]"),
        ({"layers": ()}, r"`layers` must be None or a non-empty list of block indices, got \[\]"),
        ({"layers": (True,)}, r"`layers` must be None or a non-empty list of block indices, got \[True\]"),
    ],
)
def test_spec_is_checked_on_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRASpec(**kwargs)


def test_spec_stores_lists_as_tuples():
    spec = LoRASpec(target_modules=["q_proj"], layers=[2, 0])  # type: ignore[arg-type]  # as YAML gives them
    assert spec.target_modules == ("q_proj",) and spec.layers == (2, 0)
    assert LoRASpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (
            LoRASpec(target_modules=("q_proj", "qkv_proj")),
            r"`target_modules` \['qkv_proj'\] match no Linear .*"
            r"the blocks have \['down_proj', 'gate_proj', 'k_proj'",
        ),
        (LoRASpec(layers=(0, 4)), r"`layers` must be a non-empty list of block indices in 0..3, got \[0, 4\]"),
    ],
)
def test_specs_that_do_not_fit_leave_the_model_alone(spec, match):
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        check_spec(model, spec)
    with pytest.raises(ValueError, match=match):
        attach_lora(model, spec)
    assert not any(hasattr(m, "lora_A") for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert sorted(model.state_dict()) == sorted(state)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_save_pretrained_refuses_a_model_with_unmerged_adapters(tmp_path):
    model = _model()
    module = CausalLMModule(model=model)
    attach_to_module(module, LoRASpec(r=2))
    for target in (module.model, module, model):  # the PEFT wrapper, the module holding it, the injected model
        with pytest.raises(TypeError, match="with LoRA adapters; merge the adapters first"):
            save_pretrained(target, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    merge_adapters(module)
    assert (save_pretrained(module, tmp_path / "out") / "config.json").is_file()
