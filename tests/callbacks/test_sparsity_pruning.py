import json

import pytest
import torch
from conftest import quiet_trainer, tiny_config
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from lit_prune import CausalLMModule, save_pretrained
from lit_prune.callbacks import LoRA, SparsityPruning
from lit_prune.sparse import MASK_BUFFER, masks_of, prunable_linears, sparsity_report


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(intermediate_size=96))


def _loader(n: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader([{"input_ids": w} for w in torch.randint(4, 256, (n, 16), generator=g)], batch_size=2)


def _prunable(model) -> int:
    return sum(lin.weight.numel() for lin in prunable_linears(model).values())


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
def test_twenty_training_steps_keep_exactly_the_target_sparsity(tmp_path, criterion):
    model = _model()
    module = CausalLMModule(model=model, lr=1e-2)  # a large lr: without the masks, pruned weights would move
    callback = SparsityPruning(criterion=criterion, sparsity=0.6, allocation="owl", calibration=_loader(), verbose=0)
    quiet_trainer(tmp_path, [callback], max_steps=20).fit(module, train_dataloaders=_loader(40, seed=1))
    report = sparsity_report(model)
    assert report.zeros == round(0.6 * _prunable(model))
    masks = masks_of(model)
    assert len(masks) == len(prunable_linears(model))
    for name, linear in prunable_linears(model).items():
        assert not linear.weight[~masks[name]].any()  # every pruned weight is still zero
    plan = json.loads((tmp_path / "sparsity-plan-1.json").read_text())
    assert plan["method"] == f"sparsity:{criterion}" and plan["meta"]["sparsity"] == report.overall
    assert len(set(plan["meta"]["block_ratios"])) > 1  # OWL gave the blocks different ratios


def test_training_still_moves_the_kept_weights(tmp_path):
    model = _model()
    module = CausalLMModule(model=model, lr=1e-2)
    callback = SparsityPruning(sparsity=0.5, calibration=_loader(), verbose=0)
    q = model.model.layers[0].self_attn.q_proj
    trainer = quiet_trainer(tmp_path, [callback], max_steps=0)
    trainer.fit(module, train_dataloaders=_loader(8, seed=1))
    before = q.weight.detach().clone()
    quiet_trainer(tmp_path, [callback], max_steps=5).fit(module, train_dataloaders=_loader(10, seed=1))
    kept = getattr(q, MASK_BUFFER)
    assert not torch.equal(q.weight[kept], before[kept])
    assert not q.weight[~kept].any()


def test_lora_recovery_after_sparsity_merges_with_the_masks(tmp_path):
    model = _model()
    module = CausalLMModule(model=model, lr=1e-2)
    callbacks = [SparsityPruning(sparsity=0.5, n_m="2:4", calibration=_loader(), verbose=0), LoRA(r=4, verbose=0)]
    quiet_trainer(tmp_path, callbacks, max_steps=5).fit(module, train_dataloaders=_loader(10, seed=1))
    assert not hasattr(module.model, "peft_config")  # merged at fit end
    for linear in prunable_linears(module.model).values():
        groups = linear.weight.detach().reshape(linear.out_features, -1, 4)
        assert bool(((groups == 0).sum(-1) == 2).all())  # exactly 2 zeros in every group of 4 after the merge
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "lora-merged")
    assert sparsity_report(saved).zeros == _prunable(saved) // 2


