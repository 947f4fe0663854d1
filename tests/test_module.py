from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from conftest import tiny_config
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from lit_prune import CausalLMModule
from lit_prune.eval import perplexity


def _trainer(**kw):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    defaults.update(kw)
    return pl.Trainer(**defaults)


def _windows(n=6, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 256, (n, t), generator=g)


def _loader(windows, batch_size=4):
    return DataLoader([{"input_ids": w} for w in windows], batch_size=batch_size)


def test_from_config_dict_and_object():
    a = CausalLMModule(config=tiny_config().to_dict())
    b = CausalLMModule(config=tiny_config())
    assert a.model.config.head_dim == b.model.config.head_dim == 24
    assert a.tokenizer is None


def test_from_local_folder_loads_model_and_tokenizer(tiny_model_dir, tiny_model):
    module = CausalLMModule(model=str(tiny_model_dir))
    assert module.tokenizer is not None
    assert module.hparams["model"] == str(tiny_model_dir)
    x = _windows(2)
    torch.testing.assert_close(module.model(input_ids=x).logits, tiny_model(input_ids=x).logits)


def test_validate_logs_the_same_ppl_as_perplexity(tiny_model):
    """The Trainer path and the functional path agree (issue: 1e-4 relative; here float64 sums make it ~1e-7)."""
    windows = _windows(7)
    module = CausalLMModule(model=tiny_model)
    (metrics,) = _trainer().validate(module, dataloaders=_loader(windows, batch_size=3), verbose=False)
    expected = perplexity(tiny_model, windows, batch_size=2, progress=False)
    assert metrics["val_ppl"] == pytest.approx(expected, rel=1e-5)
    (tmetrics,) = _trainer().test(module, dataloaders=_loader(windows), verbose=False)
    assert tmetrics["test_ppl"] == pytest.approx(expected, rel=1e-5)


def test_fit_after_validate_on_the_same_module(tiny_model):
    """`validate` leaves the perplexity states as inference tensors; a later `fit` (sanity check included) must still
    update them (the README's order: validate the dense model, then prune and train)."""
    windows = _windows(6)
    module = CausalLMModule(model=tiny_model)
    (before,) = _trainer().validate(module, dataloaders=_loader(windows), verbose=False)
    trainer = _trainer(max_steps=1, num_sanity_val_steps=1, limit_val_batches=1)
    trainer.fit(module, train_dataloaders=_loader(windows), val_dataloaders=_loader(windows))
    assert trainer.global_step == 1
    (after,) = _trainer().validate(module, dataloaders=_loader(windows), verbose=False)
    assert after["val_ppl"] != before["val_ppl"]  # one training step changed the model, and validation saw it


def test_training_step_masks_minus_100(tiny_model):
    module = CausalLMModule(model=tiny_model)
    ids = _windows(2, 10)
    labels = ids.clone()
    labels[:, :6] = -100  # prompt tokens
    loss = module.training_step({"input_ids": ids, "labels": labels}, 0)
    logits = tiny_model(input_ids=ids).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    expected = -lp[:, 5:].mean()  # positions whose *target* is unmasked: targets 6..9
    torch.testing.assert_close(loss, expected)


def test_fit_reduces_loss_and_uses_optimizer_factory(tiny_model):
    torch.manual_seed(0)
    windows = _windows(4, 16)
    module = CausalLMModule(model=tiny_model, optimizer=partial(torch.optim.SGD, lr=0.5))
    opts = module.configure_optimizers()
    assert isinstance(opts, torch.optim.SGD)
    before = perplexity(tiny_model, windows, progress=False)
    _trainer(max_epochs=8).fit(module, train_dataloaders=_loader(windows))
    after = perplexity(module.model, windows, progress=False)
    assert after < 0.9 * before


def test_optimizer_covers_only_trainable_parameters(tiny_model):
    for p in tiny_model.parameters():
        p.requires_grad_(False)
    tiny_model.lm_head.weight.requires_grad_(True)
    module = CausalLMModule(model=tiny_model, lr=1e-3, weight_decay=0.1)
    opt = module.configure_optimizers()
    params = [p for group in opt.param_groups for p in group["params"]]
    assert len(params) == 1 and params[0] is tiny_model.lm_head.weight
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["weight_decay"] == 0.1


def test_scheduler_factory(tiny_model):
    module = CausalLMModule(
        model=tiny_model,
        scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1),
        scheduler_interval="epoch",
    )
    cfg = module.configure_optimizers()
    assert isinstance(cfg["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert cfg["lr_scheduler"]["interval"] == "epoch"
    plateau = CausalLMModule(model=tiny_model, scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert plateau.configure_optimizers()["lr_scheduler"]["monitor"] == "val_ppl"


def test_module_misconfiguration(tiny_model):
    with pytest.raises(ValueError, match="exactly one of `model`.*got model=None, config=None"):
        CausalLMModule()
    with pytest.raises(ValueError, match="exactly one of `model`"):
        CausalLMModule(model=tiny_model, config=tiny_config())
    with pytest.raises(TypeError, match="must be a transformers PreTrainedModel, got Linear"):
        CausalLMModule(model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="`dtype` must be one of .*got 'int8'"):
        CausalLMModule(config=tiny_config(), dtype="int8")
    with pytest.raises(ValueError, match="`scheduler_interval` must be 'step' or 'epoch', got 'batch'"):
        CausalLMModule(model=tiny_model, scheduler_interval="batch")
    with pytest.raises(ValueError, match="`lr` must be positive, got 0"):
        CausalLMModule(model=tiny_model, lr=0)
    with pytest.raises(ValueError, match="needs a `model_type` key"):
        CausalLMModule(config={"hidden_size": 8})
    with pytest.raises(ValueError, match="expects batches as dicts with `input_ids`, got Tensor"):
        CausalLMModule(model=tiny_model).training_step(_windows(1), 0)
    for p in tiny_model.parameters():
        p.requires_grad_(False)
    with pytest.raises(MisconfigurationException, match="no trainable parameters"):
        CausalLMModule(model=tiny_model).configure_optimizers()


def test_model_reference_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file .*missing.gguf.* does not exist"):
        CausalLMModule(model=str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match=r"Unknown built-in model 'builtin:nope'; available: \['builtin:smollm2"):
        CausalLMModule(model="builtin:nope")
    # more cases (relative paths, offline hub ids, unsupported families) in test_loading.py, for every loader
    with pytest.raises(FileNotFoundError, match=r"^Model folder '.*nonexistent' does not exist; give an existing"):
        CausalLMModule(model=str(tmp_path / "nonexistent"))


def test_padded_batches_score_the_same_on_both_paths(tiny_model):
    """Right-padded rows without labels: padding is ignored by training, validation and perplexity()."""
    g = torch.Generator().manual_seed(3)
    lengths = [12, 7, 9, 12]
    rows = [torch.randint(4, 256, (n,), generator=g) for n in lengths]
    ids = torch.full((4, 12), 3)
    mask = torch.zeros(4, 12, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    loader = DataLoader([{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(4)], batch_size=2)
    unpadded = [perplexity(tiny_model, row[None], progress=False) for row in rows]
    nll = sum((n - 1) * torch.log(torch.tensor(p)) for n, p in zip(lengths, unpadded))
    expected = float(torch.exp(nll / sum(n - 1 for n in lengths)))
    (metrics,) = _trainer().validate(CausalLMModule(model=tiny_model), dataloaders=loader, verbose=False)
    assert metrics["val_ppl"] == pytest.approx(expected, rel=1e-5)
    assert perplexity(tiny_model, loader, progress=False) == pytest.approx(expected, rel=1e-5)
