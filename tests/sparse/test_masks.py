"""Masks on a live model: names, attach/apply/fold, validation, checkpoints, PEFT and the masked LoRA merge."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch import nn
from transformers import LlamaForCausalLM

from lit_prune.recovery.lora import LoRASpec, attach_lora, merge_lora
from lit_prune.sparse import (
    MASK_BUFFER,
    apply_masks,
    attach_masks,
    block_linears,
    detach_masks,
    fold_masks,
    masks_of,
    merge_lora_masked,
    prunable_linears,
    restore_masks_on_load,
    sparsity_report,
)

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
PROJ += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def make_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config()).eval()


def random_masks(model: nn.Module, keep: float = 0.5, seed: int = 1, names=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    linears = prunable_linears(model)
    return {name: torch.rand(linears[name].weight.shape, generator=g) < keep for name in (names or list(linears))}


class Holder(nn.Module):
    """A LightningModule-like wrapper: the HF model under `.model` (state-dict keys start with `model.`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def test_prunable_linears_are_the_block_projections_in_order() -> None:
    model = make_model()
    names = list(prunable_linears(model))
    assert names == [f"model.layers.{b}.{p}" for b in range(4) for p in PROJ]
    modules = dict(model.named_modules())
    assert all(prunable_linears(model)[n] is modules[n] for n in names)
    assert [list(block) for block in block_linears(model)] == [names[7 * b : 7 * b + 7] for b in range(4)]
    assert list(prunable_linears(Holder(model))) == names


def test_attach_apply_report_fold_round_trip() -> None:
    model = make_model()
    masks = random_masks(model, keep=0.25)
    attach_masks(model, masks)
    linears = prunable_linears(model)
    for name, mask in masks.items():
        assert (linears[name].weight[~mask] == 0).all()
        assert torch.equal(masks_of(model)[name], mask)
        assert masks_of(model)[name] is not mask  # a copy is stored
    expected = sum(int((~m).sum()) for m in masks.values())
    report = sparsity_report(model)
    assert report.zeros == expected and report.total == sum(m.numel() for m in masks.values())
    assert report.overall == pytest.approx(0.75, abs=0.02)
    assert len(report.blocks) == 4 and len(report.layers) == 28
    assert set(report.to_dict()) == {"sparsity/overall"} | {f"sparsity/block_{b}" for b in range(4)}
    assert str(report).startswith("Sparsity 7")

    with torch.no_grad():  # an optimizer step makes pruned weights nonzero again
        for linear in linears.values():
            linear.weight.add_(0.1)
    assert sparsity_report(model).zeros < expected
    assert apply_masks(model) == 28
    assert sparsity_report(model).zeros == expected

    removed = fold_masks(model)
    assert set(removed) == set(masks)
    assert not any(k.endswith(MASK_BUFFER) for k in model.state_dict())
    assert masks_of(model) == {} and apply_masks(model) == 0
    assert sparsity_report(model).zeros == expected


def test_partial_masks_replace_and_detach() -> None:
    model = make_model()
    name = "model.layers.2.mlp.down_proj"
    attach_masks(model, random_masks(model, keep=0.9, names=[name]))
    second = random_masks(model, keep=0.5, seed=7, names=[name])
    attach_masks(model, second)  # replaces, does not combine
    assert list(masks_of(model)) == [name] and torch.equal(masks_of(model)[name], second[name])
    weight = prunable_linears(model)[name].weight.detach().clone()
    assert set(detach_masks(model)) == {name}
    assert masks_of(model) == {} and torch.equal(prunable_linears(model)[name].weight, weight)
    assert sparsity_report(model).layers[name] > 0.4 and sparsity_report(model).blocks[0] == 0.0


def test_attach_masks_misconfiguration_leaves_model_unmodified() -> None:
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = random_masks(model)
    q = "model.layers.0.self_attn.q_proj"
    cases = [
        (ValueError, r"`masks` has key 'model.layers.9.mlp.up_proj', which is not one of the 28 prunable", {
            **good, "model.layers.9.mlp.up_proj": good[q]}),
        (ValueError, r"`masks` has key 'lm_head'", {**good, "lm_head": torch.ones(256, 64, dtype=torch.bool)}),
        (ValueError, r"`masks\['model.layers.0.self_attn.q_proj'\]` must have the weight's shape \(out, in\) = "
                     r"\(96, 64\), got \(64, 96\)", {**good, q: good[q].T}),
        (TypeError, r"`masks\['model.layers.0.self_attn.q_proj'\]` must be a bool tensor .*got torch.float32", {
            **good, q: good[q].float()}),
        (TypeError, r"`masks` must be a mapping", [good[q]]),
    ]  # fmt: skip
    for error, match, masks in cases:
        with pytest.raises(error, match=match):
            attach_masks(model, masks)
        assert masks_of(model) == {}
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())
    q_proj = prunable_linears(model)[q]
    torch.nn.utils.prune.identity(q_proj, "weight")
    with pytest.raises(ValueError, match=r"`model.layers.0.self_attn.q_proj` is pruned with torch.nn.utils.prune"):
        attach_masks(model, {q: good[q]})


