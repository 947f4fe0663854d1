"""``DepthConfig``: one set of depth options and defaults, read by DepthPruning, score_blocks and make_depth_plan."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import tiny_config
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from transformers import LlamaForCausalLM

from lit_prune.allocation import make_depth_plan
from lit_prune.callbacks import DepthPruning
from lit_prune.criteria.depth import needs_for, scores_from_stats
from lit_prune.criteria.depth_config import ONE_PASS, DepthConfig
from lit_prune.criteria.scoring import score_blocks
from lit_prune.stats import collect_depth_statistics


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(num_hidden_layers=6)).eval()


@pytest.fixture(scope="module")
def batches() -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(4, 256, (2, 10), generator=g)} for _ in range(2)]


def test_the_callback_defaults_are_the_config_fields():
    config = DepthConfig()
    for name, parameter in inspect.signature(DepthPruning.__init__).parameters.items():
        if name in DepthConfig.field_names():
            assert parameter.default == getattr(config, name), name
    assert set(DepthConfig.field_names()) <= set(inspect.signature(DepthPruning.__init__).parameters)
    for function in (needs_for,):
        defaults = {k: p.default for k, p in inspect.signature(function).parameters.items()}
        assert defaults["consensus_of"] == config.consensus_of == ONE_PASS
        assert defaults["reversed_of"] == config.reversed_of


def test_depth_config_normalises_and_counts():
    cfg = DepthConfig(criterion="consensus", protect=[5, 0, 5], consensus_of=["bi", "cka"], amount=0.2)  # type: ignore[arg-type]
    assert cfg.protect == (0, 5) and cfg.consensus_of == ("bi", "cka")
    assert cfg.num_to_remove(30) == 6 and cfg.num_to_remove(2) == 1
    assert DepthConfig(num_layers=3).num_to_remove(30) == 3
    assert DepthConfig(reversed_of="consensus").members == {"consensus": ONE_PASS, "reversed": "consensus"}
    assert DepthPruning(num_layers=2, protect=[3, 0]).config == DepthConfig(num_layers=2, protect=(0, 3))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"criterion": "nope"}, r"`criterion` must be one of \['bi', .*got 'nope'"),
        ({"consensus_of": ("bi", "consensus")}, r"`consensus_of` must be one of \[.*\], got 'consensus'"),
        ({"consensus_of": ()}, r"`consensus_of` must be a non-empty list of"),
        ({"reversed_of": "reversed"}, r"`reversed_of` must be one of \[.*\], got 'reversed'"),
        ({"num_layers": 2, "amount": 0.1}, "Give exactly one of `num_layers` and `amount`, got num_layers=2"),
        ({"num_layers": 0}, "`num_layers` must be an int >= 1, got 0"),
        ({"num_layers": True}, "`num_layers` must be an int >= 1, got True"),
        ({"amount": 1.5}, r"`amount` must be a fraction of the blocks in \(0, 1\), got 1.5"),
        ({"amount": "0.1"}, r"`amount` must be a fraction of the blocks in \(0, 1\), got '0.1'"),
        ({"protect": (-1,)}, r"`protect` must hold block indices >= 0, got \[-1\]"),
        ({"seed": 1.5}, "`seed` must be an int, got 1.5"),
    ],
)
def test_depth_config_misconfiguration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DepthConfig(**kwargs)
    with pytest.raises(MisconfigurationException, match=match):
        DepthPruning(**{"num_layers": 1, **kwargs} if "amount" not in kwargs else kwargs)


def test_build_and_count_errors():
    with pytest.raises(ValueError, match="Give exactly one of `num_layers` and `amount`, got num_layers=None"):
        DepthConfig().num_to_remove(6)
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['window'\]; the options are the DepthConfig fields"):
        DepthConfig.build(window=2)
    with pytest.raises(TypeError, match="`config` must be a DepthConfig or None, got dict"):
        DepthConfig.build({"criterion": "bi"})  # type: ignore[arg-type]
    assert DepthConfig.build(DepthConfig(seed=3), criterion="random") == DepthConfig(criterion="random", seed=3)


def test_score_blocks_takes_a_config_or_its_fields(model, batches):
    cfg = DepthConfig(criterion="consensus", consensus_of=("bi", "cka"))
    by_config = score_blocks(model, batches, config=cfg, progress=False)
    by_keywords = score_blocks(model, batches, "consensus", consensus_of=["bi", "cka"], progress=False)
    assert by_config.keys() == by_keywords.keys() == {"bi", "cka", "consensus"}
    for name in by_config:
        torch.testing.assert_close(by_config[name], by_keywords[name], rtol=0, atol=0)
    # a keyword replaces the config's field
    rand = score_blocks(model, batches, config=DepthConfig(criterion="random", seed=1), seed=2, progress=False)
    torch.testing.assert_close(rand["random"], score_blocks(model, batches, "random", seed=2, progress=False)["random"])
    # angular_block's window defaults to the config's count
    window = score_blocks(model, batches, config=DepthConfig(criterion="angular_block", num_layers=3), progress=False)
    explicit = score_blocks(model, batches, "angular_block", n=3, progress=False)
    torch.testing.assert_close(window["angular_block"], explicit["angular_block"], rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['consensus'\]"):
        score_blocks(model, batches, "bi", consensus=("bi",), progress=False)


def test_scores_from_stats_takes_a_config(model, batches):
    stats = collect_depth_statistics(model, batches, needs_for(["consensus"]), progress=False).compute()
    cfg = DepthConfig(criterion="consensus")
    torch.testing.assert_close(scores_from_stats(stats, config=cfg), scores_from_stats(stats, "consensus"))
    with pytest.raises(ValueError, match="needs a global pass"):
        scores_from_stats(stats, "kl_global")


def test_make_depth_plan_reads_count_and_protect_from_the_config(model):
    scores = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    cfg = DepthConfig(num_layers=2, protect=(0,))
    plan = make_depth_plan(model, scores, config=cfg)
    assert plan.drop_layers == (1, 2) and plan.meta["protect"] == [0]
    assert make_depth_plan(model, scores, 1, protect=(), config=cfg).drop_layers == (0,)  # explicit wins
    with pytest.raises(ValueError, match="Give exactly one of `num_layers` and `amount`"):
        make_depth_plan(model, scores)
