"""Where model files come from: check a reference, decide whether the Hugging Face Hub may be asked, and load.

The lowest layer of model loading, shared by :mod:`lit_prune.io` (:func:`~lit_prune.io.load_pretrained`) and
:mod:`lit_prune.loading` (:func:`~lit_prune.loading.load_model`, which re-exports these names), so both import it at
top level and neither imports the other in a function.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, PreTrainedModel

from lit_prune.presets import BUILTIN_PREFIX, builtin_models

log = logging.getLogger(__name__)

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


def auto_from_pretrained(source: str, **kwargs: Any) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained``, whose PEFT adapter lookup also stays local under ``local_files_only``.

    transformers does not pass ``local_files_only`` / ``cache_dir`` on to its ``adapter_config.json`` lookup, so with
    the hub unreachable every load from the cache would wait through that request's retries (about 25 s).
    """
    if kwargs.get("local_files_only") and "adapter_kwargs" not in kwargs:
        kwargs["adapter_kwargs"] = {k: kwargs[k] for k in ("local_files_only", "cache_dir") if k in kwargs}
    return AutoModelForCausalLM.from_pretrained(source, **kwargs)


def hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The :data:`HUB_KWARGS` among ``kwargs`` (what decides where the files are read)."""
    return {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
