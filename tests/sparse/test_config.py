"""``SparsityConfig``: one set of defaults and checks for ``prune_sparse`` and the ``SparsityPruning`` callback."""

import dataclasses
import inspect

import pytest
import torch
from conftest import tiny_config
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from transformers import LlamaForCausalLM

from lit_prune.allocation.sparsity import AllocationFunction
from lit_prune.callbacks import SparsityPruning
from lit_prune.sparse import prune_sparse
from lit_prune.sparse.config import SparsityConfig

CALLBACK_NAMES = {"trim": "trim_rows"}
"""Callback argument -> config field, where the names differ (the YAML name stays ``trim``)."""


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config())


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(4, 256, (2, 16), generator=g)} for _ in range(2)]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"criterion": "l1"}, ValueError, "`criterion` must be one of"),
        ({"sparsity": 1.0}, ValueError, r"`sparsity` must be a fraction in \(0, 1\), got 1.0"),
        ({"sparsity": True}, ValueError, r"`sparsity` must be a fraction in \(0, 1\), got True"),
        ({"allocation": "greedy"}, ValueError, "`allocation` must be one of"),
        ({"protocol": "greedy"}, ValueError, "`protocol` must be one of"),
        ({"n_m": "4:2"}, ValueError, "n_m"),
        ({"n_m": "2:4", "allocation": "owl"}, ValueError, "use allocation='uniform'"),
        ({"n_m": "2:4", "trim_rows": True}, ValueError, "TRIM does not apply"),
        ({"allocation": "linear_map"}, ValueError, "needs `layer_scores`"),
        ({"layer_scores": "1,2"}, ValueError, "`layer_scores` must be None or a list of numbers, got '1,2'"),
        ({"owl_m": 0.0}, ValueError, r"`owl_m` must be a finite number in \(0.0, inf\), got 0.0"),
        ({"owl_m": float("inf")}, ValueError, r"`owl_m` must be a finite number in \(0.0, inf\), got inf"),
        ({"lam": -0.1}, ValueError, r"`lam` must be a finite number in \[0.0, 1.0\), got -0.1"),
        ({"eps": 1.0}, ValueError, r"`eps` must be a finite number in \[0.0, 1.0\), got 1.0"),
        ({"percdamp": -1}, ValueError, r"`percdamp` must be a finite number in \[0.0, inf\), got -1"),
        ({"blocksize": 0}, ValueError, "`blocksize` must be an int >= 1, got 0"),
        ({"criterion": "sparsegpt", "n_m": "2:4", "blocksize": 6}, ValueError, "multiple of M=4 with `n_m`, got 6"),
        ({"dsa_function": "log|nope"}, ValueError, "`spec` must hold exactly one reduction"),
        ({"dsa_function": 3}, TypeError, "`dsa_function` must be a str or an AllocationFunction, got int"),
    ],
)
def test_sparsity_config_misconfiguration(kwargs, error, match):
    with pytest.raises(error, match=match):
        SparsityConfig(**kwargs)


def test_the_config_parses_and_normalises_its_fields():
    config = SparsityConfig(criterion="sparsegpt", n_m=[2, 4], layer_scores=[1, 2])  # type: ignore[arg-type]
    assert config.n_m == config.pattern == (2, 4) and config.target == 0.5
    assert config.layer_scores == (1, 2)
    assert dataclasses.replace(config, blocksize=64) == SparsityConfig.build(config, blocksize=64)
    assert SparsityConfig(sparsity=0.7).pattern is None and SparsityConfig(sparsity=0.7).target == 0.7
    function = AllocationFunction.parse("abs|mean")
    assert SparsityConfig(allocation="dsa", dsa_function=function).dsa_function is function
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.sparsity = 0.1  # type: ignore[misc]


def test_build_names_an_unknown_option():
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['owl'\]; the options are the SparsityConfig"):
        SparsityConfig.build(owl=5.0)
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['trim'\]"):
        prune_sparse(_model(), None, "magnitude", 0.5, trim=True)


def test_callback_defaults_are_the_config_defaults():
    """Every option the callback shares with the config defaults to the config's field: one default each."""
    config = SparsityConfig()
    fields = {f.name for f in dataclasses.fields(SparsityConfig)}
    shared = 0
    for name, parameter in inspect.signature(SparsityPruning).parameters.items():
        field = CALLBACK_NAMES.get(name, name)
        if field in fields:
            shared += 1
            assert parameter.default == getattr(config, field), name
    assert shared == len(fields)  # the callback exposes every field
    assert SparsityPruning(verbose=0).config == config


def test_callback_refuses_what_the_config_refuses():
    with pytest.raises(MisconfigurationException, match=r"`owl_m` must be a finite number in \(0.0, inf\), got -1"):
        SparsityPruning(owl_m=-1)


def test_a_config_or_its_fields_as_keywords_prune_the_same():
    config = SparsityConfig(criterion="wanda", sparsity=0.6, allocation="owl", owl_m=3.0, lam=0.05)
    by_config = prune_sparse(_model(), _batches(), config=config)
    by_keywords = prune_sparse(_model(), _batches(), "wanda", 0.6, allocation="owl", owl_m=3.0, lam=0.05)
    overridden = prune_sparse(
        _model(),
        _batches(),
        config=SparsityConfig(sparsity=0.3),
        sparsity=0.6,
        **{"allocation": "owl", "owl_m": 3.0, "lam": 0.05},
    )
    assert by_config.block_ratios == by_keywords.block_ratios == overridden.block_ratios
    for name, mask in by_config.masks.items():
        assert torch.equal(mask, by_keywords.masks[name]) and torch.equal(mask, overridden.masks[name])
