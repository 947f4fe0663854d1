import json
import warnings

import pytest
import torch
from conftest import quiet_trainer, tiny_config
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from lit_prune import CausalLMModule, load_pretrained, save_pretrained
from lit_prune.arch import adapter_for
from lit_prune.callbacks import WidthPruning
from lit_prune.surgery import block_shapes, loads_without_lit_prune

HD = 24
ZERO_HEADS = (1, 3)  # one query head in each of the two KV groups
ZERO_NEURONS = list(range(10, 30))


def _model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config())
    with torch.no_grad():
        for block in model.model.layers:
            for h in ZERO_HEADS:
                block.self_attn.o_proj.weight[:, h * HD : (h + 1) * HD] = 0
            block.mlp.down_proj.weight[:, ZERO_NEURONS] = 0
    return model


def _dead_params(model: LlamaForCausalLM) -> int:
    """Parameters owned by the zeroed heads and neurons of every block."""
    ad = adapter_for(model)
    attn, mlp = ad.attentions(model)[0], ad.mlps(model)[0]
    per_block = len(ZERO_HEADS) * ad.head_params(attn) + len(ZERO_NEURONS) * ad.neuron_params(mlp)
    return per_block * ad.num_blocks(model)


def _loader(n: int = 8, t: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader([{"input_ids": w} for w in torch.randint(4, 256, (n, t), generator=g)], batch_size=4)


_trainer = quiet_trainer


def test_amp_removes_the_zeroed_heads_and_neurons_first_and_keeps_logits():
    model = _model().eval()
    x = torch.randint(4, 256, (2, 12))
    with torch.no_grad():
        before = model(input_ids=x).logits
    callback = WidthPruning(criterion="amp", amount=_dead_params(model), verbose=0)
    plan = callback.prune(CausalLMModule(model=model), _loader())
    keep_neurons = [n for n in range(96) if n not in ZERO_NEURONS]
    assert plan.keep_heads == {b: (0, 2) for b in range(4)}
    assert plan.keep_neurons == {b: tuple(keep_neurons) for b in range(4)}
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=x).logits, before, atol=1e-5, rtol=0)
    # AMP gave the dead units exactly zero and every live unit more
    scores = callback.last_scores
    assert scores is not None
    for heads, neurons in zip(scores.heads, scores.neurons):
        assert heads[list(ZERO_HEADS)].abs().max() == 0 and heads[[0, 2]].min() > 0
        assert neurons[ZERO_NEURONS].abs().max() == 0 and neurons[keep_neurons].min() > 0


@pytest.mark.parametrize(("gqa", "allocation"), [("query", "uniform"), ("group", "uniform"), ("query", "global")])
@pytest.mark.parametrize("amount", [0.1, 0.2, 0.3])
def test_param_count_within_one_unit_of_target(amount, gqa, allocation):
    model = LlamaForCausalLM(tiny_config(intermediate_size=192))
    ad = adapter_for(model)
    total = ad.total_params(model)
    callback = WidthPruning(criterion="magnitude", amount=amount, gqa=gqa, allocation=allocation, verbose=0)
    plan = callback.prune(CausalLMModule(model=model), _loader())
    after = ad.total_params(model)
    assert plan.params_after == after
    # uniform: one neuron per block is the granularity; global: one neuron
    granularity = ad.neuron_params(ad.mlps(model)[0]) * (ad.num_blocks(model) if allocation == "uniform" else 1)
    assert abs((total - after) - amount * total) <= granularity


