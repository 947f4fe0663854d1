"""Load Hugging Face causal LMs and tokenizers from a hub id, a local folder, a GGUF file or a built-in alias."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lit_prune.presets import BUILTIN_PREFIX, resolve_builtin

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_source(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Turn a model reference into ``(name_or_path, gguf_file)`` for ``from_pretrained``.

    Args:
        name_or_path: ``builtin:<alias>``, a path to a ``.gguf`` file, a local folder, or a hub id (kept as is).
        gguf_file: GGUF file name inside the folder or hub repo.

    Raises:
        FileNotFoundError: if a ``.gguf`` path or the ``gguf_file`` inside a local folder does not exist.
        ValueError: for an unknown ``builtin:`` alias.
    """
    if name_or_path.startswith(BUILTIN_PREFIX):
        return resolve_builtin(name_or_path)
    path = Path(name_or_path).expanduser()
    if gguf_file is None and path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
        return str(path.parent), path.name
    if gguf_file is not None and path.is_dir() and not (path / gguf_file).is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file!r} not found in {str(path)!r}")
    return name_or_path, gguf_file


def torch_dtype(name: str) -> torch.dtype:
    """Map a dtype name from a config file to a ``torch.dtype``."""
    if name not in _DTYPES:
        raise ValueError(f"`dtype` must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def load_model(
    name_or_path: str, gguf_file: str | None = None, dtype: str = "float32", **kwargs: Any
) -> PreTrainedModel:
    """Load a causal LM; GGUF weights are de-quantized by transformers into ``dtype``.

    A local folder is loaded with :func:`lit_prune.load_pretrained`, so pruned models with non-uniform widths load
    too.

    The GGUF quantizer and ``quantization_config`` are dropped from the loaded model, so that what is saved
    afterwards is a plain checkpoint that ``AutoModelForCausalLM.from_pretrained`` reloads without the GGUF file.

    Args:
        name_or_path: any reference :func:`resolve_model_source` accepts.
        gguf_file: GGUF file name inside the folder or hub repo.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        **kwargs: passed on to ``AutoModelForCausalLM.from_pretrained``.
    """
    source, gguf = resolve_model_source(name_or_path, gguf_file)
    log.info("Loading model %s%s", source, f" (gguf_file={gguf})" if gguf else "")
    if gguf is None and Path(source).is_dir():
        from lit_prune.io import load_pretrained  # a local folder may hold a non-uniform pruned model

        return load_pretrained(source, dtype=torch_dtype(dtype), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch_dtype(dtype), **kwargs)
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
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_from_config(config: PretrainedConfig | dict[str, Any], dtype: str = "float32") -> PreTrainedModel:
    """Build a randomly initialised causal LM from a config (a ``PretrainedConfig`` or a dict with ``model_type``)."""
    if isinstance(config, dict):
        if "model_type" not in config:
            raise ValueError(f"A config dict needs a `model_type` key (e.g. 'llama'), got keys {sorted(config)}")
        fields = dict(config)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    return AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
