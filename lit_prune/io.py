"""Save and reload pruned models: stock Hugging Face checkpoints when widths are uniform, one loader when not.

* Uniform widths (depth pruning, uniform width allocation): the config describes the model and
  :func:`save_pretrained` writes a plain checkpoint that ``AutoModelForCausalLM.from_pretrained`` (and every tool
  built on it) loads.
* Non-uniform widths (global allocation): ``config.json`` also holds the per-block widths
  (:data:`lit_prune.surgery.LAYER_SHAPES_KEY`) and the weights keep their real, smaller shapes. Load it with
  :func:`load_pretrained`, which builds each block at its recorded width before the weights go in. Its
  ``model_type`` is rewritten to a name no transformers class has, which says to use :func:`load_pretrained`
  (the real one is kept under :data:`MODEL_TYPE_KEY`), so plain ``from_pretrained``, ``AutoConfig`` and tools built
  on them stop at once with that message instead of building full-width blocks (and, with
  ``ignore_mismatched_sizes=True``, silently re-initialising the pruned ones).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from lit_prune.arch import ModelAdapter, adapter_for_type, unwrap
from lit_prune.hub import HUB_KWARGS, auto_from_pretrained, check_reference, hub_access
from lit_prune.plan import PruningPlan
from lit_prune.sparse.masks import attach_masks, fold_masks
from lit_prune.surgery import (
    LAYER_SHAPES_KEY,
    BlockShape,
    loads_without_lit_prune,
    resize_to_shapes,
    shapes_from_config,
    sync_config,
)

log = logging.getLogger(__name__)

MODEL_TYPE_KEY = "lit_prune_model_type"
"""``config.json`` key holding the real ``model_type`` of a checkpoint that only :func:`load_pretrained` can load."""

_GUARD_TYPE = "{model_type} pruned by lit-prune with non-uniform widths: load it with lit_prune.load_pretrained"
"""The ``model_type`` written in its place: transformers quotes it in its "does not recognize this architecture"
error."""

PLANS_FILE = "pruning_plans.json"
"""Written next to the weights by :func:`save_pretrained` when plans are given: the plans that made the model."""


def save_pretrained(
    model: nn.Module,
    path: str | Path,
    *,
    tokenizer: Any = None,
    plans: list[PruningPlan] | None = None,
    **kwargs: Any,
) -> Path:
    """Save a (pruned) model so it reloads with identical logits; returns the folder.

    The config is first brought in line with the real block widths, so a uniform result is a stock checkpoint and a
    non-uniform one carries its per-block record. LoRA adapters must be merged first (a PEFT wrapper is refused).
    Sparsity masks are folded into the weights for the save (the live model keeps them).

    Args:
        model: a Hugging Face causal LM, or a ``CausalLMModule`` holding one.
        path: output folder (created).
        tokenizer: saved next to the model when given.
        plans: written to ``pruning_plans.json`` when given (the replayable record of how the model was made).
        kwargs: passed to the model's ``save_pretrained`` (e.g. ``safe_serialization``, ``max_shard_size``).

    Raises:
        TypeError: if ``model`` is not a ``PreTrainedModel`` after unwrapping, or still holds PEFT adapters.
    """
    hf_model = unwrap(model)
    adapters = any(hasattr(m, "lora_A") for m in hf_model.modules())
    if not isinstance(hf_model, PreTrainedModel) or hasattr(hf_model, "peft_config") or adapters:
        raise TypeError(
            f"save_pretrained needs a plain Hugging Face model, got {type(hf_model).__name__}"
            f"{' with LoRA adapters' if adapters else ''}; merge the adapters first "
            "(`lit_prune.recovery.merge_adapters(module)` or PEFT's `merge_and_unload()`)"
        )
    sync_config(hf_model)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    masks = fold_masks(hf_model)  # sparsity: zeros in the weights, no weight_mask keys in the files
    try:
        hf_model.save_pretrained(out, **kwargs)
    finally:
        if masks:
            attach_masks(hf_model, masks)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if plans:
        (out / PLANS_FILE).write_text(json.dumps([p.to_dict() for p in plans], indent=2) + "\n")
    stock = loads_without_lit_prune(hf_model)
    if not stock:
        _guard_config(out / "config.json")
    how = "AutoModelForCausalLM.from_pretrained" if stock else "lit_prune.load_pretrained"
    log.info("Saved %s to %s (reload with %s)", type(hf_model).__name__, out, how)
    return out


def load_pretrained(path: str | Path, **kwargs: Any) -> PreTrainedModel:
    """Load a model saved by lit-prune (or any stock checkpoint) with the widths it was saved with.

    A checkpoint without a per-block width record is loaded by plain ``AutoModelForCausalLM.from_pretrained``.
    Otherwise the model class is built as usual and each block is cut to its recorded widths inside the
    constructor, before transformers loads the weights, so loading keeps all of transformers' machinery (meta-device
    construction, ``dtype``, ``device_map``, sharded files, tied weights) and peak memory stays that of the pruned
    model.

    Args:
        path: a folder written by :func:`save_pretrained` (or ``save_pretrained`` of a uniform model), or a hub id.
        kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ...).

    Returns:
        The model, in eval mode as ``from_pretrained`` returns it.

    Raises:
        FileNotFoundError: if ``path`` is a local path that does not exist, or a hub id while the hub cannot be used
            and the files are not cached (see :func:`lit_prune.hub.hub_access`).
        ValueError: if the per-block record is malformed, does not match the config's depth, or (for a local
            folder) disagrees with the tensor shapes in the safetensors files; the message names the block, the
            tensor, the recorded and the stored shape.

    Example:
        >>> import tempfile
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from lit_prune.surgery import prune_neurons
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
        >>> _ = prune_neurons(model, 0, range(8))      # block 0 narrower than block 1: non-uniform
        >>> folder = save_pretrained(model, tempfile.mkdtemp())
        >>> load_pretrained(folder).model.layers[0].mlp.down_proj.in_features
        8
    """
    check_reference(str(path))
    kwargs.update(hub_access(str(path), **{k: kwargs[k] for k in HUB_KWARGS if k in kwargs}))
    config = kwargs.pop("config", None)
    if config is None:
        hub = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        config_dict, _ = PretrainedConfig.get_config_dict(str(path), **hub)
        real_type = config_dict.pop(MODEL_TYPE_KEY, None)
        if real_type is None and LAYER_SHAPES_KEY not in config_dict:
            return auto_from_pretrained(str(path), **kwargs)
        config_dict["model_type"] = real_type or config_dict["model_type"]
        if config_dict["model_type"] not in CONFIG_MAPPING:
            raise ValueError(f"Unknown model_type {config_dict['model_type']!r} in {path}/config.json")
        config = CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict)
    shapes = shapes_from_config(config)
    if shapes is None:
        return auto_from_pretrained(str(path), config=config, **kwargs)
    found: Any = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if isinstance(found, tuple):  # some config types map to several classes; the first is the default
        found = next((c for c in found if c is not None), None)
    if found is None:
        raise ValueError(
            f"No causal-LM class for config type {type(config).__name__} (model_type={config.model_type!r})"
        )
    base: type[PreTrainedModel] = found
    folder = Path(path).expanduser() / (kwargs.get("subfolder") or "")
    if folder.is_dir():
        check_record_against_weights(folder, config, shapes)
    model = _with_shapes(base, shapes).from_pretrained(str(path), config=config, **kwargs)
    model.__class__ = base  # the subclass only changed construction; users get the stock class
    log.info("Loaded %s with per-block widths from %s", base.__name__, LAYER_SHAPES_KEY)
    return model


_SAFETENSORS_INDEX = "model.safetensors.index.json"
_SAFETENSORS_FILE = "model.safetensors"


def _stored_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{tensor name: (shape, file name)}`` from the safetensors headers of ``folder`` (no tensor is read)."""
    from safetensors import safe_open

    index = folder / _SAFETENSORS_INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / _SAFETENSORS_FILE).is_file():
        files = [_SAFETENSORS_FILE]
    else:
        return {}
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[key] = (tuple(f.get_slice(key).get_shape()), name)
    return out


