"""The criterion registry: lookup, errors, needs, composites, the callbacks' Literals pinned to it, and MoP's width
branch with any registered width criterion."""

from __future__ import annotations

import copy
import typing

import pytest
import torch
from conftest import tiny_config
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from transformers import LlamaForCausalLM

from lit_prune.arch import adapter_for
from lit_prune.callbacks import MixtureOfPruners
from lit_prune.callbacks.depth import DepthCriterion
from lit_prune.callbacks.width import WidthCriterion
from lit_prune.criteria import (
    DEPTH_CRITERIA,
    GLOBAL_CRITERIA,
    SPARSE_CRITERIA,
    WIDTH_CRITERIA,
    angular,
    bi,
    cka,
    consensus,
    needs_for,
    registry,
    reversed_scores,
    width_needs_for,
)
from lit_prune.criteria.registry import ScoreInputs, register_criterion
from lit_prune.mop import MOP_DEPTH_CRITERIA, MoPSearch
from lit_prune.sparse.prune import SparseCriterion
from lit_prune.stats import collect_depth_statistics


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(4, 256, (2, 12), generator=g)} for _ in range(2)]


@pytest.fixture
def scratch():
    """Registrations made by a test are removed afterwards."""
    before = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)


@pytest.mark.parametrize(
    ("literal", "kind"), [(DepthCriterion, "depth"), (WidthCriterion, "width"), (SparseCriterion, "sparse")]
)
def test_the_callbacks_literals_are_the_registered_names(literal, kind):
    # the Lightning CLI reads its choices from these Literals: register a name, extend the Literal (and vice versa)
    assert typing.get_args(literal) == registry.names(kind)


def test_mop_width_criterion_is_typed_by_the_width_literal():
    hints = typing.get_type_hints(MixtureOfPruners.__init__)
    assert hints["width_criterion"] == WidthCriterion


def test_public_name_tuples_are_read_off_the_registry():
    assert registry.names("depth") == DEPTH_CRITERIA
    assert WIDTH_CRITERIA == ("amp", "amp_act", "magnitude", "wanda_sp", "random", "reversed")
    assert SPARSE_CRITERIA == ("magnitude", "wanda", "sparsegpt")
    assert GLOBAL_CRITERIA == ("cka_global", "cosine_global", "kl_global")
    assert registry.names("depth", composite=True) == ("consensus", "reversed")
    assert MOP_DEPTH_CRITERIA == (
        "bi",
        "angular",
        "angular_block",
        "cka",
        "cka_all",
        "consensus",
        "random",
        "reversed",
        "position",
    )


def test_lookup_gives_the_entry():
    entry = registry.criterion("depth", "cka_all")
    assert entry.fn is cka and entry.needs == {"cka_all"} and not entry.global_pass and not entry.composite
    assert registry.criterion("depth", "kl_global").global_pass
    assert registry.criterion("depth", "kl_global").needs == {"kl"}
    assert registry.criterion("width", "magnitude").data_free
    assert registry.criterion("sparse", "wanda").needs == {"input_sq"}
    assert all(registry.criterion(k, n).description for k in registry.KINDS for n in registry.names(k))


def test_lookup_errors_name_the_value_and_the_allowed_names():
    with pytest.raises(
        ValueError, match=r"`criterion` must be one of \['amp', .*'reversed'\], got 'ampp'; did you mean 'amp'\?"
    ):
        registry.criterion("width", "ampp")
    with pytest.raises(ValueError, match=r"`width_criterion` must be one of \[.*\], got 'ppl'$"):
        registry.criterion("width", "ppl", "width_criterion")
    with pytest.raises(ValueError, match=r"`criterion` must be one of \['magnitude', 'wanda', 'sparsegpt'\], got None"):
        registry.criterion("sparse", None)
    with pytest.raises(ValueError, match=r"`kind` must be one of \['depth', 'width', 'sparse'\], got 'layer'"):
        registry.names("layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'bi' is not a composite"):
        registry.members("depth", "bi")


def test_needs_of_singles_and_composites():
    assert registry.criterion("depth", "consensus").needs == {"bi", "angular", "cka_last"}  # its default members
    assert registry.criterion("width", "reversed").needs == {"amp_heads", "amp_neurons"}
    of = {"consensus": ["kl_global", "cka_all", "random"]}
    assert (
        registry.needs("depth", "consensus", of)
        == {"cka_all"}
        == needs_for(["consensus"], consensus_of=of["consensus"])
    )
    assert registry.needs("depth", "consensus", of, global_pass=True) == {"kl"}
    assert registry.needs("depth", ["reversed"], {"reversed": "consensus"}) == needs_for(["consensus"])
    assert width_needs_for("reversed", reversed_of="wanda_sp") == {"attn_in_sq", "o_in_sq", "mlp_in_sq", "down_in_sq"}
    assert width_needs_for("random") == set()
    assert registry.components("depth", "reversed", {"reversed": "consensus", "consensus": ["bi", "bi", "cka"]}) == [
        "bi",
        "cka",
    ]


def test_composite_members_are_checked():
    with pytest.raises(ValueError, match=r"`consensus_of` must be a non-empty list of \['bi', .*\], got \(\)"):
        registry.components("depth", "consensus", {"consensus": ()})
    with pytest.raises(ValueError, match=r"`consensus_of` must be one of \[.*'random'\], got 'reversed'"):
        registry.components("depth", "consensus", {"consensus": ["bi", "reversed"]})
    with pytest.raises(ValueError, match=r"`reversed_of` must be one of \['amp', .*'random'\], got 'reversed'"):
        registry.components("width", "reversed", {"reversed": "reversed"})


