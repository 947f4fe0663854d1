"""What a ``lit-prune`` run prints: lit-prune's lines at ``--log-level``, other libraries' only when they matter.

lit-prune's loggers (and its callbacks' ``rank_zero_info`` lines, which Lightning logs under its own name) are shown
from ``--log-level`` up (default ``info``). Lightning's own info lines (``GPU available``, ``Seed set to``, the
litlogger tip) and transformers' are shown only at ``debug``; their warnings always. transformers' loading progress
bars (``Loading weights``, the GGUF de-quantization bar) are hidden unless ``debug``. Everything is restored when
the run ends, so calling :func:`lit_prune.cli.main` in-process leaves the interpreter as it was.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from lit_prune.cli_errors import CLIError, did_you_mean

LOG_LEVELS = ("debug", "info", "warning", "error")
_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_OWN_HANDLER_LOGGERS = (
    "lightning",
    "lightning.pytorch",
    "lightning.fabric",
    "pytorch_lightning",
    "lightning_fabric",
    "transformers",
)
"""Loggers that print through their own handlers: for one CLI run their records go through lit-prune's instead."""


def pop_log_level(words: list[str]) -> tuple[list[str], str]:
    """Take ``--log-level LEVEL`` (or ``--log-level=LEVEL``) out of the command words, wherever it stands.

    Returns:
        The remaining words and the level (``"info"`` when not given; the last one wins).

    Raises:
        CLIError: if the level is missing or not one of :data:`LOG_LEVELS`.
    """
    rest: list[str] = []
    level = "info"
    it = iter(words)
    for word in it:
        if word == "--log-level":
            value = next(it, None)
        elif word.startswith("--log-level="):
            value = word.split("=", 1)[1]
        else:
            rest.append(word)
            continue
        if value is None or value.lower() not in LOG_LEVELS:
            raise CLIError(
                f"`--log-level` must be one of {', '.join(LOG_LEVELS)}, got {value!r}"
                f"{did_you_mean(str(value).lower(), LOG_LEVELS)}"
            )
        level = value.lower()
    return rest, level


class _Policy(logging.Filter):
    """Pass lit-prune's records from ``level`` up and other libraries' from WARNING up (INFO up at ``debug``)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name.startswith("lit_prune") or record.pathname.startswith(_PACKAGE_DIR)
        if ours:
            return record.levelno >= self.level
        return record.levelno >= (logging.INFO if self.level <= logging.DEBUG else max(self.level, logging.WARNING))


class _Formatter(logging.Formatter):
    """Info lines as the bare message, ``warning: ...`` / ``error: ...`` above; level and logger name at debug."""

    def __init__(self, debug: bool) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s" if debug else "%(message)s")
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).strip("\n")
        if not self.debug and record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        return text


def _format_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    return f"warning: {message}\n"


@contextlib.contextmanager
def cli_logging(level: str = "info") -> Iterator[None]:
    """Route lit-prune's, Lightning's and transformers' output through one stderr handler for one CLI run.

    Args:
        level: one of :data:`LOG_LEVELS`, for lit-prune's loggers.
    """
    import transformers

    numeric = getattr(logging, level.upper())
    debug = numeric <= logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Policy(numeric))
    handler.setFormatter(_Formatter(debug))
    root = logging.getLogger()
    own = logging.getLogger("lit_prune")
    saved_root, saved_own = root.level, own.level
    saved = {name: logging.getLogger(name) for name in _OWN_HANDLER_LOGGERS}
    saved_state = {name: (lg.handlers[:], lg.propagate, lg.level) for name, lg in saved.items()}
    hf_verbosity = transformers.logging.get_verbosity()
    hf_bars = transformers.utils.logging.is_progress_bar_enabled()
    saved_format = warnings.formatwarning
    gguf = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf is None:
        with contextlib.suppress(ImportError):
            import transformers.modeling_gguf_pytorch_utils as gguf
    saved_tqdm = getattr(gguf, "tqdm", None)
    try:
        root.addHandler(handler)
        root.setLevel(logging.DEBUG if debug else logging.INFO)
        own.setLevel(numeric)
        for lg in saved.values():  # Lightning and transformers install their own handlers; use ours instead
            for h in lg.handlers[:]:
                lg.removeHandler(h)
            lg.propagate = True
            lg.setLevel(logging.DEBUG if debug else logging.INFO)  # our callbacks' rank_zero_info lines use them
        transformers.logging.set_verbosity(logging.INFO if debug else logging.WARNING)
        if not debug:
            transformers.utils.logging.disable_progress_bar()
            warnings.formatwarning = _format_warning
            if saved_tqdm is not None:  # the GGUF loader uses tqdm.auto directly, not transformers' switch
                gguf.tqdm = functools.partial(saved_tqdm, disable=True)  # type: ignore[union-attr]
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_root)
        own.setLevel(saved_own)
        for name, lg in saved.items():
            handlers, propagate, lvl = saved_state[name]
            for h in handlers:
                lg.addHandler(h)
            lg.propagate, lg.level = propagate, lvl
        transformers.logging.set_verbosity(hf_verbosity)
        if hf_bars:
            transformers.utils.logging.enable_progress_bar()
        warnings.formatwarning = saved_format
        if saved_tqdm is not None:
            gguf.tqdm = saved_tqdm  # type: ignore[union-attr]
