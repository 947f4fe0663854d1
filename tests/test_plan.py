import json

import pytest
import torch

from lit_prune.plan import PLAN_FORMAT_VERSION, PruningPlan


def _plan(**overrides):
    fields = dict(
        drop_layers=(3, 1),
        num_layers=6,
        method="depth:bi",
        params_before=1000,
        params_after=700,
        non_embedding_before=600,
        non_embedding_after=300,
        scores=(0.9, 0.1, 0.5, 0.2, 0.6, 0.8),
        meta={"criterion": "bi", "calibration": {"windows": 8, "seq_len": 64}},
    )
    fields.update(overrides)
    return PruningPlan(**fields)


def test_normalises_and_derives():
    plan = _plan(drop_layers=[4, torch.tensor(1)], scores=torch.tensor([1, 2, 3, 4, 5, 6]))
    assert plan.drop_layers == (1, 4)
    assert all(type(i) is int for i in plan.drop_layers)
    assert plan.scores == (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    assert plan.keep_layers == (0, 2, 3, 5)
    assert plan.num_layers_after == 4
    assert plan.fraction_removed == pytest.approx(0.3)
    assert plan.fraction_removed_non_embedding == pytest.approx(0.5)


def test_defaults_and_unknowns():
    plan = PruningPlan()
    assert plan.drop_layers == ()
    assert plan.keep_layers is None and plan.num_layers_after is None
    assert plan.fraction_removed is None and plan.fraction_removed_non_embedding is None
    assert _plan(params_before=0, params_after=0).fraction_removed is None
    assert "drop_layers=[1, 3]" in repr(_plan()) and "1,000 -> 700" in repr(_plan())


def test_meta_is_not_part_of_equality_or_hash_and_is_copied():
    meta = {"criterion": "bi"}
    a, b = _plan(meta=meta), _plan(meta={"other": 1})
    assert a == b and hash(a) == hash(b)
    assert a != _plan(drop_layers=(2,))
    meta["criterion"] = "changed"
    assert a.meta == {"criterion": "bi"}


def test_json_round_trip_string_and_file(tmp_path):
    plan = _plan()
    text = plan.to_json()
    assert json.loads(text)["version"] == PLAN_FORMAT_VERSION
    assert json.loads(text)["drop_layers"] == [1, 3]
    back = PruningPlan.from_json(text)
    assert back == plan and back.meta == plan.meta

    path = tmp_path / "nested" / "plan.json"
    assert plan.to_json(path) == text
    for source in (path, str(path)):
        loaded = PruningPlan.from_json(source)
        assert loaded == plan and loaded.meta == plan.meta and loaded.scores == plan.scores


def test_to_dict_is_a_copy():
    plan = _plan()
    d = plan.to_dict()
    d["meta"]["calibration"]["windows"] = 99
    d["drop_layers"].append(5)
    assert plan.meta["calibration"]["windows"] == 8
    assert plan.drop_layers == (1, 3)


def test_from_dict_reads_old_and_hand_written_formats():
    # a version 1 plan (depth only: no width fields) loads with the width fields at their defaults
    v1 = {k: v for k, v in _plan().to_dict().items() if k not in ("keep_heads", "keep_neurons")}
    v1 = {k: v for k, v in v1.items() if k not in ("heads_before", "neurons_before", "sparsity", "reconstruction")}
    v1 |= {"version": 1}
    assert PruningPlan.from_dict(v1) == _plan() and PruningPlan.from_dict(v1).keep_heads is None
    # what the first lit-prune wrote (commit 5aad9f1: version 1, all version 1 fields) still loads
    first = {
        "version": 1, "drop_layers": [2], "num_layers": 4, "method": "depth:bi", "params_before": 10,
        "params_after": 8, "non_embedding_before": None, "non_embedding_after": None, "scores": None, "meta": {},
    }  # fmt: skip
    assert PruningPlan.from_dict(first) == PruningPlan(drop_layers=(2,), num_layers=4, method="depth:bi",
                                                       params_before=10, params_after=8)  # fmt: skip
    # a hand-written plan (no version): drop_layers and num_layers are enough; descriptive fields default
    hand = PruningPlan.from_dict({"drop_layers": [2], "num_layers": 4, "meta": None})
    assert hand == PruningPlan(drop_layers=(2,), num_layers=4) and hand.meta == {} and hand.scores is None
    # every plan this lit-prune writes reads back, depth and width
    assert PruningPlan.from_dict(_width_plan().to_dict()) == _width_plan()


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        # newer format: refused, saying which versions this lit-prune reads and to upgrade
        (
            {"version": 99},
            ValueError,
            r"format version 99; this lit-prune reads plan format versions 1 to 4 .* Upgrade lit-prune",
        ),
        (
            {"version": PLAN_FORMAT_VERSION + 1, "pruned_experts": {"0": [1]}},
            ValueError,
            rf"format version {PLAN_FORMAT_VERSION + 1}; this lit-prune reads",
        ),
        ({"version": "2"}, ValueError, r"`version` must be an int in \[1, 4\] \(the plan format\), got '2'"),
        ({"version": 0}, ValueError, r"`version` must be an int in \[1, 4\].*got 0"),
        ({"version": True}, ValueError, r"`version` must be an int .*got True"),
        # unknown keys: refused by name, with the close match for a typo
        ({"note": "hand-edited"}, ValueError, r"Unknown PruningPlan key\(s\) \['note'\]\. A plan of format version 4"),
        ({"num_layer": 6}, ValueError, r"\['num_layer'\] \(`num_layer`: did you mean `num_layers`\?\)"),
        ({"version": 1, "keep_heads": None}, ValueError, r"`keep_heads` is a field of format version 2, not 1"),
        ({"version": 2, "sparsity": None}, ValueError, r"`sparsity` is a field of format version 3, not 2"),
        ({"version": 3, "reconstruction": None}, ValueError, r"`reconstruction` is a field of format version 4, not 3"),
        # missing structural fields: refused by name
        ({"drop": "num_layers"}, ValueError, r"lacks the required field\(s\) \['num_layers'\]: a plan of format "),
        ({"drop": "drop_layers"}, ValueError, r"lacks the required field\(s\) \['drop_layers'\]"),
        ({"drop": "keep_heads"}, ValueError, r"lacks the required field\(s\) \['keep_heads'\]"),
        ({"drop": "sparsity"}, ValueError, r"lacks the required field\(s\) \['sparsity'\]: .*`sparsity` and"),
        ({"drop": "reconstruction"}, ValueError, r"lacks the required field\(s\) \['reconstruction'\]"),
        ({"version": 1, "drop": "num_layers"}, ValueError, r"\['num_layers'\]: a plan of format version 1 must"),
        ({"num_layers": None}, ValueError, r"`num_layers` is null: a plan read from a file must record"),
    ],
)
def test_from_dict_enforces_format_rules(data, error, message):
    data, record = dict(data), _plan().to_dict()
    record.pop(data.pop("drop", ""), None)
    if data.get("version") in (1, 2, 3):
        record.pop("reconstruction")
    if data.get("version") in (1, 2):
        record.pop("sparsity")
    if data.get("version") == 1:
        for name in ("keep_heads", "keep_neurons", "heads_before", "neurons_before"):
            record.pop(name)
    with pytest.raises(error, match=message):
        PruningPlan.from_dict(record | data)