def test_masks_come_back_from_a_checkpoint_and_export_folds_them(tmp_path):
    model = _model()
    module = CausalLMModule(model=model)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = quiet_trainer(tmp_path, [SparsityPruning(sparsity=0.5, calibration=_loader(), verbose=0), ckpt],
                            max_steps=2, enable_checkpointing=True)
    trainer.fit(module, train_dataloaders=_loader(4, seed=1))
    fresh = CausalLMModule(model=_model())
    fresh.load_state_dict(torch.load(tmp_path / "ckpt/last.ckpt", weights_only=False)["state_dict"])
    for name, mask in masks_of(model).items():
        assert torch.equal(masks_of(fresh)[name], mask)
    out = save_pretrained(module, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert not any(MASK_BUFFER in key for key in reloaded.state_dict())
    assert sparsity_report(reloaded).zeros == sparsity_report(model).zeros
    assert masks_of(model)  # the live model keeps its masks after the export


def test_bad_options_are_refused_by_name():
    with pytest.raises(MisconfigurationException, match="`criterion` must be one of"):
        SparsityPruning(criterion="l1")
    with pytest.raises(MisconfigurationException, match=r"`sparsity` must be a fraction in \(0, 1\), got 1.5"):
        SparsityPruning(sparsity=1.5)
    with pytest.raises(MisconfigurationException, match="use allocation='uniform'"):
        SparsityPruning(n_m="2:4", allocation="owl")
    with pytest.raises(MisconfigurationException, match="needs `layer_scores`"):
        SparsityPruning(allocation="linear_map")
    with pytest.raises(MisconfigurationException, match="`protocol` must be one of"):
        SparsityPruning(protocol="greedy")


def test_width_pruning_after_sparsity_slices_the_masks_too(tmp_path):
    from lit_prune.callbacks import WidthPruning

    model = _model()
    module = CausalLMModule(model=model, lr=1e-2)
    callbacks = [
        SparsityPruning(sparsity=0.5, calibration=_loader(), verbose=0),
        WidthPruning(amount=0.2, calibration=_loader(), at_epoch=1, verbose=0),
    ]
    quiet_trainer(tmp_path, callbacks, max_steps=6, max_epochs=3).fit(module, train_dataloaders=_loader(4, seed=1))
    assert callbacks[1].plans  # the width step ran after the sparsity step
    for name, linear in prunable_linears(model).items():
        mask = masks_of(model)[name]
        assert mask.shape == linear.weight.shape and not linear.weight[~mask].any()


def test_report_orders_a_sparsity_step_before_a_later_depth_step(tmp_path):
    from lit_prune.callbacks import DepthPruning

    module = CausalLMModule(model=_model())
    callbacks = [
        SparsityPruning(sparsity=0.5, calibration=_loader(), verbose=0),
        DepthPruning(num_layers=1, calibration=_loader(), verbose=0),
    ]
    quiet_trainer(tmp_path, callbacks, max_steps=1).fit(module, train_dataloaders=_loader(4, seed=1))
    text = (tmp_path / "report.md").read_text()
    assert text.index("| 1 | `sparsity:wanda`") < text.index("| 2 | `depth:bi`")
    assert "## Sparsity" in text and "(50.00%)" in text


def test_a_second_sparsity_step_keeps_the_first_zeros():
    from lit_prune.sparse import prune_sparse

    model = _model()
    prune_sparse(model, None, "magnitude", 0.3)
    first = {name: mask.clone() for name, mask in masks_of(model).items()}
    prune_sparse(model, _loader(), "wanda", 0.5)
    for name, mask in masks_of(model).items():
        assert not (mask & ~first[name]).any()  # nothing pruned before is kept now
    # per-layer magnitude zeros can crowd a row past Wanda's per-row 50%: those rows keep their extra zeros
    target = round(0.5 * _prunable(model))
    assert target <= sparsity_report(model).zeros < target * 1.01


def test_trim_with_n_m_is_refused():
    with pytest.raises(MisconfigurationException, match="TRIM does not apply"):
        SparsityPruning(n_m="2:4", trim=True)


def test_prune_command_with_sparsity_saves_an_exactly_sparse_model(tmp_path, tiny_model_dir, text_file):
    import yaml

    from lit_prune.cli import run_prune

    cfg = {
        "model": {"model": str(tiny_model_dir)},
        "data": {"class_path": "lit_prune.datamodules.TextDataModule",
                 "init_args": {"path": str(text_file), "seq_len": 16, "calibration_windows": 4,
                               "cache_dir": str(tmp_path / "cache")}},
        "trainer": {"accelerator": "cpu", "logger": False,
                    "callbacks": [{"class_path": "lit_prune.callbacks.SparsityPruning",
                                   "init_args": {"criterion": "sparsegpt", "sparsity": 0.6, "allocation": "owl"}}]},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run_prune(["--config", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "pruned")])
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert sparsity_report(saved).zeros == round(0.6 * _prunable(saved))
    assert "## Sparsity" in (tmp_path / "pruned/report.md").read_text()


# --- the plan replays: lit_prune.surgery.apply_plan re-computes the masks ----------------------------------------
def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "options",
    [
        dict(criterion="sparsegpt", sparsity=0.6, allocation="owl", protocol="one_shot"),
        dict(criterion="wanda", sparsity=0.5, trim=True),
        dict(criterion="wanda", n_m="2:4"),
    ],
)
def test_the_plan_replays_to_the_same_masks_and_weights(tmp_path, options):
    from lit_prune.plan import PruningPlan
    from lit_prune.sparse.record import config_record
    from lit_prune.surgery import apply_plan

    model = _model()
    callback = SparsityPruning(**options, calibration_batches=1, verbose=0)
    plan = callback.prune(CausalLMModule(model=model), _loader())
    assert plan.sparsity["config"] == config_record(callback.config)
    assert plan.sparsity["max_batches"] == 1 and plan.sparsity["calibration"]["sequences"] == 2  # one batch of 2
    assert set(plan.sparsity["linears"]) == set(prunable_linears(model))
    up = model.model.layers[0].mlp.up_proj
    assert plan.sparsity["linears"]["model.layers.0.mlp.up_proj"] == int((up.weight == 0).sum()) / up.weight.numel()
    replayed = PruningPlan.from_json(plan.to_json(tmp_path / "plan.json"))
    fresh = _model()
    apply_plan(fresh, replayed, calibration=_loader())
    for (name, p), (_, q) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(p, q), name  # weights (SparseGPT's updates too) and the `weight_mask` buffers


