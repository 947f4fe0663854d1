"""Least-squares reconstruction after width pruning (issue 16, item 1): exact on duplicated units, equal to lstsq.

A duplicated unit (an MLP neuron with the same gate/up rows as another, a query head with the same q rows as another
of its KV group) computes the same activation as its twin, so removing it and refitting the reading Linear on the
kept inputs must leave the logits as they were (up to float32 rounding and the tiny ridge): the refit adds its
down_proj / o_proj columns to the twin's. Without the refit the logits change. Calibration has more tokens than any
refit Linear has inputs, so the Grams of the kept inputs are full rank and the refit is the unique exact one.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import quiet_trainer, tiny_config
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader
from transformers import LlamaForCausalLM

from lit_prune import CausalLMModule
from lit_prune.callbacks import WidthPruning
from lit_prune.plan import PruningPlan
from lit_prune.sparse.record import calibration_digest
from lit_prune.surgery import apply_plan, block_shapes
from lit_prune.surgery.reconstruct import (
    ReconstructConfig,
    collect_grams,
    lsq_refit,
    reader_linears,
    reconstruction_record,
    refit_columns,
    ridge_lambda,
)

HD, HEADS, NEURONS, BLOCKS = 24, 4, 96, 4
TWINS = {2 * j + 1: 2 * j for j in range(12)}  # neuron 2j+1 copies neuron 2j (block 1)
HEAD_TWINS = {1: 0, 3: 2}  # in each KV group (heads 0,1 | 2,3) the second head copies the first (block 2)
ATOL = 1e-4


def _model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config()).eval()
    with torch.no_grad():
        mlp = model.model.layers[1].mlp
        for twin, source in TWINS.items():
            mlp.gate_proj.weight[twin] = mlp.gate_proj.weight[source]
            mlp.up_proj.weight[twin] = mlp.up_proj.weight[source]
        q = model.model.layers[2].self_attn.q_proj.weight
        for twin, source in HEAD_TWINS.items():
            q[twin * HD : (twin + 1) * HD] = q[source * HD : (source + 1) * HD]
    return model


def _batches(n: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(4, 256, (2, 32), generator=g)} for _ in range(n)]  # 512 tokens > 96 inputs


def _ids() -> torch.Tensor:
    return torch.randint(4, 256, (2, 20), generator=torch.Generator().manual_seed(7))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _plan(reconstruct: bool, ridge: float = 1e-9, **record: object) -> PruningPlan:
    keep_neurons = {1: tuple(n for n in range(NEURONS) if n not in TWINS)}
    keep_heads = {2: tuple(h for h in range(HEADS) if h not in HEAD_TWINS)}
    refit = reconstruction_record(ReconstructConfig("lsq", ridge), {}, None, None) | record if reconstruct else None
    return PruningPlan(
        num_layers=BLOCKS,
        keep_heads=keep_heads,
        keep_neurons=keep_neurons,
        heads_before=(HEADS,) * BLOCKS,
        neurons_before=(NEURONS,) * BLOCKS,
        reconstruction=refit,
    )


def test_removing_duplicated_neurons_and_heads_with_lsq_keeps_the_logits() -> None:
    model = _model()
    dense = _logits(model)
    cut = copy.deepcopy(model)
    apply_plan(cut, _plan(reconstruct=False))
    refit = copy.deepcopy(model)
    apply_plan(refit, _plan(reconstruct=True), calibration=_batches())
    assert block_shapes(refit) == block_shapes(cut)
    assert block_shapes(refit)[1].intermediate_size == NEURONS - len(TWINS)
    assert block_shapes(refit)[2].num_attention_heads == HEADS - len(HEAD_TWINS)
    assert (_logits(cut) - dense).abs().max() > 1e-2  # the cut alone loses the twins' contribution
    torch.testing.assert_close(_logits(refit), dense, rtol=0, atol=ATOL)
    for block in (0, 3):  # blocks the plan does not touch keep their weights bit for bit
        for name, param in model.model.layers[block].named_parameters():
            assert torch.equal(dict(refit.model.layers[block].named_parameters())[name], param)


def test_each_refit_alone_restores_its_twins() -> None:
    """Heads and neurons separately, so one cannot hide the other's error."""
    base = _plan(reconstruct=True)
    for keep_heads, keep_neurons in ((base.keep_heads, None), (None, base.keep_neurons)):
        model = _model()
        dense = _logits(model)
        plan = PruningPlan(num_layers=BLOCKS, keep_heads=keep_heads, keep_neurons=keep_neurons,
                           heads_before=(HEADS,) * BLOCKS, neurons_before=(NEURONS,) * BLOCKS,
                           reconstruction=base.reconstruction)  # fmt: skip
        apply_plan(model, plan, calibration=_batches())
        torch.testing.assert_close(_logits(model), dense, rtol=0, atol=ATOL)


