"""Load Hugging Face causal LMs and tokenizers from a hub id, a local folder, a GGUF file or a built-in alias.

A reference is checked before anything is downloaded or built, so a mistake costs no time: a path that does not
exist (anything that cannot be a hub id: ``/abs/dir``, ``./dir``, ``a/b/c``, ``x.gguf``) is reported as a missing
local path; a name that can be a hub id (``org/name``, ``gpt2``) is tried on the hub only when the hub answers a
single short request, otherwise it is served from the local cache or refused in one line; and the model family is
checked against :func:`lit_prune.arch.supported_model_types` from ``config.json`` (or the GGUF header) before any
weights are read.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lit_prune.arch import adapter_for_type
from lit_prune.hub import HUB_KWARGS as HUB_KWARGS  # re-exported: loading is where users look
from lit_prune.hub import PROBE_TIMEOUT_S as PROBE_TIMEOUT_S
from lit_prune.hub import auto_from_pretrained, check_reference, hub_access, hub_kwargs
from lit_prune.io import MODEL_TYPE_KEY, load_pretrained
from lit_prune.presets import BUILTIN_PREFIX, resolve_builtin

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# GGUF header: magic, version (uint32), tensor count and key/value count (uint64), then the key/value pairs
_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MODEL_TYPES = {
    "gemma3": "gemma3_text",
    "gemma4": "gemma4_text",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
}
"""GGUF ``general.architecture`` names that transformers loads under another ``model_type``."""


def _read_u(f: BinaryIO, fmt: str) -> int:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise EOFError("truncated GGUF header")
    return int(struct.unpack(fmt, data)[0])


def _read_gguf_string(f: BinaryIO) -> str:
    return f.read(_read_u(f, "<Q")).decode("utf-8", errors="replace")


def _skip_gguf_value(f: BinaryIO, vtype: int) -> None:
    if vtype in _GGUF_SCALAR_BYTES:
        f.seek(_GGUF_SCALAR_BYTES[vtype], os.SEEK_CUR)
    elif vtype == _GGUF_STRING:
        f.seek(_read_u(f, "<Q"), os.SEEK_CUR)
    elif vtype == _GGUF_ARRAY:
        etype, count = _read_u(f, "<I"), _read_u(f, "<Q")
        if etype in _GGUF_SCALAR_BYTES:
            f.seek(_GGUF_SCALAR_BYTES[etype] * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_gguf_value(f, etype)
    else:
        raise ValueError(f"unknown GGUF value type {vtype}")


def gguf_architecture(path: str | Path) -> str | None:
    """``general.architecture`` of a GGUF file, read from its header alone (no tensors, no tokenizer tables).

    Returns None when the file is not a little-endian GGUF v2/v3 file or has no such key (transformers then reports
    the problem when it reads the file).
    """
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF" or _read_u(f, "<I") not in (2, 3):
                return None
            _read_u(f, "<Q")  # tensor count
            for _ in range(_read_u(f, "<Q")):
                key, vtype = _read_gguf_string(f), _read_u(f, "<I")
                if key == "general.architecture" and vtype == _GGUF_STRING:
                    return _read_gguf_string(f)
                _skip_gguf_value(f, vtype)
    except (EOFError, ValueError, OSError):
        return None
    return None


def check_family(source: str, gguf_file: str | None = None, **hub: Any) -> None:
    """Refuse a model family lit-prune has no adapter for, from its config (or GGUF header) alone, before weights.

    Args:
        source: a local folder or hub id (what :func:`resolve_model_source` returns).
        gguf_file: the GGUF file inside it, if the weights are a GGUF file.
        **hub: hub arguments of the load (``revision``, ``cache_dir``, ...).

    Raises:
        UnsupportedModelError: naming the ``model_type`` (and GGUF architecture) and the supported types.
    """
    from transformers.utils import cached_file

    hub = {k: v for k, v in hub.items() if k != "force_download"}  # from_pretrained downloads again anyway
    if gguf_file is not None:
        file = cached_file(source, gguf_file, **hub)  # the local file, or the hub file into the cache
        arch = gguf_architecture(file) if file else None
        if arch is not None:
            adapter_for_type(_GGUF_MODEL_TYPES.get(arch, arch), f"GGUF architecture {arch!r} of {gguf_file}")
        return
    config_dict, _ = PretrainedConfig.get_config_dict(source, **hub)
    adapter_for_type(config_dict.get(MODEL_TYPE_KEY) or config_dict.get("model_type"), f"config.json of {source}")


def resolve_model_source(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Turn a model reference into ``(name_or_path, gguf_file)`` for ``from_pretrained``.

    Args:
        name_or_path: ``builtin:<alias>``, a path to a ``.gguf`` file, a local folder, or a hub id (kept as is).
        gguf_file: GGUF file name inside the folder or hub repo.

    Raises:
        FileNotFoundError: if a ``.gguf`` path, the ``gguf_file`` inside a local folder, or a local path (anything
            that cannot be a hub id, see :func:`check_reference`) does not exist.
        ValueError: for an unknown ``builtin:`` alias, or an existing file that is not a ``.gguf`` file.
    """
    if name_or_path.startswith(BUILTIN_PREFIX):
        return resolve_builtin(name_or_path)
    path = Path(name_or_path).expanduser()
    if gguf_file is None and path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
        return str(path.parent), path.name
    if not path.exists():
        check_reference(name_or_path)
        return name_or_path, gguf_file  # a hub id
    if path.is_file():
        raise ValueError(f"Model reference {name_or_path!r} is a file but not a .gguf file; give the folder it is in")
    if gguf_file is not None and not (path / gguf_file).is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file!r} not found in {str(path)!r}")
    return str(path), gguf_file