def test_from_dict_width_fields_need_their_widths():
    record = _width_plan().to_dict()
    del record["version"], record["heads_before"]  # hand-written: the width fields are optional, widths are not
    with pytest.raises(ValueError, match=r"lacks the required field\(s\) \['heads_before'\]: a hand-written plan"):
        PruningPlan.from_dict(record)
    del record["keep_heads"]
    assert PruningPlan.from_dict(record).keep_neurons == _width_plan().keep_neurons


def test_read_plans_reads_every_plan_file(tmp_path):
    import lit_prune
    from lit_prune.io import PLANS_FILE
    from lit_prune.plan import PLANS_FILE as PLAN_PLANS_FILE
    from lit_prune.plan import read_plans

    assert lit_prune.read_plans is read_plans and PLAN_PLANS_FILE == PLANS_FILE
    one, two = _plan(), _width_plan()
    single = tmp_path / "depth-plan-1.json"
    one.to_json(single)
    assert read_plans(single) == [one] and read_plans(str(single))[0].meta == one.meta
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / PLANS_FILE).write_text(json.dumps([one.to_dict(), two.to_dict()]))  # what save_pretrained writes
    assert read_plans(folder / PLANS_FILE) == [one, two]
    assert read_plans(folder) == [one, two]


def test_read_plans_misconfiguration(tmp_path):
    from lit_prune.plan import read_plans

    with pytest.raises(FileNotFoundError, match=r"No pruning plan file at '.*missing\.json'"):
        read_plans(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match=r"No pruning_plans\.json in the folder '.*'"):
        read_plans(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"The pruning plan in .*bad\.json is not valid JSON"):
        read_plans(bad)
    bad.write_text("3")
    with pytest.raises(TypeError, match=r"must hold a plan object or a list of plan objects, got a JSON int"):
        read_plans(bad)
    bad.write_text("[]")
    with pytest.raises(ValueError, match=r"The plan list in .*bad\.json' is empty"):
        read_plans(bad)
    bad.write_text(json.dumps([_plan().to_dict(), [1]]))
    with pytest.raises(TypeError, match=r"Plan entries must be JSON objects, got a list at .*bad\.json', plan \[1\]"):
        read_plans(bad)
    bad.write_text(json.dumps([_plan().to_dict(), _plan().to_dict() | {"version": 99}]))
    with pytest.raises(ValueError, match=r"bad\.json', plan \[1\]: This plan is format version 99"):
        read_plans(bad)
    bad.write_text(json.dumps(_plan().to_dict() | {"drop_layers": [-1]}))
    with pytest.raises(ValueError, match=r"bad\.json': `drop_layers` must hold non-negative"):
        read_plans(bad)


