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
from lit_prune.presets import BUILTIN_PREFIX, builtin_models, resolve_builtin

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

HUB_KWARGS = ("revision", "token", "cache_dir", "subfolder", "local_files_only", "force_download", "proxies")
"""``from_pretrained`` arguments that also decide where (and from which revision) the files are read."""

PROBE_TIMEOUT_S = 3.0
"""Seconds the one request that checks whether the hub answers may take. Without it an unreachable hub costs every
file huggingface_hub's five retries with back-off (about 25 s a file, 80 s for a model and its tokenizer)."""

_TRUE = {"1", "ON", "YES", "TRUE"}


def _missing_path(name: str) -> FileNotFoundError:
    resolved = Path(name).expanduser().resolve()
    where = "" if str(resolved) == name else f" (resolved: {resolved})"
    return FileNotFoundError(
        f"Model folder {name!r} does not exist{where}; give an existing folder, a .gguf file, a built-in model "
        f"({', '.join(builtin_models())}) or a Hugging Face Hub id ('org/name')"
    )


def check_reference(name_or_path: str) -> None:
    """Refuse at once a model reference that is neither an existing path nor shaped like a hub id.

    Raises:
        FileNotFoundError: naming the missing path (``/tmp/x/model``, ``./model``, ``a/b/c``, ``model.gguf``).
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name_or_path.startswith(BUILTIN_PREFIX) or Path(name_or_path).expanduser().exists():
        return
    if name_or_path.endswith(".gguf"):
        raise FileNotFoundError(f"GGUF file {str(Path(name_or_path).expanduser())!r} does not exist")
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise _missing_path(name_or_path) from None


def _offline() -> bool:
    """Offline mode, read now (huggingface_hub reads ``HF_HUB_OFFLINE`` once, at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.upper() in _TRUE


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached (one request, :data:`PROBE_TIMEOUT_S`, no retries), or None when it answers."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    endpoint = constants.ENDPOINT
    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 - whatever stops this request would stop from_pretrained's too
        return f"the hub ({endpoint}) is unreachable ({type(err).__name__})"
    return None


def hub_access(name_or_path: str, filename: str = "config.json", **hub: Any) -> dict[str, Any]:
    """Make sure a hub id can be loaded without waiting on the network; returns ``from_pretrained`` arguments to add.

    Nothing is checked for existing paths and built-in aliases. For a hub id: when the hub answers a single short
    request, ``{}`` (transformers downloads as usual). When offline mode is on (``HF_HUB_OFFLINE`` /
    ``TRANSFORMERS_OFFLINE``, read at call time), ``local_files_only=True`` was passed, or the hub does not answer,
    ``{"local_files_only": True}`` if ``filename`` is in the local Hugging Face cache, else an error.

    Args:
        name_or_path: the model reference.
        filename: a file the repo must have (``config.json``, the GGUF file, ``tokenizer_config.json``).
        **hub: the hub arguments of the load (``revision``, ``cache_dir``, ``subfolder``, ``local_files_only``...).

    Raises:
        FileNotFoundError: in one line, saying the name was taken as a hub id, why the hub cannot be used, and what
            to give instead.
    """
    if name_or_path.startswith(BUILTIN_PREFIX) or Path(name_or_path).expanduser().exists():
        return {}
    if hub.get("local_files_only"):
        why: str | None = "`local_files_only=True` was given"
    elif _offline():
        why = "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)"
    else:
        why = _hub_unreachable()
        if why is None:
            return {}
    from huggingface_hub import try_to_load_from_cache

    subfolder = hub.get("subfolder") or ""
    cached = try_to_load_from_cache(
        name_or_path,
        f"{subfolder}/{filename}" if subfolder else filename,
        cache_dir=hub.get("cache_dir"),
        revision=hub.get("revision"),
    )
    if isinstance(cached, str):
        log.info("%s: %s; loading it from the local Hugging Face cache", name_or_path, why)
        return {"local_files_only": True}
    raise FileNotFoundError(
        f"{name_or_path!r} is not an existing folder ({Path(name_or_path).absolute()}), so it was taken as a Hugging "
        f"Face Hub id, but {why} and it is not in the local cache; give a local folder, a .gguf file or a built-in "
        f"model ({', '.join(builtin_models())})"
    )


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

    from lit_prune.io import MODEL_TYPE_KEY

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
    kwargs = {**kwargs, **hub_access(source, gguf or "config.json", **_hub_kwargs(kwargs))}
    check_family(source, gguf, **_hub_kwargs(kwargs))
    log.info("Loading model %s%s", source, f" (gguf_file={gguf})" if gguf else "")
    if gguf is None:
        from lit_prune.io import load_pretrained  # a folder or hub repo may hold a non-uniform pruned model

        return load_pretrained(source, dtype=torch_dtype(dtype), **kwargs)
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


def auto_from_pretrained(source: str, **kwargs: Any) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained``, whose PEFT adapter lookup also stays local under ``local_files_only``.

    transformers does not pass ``local_files_only`` / ``cache_dir`` on to its ``adapter_config.json`` lookup, so with
    the hub unreachable every load from the cache would wait through that request's retries (about 25 s).
    """
    if kwargs.get("local_files_only") and "adapter_kwargs" not in kwargs:
        kwargs["adapter_kwargs"] = {k: kwargs[k] for k in ("local_files_only", "cache_dir") if k in kwargs}
    return AutoModelForCausalLM.from_pretrained(source, **kwargs)


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
