import copy
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import quiet_trainer, tiny_config
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader
from transformers import LlamaForCausalLM

from lit_prune import CausalLMModule, load_pretrained
from lit_prune.arch import adapter_for
from lit_prune.callbacks import CKALoRA, DepthPruning, LoRA, MixtureOfPruners, WidthPruning
from lit_prune.functional import next_token_nll
from lit_prune.plan import PruningPlan
from lit_prune.recovery import LLAMA_TARGETS, LoRASpec, attach_to_module, is_lora, merge_adapters
from lit_prune.surgery import BlockShape, block_shapes, is_uniform

CFG = tiny_config()
HD = CFG.head_dim  # 24
HIDDEN = CFG.hidden_size  # 64
NO_OUT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
"""Targets without o_proj and down_proj: adapters on them cannot revive a zeroed block, head or neuron."""


def _model(layers=6, identity=(), seed=0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(num_hidden_layers=layers, **overrides))
    with torch.no_grad():
        for i in identity:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    return model


def _loader(n=8, t=16, seed=0, batch_size=4) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader([{"input_ids": w} for w in torch.randint(4, 256, (n, t), generator=g)], batch_size=batch_size)


_trainer = quiet_trainer


def _analytic(shapes: list[BlockShape], layers, r: int, targets=LLAMA_TARGETS) -> int:
    """r · (in + out) per target projection of the chosen blocks, from the block widths (heads, groups, neurons)."""
    total = 0
    for b in layers:
        q, kv, inter = (
            shapes[b].num_attention_heads * HD,
            shapes[b].num_key_value_heads * HD,
            shapes[b].intermediate_size,
        )
        in_out = {
            "q_proj": HIDDEN + q,
            "k_proj": HIDDEN + kv,
            "v_proj": HIDDEN + kv,
            "o_proj": q + HIDDEN,
            "gate_proj": HIDDEN + inter,
            "up_proj": HIDDEN + inter,
            "down_proj": inter + HIDDEN,
        }
        total += r * sum(in_out[t] for t in targets)
    return total


def _dense(num_blocks: int) -> list[BlockShape]:
    return [BlockShape(CFG.num_attention_heads, CFG.num_key_value_heads, CFG.intermediate_size)] * num_blocks


def _lora_blocks(module: nn.Module) -> set[int]:
    blocks = set()
    for name, m in module.named_modules():
        if hasattr(m, "lora_A"):
            parts = name.split(".")
            blocks.add(int(parts[parts.index("layers") + 1]))
    return blocks


def _lora_params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if "lora_" in n}