def test_from_json_points_a_list_to_read_plans(tmp_path):
    listed = tmp_path / "pruning_plans.json"
    listed.write_text(json.dumps([_plan().to_dict()]))
    with pytest.raises(TypeError, match=r"is a list of 1 plan\(s\) .* read it with lit_prune\.read_plans"):
        PruningPlan.from_json(listed)
    with pytest.raises(TypeError, match=r"The JSON in JSON text is a list of 0 plan"):
        PruningPlan.from_json(" []")


def test_plan_misconfiguration(tmp_path):
    with pytest.raises(ValueError, match=r"`drop_layers` must hold non-negative integer block indices, got \[-1\]"):
        PruningPlan(drop_layers=(-1, 2))
    with pytest.raises(ValueError, match=r"non-negative integer block indices, got \[1.5, True\]"):
        PruningPlan(drop_layers=(1.5, True))
    with pytest.raises(ValueError, match="must be a sequence of block indices, got '12'"):
        PruningPlan(drop_layers="12")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"must be a sequence of block indices, got 3"):
        PruningPlan(drop_layers=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"must not repeat an index, got \[2\] more than once"):
        PruningPlan(drop_layers=(2, 1, 2))
    with pytest.raises(ValueError, match=r"must be in \[0, 4\) .* got \[4, 7\]"):
        PruningPlan(drop_layers=(7, 1, 4), num_layers=4)
    with pytest.raises(ValueError, match=r"must leave at least one of the 3 blocks, got all of them: \[0, 1, 2\]"):
        PruningPlan(drop_layers=(2, 0, 1), num_layers=3)
    with pytest.raises(ValueError, match=r"`num_layers` must be an int >= 1 or None, got 0"):
        PruningPlan(num_layers=0)
    with pytest.raises(ValueError, match=r"`num_layers` must be an int >= 1 or None, got True"):
        PruningPlan(num_layers=True)
    with pytest.raises(ValueError, match=r"`method` must be a string, got 3"):
        PruningPlan(method=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`params_after` must be an int >= 0 or None, got -5"):
        PruningPlan(params_after=-5)
    with pytest.raises(ValueError, match=r"one score per block \(6 for `num_layers`=6\), got 2"):
        _plan(scores=(0.1, 0.2))
    with pytest.raises(ValueError, match=r"`scores` must be a sequence of numbers, got \['a'\]"):
        PruningPlan(scores=("a",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`scores` must be a sequence of numbers or None, got 'ab'"):
        PruningPlan(scores="ab")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`meta` must be a dict, got list"):
        PruningPlan(meta=[1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="from a mapping of its fields, got list"):
        PruningPlan.from_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is not valid JSON"):
        PruningPlan.from_json("{not json")
    with pytest.raises(FileNotFoundError, match="No pruning plan file at"):
        PruningPlan.from_json(tmp_path / "missing.json")
    with pytest.raises(TypeError, match="`meta` must hold only JSON-serialisable values"):
        PruningPlan(meta={"x": object()}).to_json()


def _width_plan(**overrides):
    fields = dict(
        num_layers=3,
        drop_layers=(1,),
        keep_heads={0: [3, 1], "2": (0,)},
        heads_before=[4, 4, 4],
        keep_neurons={2: range(5)},
        neurons_before=(8, 8, 8),
    )
    fields.update(overrides)
    return PruningPlan(**fields)


def test_width_fields_normalise_and_round_trip(tmp_path):
    plan = _width_plan()
    assert plan.keep_heads == {0: (1, 3), 2: (0,)}
    assert plan.keep_neurons == {2: (0, 1, 2, 3, 4)}
    assert plan.changes_width and not PruningPlan(drop_layers=(1,)).changes_width
    data = json.loads(plan.to_json())
    assert data["keep_heads"] == {"0": [1, 3], "2": [0]} and data["heads_before"] == [4, 4, 4]
    back = PruningPlan.from_json(plan.to_json(tmp_path / "p.json"))
    assert back == plan and back.keep_heads == plan.keep_heads
    assert plan != _width_plan(keep_heads={0: [1, 2], 2: [0]})
    hash(plan)  # frozen plans stay hashable with dict fields
    assert "heads kept in 2 blocks" in repr(plan)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(keep_heads={0: []}), r"`keep_heads\[0\]` must keep at least one index"),
        (dict(keep_heads={0: [4]}), r"`keep_heads\[0\]` must be in \[0, 4\)"),
        (dict(keep_heads={5: [0]}), r"`keep_heads` keys must be block indices in \[0, 3\), got 5"),
        (dict(keep_heads={0: [1, 1]}), r"must not repeat an index, got \[1, 1\]"),
        (dict(keep_heads={1: [0]}), r"lists block 1, which `drop_layers` removes"),
        (dict(keep_neurons={0: [-1]}), r"`keep_neurons\[0\]` must hold non-negative integer indices"),
        (dict(keep_neurons=[0, 1]), r"`keep_neurons` must map block index -> kept indices"),
        (dict(heads_before=[4, 4]), r"`heads_before` must hold one width per block \(3\), got 2"),
        (dict(neurons_before=[8, 0, 8]), r"`neurons_before` must hold ints >= 1"),
    ],
)
def test_width_fields_reject_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        _width_plan(**overrides)


# --- sparsity plans (format version 3) ---------------------------------------------------------------------------
def _sparsity_record(**overrides):
    from lit_prune.sparse.config import SparsityConfig
    from lit_prune.sparse.record import config_record

    record = {
        "config": config_record(SparsityConfig(criterion="wanda", sparsity=0.5, allocation="owl")),
        "linears": {"model.layers.0.self_attn.q_proj": 0.4375, "model.layers.0.mlp.down_proj": 0.5},
        "max_batches": 2,
        "calibration": {"batches": 2, "sequences": 4, "tokens": 64, "sha256": "ab" * 32},
        "masks_sha256": "cd" * 32,
        "masks_before_sha256": None,
    }
    record.update(overrides)
    return record


def _sparsity_plan(**overrides):
    return PruningPlan(num_layers=4, method="sparsity:wanda", sparsity=_sparsity_record(**overrides))


def test_a_sparsity_plan_round_trips_exactly(tmp_path):
    from lit_prune.plan import read_plans

    plan = _sparsity_plan()
    assert plan.changes_sparsity and not _plan().changes_sparsity and not plan.changes_width
    data = json.loads(plan.to_json())
    assert data["version"] == PLAN_FORMAT_VERSION == 4
    assert data["sparsity"] == _sparsity_record()
    back = PruningPlan.from_json(plan.to_json(tmp_path / "sparsity-plan-1.json"))
    assert back == plan and back.sparsity == plan.sparsity
    assert read_plans(tmp_path / "sparsity-plan-1.json") == [plan]
    (tmp_path / "pruning_plans.json").write_text(json.dumps([_plan().to_dict(), plan.to_dict()]))
    assert read_plans(tmp_path) == [_plan(), plan]
    assert plan != _sparsity_plan(masks_sha256="ef" * 32)
    hash(plan)
    assert "sparsity in 2 Linears" in repr(plan)
    # tuples, (N, M) and a missing optional key normalise to what a file holds, so the plan still compares equal
    config = _sparsity_record()["config"] | {"n_m": (2, 4), "allocation": "uniform", "layer_scores": (1.0, 2.0)}
    record = {k: v for k, v in _sparsity_record(config=config).items() if k != "masks_before_sha256"}
    nm = PruningPlan(num_layers=4, sparsity=record)
    assert nm.sparsity["config"]["n_m"] == "2:4" and nm.sparsity["config"]["layer_scores"] == [1.0, 2.0]
    assert nm.sparsity["masks_before_sha256"] is None
    assert PruningPlan.from_json(nm.to_json()) == nm


def test_a_version_2_plan_still_loads():
    v2 = _plan().to_dict()
    del v2["sparsity"], v2["reconstruction"]
    assert PruningPlan.from_dict(v2 | {"version": 2}) == _plan()
    # a version 2 sparsity plan (per-block sparsity in `meta` only) loads, without a record to replay
    old = {"version": 2, "drop_layers": [], "num_layers": 4, "method": "sparsity:wanda", "params_before": 10,
           "params_after": 10, "non_embedding_before": None, "non_embedding_after": None, "scores": None,
           "keep_heads": None, "keep_neurons": None, "heads_before": None, "neurons_before": None,
           "meta": {"sparsity": 0.5, "block_sparsity": [0.5] * 4}}  # fmt: skip
    loaded = PruningPlan.from_dict(old)
    assert loaded.sparsity is None and not loaded.changes_sparsity and loaded.meta["sparsity"] == 0.5
    assert PruningPlan.from_dict(loaded.to_dict()) == loaded  # written back as version 4, `sparsity` null


def test_sparsity_config_fields_are_the_plan_record_keys():
    import dataclasses

    from lit_prune.plan import SPARSITY_CONFIG_FIELDS
    from lit_prune.sparse.config import SparsityConfig

    # a new SparsityConfig field needs a new plan format version, so that older plans keep their meaning
    assert tuple(f.name for f in dataclasses.fields(SparsityConfig)) == SPARSITY_CONFIG_FIELDS


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(mask_sha256="x"), r"`sparsity` has unknown key\(s\) \['mask_sha256'\] \(`mask_sha256`: did you mean "
         r"`masks_sha256`\?\); the allowed keys are \['config', 'linears', 'max_batches'"),
        (dict(linears=None), r"`sparsity\['linears'\]` must map each pruned Linear's name to its sparsity"),
        (dict(linears={"a": 1.5}), r"`sparsity\['linears'\]\['a'\]` must be a fraction in \[0, 1\], got 1\.5"),
        (dict(linears={"a": True}), r"must be a fraction in \[0, 1\], got True"),
        (dict(linears={"a": float("nan")}), r"`sparsity` must hold only JSON values \(finite numbers\)"),
        (dict(max_batches=0), r"`sparsity\['max_batches'\]` must be an int >= 1 or None, got 0"),
        (dict(calibration={"batches": 2}), r"`sparsity\['calibration'\]` lacks the required key\(s\) "
         r"\['sequences', 'tokens', 'sha256'\]"),
        (dict(calibration={"batches": -1, "sequences": 1, "tokens": 1, "sha256": "ab" * 32}),
         r"`sparsity\['calibration'\]\['batches'\]` must be an int >= 0"),
        (dict(masks_sha256="xyz"), r"`sparsity\['masks_sha256'\]` must be a SHA-256 hex digest"),
        (dict(config=[1]), r"`sparsity\['config'\]` must be a mapping of SparsityConfig fields"),
    ],
)
def test_sparsity_record_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        _sparsity_plan(**overrides)


