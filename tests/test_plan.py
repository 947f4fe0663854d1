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


def test_from_dict_reads_old_and_new_formats():
    # an older plan: fewer keys, no version
    old = PruningPlan.from_dict({"drop_layers": [2], "num_layers": 4})
    assert old == PruningPlan(drop_layers=(2,), num_layers=4)
    assert old.meta == {} and old.scores is None
    assert PruningPlan.from_dict({"drop_layers": [2], "meta": None}).meta == {}
    # unknown keys of a plan of this version are ignored with a warning
    same = _plan().to_dict() | {"note": "hand-edited"}
    with pytest.warns(UserWarning, match=r"Ignoring unknown PruningPlan keys \['note'\]"):
        assert PruningPlan.from_dict(same) == _plan()
    # a newer plan with fields this version cannot apply is refused (applying the rest would build another model)
    newer = _plan().to_dict() | {"sparsity": {"0": 0.5}, "version": PLAN_FORMAT_VERSION + 1}
    with pytest.raises(ValueError, match=r"format version 3\) has fields \['sparsity'\] that this lit-prune"):
        PruningPlan.from_dict(newer)
    # version 1 plans (depth only) still load
    assert PruningPlan.from_dict(_plan().to_dict() | {"version": 1}) == _plan()


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