def test_registering_a_name_twice_raises(scratch):
    with pytest.raises(ValueError, match="A depth criterion named 'bi' is already registered"):
        register_criterion("bi", "depth", bi, description="again")
    before = registry.names("width")
    with pytest.raises(ValueError, match="member 'nope' is not registered"):
        register_criterion("mean_of", "width", lambda s: s, of=("nope",), description="x")
    with pytest.raises(ValueError, match="`kind` must be one of"):
        register_criterion("x", "block", bi, description="x")  # type: ignore[arg-type]
    assert registry.names("width") == before  # nothing half-registered


def test_a_new_criterion_is_registered_by_decorator_and_reaches_the_consumers(scratch):
    @register_criterion("bi_twice", "depth", needs=("bi",), call=lambda i: 2 * bi(i.stats), description="2 x BI")
    def bi_twice(stats):
        return 2 * bi(stats)

    assert bi_twice.__name__ == "bi_twice"  # the decorator returns the function
    assert registry.names("depth")[-1] == "bi_twice"
    assert registry.needs("depth", ["consensus"], {"consensus": ["bi_twice", "angular"]}) == {"bi", "angular"}
    assert typing.get_args(DepthCriterion) != registry.names("depth")  # what the pin test would catch
    # another kind may reuse a name
    register_criterion("bi_twice", "width", lambda s: s, description="unrelated")


def test_compute_equals_the_functions_and_orders_components_before_composites():
    stats = collect_depth_statistics(_model(), _batches(), needs_for(["consensus"]), progress=False).compute()
    inputs = ScoreInputs(stats=stats, num_blocks=stats.num_blocks, seed=0)
    scores = registry.compute("depth", "reversed", inputs, {"reversed": "consensus"})
    assert list(scores) == ["bi", "angular", "cka", "consensus", "reversed"]
    expected = consensus({"bi": bi(stats), "angular": angular(stats), "cka": cka(stats)})
    torch.testing.assert_close(scores["consensus"], expected, rtol=0, atol=0)
    torch.testing.assert_close(scores["reversed"], reversed_scores(expected), rtol=0, atol=0)
    with pytest.raises(TypeError, match="no uniform scorer"):
        registry.criterion("sparse", "wanda").score(inputs)


@pytest.mark.parametrize("width_criterion", ["magnitude", "wanda_sp"])
def test_mop_width_branch_takes_a_registered_width_criterion(width_criterion):
    model = _model()
    total = adapter_for(model).total_params(model)
    search = MoPSearch(model, _batches(), 0.3, proxy="ppl", width_criterion=width_criterion)
    search.run()
    assert search.path and set(search.path) <= {"L", "G"}
    assert search.trajectory[-1].params_after == adapter_for(model).total_params(model) < total
    methods = [s.plan["method"] for s in search.trajectory if s.branch == "G"]
    assert all(m == f"mop:width:{width_criterion}" for m in methods)
    assert model(_batches()[0]["input_ids"]).logits.isfinite().all()


def test_mop_width_scores_carried_to_the_next_step_equal_fresh_ones():
    search = MoPSearch(_model(), _batches(), 0.3, proxy="ppl", width_criterion="wanda_sp", decisions="G" * 10)
    search.step()
    carried, fresh = search._scores, search._fresh_scores()
    assert carried is not None and carried.width is not None and fresh.width is not None
    assert carried.width.criterion == "wanda_sp"
    for a, b in zip((*carried.width.heads, *carried.width.neurons), (*fresh.width.heads, *fresh.width.neurons)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_mop_data_free_width_criterion_scores_the_current_weights():
    search = MoPSearch(_model(), _batches(), 0.3, proxy="ppl", width_criterion="magnitude", depth_criterion="position")
    scores = search._fresh_scores()
    assert scores.width is None and scores.depth is None  # nothing collected: scored when the candidate is built
    plan = search._width_plan(scores, None)
    assert plan is not None and plan.method == "mop:width:magnitude"


def test_bad_width_criterion_fails_at_construction_and_modifies_nothing():
    model = _model()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"`width_criterion` must be one of \['amp', .*\], got 'amps'; did you mean"):
        MoPSearch(model, _batches(), 0.3, width_criterion="amps")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(MisconfigurationException, match=r"`width_criterion` must be one of \['amp', .*got 'wanda'"):
        MixtureOfPruners(width_criterion="wanda")  # type: ignore[arg-type]
    assert MixtureOfPruners(width_criterion="magnitude").width_criterion == "magnitude"


def test_the_cli_lists_the_registered_width_criteria_for_mop(tmp_path, tiny_model_dir, text_file, capsys):
    from test_cli_errors import _config, _fail

    callback = {"class_path": "lit_prune.callbacks.MixtureOfPruners", "init_args": {"width_criterion": "wanda_sb"}}
    cfg = _config(tmp_path, tiny_model_dir, text_file, callbacks=[callback])
    code, err = _fail(["prune", "--config", str(cfg), "--output", str(tmp_path / "o")], capsys)
    allowed = ", ".join(repr(n) for n in registry.names("width"))
    assert code == 2
    assert f"`width_criterion` must be one of {allowed}, got 'wanda_sb'; did you mean 'wanda_sp'?" in err[0]