def test_fit_prunes_trains_writes_plan_and_resumes(tmp_path):
    model = _model()
    module = CausalLMModule(model=model)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callback = WidthPruning(criterion="amp", amount=0.2, calibration=_loader(), verbose=0)
    trainer = _trainer(tmp_path, [callback, checkpoint], enable_checkpointing=True)
    trainer.fit(module, train_dataloaders=_loader(seed=1))
    assert trainer.global_step == 3
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in module.parameters() if p.requires_grad}
    saved = json.loads((tmp_path / "ckpt" / "width-plan-1.json").read_text())
    assert saved["method"] == "width:amp" and saved["params_after"] == adapter_for(model).total_params(model)
    shapes = block_shapes(model)

    # resume: a fresh dense module gets the plan replayed before the pruned weights load; no second pruning
    fresh = CausalLMModule(model=_model())
    callback2 = WidthPruning(criterion="amp", amount=0.2, calibration=_loader(), verbose=0)
    trainer2 = _trainer(tmp_path, [callback2], max_steps=5)
    trainer2.fit(fresh, train_dataloaders=_loader(seed=1), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert len(callback2.plans) == 1 and block_shapes(fresh.model) == shapes
    assert trainer2.global_step == 5


def test_save_and_reload_after_fit(tmp_path):
    x = torch.randint(4, 256, (2, 12))
    for allocation, loader in (("uniform", AutoModelForCausalLM.from_pretrained), ("global", load_pretrained)):
        model = _model()
        module = CausalLMModule(model=model)
        callback = WidthPruning(criterion="amp", amount=0.25, allocation=allocation, calibration=_loader(), verbose=0)
        _trainer(tmp_path, [callback], max_steps=1).fit(module, train_dataloaders=_loader(seed=1))
        model.eval()
        assert loads_without_lit_prune(model) == (allocation == "uniform")
        folder = save_pretrained(model, tmp_path / allocation)
        again = loader(folder).eval()
        with torch.no_grad():
            torch.testing.assert_close(again(input_ids=x).logits, model(input_ids=x).logits, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(amount=0.0), r"`amount` must be a float in \(0, 1\) or an int >= 1, got 0.0"),
        (dict(amount=1.0), r"`amount` must be a float in \(0, 1\) or an int >= 1, got 1.0"),
        (dict(amount=-5), r"`amount` must be a float in \(0, 1\) or an int >= 1, got -5"),
        (dict(amount=True), r"`amount` must be a float in \(0, 1\) or an int >= 1, got True"),
        (dict(gqa="kv"), r"`gqa` must be one of \['query', 'group'\], got 'kv'"),
        (
            dict(criterion="l1"),
            r"`criterion` must be one of \['amp', 'amp_act', 'magnitude', 'wanda_sp', 'random', 'reversed'\]",
        ),
        (dict(allocation="owl"), r"`allocation` must be one of \['uniform', 'global'\]"),
        (dict(round_to=0), r"`round_to` must be an int >= 1, got 0"),
        (dict(min_keep=0.0), r"`min_keep` must be a number in \(0, 1\], got 0.0"),
        (dict(of="embedding"), r"`of` must be one of \['total', 'non_embedding'\], got 'embedding'"),
        (dict(criterion="reversed", reversed_of="reversed"), r"`reversed_of` must be one of \['amp', 'amp_act'"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        WidthPruning(**kwargs)


def test_unreachable_budget_fails_in_setup_before_anything_changes(tmp_path):
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    callback = WidthPruning(criterion="amp", amount=0.95, calibration=_loader(), verbose=0)
    with pytest.raises(MisconfigurationException, match=r"WidthPruning: "):
        _trainer(tmp_path, [callback]).fit(CausalLMModule(model=model), train_dataloaders=_loader(seed=1))
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state) and not callback.plans


@pytest.mark.parametrize(
    ("model_kwargs", "amount", "message"),
    [
        # p = 0.76: round(0.76 * 2) would take both query heads of every KV group
        (dict(intermediate_size=1024), 0.75, r"would remove 2 of the 2 query heads of each KV group in block 0"),
        (dict(), 1, r"below the smallest unit that can go"),
    ],
)
def test_targets_that_cannot_be_met_fail_in_setup(tmp_path, model_kwargs, amount, message):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(**model_kwargs))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    callback = WidthPruning(criterion="amp", amount=amount, calibration=_loader(), verbose=0)
    with pytest.raises(MisconfigurationException, match=message):
        _trainer(tmp_path, [callback]).fit(CausalLMModule(model=model), train_dataloaders=_loader(seed=1))
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state) and not callback.plans


def test_few_calibration_windows_warn_and_the_plan_line_is_logged_once(caplog):
    module = CausalLMModule(model=_model())
    with caplog.at_level("DEBUG", logger="lit_prune.allocation.structured"), pytest.warns(
        UserWarning, match=r"WidthPruning scored the heads and neurons on only 8 calibration windows \(fewer than 16\)"
    ):
        plan = WidthPruning(amount=0.2, verbose=0).prune(module, _loader(n=8))
    assert plan.meta["calibration_windows"] == 8
    records = [r for r in caplog.records if r.name == "lit_prune.allocation.structured"]
    plan_lines = [r for r in records if "Width plan" in r.getMessage()]
    assert len(plan_lines) == 1  # the budget dry run in check_model is silent


def test_enough_windows_or_a_data_free_criterion_do_not_warn():
    for criterion, n in (("amp", 16), ("magnitude", 4)):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            WidthPruning(criterion=criterion, amount=0.2, verbose=0).prune(CausalLMModule(model=_model()), _loader(n=n))
        assert not [w for w in record if "calibration windows" in str(w.message)], criterion