def test_masks_survive_a_state_dict_round_trip() -> None:
    model = make_model()
    masks = random_masks(model, names=list(prunable_linears(model))[:9])
    attach_masks(model, masks)
    state = Holder(model).state_dict()
    assert "model.model.layers.0.self_attn.q_proj.weight_mask" in state

    fresh = Holder(make_model(seed=5))
    with pytest.raises(RuntimeError, match="Unexpected key"):  # a fresh model has no buffers to load into
        fresh.load_state_dict(state)
    handle = restore_masks_on_load(fresh)
    fresh.load_state_dict(state)  # strict
    handle.remove()
    restored = masks_of(fresh)
    assert list(restored) == list(masks) and all(torch.equal(restored[n], masks[n]) for n in masks)
    assert sparsity_report(fresh).zeros == sparsity_report(model).zeros

    fresh_plain = make_model(seed=6)  # masks attached first: a plain strict load also works
    attach_masks(fresh_plain, {n: torch.ones_like(m) for n, m in masks.items()})
    fresh_plain.load_state_dict(model.state_dict())
    assert all(torch.equal(masks_of(fresh_plain)[n], masks[n]) for n in masks)


def test_mask_buffer_lives_on_the_peft_base_layer_and_survives_merges(caplog: pytest.LogCaptureFixture) -> None:
    model = make_model()
    masks = random_masks(model)
    attach_masks(model, masks)
    zeros = sparsity_report(model).zeros
    wrapped = attach_lora(model, LoRASpec(r=2, dropout=0.0))
    assert list(prunable_linears(wrapped)) == list(masks)
    keys = [k for k in wrapped.state_dict() if k.endswith(MASK_BUFFER)]
    assert len(keys) == 28 and keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight_mask"
    for name, param in wrapped.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.1)  # a non-zero update
    assert apply_masks(wrapped) == 28  # finds the base layers

    with caplog.at_level("INFO", logger="lit_prune.sparse.masks"):
        merged = merge_lora_masked(wrapped)
    assert "Merged LoRA and re-applied 28 masks; dropped update norm" in caplog.text
    assert merged is model
    assert isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)
    assert sparsity_report(merged).zeros == zeros
    linears = prunable_linears(merged)
    assert all((linears[n].weight[~m] == 0).all() for n, m in masks.items())
    assert all(torch.equal(masks_of(merged)[n], m) for n, m in masks.items())

    dense = make_model()  # the plain merge_lora re-applies the masks too (the buffers survive the merge)
    attach_masks(dense, masks)
    wrapped = attach_lora(dense, LoRASpec(r=2, dropout=0.0))
    for name, param in wrapped.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.1)
    plain = merge_lora(wrapped)
    assert sparsity_report(plain).zeros == zeros


def test_merge_lora_masked_needs_adapters() -> None:
    with pytest.raises(TypeError, match="merge_lora_masked needs a model with LoRA adapters, got LlamaForCausalLM"):
        merge_lora_masked(make_model())
