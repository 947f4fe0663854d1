import json
import logging
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import tiny_config
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from lit_prune import CausalLMModule
from lit_prune.callbacks import DepthPruning

IDENTITY = (1, 4)


def _model(layers=6, identity=IDENTITY):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(num_hidden_layers=layers))
    with torch.no_grad():
        for i in identity:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    return model


def _loader(n=8, t=16, seed=0, batch_size=4):
    g = torch.Generator().manual_seed(seed)
    return DataLoader([{"input_ids": w} for w in torch.randint(4, 256, (n, t), generator=g)], batch_size=batch_size)


def _trainer(tmp_path, callbacks, **kw):
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=tmp_path, max_steps=3)
    args.update(kw)
    return pl.Trainer(callbacks=callbacks, **args)


@pytest.mark.parametrize("criterion", ["bi", "angular", "cka", "consensus", "cosine_global"])
def test_fit_removes_identity_blocks_and_keeps_training(tmp_path, criterion):
    model = _model()
    x = torch.randint(4, 256, (2, 12))
    with torch.no_grad():
        before = model(input_ids=x).logits
    module = CausalLMModule(model=model)
    callback = DepthPruning(criterion=criterion, num_layers=2, calibration=_loader())
    trainer = _trainer(tmp_path, [callback])
    trainer.fit(module, train_dataloaders=_loader(seed=1))
    plan = callback.plans[0]
    assert plan["drop_layers"] == list(IDENTITY)
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    assert trainer.global_step == 3  # training continued after surgery
    # the optimizer holds exactly the surviving parameters
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in module.parameters() if p.requires_grad}
    saved = json.loads((tmp_path / "depth-plan-1.json").read_text())
    assert saved["drop_layers"] == list(IDENTITY)
    assert saved["params_after"] == sum(p.numel() for p in model.parameters())
    assert module.pruning_plans == [plan]
    del before


def test_removing_identity_blocks_keeps_logits(tmp_path):
    model = _model()
    x = torch.randint(4, 256, (2, 12))
    with torch.no_grad():
        before = model(input_ids=x).logits
    module = CausalLMModule(model=model)
    DepthPruning(criterion="bi", num_layers=2, verbose=0).prune(module, _loader())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=x).logits, before, atol=1e-5, rtol=0)


def test_amount_protect_and_calibration_from_datamodule(tmp_path, tiny_tokenizer, text_file):
    from lit_prune.datamodules import TextDataModule

    module = CausalLMModule(model=_model(), tokenizer=tiny_tokenizer)
    data = TextDataModule(path=str(text_file), seq_len=16, batch_size=4, calibration_windows=8,
                          cache_dir=str(tmp_path / "cache"))
    callback = DepthPruning(criterion="bi", amount=0.34, protect=[1], verbose=0)  # round(0.34 * 6) = 2 blocks
    _trainer(tmp_path, [callback]).fit(module, datamodule=data)
    dropped = callback.plans[0]["drop_layers"]
    assert len(dropped) == 2 and 1 not in dropped and 4 in dropped
    assert set(callback.last_scores) == {"bi"}


