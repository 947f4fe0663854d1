"""PruningPlan: what survives pruning, with parameter counts; serialisable to JSON and replayable on a fresh model.

A plan is made once (scoring is the expensive part) and applied by :mod:`lit_prune.surgery`, possibly later and on
another copy of the same model (``lit-prune prune --plan plan.json``). Plans are plain data: indices refer to the
model the plan was made on, and ``num_layers`` records that model's depth (``heads_before`` / ``neurons_before`` its
widths) so a plan is never applied to a model of another shape.

A plan says what survives in two ways, applied in this order: ``keep_heads`` / ``keep_neurons`` (width: the query
heads and MLP neurons each listed block keeps; unlisted blocks keep everything) and then ``drop_layers`` (depth).
A sparsity plan (``sparsity``, format version 3) instead records how its masks were made: the whole
:class:`~lit_prune.sparse.config.SparsityConfig` as plain data, the calibration it ran on (a digest of its tokens), the
sparsity each Linear reached and a digest of the masks; replaying it re-computes the masks from that record on the same
calibration and checks they are the recorded ones (:func:`lit_prune.surgery.apply_plan`). It changes no shape, so it
neither drops blocks nor changes widths.

Format rules (:meth:`PruningPlan.from_dict`, and so :meth:`PruningPlan.from_json` and :func:`read_plans`): a plan is a
JSON object with a ``"version"`` (:data:`PLAN_FORMAT_VERSION` when written by this lit-prune) and the fields of that
version. A record that could build a different model than the one it describes is refused, never applied in part:

- a **newer** version than this lit-prune reads is refused (upgrade lit-prune to replay it);
- an **unknown key** is refused, naming it (and the closest field name when it looks like a typo);
- a **missing structural field** is refused, naming it: ``drop_layers`` and ``num_layers`` (not null) in every plan,
  and from version 2 ``keep_heads``, ``keep_neurons``, ``heads_before`` and ``neurons_before`` (null when unused;
  every lit-prune of that version writes them), from version 3 ``sparsity`` (null except in sparsity plans), from
  version 4 ``reconstruction`` (null unless the surviving weights were refit), and
  ``heads_before`` / ``neurons_before`` whenever ``keep_heads`` / ``keep_neurons`` are given;
- **older versions** load with the later fields at their defaults (a version 1 plan is a depth plan: no width
  fields; a version 2 sparsity plan has no ``sparsity`` record, only per-block sparsity in its ``meta``, so it loads
  but cannot be replayed); descriptive fields (``method``, the parameter counts, ``scores``, ``meta``) default when
  absent;
- a plan with no ``"version"`` is taken as hand-written for the current version (the same rules, except that the
  version 2 to 4 fields may be left out).

Plan files are read by :func:`read_plans`: one plan object (:meth:`PruningPlan.to_json`), a list of them
(``pruning_plans.json``, written by :func:`lit_prune.io.save_pretrained`), or a folder holding ``pruning_plans.json``.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lit_prune._validation import check_number

log = logging.getLogger(__name__)

PLAN_FORMAT_VERSION = 4
"""Written to every plan's JSON as ``"version"``; bumped when a field is added that changes what a plan does or the
meaning of an existing field changes (2: ``keep_heads`` / ``keep_neurons``, width pruning; 3: ``sparsity``, replayable
sparsity plans; 4: ``reconstruction``, least-squares refits of the surviving weights)."""

_FIELDS_ADDED: dict[int, tuple[str, ...]] = {
    1: (
        "drop_layers",
        "num_layers",
        "method",
        "params_before",
        "params_after",
        "non_embedding_before",
        "non_embedding_after",
        "scores",
        "meta",
    ),
    2: ("keep_heads", "keep_neurons", "heads_before", "neurons_before"),
    3: ("sparsity",),
    4: ("reconstruction",),
}
"""The fields each format version added (every lit-prune of a version writes all fields up to it)."""

_STRUCTURAL_ADDED: dict[int, tuple[str, ...]] = {
    1: ("drop_layers", "num_layers"),
    2: ("keep_heads", "keep_neurons", "heads_before", "neurons_before"),
    3: ("sparsity",),
    4: ("reconstruction",),
}
"""The fields each version added that say what a plan does or which model it fits: required in a record of that
version or later (the width ones and ``sparsity`` may be null)."""

SPARSITY_CONFIG_FIELDS: tuple[str, ...] = (
    "criterion",
    "sparsity",
    "n_m",
    "allocation",
    "protocol",
    "trim_rows",
    "owl_m",
    "lam",
    "eps",
    "layer_scores",
    "dsa_function",
    "blocksize",
    "percdamp",
)
"""The keys of a sparsity plan's ``sparsity["config"]``: every :class:`~lit_prune.sparse.config.SparsityConfig` field
(a test keeps the two equal; a new config field needs a new plan format version, so an older plan keeps its meaning).
The values are checked by ``SparsityConfig`` when the plan is applied, before the model changes."""

SPARSITY_KEYS: dict[str, bool] = {
    "config": True,
    "linears": True,
    "max_batches": False,
    "calibration": False,
    "masks_sha256": False,
    "masks_before_sha256": False,
}
"""The keys of a sparsity plan's ``sparsity`` record, and whether each is required: ``config`` (the
``SparsityConfig`` as plain data), ``linears`` (``{linear name: fraction of its weights zeroed}``, as reached),
``max_batches`` (the calibration batches used, None for all), ``calibration`` (:data:`CALIBRATION_KEYS`: a digest of
the calibration tokens, None when none were used), ``masks_sha256`` (a digest of the keep masks) and
``masks_before_sha256`` (of the masks the model already carried, None when it carried none: a replay must start from
the same ones)."""

RECONSTRUCTION_KEYS: dict[str, bool] = {
    "method": True,
    "ridge": True,
    "protocol": True,
    "max_batches": False,
    "calibration": False,
    "lambdas": False,
}
"""The keys of a plan's ``reconstruction`` record (format version 4), and whether each is required: ``method``
(``"lsq"``), ``ridge`` (relative to the mean diagonal of the kept inputs' Gram), ``protocol`` (``"one_shot"``),
``max_batches`` (calibration batches used, None for all), ``calibration`` (:data:`CALIBRATION_KEYS`, the tokens the
Grams came from) and ``lambdas`` (``{Linear name: absolute ridge λ}`` of every refit, as computed)."""

CALIBRATION_KEYS: tuple[str, ...] = ("batches", "sequences", "tokens", "sha256")
"""The keys of ``sparsity["calibration"]``: how many batches, sequences and tokens were read, and the SHA-256 of their
``input_ids`` (and ``attention_mask``), so a replay on other calibration data is refused before anything changes."""

_WIDTHS_FOR = {"keep_heads": "heads_before", "keep_neurons": "neurons_before"}

PLANS_FILE = "pruning_plans.json"
"""The plan list a saved model folder holds (:data:`lit_prune.io.PLANS_FILE`; kept here so reading plans does not
import the model I/O)."""


def _as_index(value: object) -> int | None:
    """``value`` as a Python int if it is an integer (``int``, numpy or 0-d torch integer) and not a bool."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def _checked_indices(indices: Iterable[int], num_blocks: int, name: str = "indices") -> list[int]:
    """Block indices as a list of ints, each in ``[0, num_blocks)`` and unique; ``ValueError`` names the bad ones."""
    if isinstance(indices, (str, bytes)) or not hasattr(indices, "__iter__"):
        raise ValueError(f"`{name}` must be an iterable of block indices, got {indices!r}")
    values = list(indices)
    as_ints = [_as_index(v) for v in values]
    not_ints = [v for v, i in zip(values, as_ints) if i is None]
    if not_ints:
        raise ValueError(f"`{name}` must hold integer block indices, got {not_ints!r} in {values!r}")
    ints = [i for i in as_ints if i is not None]
    out_of_range = [i for i in ints if not 0 <= i < num_blocks]
    if out_of_range:
        raise ValueError(
            f"`{name}` must be in [0, {num_blocks}) (the model has {num_blocks} blocks; negative indices are not "
            f"accepted), got {out_of_range}"
        )
    duplicates = sorted({i for i in ints if ints.count(i) > 1})
    if duplicates:
        raise ValueError(f"`{name}` must not repeat a block, got {duplicates} more than once in {ints}")
    return ints


def _checked_keys(where: str, record: Mapping[str, Any], allowed: Iterable[str], required: Iterable[str]) -> None:
    """Raise ``ValueError`` naming the unknown or missing keys of ``record`` and the allowed ones."""
    names = list(allowed)
    unknown = sorted(str(k) for k in record if k not in names)
    if unknown:
        close = [difflib.get_close_matches(k, names, n=1, cutoff=0.6) for k in unknown]
        hints = [f"`{k}`: did you mean `{c[0]}`?" for k, c in zip(unknown, close) if c]
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise ValueError(f"`{where}` has unknown key(s) {unknown}{hint}; the allowed keys are {names}")
    missing = [k for k in required if k not in record]
    if missing:
        raise ValueError(f"`{where}` lacks the required key(s) {missing}; a complete record has {names}")


def _checked_sparsity(record: object) -> dict[str, Any] | None:
    """A sparsity record as plain JSON data (lists, not tuples), or ``ValueError`` / ``TypeError`` naming the problem.

    Checks the keys of the record (:data:`SPARSITY_KEYS`), of its ``config`` (:data:`SPARSITY_CONFIG_FIELDS`, all
    required) and of its ``calibration`` (:data:`CALIBRATION_KEYS`), and every value's type and range; the config's
    values themselves are checked by ``SparsityConfig`` when the plan is applied.
    """
    if record is None:
        return None
    if not isinstance(record, Mapping):
        raise ValueError(f"`sparsity` must be a mapping {list(SPARSITY_KEYS)} or None, got {type(record).__name__}")
    try:
        data = json.loads(json.dumps(record, allow_nan=False))  # plain data: tuples become lists, as after a file
    except (TypeError, ValueError) as err:
        raise ValueError(f"`sparsity` must hold only JSON values (finite numbers): {err}") from None
    _checked_keys("sparsity", data, SPARSITY_KEYS, [k for k, needed in SPARSITY_KEYS.items() if needed])
    for key in SPARSITY_KEYS:
        data.setdefault(key, None)

    config = data["config"]
    if not isinstance(config, dict):
        raise ValueError(f"`sparsity['config']` must be a mapping of SparsityConfig fields, got {config!r}")
    _checked_keys("sparsity['config']", config, SPARSITY_CONFIG_FIELDS, SPARSITY_CONFIG_FIELDS)
    n_m = config["n_m"]
    if isinstance(n_m, list) and len(n_m) == 2 and all(_as_index(v) is not None for v in n_m):
        config["n_m"] = f"{n_m[0]}:{n_m[1]}"  # one spelling, so that a plan compares equal after a round trip
    elif n_m is not None and not isinstance(n_m, str):
        raise ValueError(f"`sparsity['config']['n_m']` must be None or 'N:M', got {n_m!r}")

    linears = data["linears"]
    if not isinstance(linears, dict) or not linears:
        raise ValueError(f"`sparsity['linears']` must map each pruned Linear's name to its sparsity, got {linears!r}")
    for name, value in linears.items():
        ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1
        if not ok:
            raise ValueError(f"`sparsity['linears'][{name!r}]` must be a fraction in [0, 1], got {value!r}")
        linears[name] = float(value)

    max_batches = data["max_batches"]
    if max_batches is not None and (_as_index(max_batches) is None or max_batches < 1):
        raise ValueError(f"`sparsity['max_batches']` must be an int >= 1 or None, got {max_batches!r}")

    _check_calibration("sparsity['calibration']", data["calibration"])
    _check_digest("sparsity['masks_sha256']", data["masks_sha256"], optional=True)
    _check_digest("sparsity['masks_before_sha256']", data["masks_before_sha256"], optional=True)
    return data


def _check_calibration(where: str, calibration: object) -> None:
    """Raise ``ValueError`` unless ``calibration`` is None or a complete :data:`CALIBRATION_KEYS` digest."""
    if calibration is None:
        return
    if not isinstance(calibration, dict):
        raise ValueError(f"`{where}` must be a mapping {list(CALIBRATION_KEYS)} or None")
    _checked_keys(where, calibration, CALIBRATION_KEYS, CALIBRATION_KEYS)
    for key in CALIBRATION_KEYS[:-1]:
        _check_count(f"{where}['{key}']", calibration[key])
        if calibration[key] is None:
            raise ValueError(f"`{where}['{key}']` must be an int >= 0, got None")
    _check_digest(f"{where}['sha256']", calibration["sha256"], optional=False)


def _checked_reconstruction(record: object) -> dict[str, Any] | None:
    """A reconstruction record as plain JSON data, or ``ValueError`` naming what is wrong.

    See :data:`RECONSTRUCTION_KEYS`; the method and protocol values are checked by ``ReconstructConfig`` when applied.
    """
    if record is None:
        return None
    if not isinstance(record, Mapping):
        raise ValueError(
            f"`reconstruction` must be a mapping {list(RECONSTRUCTION_KEYS)} or None, got {type(record).__name__}"
        )
    try:
        data = json.loads(json.dumps(record, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"`reconstruction` must hold only JSON values (finite numbers): {err}") from None
    _checked_keys("reconstruction", data, RECONSTRUCTION_KEYS, [k for k, r in RECONSTRUCTION_KEYS.items() if r])
    for key in RECONSTRUCTION_KEYS:
        data.setdefault(key, None)
    for key in ("method", "protocol"):
        if not isinstance(data[key], str):
            raise ValueError(f"`reconstruction['{key}']` must be a string, got {data[key]!r}")
    check_number("reconstruction['ridge']", data["ridge"], 0.0)
    max_batches = data["max_batches"]
    if max_batches is not None and (_as_index(max_batches) is None or max_batches < 1):
        raise ValueError(f"`reconstruction['max_batches']` must be an int >= 1 or None, got {max_batches!r}")
    _check_calibration("reconstruction['calibration']", data["calibration"])
    lambdas = data["lambdas"]
    if lambdas is not None:
        if not isinstance(lambdas, dict):
            raise ValueError(f"`reconstruction['lambdas']` must map Linear names to numbers >= 0, got {lambdas!r}")
        where = "reconstruction['lambdas']"
        data["lambdas"] = {name: check_number(f"{where}[{name!r}]", v, 0.0) for name, v in lambdas.items()}
    return data


def _check_digest(name: str, value: object, *, optional: bool) -> None:
    """Raise ``ValueError`` unless ``value`` is a SHA-256 hex digest (or None when ``optional``)."""
    if value is None and optional:
        return
    ok = isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    if not ok:
        raise ValueError(f"`{name}` must be a SHA-256 hex digest (64 lowercase hex digits), got {value!r}")


def _checked_keep(
    name: str, keep: object, num_layers: int | None, widths: tuple[int, ...] | None, drop_layers: tuple[int, ...]
) -> dict[int, tuple[int, ...]] | None:
    """``keep`` as ``{block: sorted kept indices}``, or ``ValueError`` naming the bad block or index.

    Keys may be ints or their strings (JSON object keys); every block keeps at least one index; indices are unique,
    non-negative and below ``widths[block]`` when the widths are known; a block in ``drop_layers`` is not listed.
    """
    if keep is None:
        return None
    if not isinstance(keep, Mapping):
        raise ValueError(f"`{name}` must map block index -> kept indices, got {type(keep).__name__}")
    out: dict[int, tuple[int, ...]] = {}
    for key, values in keep.items():
        block = _as_index(int(key) if isinstance(key, str) and key.strip().isdigit() else key)
        if block is None or block < 0 or (num_layers is not None and block >= num_layers):
            limit = f"[0, {num_layers})" if num_layers is not None else ">= 0"
            raise ValueError(f"`{name}` keys must be block indices in {limit}, got {key!r}")
        if block in drop_layers:
            raise ValueError(f"`{name}` lists block {block}, which `drop_layers` removes; leave it out")
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise ValueError(f"`{name}[{block}]` must be a sequence of indices, got {values!r}")
        items = list(values.tolist() if hasattr(values, "tolist") else values)
        ints = [_as_index(v) for v in items]
        bad = [v for v, i in zip(items, ints) if i is None or i < 0]
        if bad:
            raise ValueError(f"`{name}[{block}]` must hold non-negative integer indices, got {bad!r}")
        kept = sorted(i for i in ints if i is not None)
        if not kept:
            raise ValueError(f"`{name}[{block}]` must keep at least one index, got none")
        if len(set(kept)) != len(kept):
            raise ValueError(f"`{name}[{block}]` must not repeat an index, got {kept}")
        if widths is not None and kept[-1] >= widths[block]:
            raise ValueError(f"`{name}[{block}]` must be in [0, {widths[block]}) (the block's width), got {kept[-1]}")
        if block in out:
            raise ValueError(f"`{name}` lists block {block} twice")
        out[block] = tuple(kept)
    return dict(sorted(out.items()))


def _checked_widths(name: str, widths: object, num_layers: int | None) -> tuple[int, ...] | None:
    """One positive int per block, or ``ValueError``."""
    if widths is None:
        return None
    if hasattr(widths, "tolist"):
        widths = widths.tolist()
    if isinstance(widths, (str, bytes)) or not hasattr(widths, "__iter__"):
        raise ValueError(f"`{name}` must be a sequence of per-block widths, got {widths!r}")
    values = [_as_index(v) for v in widths]  # type: ignore[union-attr]
    if any(v is None or v < 1 for v in values):
        raise ValueError(f"`{name}` must hold ints >= 1, got {list(widths)!r}")  # type: ignore[call-overload]
    if num_layers is not None and len(values) != num_layers:
        raise ValueError(f"`{name}` must hold one width per block ({num_layers}), got {len(values)}")
    return tuple(v for v in values if v is not None)


def _check_count(name: str, value: object) -> int | None:
    """``value`` as an int >= 0 or None; raises ``ValueError`` naming ``name`` otherwise."""
    if value is None:
        return None
    as_int = _as_index(value)
    if as_int is None or as_int < 0:
        raise ValueError(f"`{name}` must be an int >= 0 or None, got {value!r}")
    return as_int


@dataclass(frozen=True)
class PruningPlan:
    """What survives pruning: the blocks to drop, the parameter counts before and after, and how it was chosen.

    The plan is frozen and validated on construction; ``drop_layers`` is normalised to a sorted tuple and ``scores``
    to a tuple of floats, so plans compare and hash by content (``meta`` is left out of both).

    Args:
        drop_layers: indices of the blocks to remove, counted on the model the plan was made on. Non-negative,
            unique integers; stored sorted.
        num_layers: number of blocks of the model the plan applies to; checked when the plan is applied.
        method: how the plan was chosen, e.g. ``"depth:bi"``.
        params_before: all parameters before pruning (tied embeddings counted once, LoRA adapters not counted).
        params_after: all parameters after pruning.
        non_embedding_before: parameters outside the embedding and an untied LM head, before pruning.
        non_embedding_after: the same after pruning.
        scores: per-block scores the plan was chosen by (higher = more important); ``num_layers`` of them.
        keep_heads: ``{block: query-head indices kept}`` for the blocks whose attention shrinks (GQA: a KV head
            survives when any of its query heads does, and every surviving KV head must keep the same number of
            query heads; surgery checks this). Not part of the hash.
        keep_neurons: ``{block: MLP neuron indices kept}`` for the blocks whose MLP shrinks. Not part of the hash.
        heads_before: query heads per block of the model the plan was made on; checked when applied.
        neurons_before: MLP neurons per block of the model the plan was made on; checked when applied.
        sparsity: for a sparsity plan, how its masks were made and what they reached (:data:`SPARSITY_KEYS`):
            ``{"config": every SparsityConfig field, "linears": {linear name: fraction zeroed}, "max_batches": ...,
            "calibration": {"batches", "sequences", "tokens", "sha256"} or None, "masks_sha256": ...,
            "masks_before_sha256": ...}``; stored
            as plain JSON data (``n_m`` as ``"N:M"``). None for depth and width plans. Not part of the hash.
        reconstruction: how the surviving weights were refit after the cut (:data:`RECONSTRUCTION_KEYS`): ``{"method":
            "lsq", "ridge": ..., "protocol": "one_shot", "max_batches": ..., "calibration": {...}, "lambdas": {...}}``;
            applying the plan refits the same way from the Grams of that calibration. None: cut only. Not part of
            the hash.
        meta: free-form, JSON-serialisable provenance (criterion arguments, calibration description). Not part of
            equality or the hash.

    Raises:
        ValueError: if ``drop_layers`` holds a non-integer, a negative index, a duplicate, an index >= ``num_layers``
            or every block; if ``num_layers`` is not an int >= 1; if a parameter count is negative; if ``scores``
            holds a non-number or its length differs from ``num_layers``; if ``sparsity`` has an unknown or missing
            key (the message lists the allowed ones), a fraction outside [0, 1], a bad digest, or comes with
            ``drop_layers`` / width changes (a sparsity plan changes no shape: record those as their own plans).
        TypeError: if ``meta`` is not a dict.

    Example:
        >>> plan = PruningPlan(drop_layers=[3, 1], num_layers=4, method="depth:bi", params_before=100, params_after=60)
        >>> plan.drop_layers, plan.keep_layers
        ((1, 3), (0, 2))
        >>> plan.fraction_removed
        0.4
        >>> PruningPlan.from_json(plan.to_json()) == plan
        True
    """

    drop_layers: tuple[int, ...] = ()
    num_layers: int | None = None
    method: str = ""
    params_before: int | None = None
    params_after: int | None = None
    non_embedding_before: int | None = None
    non_embedding_after: int | None = None
    scores: tuple[float, ...] | None = None
    keep_heads: dict[int, tuple[int, ...]] | None = field(default=None, hash=False)
    keep_neurons: dict[int, tuple[int, ...]] | None = field(default=None, hash=False)
    heads_before: tuple[int, ...] | None = None
    neurons_before: tuple[int, ...] | None = None
    sparsity: dict[str, Any] | None = field(default=None, hash=False)
    reconstruction: dict[str, Any] | None = field(default=None, hash=False)
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        num_layers = self.num_layers
        if num_layers is not None:
            as_int = _as_index(num_layers)
            if as_int is None or as_int < 1:
                raise ValueError(f"`num_layers` must be an int >= 1 or None, got {num_layers!r}")
            num_layers = as_int
            object.__setattr__(self, "num_layers", num_layers)

        drop = self._checked_drop_layers(self.drop_layers, num_layers)
        object.__setattr__(self, "drop_layers", drop)

        if not isinstance(self.method, str):
            raise ValueError(f"`method` must be a string, got {self.method!r}")
        for name in ("params_before", "params_after", "non_embedding_before", "non_embedding_after"):
            object.__setattr__(self, name, _check_count(name, getattr(self, name)))

        if self.scores is not None:
            object.__setattr__(self, "scores", self._checked_scores(self.scores, num_layers))

        heads_before = _checked_widths("heads_before", self.heads_before, num_layers)
        neurons_before = _checked_widths("neurons_before", self.neurons_before, num_layers)
        object.__setattr__(self, "heads_before", heads_before)
        object.__setattr__(self, "neurons_before", neurons_before)
        object.__setattr__(
            self, "keep_heads", _checked_keep("keep_heads", self.keep_heads, num_layers, heads_before, drop)
        )
        object.__setattr__(
            self, "keep_neurons", _checked_keep("keep_neurons", self.keep_neurons, num_layers, neurons_before, drop)
        )

        record = _checked_sparsity(self.sparsity)
        if record is not None and (drop or self.keep_heads or self.keep_neurons):
            raise ValueError(
                "A sparsity plan (`sparsity` given) must not also drop blocks or change widths, got "
                f"drop_layers={list(drop)}, keep_heads in {len(self.keep_heads or {})} blocks, keep_neurons in "
                f"{len(self.keep_neurons or {})} blocks; record each step as its own plan, in the order applied"
            )
        object.__setattr__(self, "sparsity", record)
        refit = _checked_reconstruction(self.reconstruction)
        if refit is not None and record is not None:
            raise ValueError("A sparsity plan (`sparsity` given) has no `reconstruction`: it changes no shape")
        object.__setattr__(self, "reconstruction", refit)

        if not isinstance(self.meta, dict):
            raise TypeError(f"`meta` must be a dict, got {type(self.meta).__name__}")
        object.__setattr__(self, "meta", dict(self.meta))  # the caller's dict stays theirs

    @staticmethod
    def _checked_drop_layers(drop_layers: object, num_layers: int | None) -> tuple[int, ...]:
        """``drop_layers`` as a sorted tuple of ints, or ``ValueError`` naming the bad values."""
        if isinstance(drop_layers, (str, bytes)) or not hasattr(drop_layers, "__iter__"):
            raise ValueError(f"`drop_layers` must be a sequence of block indices, got {drop_layers!r}")
        values = list(drop_layers)
        indices = [_as_index(v) for v in values]
        bad = [v for v, i in zip(values, indices) if i is None or i < 0]
        if bad:
            raise ValueError(f"`drop_layers` must hold non-negative integer block indices, got {bad!r} in {values!r}")
        ints = [i for i in indices if i is not None]
        duplicates = sorted({i for i in ints if ints.count(i) > 1})
        if duplicates:
            raise ValueError(f"`drop_layers` must not repeat an index, got {duplicates} more than once in {ints}")
        if num_layers is not None:
            out_of_range = sorted(i for i in ints if i >= num_layers)
            if out_of_range:
                raise ValueError(
                    f"`drop_layers` must be in [0, {num_layers}) for a model with `num_layers`={num_layers}, "
                    f"got {out_of_range}"
                )
            if len(ints) == num_layers:
                raise ValueError(
                    f"`drop_layers` must leave at least one of the {num_layers} blocks, got all of them: {sorted(ints)}"
                )
        return tuple(sorted(ints))

    @staticmethod
    def _checked_scores(scores: object, num_layers: int | None) -> tuple[float, ...]:
        """``scores`` as a tuple of floats, or ``ValueError`` naming the problem."""
        if hasattr(scores, "tolist"):  # a tensor or an array
            scores = scores.tolist()
        if isinstance(scores, (str, bytes)) or not hasattr(scores, "__iter__"):
            raise ValueError(f"`scores` must be a sequence of numbers or None, got {scores!r}")
        values = list(scores)
        try:
            floats = tuple(float(s) for s in values)
        except (TypeError, ValueError):
            raise ValueError(f"`scores` must be a sequence of numbers, got {values!r}") from None
        if num_layers is not None and len(floats) != num_layers:
            raise ValueError(
                f"`scores` must hold one score per block ({num_layers} for `num_layers`={num_layers}), "
                f"got {len(floats)}"
            )
        return floats

    # --- derived values ----------------------------------------------------------------------------------------
    @property
    def keep_layers(self) -> tuple[int, ...] | None:
        """Indices (on the original model) of the blocks that survive, or None when ``num_layers`` is unknown."""
        if self.num_layers is None:
            return None
        dropped = set(self.drop_layers)
        return tuple(i for i in range(self.num_layers) if i not in dropped)

    @property
    def changes_width(self) -> bool:
        """Whether the plan removes attention heads or MLP neurons."""
        return bool(self.keep_heads) or bool(self.keep_neurons)

    @property
    def changes_sparsity(self) -> bool:
        """Whether the plan records masks to re-compute (a format version 3 sparsity plan)."""
        return self.sparsity is not None

    @property
    def num_layers_after(self) -> int | None:
        """Number of blocks after the plan is applied, or None when ``num_layers`` is unknown."""
        return None if self.num_layers is None else self.num_layers - len(self.drop_layers)

    @staticmethod
    def _fraction(before: int | None, after: int | None) -> float | None:
        if before is None or after is None or before == 0:
            return None
        return 1.0 - after / before

    @property
    def fraction_removed(self) -> float | None:
        """Fraction of all parameters removed (``1 - after / before``), or None when a count is unknown."""
        return self._fraction(self.params_before, self.params_after)

    @property
    def fraction_removed_non_embedding(self) -> float | None:
        """Fraction of non-embedding parameters removed, or None when a count is unknown."""
        return self._fraction(self.non_embedding_before, self.non_embedding_after)

    # --- serialisation -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values: lists for tuples, a ``version`` key for the format.

        Returns:
            A new dict; changing it does not change the plan.
        """
        out: dict[str, Any] = {"version": PLAN_FORMAT_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif f.name in ("keep_heads", "keep_neurons") and value is not None:
                value = {str(block): list(kept) for block, kept in value.items()}
            elif isinstance(value, dict):
                value = copy.deepcopy(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruningPlan:
        """Build a plan from :meth:`to_dict` output, by the format rules of the module docstring.

        Args:
            data: a mapping with the plan's fields and (normally) ``version``.

        Returns:
            The validated plan.

        Raises:
            TypeError: if ``data`` is not a mapping.
            ValueError: if the version is newer than :data:`PLAN_FORMAT_VERSION` or not an int >= 1, a key is not a
                field of the plan's version, a structural field is missing (or ``num_layers`` is null), or a field's
                value is invalid (see :class:`PruningPlan`).
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"A plan must be read from a mapping of its fields, got {type(data).__name__}")
        hand_written = "version" not in data
        version = data.get("version", PLAN_FORMAT_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(
                f"A plan's `version` must be an int in [1, {PLAN_FORMAT_VERSION}] (the plan format), got {version!r}"
            )
        if version > PLAN_FORMAT_VERSION:
            raise ValueError(
                f"This plan is format version {version}; this lit-prune reads plan format versions 1 to "
                f"{PLAN_FORMAT_VERSION} and cannot tell what the newer fields would change (applying the rest could "
                "build a different model). Upgrade lit-prune to replay it."
            )
        known = [name for v in range(1, version + 1) for name in _FIELDS_ADDED[v]]
        unknown = sorted(k for k in data if k not in known and k != "version")
        if unknown:
            raise ValueError(cls._unknown_keys_message(unknown, known, version))
        required = [name for v in range(1, version + 1) for name in _STRUCTURAL_ADDED[v]]
        if hand_written:
            required = list(_STRUCTURAL_ADDED[1])
        required += [_WIDTHS_FOR[k] for k in _WIDTHS_FOR if data.get(k) is not None]
        missing = [name for name in dict.fromkeys(required) if name not in data]
        if missing:
            of = "a hand-written plan (no `version`)" if hand_written else f"a plan of format version {version}"
            raise ValueError(
                f"This plan lacks the required field(s) {missing}: {of} must record {list(dict.fromkeys(required))} "
                "(the width fields, `sparsity` and `reconstruction` may be null), or it could be applied to the wrong "
                "model or build a different one. "
                "Restore the field(s) from the original plan."
            )
        if data["num_layers"] is None:
            raise ValueError(
                "This plan's `num_layers` is null: a plan read from a file must record the number of blocks of the "
                "model it was made on, so that it is never applied to a model of another depth"
            )
        kwargs = {k: v for k, v in data.items() if k != "version"}
        for name in ("drop_layers", "scores", "heads_before", "neurons_before"):
            if isinstance(kwargs.get(name), list):
                kwargs[name] = tuple(kwargs[name])
        if kwargs.get("meta") is None:
            kwargs.pop("meta", None)
        return cls(**kwargs)

    @staticmethod
    def _unknown_keys_message(unknown: list[str], known: list[str], version: int) -> str:
        """Why ``unknown`` keys are refused, with the closest known field and the version a later field needs."""
        hints = []
        for key in unknown:
            later = [v for v, names in _FIELDS_ADDED.items() if key in names]
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            if later:
                hints.append(f"`{key}` is a field of format version {later[0]}, not {version}")
            elif close:
                hints.append(f"`{key}`: did you mean `{close[0]}`?")
        hint = f" ({'; '.join(hints)})" if hints else ""
        return (
            f"Unknown PruningPlan key(s) {unknown}{hint}. A plan of format version {version} has the fields "
            f"{sorted(known)} and `version`; an unknown key may change what the plan does, so the plan is not applied."
        )

    def to_json(self, path: str | Path | None = None) -> str:
        """The plan as JSON text (indent 2); also written to ``path`` when one is given.

        Args:
            path: file to write (parent folders are created). None writes nothing.

        Returns:
            The JSON text.

        Raises:
            TypeError: if ``meta`` holds a value JSON cannot represent.
        """
        try:
            text = json.dumps(self.to_dict(), indent=2)
        except TypeError as err:
            raise TypeError(f"PruningPlan `meta` must hold only JSON-serialisable values: {err}") from None
        if path is not None:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text + "\n")
            log.info("Wrote pruning plan (%d blocks dropped) to %s", len(self.drop_layers), target)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> PruningPlan:
        """Read one plan from JSON text or from a file holding one plan object.

        A file holding a list of plans (``pruning_plans.json``) is refused with a pointer to :func:`read_plans`,
        the reader of every plan file, even when the list has one element: a list is a record of several applied
        steps, and reading its first one silently would drop the others.

        Args:
            text_or_path: a :class:`~pathlib.Path`, a string path, or the JSON text itself (a string whose first
                non-blank character is ``{`` or ``[``).

        Returns:
            The validated plan.

        Raises:
            FileNotFoundError: if a path is given and does not exist.
            ValueError: if the text is not valid JSON, breaks the format rules (module docstring) or a field's value is
                invalid.
            TypeError: if the JSON is a list (use :func:`read_plans`) or not an object.
        """
        if isinstance(text_or_path, str) and text_or_path.lstrip()[:1] in ("{", "["):
            text, source = text_or_path, "JSON text"
        else:
            path = Path(text_or_path)
            if not path.is_file():
                raise FileNotFoundError(f"No pruning plan file at {str(path)!r}")
            text, source = path.read_text(), str(path)
        data = _loads(text, source)
        if isinstance(data, list):
            raise TypeError(
                f"The JSON in {source} is a list of {len(data)} plan(s) (like {PLANS_FILE}), not one plan; read it "
                "with lit_prune.read_plans, which returns every plan in applied order"
            )
        return cls.from_dict(data)

    def __repr__(self) -> str:
        counts = ""
        if self.params_before is not None and self.params_after is not None:
            counts = f", params {self.params_before:,} -> {self.params_after:,}"
        width = ""
        if self.keep_heads:
            width += f", heads kept in {len(self.keep_heads)} blocks"
        if self.keep_neurons:
            width += f", neurons kept in {len(self.keep_neurons)} blocks"
        if self.sparsity is not None:
            width += f", sparsity in {len(self.sparsity['linears'])} Linears"
        if self.reconstruction is not None:
            width += f", {self.reconstruction['method']} refit of {len(self.reconstruction['lambdas'] or {})} Linears"
        return (
            f"PruningPlan(drop_layers={list(self.drop_layers)}, num_layers={self.num_layers}, "
            f"method={self.method!r}{width}{counts})"
        )


def _loads(text: str, source: str) -> Any:
    """``json.loads(text)``, or ``ValueError`` naming ``source``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"The pruning plan in {source} is not valid JSON: {err}") from None


def read_plans(path: str | Path) -> list[PruningPlan]:
    """Read the plans of a plan file: the one public reader of plan files.

    Reads one plan object (what :meth:`PruningPlan.to_json` and the pruning callbacks' ``<name>-plan-<n>.json``
    hold), a JSON list of them (``pruning_plans.json``, written by :func:`lit_prune.io.save_pretrained` in applied
    order), or a folder holding ``pruning_plans.json`` (a saved model). Every plan is checked by the format rules of
    :mod:`lit_prune.plan` (newer versions, unknown keys and missing structural fields are refused).

    Args:
        path: the plan file, or a saved model folder.

    Returns:
        The plans in file order (one element for a single plan object).

    Raises:
        FileNotFoundError: if ``path`` does not exist, or is a folder without ``pruning_plans.json``.
        ValueError: if the file is not valid JSON, is an empty list, or a plan breaks the format rules or holds an
            invalid value (the message names the file and, for a list, the entry's index).
        TypeError: if the JSON is neither an object nor a list, or a list entry is not an object.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = PruningPlan(drop_layers=[1], num_layers=4).to_json(folder / "plan.json")
        >>> [p.drop_layers for p in read_plans(folder / "plan.json")]
        [(1,)]
    """
    target = Path(path)
    if target.is_dir():
        if not (target / PLANS_FILE).is_file():
            raise FileNotFoundError(
                f"No {PLANS_FILE} in the folder {str(target)!r}: give a plan file (a '<callback>-plan-<n>.json' or "
                f"a {PLANS_FILE}) or a saved model folder that holds {PLANS_FILE}"
            )
        target = target / PLANS_FILE
    elif not target.is_file():
        raise FileNotFoundError(f"No pruning plan file at {str(target)!r}")
    data = _loads(target.read_text(), str(target))
    if isinstance(data, Mapping):
        entries, single = [data], True
    elif isinstance(data, list):
        entries, single = data, False
        if not entries:
            raise ValueError(f"The plan list in {str(target)!r} is empty: there is no plan to read")
    else:
        raise TypeError(
            f"A plan file must hold a plan object or a list of plan objects, got a JSON {type(data).__name__} "
            f"in {str(target)!r}"
        )
    plans = []
    for i, entry in enumerate(entries):
        where = f"{str(target)!r}" if single else f"{str(target)!r}, plan [{i}]"
        if not isinstance(entry, Mapping):
            raise TypeError(f"Plan entries must be JSON objects, got a {type(entry).__name__} at {where}")
        try:
            plans.append(PruningPlan.from_dict(entry))
        except (ValueError, TypeError) as err:
            raise type(err)(f"{where}: {err}") from None
    return plans