def torch_dtype(name: str) -> torch.dtype:
    """Map a dtype name from a config file to a ``torch.dtype``."""
    if name not in _DTYPES:
        raise ValueError(f"`dtype` must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def load_model(
    name_or_path: str, gguf_file: str | None = None, dtype: str = "float32", **kwargs: Any
) -> PreTrainedModel:
    """Load a causal LM; GGUF weights are de-quantized by transformers into ``dtype``.

    A folder or hub repo (not a GGUF file) is loaded with :func:`lit_prune.load_pretrained`, so pruned models with
    non-uniform widths load too. The reference is checked first (:func:`resolve_model_source`, :func:`hub_access`)
    and so is the family (:func:`check_family`, from ``config.json`` or the GGUF header), so mistakes fail at once,
    before any weights.

    The GGUF quantizer and ``quantization_config`` are dropped from the loaded model, so that what is saved
    afterwards is a plain checkpoint that ``AutoModelForCausalLM.from_pretrained`` reloads without the GGUF file.

    Args:
        name_or_path: any reference :func:`resolve_model_source` accepts.
        gguf_file: GGUF file name inside the folder or hub repo.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        **kwargs: passed on to ``AutoModelForCausalLM.from_pretrained``.

    Raises:
        FileNotFoundError: for a missing local path, or a hub id while the hub cannot be used (offline, unreachable)
            and the files are not cached.
        UnsupportedModelError: if the family has no adapter (checked before the weights are read).
    """
    source, gguf = resolve_model_source(name_or_path, gguf_file)
    kwargs = {**kwargs, **hub_access(source, gguf or "config.json", **hub_kwargs(kwargs))}
    check_family(source, gguf, **hub_kwargs(kwargs))
    log.info("Loading model %s%s", source, f" (gguf_file={gguf})" if gguf else "")
    if gguf is None:
        return load_pretrained(source, dtype=torch_dtype(dtype), **kwargs)  # may hold a non-uniform pruned model
    model = auto_from_pretrained(source, gguf_file=gguf, dtype=torch_dtype(dtype), **kwargs)
    if gguf is not None:
        # The weights are plain float tensors now; forget the GGUF quantizer so save_pretrained works.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def load_tokenizer(name_or_path: str, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer that goes with :func:`load_model`'s arguments; sets pad = EOS if there is no pad token.

    Args:
        name_or_path: any reference :func:`resolve_model_source` accepts.
        gguf_file: GGUF file name inside the folder or hub repo.
    """
    source, gguf = resolve_model_source(name_or_path, gguf_file)
    extra = hub_access(source, gguf or "tokenizer_config.json")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf, **extra)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_from_config(config: PretrainedConfig | dict[str, Any], dtype: str = "float32") -> PreTrainedModel:
    """Build a randomly initialised causal LM from a config (a ``PretrainedConfig`` or a dict with ``model_type``).

    Raises:
        ValueError: if a dict has no ``model_type``, or ``dtype`` is unknown.
        UnsupportedModelError: if the family has no adapter (checked before the model is built).
    """
    if isinstance(config, dict):
        if "model_type" not in config:
            raise ValueError(f"A config dict needs a `model_type` key (e.g. 'llama'), got keys {sorted(config)}")
        fields = dict(config)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    adapter_for_type(getattr(config, "model_type", None), type(config).__name__)
    return AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
