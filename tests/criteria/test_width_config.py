"""``WidthConfig``: one set of width options and defaults, read by WidthPruning, score_width and make_width_plan."""

from __future__ import annotations

import inspect
import typing

import pytest
import torch
from conftest import tiny_config
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from transformers import LlamaForCausalLM

from lit_prune.allocation import check_width_options, make_width_plan, params_to_remove
from lit_prune.callbacks import WidthPruning
from lit_prune.criteria import registry
from lit_prune.criteria.scoring import score_width
from lit_prune.criteria.width import width_needs_for
from lit_prune.criteria.width_config import GQA_MODES, PARAMS_OF, WIDTH_ALLOCATIONS, WidthConfig, WidthCriterion


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(num_hidden_layers=2)).eval()


@pytest.fixture(scope="module")
def batches() -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(4, 256, (2, 10), generator=g)} for _ in range(2)]


def test_the_callback_defaults_are_the_config_fields():
    config = WidthConfig()
    parameters = inspect.signature(WidthPruning.__init__).parameters
    assert set(WidthConfig.field_names()) <= set(parameters)
    for name in WidthConfig.field_names():
        assert parameters[name].default == getattr(config, name), name
    assert inspect.signature(width_needs_for).parameters["reversed_of"].default == config.reversed_of
    assert inspect.signature(params_to_remove).parameters["of"].default == config.of
    assert registry.criterion("width", "reversed").of == (config.reversed_of,)  # the registry's default member
    assert typing.get_args(WidthCriterion) == registry.names("width")
    assert (GQA_MODES, WIDTH_ALLOCATIONS, PARAMS_OF) == (
        ("query", "group"),
        ("uniform", "global"),
        ("total", "non_embedding"),
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"criterion": "ampp"}, r"`criterion` must be one of \['amp', .*got 'ampp'; did you mean 'amp'"),
        ({"criterion": "reversed", "reversed_of": "reversed"}, r"`reversed_of` must be one of \['amp', 'amp_act'"),
        ({"amount": 1.0}, r"`amount` must be a float in \(0, 1\) or an int >= 1, got 1.0"),
        ({"amount": True}, r"`amount` must be a float in \(0, 1\) or an int >= 1, got True"),
        ({"gqa": "kv"}, r"`gqa` must be one of \['query', 'group'\], got 'kv'"),
        ({"allocation": "owl"}, r"`allocation` must be one of \['uniform', 'global'\], got 'owl'"),
        ({"of": "embedding"}, r"`of` must be one of \['total', 'non_embedding'\], got 'embedding'"),
        ({"round_to": 0}, "`round_to` must be an int >= 1, got 0"),
        ({"min_keep": 0.0}, r"`min_keep` must be a number in \(0, 1\], got 0.0"),
        ({"seed": "0"}, "`seed` must be an int, got '0'"),
    ],
)
def test_width_config_misconfiguration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WidthConfig(**kwargs)
    with pytest.raises(MisconfigurationException, match=match):
        WidthPruning(**kwargs)
    with pytest.raises(ValueError, match=match):
        check_width_options(**{"amount": 0.2, **kwargs})


def test_build_errors():
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['mode'\]; the options are the WidthConfig fields"):
        WidthConfig.build(mode="query")
    with pytest.raises(TypeError, match="`config` must be a WidthConfig or None, got str"):
        WidthConfig.build("amp")  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:gqa='group' removes")
def test_the_functional_api_takes_a_config_or_its_fields(model, batches):
    cfg = WidthConfig(criterion="wanda_sp", amount=0.25, gqa="group", allocation="global", round_to=4)
    scores = score_width(model, batches, config=cfg)
    same = score_width(model, batches, "wanda_sp")
    for a, b in zip((*scores.heads, *scores.neurons), (*same.heads, *same.neurons)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    by_config = make_width_plan(model, scores, config=cfg)
    by_keywords = make_width_plan(model, scores, 0.25, gqa="group", allocation="global", round_to=4)
    assert by_config.to_dict() == by_keywords.to_dict()
    assert by_config.meta["gqa"] == "group" and by_config.meta["round_to"] == 4
    # the explicit amount and keywords replace the config's
    smaller = make_width_plan(model, scores, 0.1, config=cfg, gqa="query")
    assert smaller.meta["amount"] == 0.1 and smaller.meta["gqa"] == "query" and smaller.meta["allocation"] == "global"
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['gqa_mode'\]"):
        make_width_plan(model, scores, 0.2, gqa_mode="group")