def test_at_epoch_prunes_later(tmp_path):
    module = CausalLMModule(model=_model())
    callback = DepthPruning(criterion="bi", num_layers=1, at_epoch=1, calibration=_loader(), verbose=0)
    seen = []

    class Spy(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append(len(pl_module.model.model.layers))

    _trainer(tmp_path, [callback, Spy()], max_steps=-1, max_epochs=3, limit_train_batches=1).fit(
        module, train_dataloaders=_loader())
    assert seen == [6, 5, 5]


def test_resume_does_not_prune_twice_and_loads_pruned_weights(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    module = CausalLMModule(model=_model())
    callback = DepthPruning(criterion="bi", num_layers=2, calibration=_loader(), verbose=0)
    trainer = _trainer(tmp_path, [callback, ckpt], enable_checkpointing=True, max_steps=2)
    trainer.fit(module, train_dataloaders=_loader(seed=1))
    assert (tmp_path / "ckpt" / "depth-plan-1.json").is_file()  # next to the checkpoints
    last = tmp_path / "ckpt" / "last.ckpt"

    resumed = CausalLMModule(model=_model())  # a fresh dense model, as a resumed run would build
    callback2 = DepthPruning(criterion="bi", num_layers=2, calibration=_loader(), verbose=0)
    trainer2 = _trainer(tmp_path, [callback2, ModelCheckpoint(dirpath=tmp_path / "ckpt2")],
                        enable_checkpointing=True, max_steps=4)
    trainer2.fit(resumed, train_dataloaders=_loader(seed=1), ckpt_path=last)
    assert len(resumed.model.model.layers) == 4  # replayed once, not pruned again
    assert len(callback2.plans) == 1 and trainer2.global_step == 4

    loaded = CausalLMModule.load_from_checkpoint(last, model=_model())
    assert len(loaded.model.model.layers) == 4


def test_depth_pruning_misconfiguration():
    with pytest.raises(MisconfigurationException, match=r"`criterion` must be one of \['bi', .*got 'nope'"):
        DepthPruning(criterion="nope", num_layers=1)
    with pytest.raises(MisconfigurationException, match="exactly one of `num_layers` and `amount`"):
        DepthPruning(criterion="bi")
    with pytest.raises(MisconfigurationException, match="exactly one of `num_layers` and `amount`"):
        DepthPruning(criterion="bi", num_layers=1, amount=0.1)
    with pytest.raises(MisconfigurationException, match="`num_layers` must be an int >= 1, got 0"):
        DepthPruning(num_layers=0)
    with pytest.raises(MisconfigurationException, match=r"`amount` must be a fraction .* got 1.5"):
        DepthPruning(amount=1.5)
    with pytest.raises(MisconfigurationException, match=r"`protect` must hold block indices >= 0, got \[-1\]"):
        DepthPruning(num_layers=1, protect=[-1])
    with pytest.raises(MisconfigurationException, match="`at_epoch` must be None or an int >= 0, got -1"):
        DepthPruning(num_layers=1, at_epoch=-1)
    with pytest.raises(MisconfigurationException, match=r"`consensus_of` must be one of \[.*\], got 'consensus'"):
        DepthPruning(criterion="consensus", num_layers=1, consensus_of=["bi", "consensus"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_layers": 1, "protect": [6]}, r"`protect` indices \[6\] are out of range: the model has 6 blocks"),
        ({"num_layers": 6}, "cannot remove 6 blocks: the model has 6 blocks, 0 protected"),
        ({"num_layers": 5, "protect": [0, 1]}, "cannot remove 5 blocks: the model has 6 blocks, 2 protected"),
    ],
)
def test_bad_requests_fail_in_setup_before_anything_changes(tmp_path, kwargs, match):
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    callback = DepthPruning(criterion="bi", calibration=_loader(), **kwargs)
    with pytest.raises(MisconfigurationException, match=match):
        _trainer(tmp_path, [callback]).fit(CausalLMModule(model=model), train_dataloaders=_loader())
    assert len(model.model.layers) == 6 and model.config.num_hidden_layers == 6
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not callback.plans


def test_no_calibration_source(tmp_path):
    callback = DepthPruning(criterion="bi", num_layers=1)
    with pytest.raises(MisconfigurationException, match="needs calibration data: pass `calibration=`"):
        _trainer(tmp_path, [callback]).fit(CausalLMModule(model=_model()), train_dataloaders=_loader())


def test_hooks_are_removed_after_fit(tmp_path):
    module = CausalLMModule(model=_model())
    _trainer(tmp_path, [DepthPruning(criterion="consensus", num_layers=1, calibration=_loader(), verbose=0)]).fit(
        module, train_dataloaders=_loader())
    for m in module.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_saved_pruned_model_reloads_with_plain_transformers(tmp_path):
    module = CausalLMModule(model=_model())
    DepthPruning(criterion="bi", num_layers=2, verbose=0).prune(module, _loader())
    module.model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    x = torch.randint(4, 256, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, module.model.eval()(input_ids=x).logits)
    assert Path(tmp_path / "out" / "config.json").is_file()


def test_scores_and_removed_blocks_reach_the_logger(tmp_path, caplog):
    from lightning.pytorch.loggers import CSVLogger

    module = CausalLMModule(model=_model())
    callback = DepthPruning(criterion="consensus", num_layers=2, calibration=_loader(), verbose=2)
    logger = CSVLogger(tmp_path / "logs")
    with caplog.at_level("INFO"):
        _trainer(tmp_path, [callback], logger=logger).fit(module, train_dataloaders=_loader())
    logger.save()
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in ("bi", "angular", "cka", "consensus"):
        assert f"depth/score/{name}/block_00" in header and f"depth/score/{name}/block_05" in header
    assert "depth/removed/block_01" in header and "depth/removed/block_04" in header
    assert "depth/fraction_removed" in header
    assert "DepthPruning (consensus): removed blocks [1, 4] of 6" in caplog.text
    assert "DepthPruning scores [bi]:" in caplog.text


UNSTABLE = "may change with another calibration sample"


def _unstable_warnings(record):
    return [str(w.message) for w in record if UNSTABLE in str(w.message)]


def test_few_calibration_windows_warn_where_the_blocks_are_chosen():
    module = CausalLMModule(model=_model())
    with pytest.warns(UserWarning, match=r"only 8 calibration windows \(fewer than 16\)") as record:
        plan = DepthPruning(criterion="bi", num_layers=2, verbose=0).prune(module, _loader(n=8))
    (message,) = _unstable_warnings(record)
    assert "Depth plan (depth:bi)" in message and "Score on more calibration windows" in message
    margin = plan.meta["decision_margin"]
    assert plan.meta["calibration_windows"] == 8
    assert margin["last_removed"] in plan.drop_layers and margin["first_kept"] not in plan.drop_layers
    assert margin["gap"] == pytest.approx(margin["first_kept_score"] - margin["last_removed_score"])
    assert margin["gap"] >= 0


def test_enough_windows_and_a_clear_margin_do_not_warn():
    module = CausalLMModule(model=_model())  # blocks 1 and 4 are identities: BI 0, far below the others
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        plan = DepthPruning(criterion="bi", num_layers=2, verbose=0).prune(module, _loader(n=16))
    assert plan.drop_layers == IDENTITY and plan.meta["calibration_windows"] == 16
    assert plan.meta["decision_margin"]["relative"] > 0.05
    assert not _unstable_warnings(record)


def test_calibration_batches_cap_the_counted_windows_and_random_never_warns():
    with pytest.warns(UserWarning, match=r"only 4 calibration windows"):
        DepthPruning(criterion="bi", num_layers=1, calibration_batches=1, verbose=0).prune(
            CausalLMModule(model=_model()), _loader(n=32)
        )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        plan = DepthPruning(criterion="random", num_layers=2, verbose=0).prune(
            CausalLMModule(model=_model()), _loader(n=4)
        )
    assert not _unstable_warnings(record) and "decision_margin" not in plan.meta


def test_make_depth_plan_warns_on_a_near_tie_and_checks_the_window_count():
    from lit_prune.allocation import make_depth_plan

    model = _model()
    scores = [0.0, 1.0, 1.02, 2.0, 3.0, 4.0]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        clear = make_depth_plan(model, scores, num_remove=1, calibration_windows=64)
        make_depth_plan(model, scores, num_remove=2)  # no count: not from calibration, nothing checked
    assert not _unstable_warnings(record) and clear.meta["decision_margin"]["relative"] > 0.5
    with pytest.warns(UserWarning, match=r"a near tie \(margin below 5% of the scores' interquartile range\)"):
        tie = make_depth_plan(model, scores, num_remove=2, calibration_windows=64)
    assert tie.drop_layers == (0, 1)
    assert (tie.meta["decision_margin"]["last_removed"], tie.meta["decision_margin"]["first_kept"]) == (1, 2)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=rf"`calibration_windows` must be None or an int >= 1, got {bad!r}"):
            make_depth_plan(model, scores, num_remove=1, calibration_windows=bad)


def test_default_verbosity_logs_one_result_line_and_no_scores(caplog):
    module = CausalLMModule(model=_model())
    with caplog.at_level("INFO"):
        DepthPruning(criterion="consensus", num_layers=2, verbose=1).prune(module, _loader(n=16))
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert lines == ["DepthPruning (consensus): removed blocks [1, 4] of 6; params 254,784 -> 180,800 (29.0% removed); "
                     f"scoring on 16 calibration windows took {lines[0].rsplit('took ', 1)[1]}"]
    caplog.clear()
    with caplog.at_level("INFO"):
        DepthPruning(criterion="consensus", num_layers=1, verbose=2).prune(module, _loader(n=16))
    text = caplog.text
    for name in ("bi", "angular", "cka", "consensus"):
        assert text.count(f"DepthPruning scores [{name}]:") == 1  # each score vector once
    assert "Depth scores" not in text and "Depth plan" not in text  # the criteria and the plan log at DEBUG