def test_a_replay_on_other_weights_fails_after_pruning():
    from lit_prune.surgery import apply_plan

    plan = SparsityPruning(criterion="wanda", sparsity=0.5, verbose=0).prune(CausalLMModule(model=_model()), _loader())
    torch.manual_seed(1)
    other = LlamaForCausalLM(tiny_config(intermediate_size=96))
    with pytest.raises(ValueError, match=r"The re-computed sparsity masks differ from the plan's: every Linear reached "
                       r"the recorded sparsity but other weights were zeroed .*the calibration matched the record, so "
                       r"the model's weights differ .*The model is left pruned with the new masks: reload it to undo"):
        apply_plan(other, plan, calibration=_loader())
    assert masks_of(other)  # as the message says


def test_sparsity_replay_misconfiguration():
    from lit_prune.plan import PruningPlan
    from lit_prune.surgery import apply_plan

    plan = SparsityPruning(criterion="wanda", sparsity=0.5, allocation="owl", verbose=0).prune(
        CausalLMModule(model=_model()), _loader()
    )
    fresh = _model()
    before = _state(fresh)

    def unchanged():
        after = fresh.state_dict()
        return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)

    with pytest.raises(ValueError, match=r"This sparsity plan \(wanda, owl allocation\) re-computes its masks from "
                       r"calibration batches: pass `calibration=` the batches it was made on: 2 batches, 4 sequences, "
                       r"64 tokens \(sha256 [0-9a-f]{12}\.\.\.\)\. Nothing was modified"):
        apply_plan(fresh, plan)
    with pytest.raises(ValueError, match=r"The calibration differs from the one the sparsity plan was made on: got 2 "
                       r"batches, 4 sequences, 64 tokens \(sha256 .*the plan records 2 batches.*Nothing was modified"):
        apply_plan(fresh, plan, calibration=_loader(seed=1))
    with pytest.raises(ValueError, match=r"got 1 batches, 2 sequences, 32 tokens"):
        apply_plan(fresh, plan, calibration=_loader(n=2))
    bad = PruningPlan(num_layers=4, method=plan.method,
                      sparsity=plan.sparsity | {"config": plan.sparsity["config"] | {"owl_m": 0}})
    with pytest.raises(ValueError, match=r"The plan's sparsity config is invalid: `owl_m` must be a finite number in "
                       r"\(0.0, inf\), got 0; nothing was modified"):
        apply_plan(fresh, bad, calibration=_loader())
    old = PruningPlan(num_layers=4, method="sparsity:wanda", meta=plan.meta)  # format version 2: no record
    with pytest.raises(ValueError, match=r"a sparsity plan without a `sparsity` record .* nothing to replay; run its "
                       r"SparsityPruning config again"):
        apply_plan(fresh, old, calibration=_loader())
    assert unchanged() and not masks_of(fresh)

    shallower = _model()
    from lit_prune.surgery import remove_blocks

    remove_blocks(shallower, [3])
    with pytest.raises(ValueError, match=r"The plan was made for a model with 4 blocks, this one has 3"):
        apply_plan(shallower, plan, calibration=_loader())
    renamed = PruningPlan(num_layers=4, method=plan.method, sparsity=plan.sparsity | {
        "linears": {k.replace("layers.3.", "layers.9."): v for k, v in plan.sparsity["linears"].items()}})
    with pytest.raises(ValueError, match=r"The plan records the sparsity of 28 Linears, this model has 28 prunable "
                       r"Linears \(not in the model: \['model.layers.9.self_attn.q_proj'.*another model or at another "
                       r"step; nothing was modified"):
        apply_plan(fresh, renamed, calibration=_loader())
    assert unchanged()

    apply_plan(fresh, plan, calibration=iter(list(_loader())))  # a one-pass iterator is read once and kept
    with pytest.raises(ValueError, match=r"The model carries other sparsity masks than when the plan was made \(it "
                       r"carried no masks then\): was the plan already applied.*Nothing was modified"):
        apply_plan(fresh, plan, calibration=_loader())