def test_sparsity_record_misconfiguration():
    config = _sparsity_record()["config"]
    with pytest.raises(ValueError, match=r"`sparsity\['config'\]` has unknown key\(s\) \['owl_n'\] \(`owl_n`: did "
                       r"you mean `owl_m`\?\); the allowed keys are \['criterion', 'sparsity', 'n_m'"):
        _sparsity_plan(config=config | {"owl_n": 3})
    with pytest.raises(ValueError, match=r"`sparsity\['config'\]` lacks the required key\(s\) \['lam'\]"):
        _sparsity_plan(config={k: v for k, v in config.items() if k != "lam"})
    with pytest.raises(ValueError, match=r"`sparsity` lacks the required key\(s\) \['linears'\]"):
        PruningPlan(sparsity={"config": config})
    with pytest.raises(ValueError, match=r"`sparsity` must be a mapping \['config', 'linears'.*got list"):
        PruningPlan(sparsity=[config])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`sparsity\['config'\]\['n_m'\]` must be None or 'N:M', got 3"):
        _sparsity_plan(config=config | {"n_m": 3})
    with pytest.raises(ValueError, match=r"A sparsity plan \(`sparsity` given\) must not also drop blocks or change "
                       r"widths, got drop_layers=\[1\].*record each step as its own plan"):
        PruningPlan(drop_layers=[1], num_layers=4, sparsity=_sparsity_record())
    with pytest.raises(ValueError, match=r"must not also drop blocks or change widths"):
        _width_plan(drop_layers=(), sparsity=_sparsity_record())
    with pytest.raises(ValueError, match=r"`sparsity` must hold only JSON values"):
        _sparsity_plan(max_batches=object())