def _optimizer_ids(trainer: pl.Trainer) -> set[int]:
    return {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits (LoRA dropout off), the mode restored afterwards."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=x).logits
    model.train(was)
    return out


X = torch.randint(4, 256, (2, 12), generator=torch.Generator().manual_seed(42))


def test_lora_trains_only_the_adapters_of_the_chosen_blocks(tmp_path):
    module = CausalLMModule(model=_model(layers=4))
    base = {k: v.clone() for k, v in module.model.state_dict().items()}
    callback = LoRA(r=4, layers=[3, 1], merge_at_end=False, verbose=0)
    trainer = _trainer(tmp_path, [callback])
    trainer.fit(module, train_dataloaders=_loader())
    assert trainer.global_step == 3 and is_lora(module.model)
    assert _lora_blocks(module) == {1, 3}
    expected = _analytic(_dense(4), [1, 3], r=4)
    assert expected == 2 * 4 * 1024
    assert callback.attachments == [
        {"layers": [1, 3], "trainable": expected, "all_blocks": _analytic(_dense(4), range(4), r=4), "global_step": 0}
    ]
    lora = _lora_params(module)
    assert sum(p.numel() for p in lora.values()) == expected
    assert {n for n, p in module.named_parameters() if p.requires_grad} == set(lora)
    assert _optimizer_ids(trainer) == {id(p) for p in lora.values()}  # the optimizer holds exactly the adapters
    assert all(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # they were trained
    # the base weights did not move
    state = module.model.get_base_model().state_dict()
    for key, value in base.items():
        wrapped_key = key.replace(".weight", ".base_layer.weight") if key not in state else key
        assert torch.equal(state[wrapped_key], value), key


def test_merged_model_gives_the_adapter_model_logits_after_training(tmp_path):
    model = _model(layers=4)
    before = _logits(model, X)
    module = CausalLMModule(model=model, lr=1e-2)
    _trainer(tmp_path, [LoRA(r=4, merge_at_end=False, verbose=0)]).fit(module, train_dataloaders=_loader())
    adapted = _logits(module.model, X)
    assert (adapted - before).abs().max() > 1e-2  # lora_B moved away from zero
    assert not any(p.requires_grad for n, p in module.named_parameters() if "lora_" not in n)
    plain = module.model.get_base_model()
    assert plain is model
    assert merge_adapters(module)
    assert module.model is model and not _lora_blocks(module)
    torch.testing.assert_close(_logits(module.model, X), adapted, atol=1e-5, rtol=0)
    assert all(p.requires_grad for p in module.parameters())  # trainable again, as before the adapters


def test_merge_at_end_restores_trainable_flags_and_saves_model_and_adapter(tmp_path, tiny_tokenizer):
    model = _model(layers=6, identity=(1, 4))
    model.model.embed_tokens.requires_grad_(False)
    module = CausalLMModule(model=model, tokenizer=tiny_tokenizer, lr=1e-2)
    depth = DepthPruning(criterion="bi", num_layers=2, calibration=_loader(), verbose=0)
    lora = LoRA(r=2, layers=[0, 2], save_adapter=True, verbose=0)
    _trainer(tmp_path, [depth, lora]).fit(module, train_dataloaders=_loader(seed=1))
    assert depth.plans[0]["drop_layers"] == [1, 4]
    assert not is_lora(module.model) and module.model is model and not _lora_blocks(module)
    assert not model.model.embed_tokens.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if "embed_tokens" not in n)
    merged = tmp_path / "lora-merged"
    reloaded = load_pretrained(merged)
    assert reloaded.config.num_hidden_layers == 4
    torch.testing.assert_close(_logits(reloaded, X), _logits(model, X), atol=0, rtol=0)
    assert json.loads((merged / "pruning_plans.json").read_text())[0]["drop_layers"] == [1, 4]
    assert (merged / "tokenizer.json").is_file()
    adapter = json.loads((tmp_path / "lora-adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and adapter["layers_to_transform"] == [0, 2]
    assert set(adapter["target_modules"]) == set(LLAMA_TARGETS)
    assert any(p.name.startswith("adapter_model") for p in (tmp_path / "lora-adapter").iterdir())
    # the adapter applies to the pruned, unmerged model saved next to it: together they give the merged model
    from peft import PeftModel

    assert adapter["base_model_name_or_path"] == str((tmp_path / "lora-base").resolve())
    rebuilt = PeftModel.from_pretrained(load_pretrained(tmp_path / "lora-base"), tmp_path / "lora-adapter")
    assert not torch.equal(_logits(load_pretrained(tmp_path / "lora-base"), X), _logits(model, X))
    torch.testing.assert_close(_logits(rebuilt, X), _logits(model, X), atol=1e-5, rtol=0)


def test_nothing_saved_without_merge_and_a_second_fit_keeps_the_adapters(tmp_path):
    module = CausalLMModule(model=_model(layers=2))
    lora = LoRA(r=2, merge_at_end=False, save_adapter=False, verbose=0)
    _trainer(tmp_path, [lora], max_steps=1).fit(module, train_dataloaders=_loader())
    assert is_lora(module.model)
    assert not (tmp_path / "lora-merged").exists() and not (tmp_path / "lora-adapter").exists()
    wrapper, keys = module.model, sorted(module.state_dict())
    trainer = _trainer(tmp_path, [lora], max_steps=2)
    trainer.fit(module, train_dataloaders=_loader())  # training goes on with the adapters already there
    assert module.model is wrapper and sorted(module.state_dict()) == keys
    assert len(lora.attachments) == 1
    assert _optimizer_ids(trainer) == {id(p) for p in _lora_params(module).values()}


def test_cka_lora_never_picks_identity_blocks(tmp_path, caplog):
    identity = (2, 5)  # the last block too: it is scored on its own output
    module = CausalLMModule(model=_model(identity=identity))
    callback = CKALoRA(ratio=4 / 6, r=2, merge_at_end=False, verbose=2)
    logger = CSVLogger(tmp_path / "logs")
    with caplog.at_level("INFO"):
        _trainer(tmp_path, [callback], logger=logger).fit(module, train_dataloaders=_loader())
    importance = callback.last_importance
    assert importance is not None and importance.shape == (6,)
    assert importance[list(identity)].abs().max() < 1e-9
    assert importance[[0, 1, 3, 4]].min() > 1e-3
    assert callback.attachments[0]["layers"] == [0, 1, 3, 4]
    assert _lora_blocks(module) == {0, 1, 3, 4}
    assert callback.attachments[0]["trainable"] == _analytic(_dense(6), [0, 1, 3, 4], r=2)
    for m in module.modules():  # the CKA pass left no hook behind
        assert not m._forward_hooks and not m._forward_pre_hooks
    logger.save()
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "cka_lora/selected/block_00" in header and "cka_lora/selected/block_02" not in header
    assert "cka_lora/importance/block_05" in header and "cka_lora/trainable_params" in header
    assert "CKALoRA: attached r=2 adapters to 4/6 blocks [0, 1, 3, 4]" in caplog.text
    assert "CKALoRA: block importance 1 - CKA = [0:" in caplog.text


class ProbeDepth(DepthPruning):
    """Records the logits the model gives with its adapters, merged before surgery, and after surgery."""

    def _run(self, trainer, pl_module):
        self.was_lora = is_lora(pl_module.model)
        self.adapter_logits = _logits(pl_module.model, X)
        super()._run(trainer, pl_module)

    def prune(self, pl_module, calibration):
        self.merged_before = not is_lora(pl_module.model)
        self.before = _logits(pl_module.model, X)
        plan = super().prune(pl_module, calibration)
        self.after = _logits(pl_module.model, X)
        return plan


class ProbeWidth(WidthPruning):
    def _run(self, trainer, pl_module):
        self.was_lora = is_lora(pl_module.model)
        self.adapter_logits = _logits(pl_module.model, X)
        super()._run(trainer, pl_module)

    def prune(self, pl_module, calibration):
        self.merged_before = not is_lora(pl_module.model)
        self.before = _logits(pl_module.model, X)
        plan = super().prune(pl_module, calibration)
        self.after = _logits(pl_module.model, X)
        return plan


def _check_probe(probe, dense_logits) -> None:
    assert probe.was_lora and probe.merged_before
    assert (probe.adapter_logits - dense_logits).abs().max() > 1e-3  # the adapters had been trained
    torch.testing.assert_close(probe.before, probe.adapter_logits, atol=1e-5, rtol=0)  # merged, outputs kept
    torch.testing.assert_close(probe.after, probe.before, atol=1e-5, rtol=0)  # only dead structure removed


def test_depth_pruning_after_lora_merges_first_and_lora_comes_back(tmp_path, caplog):
    model = _model(identity=(1, 4))
    dense_logits = _logits(model, X)
    module = CausalLMModule(model=model, lr=1e-2)
    lora = LoRA(r=2, target_modules=NO_OUT, merge_at_end=False, verbose=0)
    depth = ProbeDepth(criterion="bi", num_layers=2, at_epoch=1, calibration=_loader(), verbose=1)
    trainer = _trainer(tmp_path, [lora, depth], max_steps=-1, max_epochs=2)
    with caplog.at_level("INFO"):
        trainer.fit(module, train_dataloaders=_loader(seed=1))
    assert "ProbeDepth: merged the LoRA adapters into the weights before pruning" in caplog.text
    assert depth.plans[0]["drop_layers"] == [1, 4]
    _check_probe(depth, dense_logits)
    assert trainer.global_step == 4  # 2 batches per epoch, training went on after surgery
    assert [a["layers"] for a in lora.attachments] == [list(range(6)), list(range(4))]
    assert [a["global_step"] for a in lora.attachments] == [0, 2]
    assert lora.attachments[1]["trainable"] == _analytic(_dense(4), range(4), r=2, targets=NO_OUT)
    assert is_lora(module.model) and len(module.model.get_base_model().model.layers) == 4
    assert _optimizer_ids(trainer) == {id(p) for p in _lora_params(module).values()}
    assert all(p.abs().sum() > 0 for n, p in _lora_params(module).items() if "lora_B" in n)  # the new ones trained


def test_module_apply_plan_merges_the_adapters_first():
    module = CausalLMModule(model=_model(identity=(1, 4)))
    dense_logits = _logits(module.model, X)
    attach_to_module(module, LoRASpec(r=2, target_modules=NO_OUT))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in _lora_params(module).values():
            p.normal_(0, 0.05)
    adapted = _logits(module.model, X)
    assert (adapted - dense_logits).abs().max() > 1e-2
    module.apply_plan(PruningPlan(drop_layers=(1, 4), num_layers=6))
    assert not is_lora(module.model) and len(module.model.model.layers) == 4
    torch.testing.assert_close(_logits(module.model, X), adapted, atol=1e-5, rtol=0)
    assert module.pruning_plans[0]["drop_layers"] == [1, 4]


def _width_model() -> LlamaForCausalLM:
    """Heads 1 and 3 and neurons 10..29 of every block write nothing (zero o_proj / down_proj columns)."""
    model = _model(layers=4)
    with torch.no_grad():
        for block in model.model.layers:
            for h in (1, 3):
                block.self_attn.o_proj.weight[:, h * HD : (h + 1) * HD] = 0
            block.mlp.down_proj.weight[:, 10:30] = 0
    return model


def test_width_pruning_after_cka_lora_merges_first_and_cka_lora_comes_back(tmp_path):
    model = _width_model()
    dense_logits = _logits(model, X)
    ad = adapter_for(model)
    dead = 4 * (2 * ad.head_params(ad.attentions(model)[0]) + 20 * ad.neuron_params(ad.mlps(model)[0]))
    module = CausalLMModule(model=model, lr=1e-2)
    lora = CKALoRA(ratio=0.5, r=2, target_modules=NO_OUT, merge_at_end=False, verbose=0)
    width = ProbeWidth(criterion="amp", amount=dead, at_epoch=1, calibration=_loader(), verbose=0)
    trainer = _trainer(tmp_path, [lora, width], max_steps=-1, max_epochs=2)
    trainer.fit(module, train_dataloaders=_loader(seed=1))
    assert width.plans[0]["keep_heads"] == {str(b): [0, 2] for b in range(4)}  # the dead heads went
    _check_probe(width, dense_logits)
    assert trainer.global_step == 4
    assert len(lora.attachments) == 2
    shapes = block_shapes(module.model.get_base_model())
    assert shapes == [BlockShape(2, 2, 76)] * 4
    second = lora.attachments[1]
    assert len(second["layers"]) == 2 and _lora_blocks(module) == set(second["layers"])
    assert second["trainable"] == _analytic(shapes, second["layers"], r=2, targets=NO_OUT)
    assert _optimizer_ids(trainer) == {id(p) for p in _lora_params(module).values()}


def test_lora_waits_for_the_pruning_callbacks_listed_before_it(tmp_path):
    module = CausalLMModule(model=_model(identity=(1, 4)))
    depth = DepthPruning(criterion="bi", num_layers=2, at_epoch=1, calibration=_loader(), verbose=0)
    lora = LoRA(r=2, merge_at_end=False, verbose=0)
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(is_lora(pl_module.model))

    trainer = _trainer(tmp_path, [depth, lora, Spy()], max_steps=-1, max_epochs=2)
    trainer.fit(module, train_dataloaders=_loader(seed=1))
    assert seen == [False, False, True, True]  # full fine-tuning until the depth pruning ran, then LoRA
    assert [a["global_step"] for a in lora.attachments] == [2]
    assert lora.attachments[0]["layers"] == [0, 1, 2, 3]


def test_cka_lora_after_depth_pruning_selects_on_the_pruned_model(tmp_path):
    module = CausalLMModule(model=_model(identity=(1, 4)))
    depth = DepthPruning(criterion="bi", num_layers=2, calibration=_loader(), verbose=0)
    lora = CKALoRA(ratio=0.5, r=2, merge_at_end=False, verbose=0)
    _trainer(tmp_path, [depth, lora]).fit(module, train_dataloaders=_loader(seed=1))
    assert depth.plans[0]["drop_layers"] == [1, 4]
    assert lora.last_importance is not None and lora.last_importance.shape == (4,)
    assert len(lora.attachments) == 1
    layers = lora.attachments[0]["layers"]
    assert len(layers) == 2 and set(layers) <= set(range(4)) and _lora_blocks(module) == set(layers)
    order = sorted(range(4), key=lambda i: -float(lora.last_importance[i]))
    assert layers == sorted(order[:2])
    assert lora.attachments[0]["trainable"] == _analytic(_dense(4), layers, r=2)
    assert lora.attachments[0]["all_blocks"] == _analytic(_dense(4), range(4), r=2)


def test_cka_lora_after_mixture_of_pruners(tmp_path):
    torch.manual_seed(0)
    module = CausalLMModule(model=_model(intermediate_size=192))
    mop = MixtureOfPruners(
        target=0.3, proxy="ppl", decisions="LGGGGGGG", calibration=_loader(n=4), verbose=0, save_model=False
    )
    lora = CKALoRA(ratio=0.5, r=2, merge_at_end=False, verbose=0)
    _trainer(tmp_path, [mop, lora], max_steps=2).fit(module, train_dataloaders=_loader(seed=1))
    assert mop.done and mop.path.startswith("LG")
    shapes = block_shapes(module.model.get_base_model())
    assert len(shapes) == 5 and shapes[0].intermediate_size < 192
    assert lora.last_importance is not None and lora.last_importance.shape == (5,)
    (attachment,) = lora.attachments
    assert len(attachment["layers"]) == 2 and set(attachment["layers"]) <= set(range(5))
    assert attachment["trainable"] == _analytic(shapes, attachment["layers"], r=2)


def test_mixture_of_pruners_merges_before_its_steps_and_before_saving_mop_final(tmp_path):
    module = CausalLMModule(model=_model(intermediate_size=192), lr=1e-2)
    mop = MixtureOfPruners(
        target=0.3,
        proxy="ppl",
        decisions="LGGGGGGG",
        recover_epochs_between_steps=1,
        calibration=_loader(n=4),
        verbose=0,
    )
    lora = LoRA(r=2, merge_at_end=False, verbose=0)
    _trainer(tmp_path, [mop, lora], max_steps=-1, max_epochs=4, limit_train_batches=1).fit(
        module, train_dataloaders=_loader(seed=1)
    )
    assert mop.finished and mop.path == "LG"
    # attached after the depth step (fit start), merged by the width step one epoch later, attached again
    assert [a["global_step"] for a in lora.attachments][:2] == [0, 1]
    assert lora.attachments[0]["layers"] == list(range(5))
    assert is_lora(module.model)  # merge_at_end=False: MoP saved a merged copy and left the live model alone
    reloaded = load_pretrained(tmp_path / "mop-final")
    # the saved merged copy vs the live adapters: float32 rounding of W + s·BA, seen 1.1e-6 on logits of ~0.7
    torch.testing.assert_close(_logits(reloaded, X), _logits(module.model, X), atol=3e-5, rtol=0)


def test_cka_lora_after_global_width_pruning_counts_non_uniform_blocks(tmp_path):
    module = CausalLMModule(model=_model(layers=4))
    width = WidthPruning(
        criterion="amp", amount=0.25, of="non_embedding", allocation="global", calibration=_loader(), verbose=0
    )
    lora = CKALoRA(ratio=1.0, r=3, merge_at_end=False, verbose=0)
    _trainer(tmp_path, [width, lora], max_steps=2).fit(module, train_dataloaders=_loader(seed=1))
    shapes = block_shapes(module.model.get_base_model())
    assert not is_uniform(shapes)
    assert lora.attachments[0]["layers"] == [0, 1, 2, 3]
    assert lora.attachments[0]["trainable"] == _analytic(shapes, range(4), r=3)
    assert lora.attachments[0]["trainable"] < _analytic(_dense(4), range(4), r=3)


def test_resume_reattaches_the_adapters_once_and_loads_them(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    module = CausalLMModule(model=_model(identity=(1, 4)), lr=1e-2)
    depth = DepthPruning(criterion="bi", num_layers=2, calibration=_loader(), verbose=0)
    lora = LoRA(r=2, layers=[0, 3], dropout=0.0, merge_at_end=False, verbose=0)
    _trainer(tmp_path, [depth, lora, ckpt], enable_checkpointing=True, max_steps=2).fit(
        module, train_dataloaders=_loader(seed=1)
    )
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["lit_prune_lora"]["spec"]["layers"] == [0, 3]
    saved_lora = {k: v for k, v in saved["state_dict"].items() if "lora_" in k}
    assert saved_lora and all(v.abs().sum() > 0 for k, v in saved_lora.items() if "lora_B" in k)
    reloaded = CausalLMModule.load_from_checkpoint(last, model=_model(identity=(1, 4)))
    assert is_lora(reloaded.model) and _lora_blocks(reloaded) == {0, 3}
    torch.testing.assert_close(_logits(reloaded.model, X), _logits(module.model, X), atol=0, rtol=0)
    loaded = {}

    class AtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            loaded["state"] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            loaded["trainable"] = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            loaded["optimizer"] = _optimizer_ids(trainer) == {id(p) for p in _lora_params(pl_module).values()}

    resumed = CausalLMModule(model=_model(identity=(1, 4)), lr=1e-2)  # a fresh dense model, as a new run builds
    depth2 = DepthPruning(criterion="bi", num_layers=2, calibration=_loader(), verbose=0)
    lora2 = LoRA(r=2, layers=[0, 3], dropout=0.0, merge_at_end=False, verbose=0)
    trainer2 = _trainer(
        tmp_path,
        [depth2, lora2, AtStart(), ModelCheckpoint(dirpath=tmp_path / "ckpt2")],
        enable_checkpointing=True,
        max_steps=4,
    )
    trainer2.fit(resumed, train_dataloaders=_loader(seed=1), ckpt_path=last)
    assert trainer2.global_step == 4
    assert sorted(loaded["state"]) == sorted(saved["state_dict"])  # same wrapper: not wrapped twice
    for key, value in saved["state_dict"].items():
        assert torch.equal(loaded["state"][key], value), key
    assert loaded["trainable"] == _analytic(_dense(4), [0, 3], r=2) and loaded["optimizer"]
    assert len(lora2.attachments) == 1 and len(depth2.plans) == 1  # restored, not attached again
    assert _lora_blocks(resumed) == {0, 3} and len(resumed.model.get_base_model().model.layers) == 4
    assert not any(hasattr(m, "base_layer") and hasattr(m.base_layer, "lora_A") for m in resumed.modules())


def test_distillation_adds_alpha_kl_to_the_loss_with_the_unpruned_teacher(tmp_path):
    model = _model(layers=4)
    dense = copy.deepcopy(model).eval()
    module = CausalLMModule(model=model, lr=1e-2)
    depth = DepthPruning(criterion="bi", num_layers=1, calibration=_loader(), verbose=0)
    lora = LoRA(r=2, dropout=0.0, distill=True, distill_alpha=0.5, temperature=2.0, merge_at_end=False, verbose=0)
    records = []

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            teacher = pl_module.distillation.teacher
            assert len(teacher.model.layers) == 4 and len(pl_module.model.get_base_model().model.layers) == 3
            torch.testing.assert_close(_logits(teacher, X), _logits(dense, X), atol=0, rtol=0)
            assert not any(p.requires_grad for p in teacher.parameters())
            assert not {id(p) for p in teacher.parameters()} & _optimizer_ids(trainer)
            assert not any(k.startswith("distillation") for k in pl_module.state_dict())

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            ids = batch["input_ids"]
            with torch.no_grad():
                student = pl_module.model(input_ids=ids).logits
                teacher = dense(input_ids=ids).logits
            nll, count = next_token_nll(student, ids)
            log_s = torch.log_softmax(student[:, :-1] / 2.0, -1)
            log_t = torch.log_softmax(teacher[:, :-1] / 2.0, -1)
            kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * 4.0
            records.append({"ce": float(nll / count), "kl": float(kl)})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            metrics = trainer.callback_metrics
            records[-1].update({k: float(metrics[k]) for k in ("train_ce", "train_kl", "train_loss")})
            records[-1]["loss"] = float(outputs["loss"])

    _trainer(tmp_path, [depth, lora, Probe()]).fit(module, train_dataloaders=_loader(seed=1))
    assert len(records) == 3
    assert records[0]["kl"] > 1e-3  # the pruned student differs from the dense teacher from the first step
    for r in records:
        assert math.isclose(r["train_ce"], r["ce"], rel_tol=1e-4)
        assert math.isclose(r["train_kl"], r["kl"], rel_tol=1e-3, abs_tol=1e-6)
        assert math.isclose(r["train_loss"], r["train_ce"] + 0.5 * r["train_kl"], rel_tol=1e-5)
        assert math.isclose(r["loss"], r["train_loss"], rel_tol=1e-6)
    assert module.distillation is None  # the teacher is dropped when the fit ends


def test_distillation_from_a_given_teacher(tmp_path, tiny_model_dir):
    other = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    seen = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["teacher"] = pl_module.distillation.teacher

    for teacher in (other, str(tiny_model_dir)):
        module = CausalLMModule(model=_model(layers=2))
        lora = LoRA(r=2, distill=True, teacher=teacher, merge_at_end=False, verbose=0)
        _trainer(tmp_path, [lora, Probe()], max_steps=1).fit(module, train_dataloaders=_loader())
        assert seen["teacher"] is not other and len(seen["teacher"].model.layers) == 4
        torch.testing.assert_close(_logits(seen["teacher"], X), _logits(other, X), atol=0, rtol=0)
    assert all(p.requires_grad for p in other.parameters())  # the given model itself is left alone


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (LoRA, {"r": 0}, "LoRA: `r` must be an int >= 1, got 0"),
        (LoRA, {"r": 2.5}, "LoRA: `r` must be an int >= 1, got 2.5"),
        (LoRA, {"alpha": -1.0}, "LoRA: `alpha` must be positive, got -1.0"),
        (LoRA, {"dropout": 1.0}, r"LoRA: `dropout` must be in \[0, 1\), got 1.0"),
        (LoRA, {"target_modules": "q_proj"}, "LoRA: `target_modules` must be a non-empty list of module names"),
        (LoRA, {"target_modules": []}, "LoRA: `target_modules` must be a non-empty list of module names"),
        (LoRA, {"layers": []}, r"`layers` must be None or a non-empty list of block indices, got \[\]"),
        (LoRA, {"layers": [0, -1]}, r"`layers` must be None or a non-empty list of block indices, got \[0, -1\]"),
        (LoRA, {"layers": [True]}, r"`layers` must be None or a non-empty list of block indices, got \[True\]"),
        (LoRA, {"distill_alpha": -0.5}, "`distill_alpha` must be >= 0, got -0.5"),
        (LoRA, {"temperature": 0.0}, "`temperature` must be positive, got 0.0"),
        (LoRA, {"teacher": "some/model"}, r"`teacher` is only used with `distill=True`"),
        (LoRA, {"verbose": 3}, "`verbose` must be 0, 1 or 2, got 3"),
        (CKALoRA, {"ratio": 0.0}, r"`ratio` must be in \(0, 1\], got 0.0"),
        (CKALoRA, {"ratio": 1.2}, r"`ratio` must be in \(0, 1\], got 1.2"),
        (CKALoRA, {"n_samples": 0}, "`n_samples` must be an int >= 1, got 0"),
        (CKALoRA, {"n_samples": True}, "`n_samples` must be an int >= 1, got True"),
        (CKALoRA, {"r": -1}, "CKALoRA: `r` must be an int >= 1, got -1"),
    ],
)
def test_lora_misconfiguration(cls, kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        cls(**kwargs)


def test_cka_lora_has_no_layers_argument():
    with pytest.raises(TypeError, match="unexpected keyword argument 'layers'"):
        CKALoRA(layers=[0])  # type: ignore[call-arg]
    assert CKALoRA(verbose=0).layers is None


@pytest.mark.parametrize(
    ("callback", "match"),
    [
        (LoRA(target_modules=["q_proj", "qkv"]), r"LoRA: `target_modules` \['qkv'\] match no Linear"),
        (LoRA(layers=[1, 4]), r"LoRA: `layers` must be a non-empty list of block indices in 0..3, got \[1, 4\]"),
        (CKALoRA(target_modules=["nope"]), r"CKALoRA: `target_modules` \['nope'\] match no Linear"),
        (CKALoRA(ratio=0.2), r"CKALoRA: `ratio`=0.2 selects no block of 4"),
    ],
)
def test_setup_errors_leave_the_model_unchanged(tmp_path, callback, match):
    model = _model(layers=4)
    module = CausalLMModule(model=model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MisconfigurationException, match=match):
        _trainer(tmp_path, [callback]).fit(module, train_dataloaders=_loader())
    assert module.model is model and not is_lora(module.model) and not _lora_blocks(module)
    assert all(p.requires_grad for p in model.parameters())
    assert sorted(model.state_dict()) == sorted(state)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not callback.attachments


class _NoModel(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 4)

    def training_step(self, batch, batch_idx):
        return self.net(batch.float()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _NoDistillation(pl.LightningModule):
    """Holds a causal LM as `.model` but has no `distillation` attribute."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_fsdp_is_refused_in_setup():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    module = CausalLMModule(model=_model(layers=2))
    trainer = SimpleNamespace(strategy=FSDPStrategy())  # only the strategy is read before the error
    for callback in (LoRA(), CKALoRA()):
        with pytest.raises(MisconfigurationException, match=r"cannot yet rebuild a FSDPStrategy .* strategy='ddp'"):
            callback.setup(trainer, module, "fit")  # type: ignore[arg-type]
    assert not is_lora(module.model)


def test_module_preconditions(tmp_path):
    with pytest.raises(MisconfigurationException, match="LoRA needs a LightningModule that holds its Hugging Face"):
        _trainer(tmp_path, [LoRA()]).fit(_NoModel(), train_dataloaders=DataLoader(torch.ones(4, 4), batch_size=2))
    model = _model(layers=2)
    with pytest.raises(MisconfigurationException, match="distill=True needs a module whose training step adds"):
        _trainer(tmp_path, [LoRA(distill=True)]).fit(_NoDistillation(model), train_dataloaders=_loader())
    assert not is_lora(model) and not _lora_blocks(model)
    module = _NoDistillation(_model(layers=2))  # without distillation such a module works
    _trainer(tmp_path, [LoRA(r=2, merge_at_end=False, verbose=0)], max_steps=1).fit(module, train_dataloaders=_loader())
    assert is_lora(module.model)


def test_fixed_layers_follow_the_surviving_blocks_through_depth_pruning(tmp_path):
    # blocks 2 and 5 are identities: DepthPruning at epoch 1 removes them; LoRA(layers=[1, 3, 5]) named the
    # blocks of the 6-block model, so after the surgery its adapters go to the old blocks 1 and 3 (now 1 and 2)
    module = CausalLMModule(model=_model(identity=(2, 5)))
    lora = LoRA(r=2, layers=[1, 3, 5], merge_at_end=False, verbose=0)
    depth = DepthPruning(num_layers=2, at_epoch=1, calibration=_loader(), verbose=0)
    _trainer(tmp_path, [lora, depth], max_steps=-1, max_epochs=2, limit_train_batches=1).fit(
        module, train_dataloaders=_loader(seed=1)
    )
    assert depth.plans[0]["drop_layers"] == [2, 5]
    assert [a["layers"] for a in lora.attachments] == [[1, 3, 5], [1, 2]]
    assert _lora_blocks(module) == {1, 2}


def test_fixed_layers_all_removed_is_a_clear_error(tmp_path):
    module = CausalLMModule(model=_model(identity=(2, 5)))
    lora = LoRA(r=2, layers=[2, 5], verbose=0)
    depth = DepthPruning(num_layers=2, at_epoch=1, calibration=_loader(), verbose=0)
    with pytest.raises(MisconfigurationException, match=r"removed every block of `layers`=\[2, 5\]"):
        _trainer(tmp_path, [lora, depth], max_steps=-1, max_epochs=2, limit_train_batches=1).fit(
            module, train_dataloaders=_loader(seed=1)
        )


def test_cka_lora_keeps_one_block_when_pruning_leaves_too_few_for_the_ratio(tmp_path):
    # ratio 0.25 of 4 blocks = 1 at setup; after DepthPruning removes one, floor(0.25 * 3) = 0
    module = CausalLMModule(model=_model(layers=4))
    cka = CKALoRA(ratio=0.25, r=2, n_samples=8, verbose=0)
    depth = DepthPruning(num_layers=1, calibration=_loader(), verbose=0)
    with pytest.warns(UserWarning, match="selects none after pruning; using the top block"):
        _trainer(tmp_path, [depth, cka]).fit(module, train_dataloaders=_loader(seed=1))
    assert len(cka.attachments[0]["layers"]) == 1


def test_a_teacher_with_unmerged_adapters_is_refused(tmp_path):
    from lit_prune.recovery import LoRASpec, attach_lora

    teacher = attach_lora(_model(), LoRASpec(r=2))
    module = CausalLMModule(model=_model())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(MisconfigurationException, match=r"distill=True.*merge its LoRA adapters"):
        _trainer(tmp_path, [LoRA(r=2, distill=True, teacher=teacher, verbose=0)]).fit(
            module, train_dataloaders=_loader(seed=1)
        )
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_lora_attaches_after_a_pruning_callback_that_finished_without_pruning(tmp_path):
    module = CausalLMModule(model=_model())
    mop = MixtureOfPruners(target=1e-6, proxy="ppl", calibration=_loader(), verbose=0)  # below the smallest unit
    lora = LoRA(r=2, verbose=0)
    _trainer(tmp_path, [mop, lora]).fit(module, train_dataloaders=_loader(seed=1))
    assert mop.finished and not mop.plans
    assert len(lora.attachments) == 1 and lora.attachments[0]["global_step"] == 0


def test_a_lora_that_never_attached_warns(tmp_path):
    module = CausalLMModule(model=_model())
    depth = DepthPruning(num_layers=1, at_epoch=5, calibration=_loader(), verbose=0)
    lora = LoRA(r=2, verbose=0)
    with pytest.warns(UserWarning, match="never attached adapters in this fit"):
        _trainer(tmp_path, [depth, lora]).fit(module, train_dataloaders=_loader(seed=1))
    assert not lora.attachments and not (tmp_path / "lora-merged").exists()


def test_the_last_checkpoint_keeps_the_adapters_and_resumes(tmp_path):
    # merging happens in on_fit_end, after ModelCheckpoint's end-of-training save: last.ckpt holds the adapters and
    # the optimizer state that belongs to them, so a resumed fit continues the same adapters
    module = CausalLMModule(model=_model(layers=4), lr=1e-2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=100)
    _trainer(tmp_path, [LoRA(r=2, verbose=0), ckpt], enable_checkpointing=True, max_steps=2).fit(
        module, train_dataloaders=_loader(seed=1)
    )
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["lit_prune_lora"]["spec"]["r"] == 2
    assert any("lora_A" in k for k in saved["state_dict"])
    assert not is_lora(module.model)  # merged after the save
    resumed = CausalLMModule(model=_model(layers=4), lr=1e-2)
    lora = LoRA(r=2, verbose=0)
    trainer = _trainer(tmp_path, [lora], max_steps=4)
    trainer.fit(resumed, train_dataloaders=_loader(seed=1), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    # the checkpoint's adapters were re-attached (not fresh ones): the only attachment is the restored record
    assert trainer.global_step == 4 and [a["global_step"] for a in lora.attachments] == [0]
    assert not is_lora(resumed.model)
