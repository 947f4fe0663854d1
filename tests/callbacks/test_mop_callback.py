import csv
import functools
import json
import logging

import lightning.pytorch as pl
import pytest
import torch
from conftest import quiet_trainer, tiny_config
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from lit_prune import CausalLMModule
from lit_prune.arch import adapter_for
from lit_prune.callbacks import MixtureOfPruners
from lit_prune.surgery import block_shapes


def _model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(num_hidden_layers=6, intermediate_size=192))


def _loader(n: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader([{"input_ids": w} for w in torch.randint(4, 256, (n, 16), generator=g)], batch_size=2)


_trainer = functools.partial(quiet_trainer, max_steps=2)


def test_one_shot_fit_logs_every_step_and_saves_the_final_model(tmp_path):
    model = _model()
    module = CausalLMModule(model=model)
    mop = MixtureOfPruners(target=0.3, proxy="ppl", calibration=_loader(), verbose=0)
    logger = CSVLogger(tmp_path, name="logs")
    trainer = _trainer(tmp_path, [mop], logger=logger)
    trainer.fit(module, train_dataloaders=_loader(8, seed=1))
    assert trainer.global_step == 2 and mop.done
    total = adapter_for(model).total_params(model)
    start = mop.trajectory[0]["params_before"]
    assert abs((start - total) - 0.3 * start) <= adapter_for(model).neuron_params(adapter_for(model).mlps(model)[0]) * 6
    folder = tmp_path / "logs" / "version_0"
    rows = list(csv.DictReader((folder / "mop-trajectory.csv").open()))
    assert [r["branch"] for r in rows] == list(mop.path)
    assert int(rows[-1]["params_after"]) == total
    assert json.loads((folder / f"mop-plan-{len(rows)}.json").read_text())["params_after"] == total
    metrics = (folder / "metrics.csv").read_text()
    assert "mop/proxy_depth" in metrics and "mop/branch_depth" in metrics
    again = AutoModelForCausalLM.from_pretrained(folder / "mop-final").eval()
    ids = torch.randint(4, 256, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)
    assert module.pruning_plans == mop.plans


def _recovering_run(root, max_epochs, ckpt_path=None, proxy="ppl"):
    pl.seed_everything(0)
    module = CausalLMModule(model=_model())
    mop = MixtureOfPruners(
        target=0.45, proxy=proxy, recover_epochs_between_steps=1, calibration=_loader(), verbose=0, save_model=False
    )
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_epochs=1, save_top_k=0)
    trainer = _trainer(root, [mop, checkpoint], enable_checkpointing=True, max_steps=-1, max_epochs=max_epochs)
    trainer.fit(module, train_dataloaders=_loader(4, seed=1), ckpt_path=ckpt_path)
    return module, mop


@pytest.mark.parametrize("proxy", ["ppl", "kl", "random"])
def test_a_resumed_run_ends_with_the_architecture_of_an_uninterrupted_one(tmp_path, proxy):
    full_module, full = _recovering_run(tmp_path / "full", max_epochs=8, proxy=proxy)
    assert full.done and len(full.path) >= 3
    with pytest.warns(UserWarning, match="did not reach its target before the fit ended"):
        _, first = _recovering_run(tmp_path / "cut", max_epochs=2, proxy=proxy)
    assert len(first.trajectory) == 2 and not first.done
    resumed_module, resumed = _recovering_run(
        tmp_path / "cut", max_epochs=8, ckpt_path=str(tmp_path / "cut" / "ckpt" / "last.ckpt"), proxy=proxy
    )
    assert resumed.path == full.path
    assert block_shapes(resumed_module.model) == block_shapes(full_module.model)
    assert resumed_module.pruning_plans == full_module.pruning_plans


def test_lit_prune_prune_api_runs_every_step(tmp_path):
    module = CausalLMModule(model=_model())
    mop = MixtureOfPruners(target=0.2, proxy="cosine", verbose=0)
    plans = mop.prune_all(module, _loader())
    assert len(plans) == len(mop.path) >= 1 and mop.done
    assert plans[-1].params_after == adapter_for(module.model).total_params(module.model)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(proxy="loss"), r"`proxy` must be one of"),
        (dict(target=0.0), r"`target` must be a fraction of all parameters in \(0, 1\)"),
        (dict(recover_epochs_between_steps=-1), r"`recover_epochs_between_steps` must be an int >= 0"),
        (dict(decisions="LLX"), r"`decisions` must be a string of 'L'"),
        (dict(depth_criterion="cka_global"), r"`depth_criterion` must be one of"),
        (dict(round_to=0), r"`round_to` must be an int >= 1, got 0"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        MixtureOfPruners(**kwargs)


def test_the_dense_reference_of_kl_travels_in_the_checkpoint(tmp_path):
    with pytest.warns(UserWarning, match="did not reach its target"):
        _, first = _recovering_run(tmp_path, max_epochs=2, proxy="kl")
    assert first._search is not None
    dense_reference = first._search.reference
    assert dense_reference
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("MixtureOfPruners")]
    assert all(torch.equal(a, b) for a, b in zip(state["reference"], dense_reference, strict=True))
    _, resumed = _recovering_run(tmp_path, max_epochs=8, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), proxy="kl")
    assert resumed._search is not None
    assert all(torch.equal(a, b) for a, b in zip(resumed._search.reference, dense_reference, strict=True))


def test_one_shot_logs_one_line_per_step_and_warns_once_about_few_windows(caplog):
    module = CausalLMModule(model=_model())
    mop = MixtureOfPruners(target=0.2, proxy="ppl", verbose=1)
    with caplog.at_level("INFO"), pytest.warns(UserWarning, match=r"MixtureOfPruners .* only 4 calibration windows"):
        plans = mop.prune_all(module, _loader())
    # lit_prune.allocation.structured (another module's) logs each width candidate's plan line; the rest is ours
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.INFO and r.name != "lit_prune.allocation.structured"
    ]
    steps = [line for line in lines if line.startswith("MoP step")]
    assert len(steps) == len(plans) == len(mop.path) >= 1
    first = mop.trajectory[0]
    assert f"params {first['params_before']:,} -> {first['params_after']:,}" in steps[0]
    assert ("block [" in steps[0]) == (mop.path[0] == "L") and ("neurons" in steps[0]) == (mop.path[0] == "G")
    assert lines[-1].startswith(f"MoP one shot: {len(plans)} steps, path {mop.path}; params ")
    assert len(lines) == len(plans) + 1  # depth candidates' plans and the surgery log at DEBUG