# --- reconstruction records (format version 4) -------------------------------------------------------------------
def _reconstruction(**overrides):
    record = {"method": "lsq", "ridge": 1e-3, "protocol": "one_shot", "max_batches": None,
              "calibration": {"batches": 2, "sequences": 4, "tokens": 64, "sha256": "ab" * 32},
              "lambdas": {"model.layers.0.mlp.down_proj": 0.25}}  # fmt: skip
    record.update(overrides)
    return record


def test_a_reconstruction_record_round_trips_and_shows_in_the_repr(tmp_path):
    import dataclasses

    plan = dataclasses.replace(_width_plan(), reconstruction=_reconstruction())
    back = PruningPlan.from_json(plan.to_json(tmp_path / "plan.json"))
    assert back == plan and back.reconstruction == _reconstruction()
    assert "lsq refit of 1 Linears" in repr(plan)
    v3 = {k: v for k, v in _width_plan().to_dict().items() if k != "reconstruction"} | {"version": 3}
    assert PruningPlan.from_dict(v3).reconstruction is None  # older plans: cut only


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ridge": -1.0}, r"`reconstruction\['ridge'\]` must be a finite number in \[0.0, inf\), got -1.0"),
        ({"ridge": True}, r"`reconstruction\['ridge'\]` must be a finite number"),
        ({"method": 3}, r"`reconstruction\['method'\]` must be a string, got 3"),
        ({"max_batches": 0}, r"`reconstruction\['max_batches'\]` must be an int >= 1 or None, got 0"),
        ({"lambdas": {"x": -2}}, r"`reconstruction\['lambdas'\]\['x'\]` must be a finite number in \[0.0, inf\), got -2"),  # noqa: E501
        ({"lambdas": [1.0]}, r"`reconstruction\['lambdas'\]` must map Linear names to numbers >= 0"),
        ({"calibration": {"batches": 1}}, r"`reconstruction\['calibration'\]` lacks the required key"),
        ({"ridg": 1.0}, r"unknown key\(s\) \['ridg'\] \(`ridg`: did you mean `ridge`\?\)"),
    ],
)
def test_a_bad_reconstruction_record_is_refused_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        PruningPlan(num_layers=4, keep_neurons={0: (0, 1)}, neurons_before=(4,) * 4,
                    reconstruction=_reconstruction(**overrides))  # fmt: skip


def test_a_sparsity_plan_has_no_reconstruction():
    with pytest.raises(ValueError, match="has no `reconstruction`"):
        PruningPlan(num_layers=4, sparsity=_sparsity_record(), reconstruction=_reconstruction())