def _expected_shapes(
    adapter: ModelAdapter, shape: BlockShape, head_dim: int, hidden: int
) -> dict[str, tuple[int, ...]]:
    """The shapes a block with widths ``shape`` gives its projections, keyed by their name inside the block."""
    return adapter.expected_shapes(
        shape.num_attention_heads, shape.num_key_value_heads, shape.intermediate_size, head_dim, hidden
    )


def check_record_against_weights(folder: str | Path, config: Any, shapes: list[BlockShape]) -> None:
    """Check a per-block width record against the tensor shapes in a folder's safetensors files (headers only).

    Run by :func:`load_pretrained` before the model is built, so a hand-edited or mismatched ``config.json`` is
    reported block by block instead of as transformers' size-mismatch table. A folder without safetensors files is
    not checked.

    Args:
        folder: the checkpoint folder.
        config: its config (with the record).
        shapes: the record, as :func:`~lit_prune.surgery.shapes_from_config` read it.

    Raises:
        ValueError: naming the first block whose record disagrees with a tensor (its name, the recorded and the
            stored shape) or whose tensors are missing, or the blocks the weights hold beyond the record.
    """
    stored = _stored_shapes(Path(folder))
    if not stored:
        return
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    adapter = adapter_for_type(getattr(cfg, "model_type", None), type(config).__name__)
    hidden = int(cfg.hidden_size)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads)
    layer_key = re.compile(rf"(.*?\b{re.escape(adapter.layers_attr)})\.(\d+)\.(.+)$")
    by_block: dict[int, dict[str, tuple[str, tuple[int, ...], str]]] = {}
    for key, (dims, file) in stored.items():
        match = layer_key.match(key)
        if match:
            by_block.setdefault(int(match.group(2)), {})[match.group(3)] = (key, dims, file)
    fix = (
        f"the {LAYER_SHAPES_KEY} record in config.json was edited or belongs to other weights; restore the "
        "config.json that lit_prune.save_pretrained wrote next to these weights (or re-save the model with it)"
    )
    extra = sorted(b for b in by_block if b >= len(shapes))
    if extra:
        raise ValueError(
            f"The weights in {folder} hold {max(by_block) + 1} blocks but config.json records {len(shapes)} "
            f"(num_hidden_layers={cfg.num_hidden_layers}); {fix}"
        )
    for b, shape in enumerate(shapes):
        tensors = by_block.get(b, {})
        for rest, expected in _expected_shapes(adapter, shape, head_dim, hidden).items():
            if rest not in tensors:
                if rest.endswith(".bias"):
                    continue
                raise ValueError(f"Block {b}: the weights in {folder} have no tensor for {rest!r}; {fix}")
            name, got, file = tensors[rest]
            if got != expected:
                raise ValueError(
                    f"Block {b}: config.json records num_attention_heads={shape.num_attention_heads}, "
                    f"num_key_value_heads={shape.num_key_value_heads}, intermediate_size={shape.intermediate_size} "
                    f"(head_dim={head_dim}, hidden_size={hidden}), so {name} should have shape {list(expected)}, "
                    f"but {file} stores {list(got)}; {fix}"
                )


def _guard_config(config_file: Path) -> None:
    """Swap the saved ``model_type`` for one that tells plain transformers to use :func:`load_pretrained`."""
    data = json.loads(config_file.read_text())
    data[MODEL_TYPE_KEY] = data["model_type"]
    data["model_type"] = _GUARD_TYPE.format(model_type=data["model_type"])
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _with_shapes(base: type[PreTrainedModel], shapes: list[BlockShape]) -> type[PreTrainedModel]:
    """A subclass of ``base`` whose constructor cuts every block to ``shapes`` right after building it."""

    def __init__(self: PreTrainedModel, config: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, config, *args, **kwargs)
        resize_to_shapes(self, shapes)

    # same name and module: transformers reads both (class name in saved configs, module file for attention support)
    return type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})
