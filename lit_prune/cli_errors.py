"""How ``lit-prune`` reports a failed command: one ``lit-prune <cmd>: error: <message>`` line first, then a hint.

jsonargparse reports a bad config as a nested message (every Union member it tried, the whole given value) after
~40 lines of usage. :func:`summarize_parser_error` keeps the one line that says what is wrong, where, and the
closest allowed name (``difflib.get_close_matches``): a misspelled argument, choice or class name.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import re
from collections.abc import Iterable
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException

LIBRARY_ERRORS: tuple[type[Exception], ...] = (MisconfigurationException, ValueError, FileNotFoundError)
"""The library's validation errors, reported as one line (``UnsupportedModelError`` is a ``ValueError``)."""


class CLIError(Exception):
    """A failure the CLI prints as ``lit-prune <cmd>: error: <message>`` (no traceback) and exits with ``code``.

    Args:
        message: the one line to print (may hold a second line with a hint).
        code: the exit status: 2 for a bad command line or config, 1 for a failure while running, 130 for SIGINT.
        detail: longer text shown only at ``--log-level debug`` (e.g. the parser's full message).
    """

    def __init__(self, message: str, code: int = 2, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.detail = detail


def innermost_error(err: BaseException) -> BaseException:
    """The deepest library error in ``err``'s ``__cause__`` chain, else ``err``.

    jsonargparse wraps a constructor's error in a ``ValueError`` that lists every Union member it tried.
    """
    found: BaseException = err
    cause = err.__cause__
    while cause is not None:
        if isinstance(cause, LIBRARY_ERRORS):
            found = cause
        cause = cause.__cause__
    return found


def close_match(word: str, choices: Iterable[str]) -> str | None:
    """The allowed name closest to ``word`` (``difflib`` ratio >= 0.75: a typo, not a different word), or None.

    Example:
        >>> close_match("consensu", ["bi", "angular", "consensus"])
        'consensus'
    """
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return matches[0] if matches else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest choice, or ``""``."""
    match = close_match(word, choices)
    return f"; did you mean {match!r}?" if match else ""


def _init_parameters(class_path: str) -> list[str]:
    """The constructor argument names of the class at ``class_path`` (empty if it cannot be imported)."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
        return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    except (ImportError, AttributeError, TypeError, ValueError):
        return []


def _module_classes(module_name: str) -> list[str]:
    """Public class names of ``module_name`` (empty if it cannot be imported)."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    return [name for name, value in vars(module).items() if inspect.isclass(value) and not name.startswith("_")]


def _short(class_path: str | None) -> str:
    return class_path.rpartition(".")[2] if class_path else ""


def _literal_choices(text: str) -> list[str]:
    try:
        values = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return [str(v) for v in (values if isinstance(values, tuple | list) else (values,))]


_CLASS_PATH = re.compile(r"Problem with given class_path '([\w.]+)':")
_PARSER_KEY = re.compile(r'Parser key "([\w.]+)":')
_NOT_ACCEPTED = re.compile(r"Option '([\w.]+)' is not accepted")
_GROUP = re.compile(r"Group '([\w.]+)' does not accept option '([\w.]+)'")
_LITERAL = re.compile(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)")
_EXPECTED = re.compile(r"Expected a <class '([\w.]+)'>\. Got value: (.*)")
_NO_ATTRIBUTE = re.compile(r"module '([\w.]+)' has no attribute '(\w+)'")
_UNRECOGNIZED = re.compile(r"Unrecognized arguments: (\S+)", re.IGNORECASE)
_GIVEN = re.compile(r"Given value: (.*)")
_SUBTYPES = re.compile(r"Subtypes: \[(.*)\]")
_LAST_ITEM_HINT = (
    " (`--trainer.callbacks.init_args.NAME VALUE` sets NAME on the last callback of the list; "
    "change an earlier one in the YAML)"
)
_BASE_CALLBACK = "lightning.Callback"  # jsonargparse also tries the list item as the base class: never the answer


def summarize_parser_error(message: str, options: Iterable[str] = ()) -> str:
    r"""One line for a jsonargparse error: what is wrong and where, with the closest allowed name.

    Args:
        message: the ``ArgumentError`` text jsonargparse raised.
        options: the parser's option names (``trainer.max_steps``, ...), for misspelled options.

    Returns:
        e.g. ``"DepthPruning (trainer.callbacks): `criterion` must be one of 'bi', ..., got 'consensu'; did you mean
        'consensus'?"``; the first line of ``message`` when no known pattern matches.

    Example:
        >>> summarize_parser_error('Parser key "model.dtype":\n  Expected a typing.Literal'
        ...                        "['float32', 'bfloat16']. Got value: flaot32")
        "model.dtype: must be one of 'float32', 'bfloat16', got 'flaot32'; did you mean 'float32'?"
    """
    options = list(options)
    lines = [line.strip().removeprefix("- ") for line in message.strip().splitlines()]
    top = _PARSER_KEY.match(lines[0]) if lines else None
    where = top.group(1) if top else None
    class_path: str | None = None
    key: str | None = None
    for i, line in enumerate(lines):
        if m := _CLASS_PATH.match(line):
            class_path = m.group(1)
            key = None
            continue
        if class_path == _BASE_CALLBACK:
            continue
        if m := _PARSER_KEY.match(line):
            key = m.group(1) if i else None
            continue
        owner = f"{_short(class_path)} ({where})" if class_path and where else (where or "")
        prefix = f"{owner}: " if owner else ""
        name = f"`{key}` " if key else ""
        if m := _GROUP.match(line):
            group, option = m.groups()
            known = [o[len(group) + 1 :] for o in options if o.startswith(group + ".")]
            return f"`{group}` has no option {option!r}{did_you_mean(option, known)}"
        if m := _NOT_ACCEPTED.match(line):
            option = m.group(1)
            if class_path:
                known = _init_parameters(class_path)
                last = _LAST_ITEM_HINT if "NestedArg(" in message and where == "trainer.callbacks" else ""
                at = f"{where}: " if where else ""
                return f"{at}{_short(class_path)} has no argument {option!r}{did_you_mean(option, known)}{last}"
            return f"unknown key {option!r}{did_you_mean(option, options)}"
        if m := _LITERAL.match(line):
            choices = _literal_choices(m.group(1))
            got = m.group(2)
            allowed = ", ".join(repr(c) for c in choices)
            return f"{prefix}{name}must be one of {allowed}, got {got!r}{did_you_mean(got, choices)}"
        if m := _EXPECTED.match(line):
            return f"{prefix}{name}must be {m.group(1)}, got {m.group(2)!r}"
        if m := _NO_ATTRIBUTE.match(line):
            module_name, missing = m.groups()
            hint = did_you_mean(missing, _module_classes(module_name))
            return f"{prefix}class_path {class_path or missing!r} not found: {module_name} has no {missing!r}{hint}"
        if key and (m := _SUBTYPES.match(line)):
            given = next((g.group(1) for g in map(_GIVEN.match, lines[i:]) if g), "?")
            types = m.group(1).replace("<class '", "").replace("'>", "").replace("NoneType", "None")
            return f"{prefix}{name}must be one of [{types}], got {given!r}"
        if m := _UNRECOGNIZED.match(line):
            word = m.group(1).split("=", 1)[0]
            flags = [f"--{o}" for o in options]
            return f"unrecognized argument {word!r}{did_you_mean(word, flags)}"
    return lines[0] if lines else message


def parser_options(parser: Any) -> list[str]:
    """The dotted option names of a jsonargparse parser and of its subcommand parsers (for close matches)."""
    names: list[str] = []
    for action in getattr(parser, "_actions", []):
        dest = getattr(action, "dest", None)
        if isinstance(dest, str) and dest not in ("help", "config", "print_config"):
            names.append(dest)
        for sub in getattr(action, "_name_parser_map", {}).values():
            names += parser_options(sub)
    return names