def _inputs(model: nn.Module, names: list[str], batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The stacked float64 inputs of each named Linear over ``batches`` (what the Gram sums)."""
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def keep(name: str):  # noqa: ANN202
        return lambda module, args: seen[name].append(args[0].reshape(-1, args[0].shape[-1]))

    hooks = [modules[name].register_forward_pre_hook(keep(name)) for name in names]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in hooks:
        h.remove()
    return {name: torch.cat(xs).double() for name, xs in seen.items()}


@pytest.mark.parametrize("ridge", [0.0, 1e-2])
def test_the_refit_equals_lstsq_on_the_stacked_activations(ridge: float) -> None:
    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny_config()).eval()
    batches = _batches()
    plan = PruningPlan(num_layers=BLOCKS, keep_heads={0: (0, 2)}, keep_neurons={3: tuple(range(0, NEURONS, 3))},
                       heads_before=(HEADS,) * BLOCKS, neurons_before=(NEURONS,) * BLOCKS)  # fmt: skip
    columns = refit_columns(model, plan)
    assert sorted(columns) == ["model.layers.0.self_attn.o_proj", "model.layers.3.mlp.down_proj"]
    assert columns["model.layers.0.self_attn.o_proj"].tolist() == [*range(0, HD), *range(2 * HD, 3 * HD)]
    grams = collect_grams(model, batches, list(columns))
    stacked = _inputs(model, list(columns), batches)
    modules = dict(model.named_modules())
    for name, cols in columns.items():
        x, weight = stacked[name], modules[name].weight.detach().double()
        lam = ridge_lambda(grams[name].hessian_sum, cols, ridge)
        assert lam == pytest.approx(ridge * float((x[:, cols] ** 2).sum(0).mean()), rel=1e-12)
        refit = lsq_refit(modules[name].weight, grams[name].hessian_sum, cols, lam)
        # ridge regression as plain least squares on [X_K; sqrt(λ) I] -> [X Wᵀ; 0]
        a = torch.cat([x[:, cols], lam**0.5 * torch.eye(len(cols), dtype=torch.float64)])
        b = torch.cat([x @ weight.T, torch.zeros(len(cols), weight.shape[0], dtype=torch.float64)])
        direct = torch.linalg.lstsq(a, b).solution.T
        torch.testing.assert_close(refit, direct, rtol=0, atol=1e-6 * float(direct.abs().max()))


def test_gram_memory_does_not_grow_with_calibration_tokens() -> None:
    model = _model()
    names = reader_linears(model)
    assert len(names) == 2 * BLOCKS
    sizes = []
    for n in (2, 8):
        grams = collect_grams(model, _batches(n), names)
        assert {s.count for s in grams.values()} == {n * 64}
        sizes.append(sum(s.hessian_sum.nbytes for s in grams.values()))
        assert all(s.input_sq is None and s.last_inputs is None for s in grams.values())
    assert sizes[0] == sizes[1] == BLOCKS * 8 * (HEADS * HD * HEADS * HD + NEURONS * NEURONS)


def test_a_refit_plan_needs_its_calibration_and_nothing_changes_without_it() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"pass `calibration=` .* or `reconstruct=False`.*Nothing was modified"):
        apply_plan(model, _plan(reconstruct=True))
    digest = calibration_digest(_batches())
    with pytest.raises(ValueError, match="made on other calibration data .* nothing was modified"):
        apply_plan(model, _plan(reconstruct=True, calibration=digest), calibration=_batches(seed=5))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    apply_plan(model, _plan(reconstruct=True), reconstruct=False)  # shapes only: the same cut as without refit
    cut = _model()
    apply_plan(cut, _plan(reconstruct=False))
    assert torch.equal(_logits(model), _logits(cut))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reconstruct": "ols"}, r"`reconstruct` must be one of \['none', 'lsq'\], got 'ols'"),
        ({"ridge": -0.1}, r"`ridge` must be a finite number in \[0.0, inf\), got -0.1"),
        ({"ridge": float("nan")}, r"`ridge` must be a finite number in \[0.0, inf\), got nan"),
    ],
)
def test_bad_reconstruction_options_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ReconstructConfig(**kwargs)
    with pytest.raises(MisconfigurationException, match=message):
        WidthPruning(amount=0.2, **kwargs)


def _loader() -> DataLoader:
    return DataLoader([{"input_ids": b["input_ids"][i]} for b in _batches() for i in range(2)], batch_size=4)


def test_width_pruning_refits_in_the_fit_records_it_and_a_replay_gives_the_same_model(tmp_path) -> None:
    model = _model()
    module = CausalLMModule(model=model)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callback = WidthPruning(criterion="amp", amount=0.15, reconstruct="lsq", ridge=1e-3, calibration=_loader(),
                            verbose=0)  # fmt: skip
    trainer = quiet_trainer(tmp_path, [callback, checkpoint], max_steps=1, enable_checkpointing=True)
    # `max_steps=1` with lr 0 keeps the weights as the refit left them, so a replay can be compared exactly
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.0)  # type: ignore[method-assign]
    trainer.fit(module, train_dataloaders=_loader())
    plan = PruningPlan.from_dict(callback.plans[0])
    record = plan.reconstruction
    assert record is not None and record["method"] == "lsq" and record["ridge"] == 1e-3
    assert record["calibration"]["tokens"] == 16 * 32 and set(record["lambdas"]) == set(refit_columns(_model(), plan))
    assert all(lam > 0 for lam in record["lambdas"].values())
    saved = json.loads((tmp_path / "ckpt" / "width-plan-1.json").read_text())
    assert saved["reconstruction"] == record
    # replaying the saved plan on a fresh copy, on the same calibration, refits the same way
    fresh = _model()
    apply_plan(fresh, PruningPlan.from_dict(saved), calibration=_loader())
    torch.testing.assert_close(_logits(fresh), _logits(module.model), rtol=0, atol=1e-5)
    cut = _model()
    apply_plan(cut, PruningPlan.from_dict(saved), reconstruct=False)
    assert not torch.allclose(_logits(cut), _logits(module.model), atol=1e-3)  # the refit did something
    # resume from the checkpoint: shapes replayed without calibration, the weights are the checkpoint's
    resumed = CausalLMModule(model=_model())
    trainer2 = quiet_trainer(tmp_path, [WidthPruning(amount=0.15, reconstruct="lsq", verbose=0)], max_steps=1)
    trainer2.validate(resumed, dataloaders=_loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), verbose=False)
    torch.testing.assert_close(_logits(resumed.model), _logits(module.model), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("gqa", "allocation"), [("query", "uniform"), ("group", "uniform"), ("query", "global")])
def test_the_refit_never_fits_the_calibration_worse_than_the_cut(gqa: str, allocation: str) -> None:
    """Least squares at ridge 0 is optimal on the calibration inputs: every refit Linear's output error is at most
    the plain cut's (which keeps W[:, K]), in every GQA mode and allocation."""
    from lit_prune.allocation import make_width_plan
    from lit_prune.criteria.scoring import score_width_with_grams

    torch.manual_seed(2)
    model = LlamaForCausalLM(tiny_config()).eval()
    batches = _batches()
    scores, grams = score_width_with_grams(model, batches, reader_linears(model))
    plan = make_width_plan(model, scores, 0.25, gqa=gqa, allocation=allocation)
    columns = refit_columns(model, plan)
    assert any("o_proj" in n for n in columns) and any("down_proj" in n for n in columns)
    stacked = _inputs(model, list(columns), batches)
    modules = dict(model.named_modules())
    for name, cols in columns.items():
        x, weight = stacked[name], modules[name].weight.detach().double()
        target = x @ weight.T
        refit = lsq_refit(weight, grams[name].hessian_sum, cols, 0.0)
        cut_error = (target - x[:, cols] @ weight[:, cols].T).pow(2).sum()
        refit_error = (target - x[:, cols] @ refit.T).pow(2).sum()
        assert refit_error <= cut_error * (1 + 1e-9), name
        assert refit_error < 0.9 * cut_error, name  # and by a margin: random weights leave plenty to recover
