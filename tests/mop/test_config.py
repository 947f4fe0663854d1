"""``MoPConfig``: one set of MoP options and defaults, read by MixtureOfPruners and MoPSearch."""

from __future__ import annotations

import inspect
import typing

import pytest
import torch
from conftest import tiny_config
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from transformers import LlamaForCausalLM

from lit_prune.callbacks import MixtureOfPruners
from lit_prune.criteria.depth_config import DepthConfig
from lit_prune.criteria.width_config import WidthConfig
from lit_prune.mop import PROXIES, MoPConfig, MoPSearch
from lit_prune.mop.config import Proxy


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(num_hidden_layers=4, intermediate_size=192)).eval()


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(4, 256, (2, 12), generator=g)}]


def test_the_callback_defaults_are_the_config_fields():
    config = MoPConfig()
    parameters = inspect.signature(MixtureOfPruners.__init__).parameters
    for name in MoPConfig.field_names():
        if name == "branches":  # the callback always searches both branches
            assert name not in parameters
            continue
        assert parameters[name].default == getattr(config, name), name
    assert typing.get_args(Proxy) == PROXIES
    # the width candidate's and depth criterion's defaults are those of the width / depth configs
    assert (config.gqa, config.round_to, config.width_criterion) == (
        WidthConfig.gqa,
        WidthConfig.round_to,
        WidthConfig.criterion,
    )
    assert config.depth_criterion == DepthConfig.criterion


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"proxy": "loss"}, r"`proxy` must be one of \['ppl', 'kl', 'cosine', 'random'\] or a callable, got 'loss'"),
        ({"depth_criterion": "kl_global"}, r"`depth_criterion` must be one of \['bi', .*'position'\], got 'kl_global'"),
        ({"width_criterion": "amps"}, r"`width_criterion` must be one of \['amp', .*\], got 'amps'; did you mean"),
        ({"gqa": "kv"}, r"`gqa` must be one of \['query', 'group'\], got 'kv'"),
        ({"target": 1.0}, r"`target` must be a fraction of all parameters in \(0, 1\), got 1.0"),
        ({"target": True}, r"`target` must be a fraction of all parameters in \(0, 1\), got True"),
        ({"branches": ""}, r"`branches` must be 'LG', 'L' or 'G', got ''"),
        ({"decisions": "LX"}, r"`decisions` must be a string of 'L' \(depth\) and 'G' \(width\), got 'LX'"),
        ({"round_to": 0}, "`round_to` must be an int >= 1, got 0"),
        ({"seed": None}, "`seed` must be an int, got None"),
    ],
)
def test_mop_config_misconfiguration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoPConfig(**kwargs)
    model = _model()
    with pytest.raises(ValueError, match=match):
        MoPSearch(model, _batches(), **kwargs)
    if "branches" not in kwargs:
        with pytest.raises(MisconfigurationException, match=match):
            MixtureOfPruners(**kwargs)


def test_config_values_and_errors():
    assert MoPConfig(target=1 / 4).target == 0.25 and isinstance(MoPConfig(target=0.5).target, float)
    assert MoPConfig(proxy=lambda branch, model: 0.0).branches == "LG"  # a callable proxy is allowed
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['proxies'\]; the options are the MoPConfig fields"):
        MoPConfig.build(proxies="ppl")
    with pytest.raises(MisconfigurationException, match="`recover_epochs_between_steps` must be an int >= 0, got -1"):
        MixtureOfPruners(recover_epochs_between_steps=-1)


def test_mop_search_takes_a_config_or_its_fields():
    cfg = MoPConfig(target=0.3, proxy="random", width_criterion="magnitude", round_to=2, seed=5)
    by_config = MoPSearch(_model(), _batches(), config=cfg)
    by_keywords = MoPSearch(_model(), _batches(), 0.3, proxy="random", width_criterion="magnitude", round_to=2, seed=5)
    assert by_config.config == by_keywords.config == cfg
    assert (by_config.target, by_config.round_to, by_config.seed) == (0.3, 2, 5)
    by_config.run()
    by_keywords.run()
    assert by_config.path == by_keywords.path and by_config.removed == by_keywords.removed
    replaced = MoPSearch(_model(), _batches(), 0.2, config=cfg, branches="L")  # target and keywords replace
    assert replaced.config == MoPConfig.build(cfg, target=0.2, branches="L")
    callback = MixtureOfPruners(target=0.3, proxy="random", width_criterion="magnitude", round_to=2, seed=5)
    assert callback.config == cfg and callback.width_criterion == "magnitude" and callback.target == 0.3
