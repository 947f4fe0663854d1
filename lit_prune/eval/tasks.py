"""Local lm-eval task definitions for the zero-shot suite, read from the shared benchmark files (no network).

Each task is an lm-eval ``TaskConfig`` built as a Python dict. The documents are converted to the fields of the
Hugging Face dataset that lm-eval's own YAML reads, and the prompt, choices, target and metrics are copied from
that YAML (lm-eval 0.4.13), so the scores follow lm-eval's definitions:

- ``piqa``: ``piqa/dev.jsonl`` + ``piqa/dev-labels.lst`` (1,838). Same as lm-eval ``piqa``.
- ``hellaswag``: ``hellaswag/hellaswag_val_full.txt.bz2`` (10,042; 6 lines per item). The file holds
  ``activity_label + ": " + ctx`` with ``[header]``, ``[step]``, ``[substeps]`` removed and ``" [title]"`` turned
  into ``". "``. lm-eval's ``preprocess`` is applied again (drops any other ``[...]``, collapses double spaces).
  **Deviation:** lm-eval builds the query as ``ctx_a + " " + ctx_b.capitalize()``; the file only has ``ctx``, so
  the text after the last ``". "`` is capitalized when it starts with a lowercase letter (the ActivityNet
  ``ctx_b`` fragment). Checked against the original-JSON sample ``hellaswag_val_sample1000.jsonl``: the
  resulting query equals lm-eval's for 1,000/1,000 sample items. **Deviation 2:** lm-eval strips an ending
  *before* removing ``[step]``, so endings that began with ``[step]`` keep a leading space (scored as
  ``"  text"`` after the ``" "`` delimiter); the file's endings are already stripped, so here they are scored as
  ``" text"``. This hits 59 of the 1,000 sample items (WikiHow ones); the endings are otherwise equal.
- ``hellaswag_sample1000``: ``hellaswag/hellaswag_val_sample1000.jsonl``, 1,000 validation items in the original
  JSON, processed with lm-eval's ``process_docs`` exactly (no deviation). The sample is **not uniform** (829
  in-domain / 171 zero-shot, only 87 WikiHow), so use ``hellaswag`` for reported accuracy and this one to check
  agreement with stock lm-eval.
- ``winogrande``: ``winogrande/winogrande_dev_llmfoundry.jsonl`` (1,267, WinoGrande 1.1 xl dev). lm-eval's
  partial scoring: the choices are the two contexts ``sentence[:blank] + option``, the continuation is the text
  after the blank, gold is ``answer - 1`` (= ``gold`` in the file). acc only, as lm-eval.
- ``arc_easy`` / ``arc_challenge``: ``arc/ARC-{Easy,Challenge}-Test.jsonl`` (2,376 / 1,172), the test split
  lm-eval uses; ``answerKey`` is looked up in the choice labels (A-E or 1-5).
- ``boolq``: ``boolq/val.jsonl`` (3,270, SuperGLUE layout, passage ``"Title -- text"`` as in ``super_glue``);
  the string label ``"true"``/``"false"`` becomes 1/0, choices ``["no", "yes"]``. acc only, as lm-eval.
- ``openbookqa``: ``openbookqa/test.tsv`` (500, the original release). lm-eval prompts with ``question_stem``;
  the TSV's ``Question Stem`` column is exactly that, and the ``(A) .. (B) ..`` choices are split on the labels.
"""

from __future__ import annotations

import bz2
import csv
import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lit_prune.presets import data_root

if TYPE_CHECKING:
    import datasets

Doc = dict[str, Any]

_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}


# ----------------------------------------------------------------------------------------------------- readers
def _read_jsonl(path: Path, limit: int | None) -> list[Doc]:
    rows: list[Doc] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                rows.append(json.loads(line))
    return rows


def _piqa(files: list[Path], limit: int | None) -> list[Doc]:
    rows = _read_jsonl(files[0], limit)
    labels = [int(x) for x in files[1].read_text().split()]
    if len(labels) < len(rows):
        raise ValueError(f"{files[1]} has {len(labels)} labels but {files[0]} has at least {len(rows)} items")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": lab} for r, lab in zip(rows, labels)]


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag ``preprocess`` (``lm_eval/tasks/hellaswag/utils.py``), copied verbatim."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_query(line: str) -> str:
    """lm-eval's query from the full file's ``activity_label: ctx`` line (see the module docstring)."""
    line = hellaswag_preprocess(line)
    label, sep, ctx = line.partition(": ")
    head, dot, tail = ctx.rpartition(". ")
    if tail[:1].islower():  # the ActivityNet ctx_b fragment, which lm-eval capitalizes
        tail = tail.capitalize()
    return hellaswag_preprocess(label + sep + head + dot + tail)


def _hellaswag(files: list[Path], limit: int | None) -> list[Doc]:
    docs: list[Doc] = []
    with bz2.open(files[0], "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{files[0]} should hold 6 lines per item, got {len(lines)} lines")
    for i in range(0, len(lines), 6):
        if limit is not None and len(docs) >= limit:
            break
        query, label, *endings = lines[i : i + 6]
        choices = [hellaswag_preprocess(e) for e in endings]
        docs.append({"query": hellaswag_query(query), "choices": choices, "label": int(label), "gold": int(label)})
    return docs


def _hellaswag_json(files: list[Path], limit: int | None) -> list[Doc]:
    docs: list[Doc] = []
    for r in _read_jsonl(files[0], limit):  # lm-eval's ``process_docs``, verbatim
        query = hellaswag_preprocess(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
        choices = [hellaswag_preprocess(e) for e in r["endings"]]
        docs.append({"query": query, "choices": choices, "label": int(r["label"]), "gold": int(r["label"])})
    return docs


def _winogrande(files: list[Path], limit: int | None) -> list[Doc]:
    return [
        {"context_options": r["context_options"], "continuation": r["continuation"], "gold": int(r["gold"])}
        for r in _read_jsonl(files[0], limit)
    ]


def _arc(files: list[Path], limit: int | None) -> list[Doc]:
    docs: list[Doc] = []
    for r in _read_jsonl(files[0], limit):
        choices = r["question"]["choices"]
        docs.append(
            {
                "id": r["id"],
                "question": r["question"]["stem"],
                "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
                "answerKey": r["answerKey"],
            }
        )
    return docs


def _boolq(files: list[Path], limit: int | None) -> list[Doc]:
    docs: list[Doc] = []
    for r in _read_jsonl(files[0], limit):
        label = r["label"]
        if isinstance(label, str):
            if label.lower() not in ("true", "false"):
                raise ValueError(f"BoolQ `label` must be 'true' or 'false', got {label!r} in {files[0]}")
            label = label.lower() == "true"
        docs.append({"question": r["question"], "passage": r["passage"], "idx": r.get("idx"), "label": int(label)})
    return docs


_OBQA_CHOICE = re.compile(r"\(([A-Z])\)\s*")


def _openbookqa(files: list[Path], limit: int | None) -> list[Doc]:
    docs: list[Doc] = []
    with files[0].open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if limit is not None and len(docs) >= limit:
                break
            parts = _OBQA_CHOICE.split(row["Choices"].strip())  # ["", "A", "text ", "B", "text ", ...]
            labels, texts = parts[1::2], [t.strip() for t in parts[2::2]]
            docs.append(
                {
                    "id": row["ID"],
                    "question_stem": row["Question Stem"],
                    "choices": {"text": texts, "label": labels},
                    "answerKey": row["Answer Key"].strip(),
                }
            )
    return docs


# ------------------------------------------------------------------------------------------ winogrande hooks
def _winogrande_text(doc: Doc) -> int:
    return int(doc["gold"])  # lm-eval: the answer index; the contexts are the choices


def _winogrande_target(doc: Doc) -> str:
    return str(doc["continuation"])


def _winogrande_choice(doc: Doc) -> list[str]:
    return list(doc["context_options"])


# ---------------------------------------------------------------------------------------------------- registry
# name -> (files relative to the data root, reader, lm-eval config fields copied from lm-eval's YAML)
_TASKS: dict[str, tuple[tuple[str, ...], Callable[[list[Path], int | None], list[Doc]], dict[str, Any]]] = {
    "piqa": (
        ("piqa/dev.jsonl", "piqa/dev-labels.lst"),
        _piqa,
        {
            "doc_to_text": "Question: {{goal}}\nAnswer:",
            "doc_to_target": "label",
            "doc_to_choice": "{{[sol1, sol2]}}",
            "metric_list": [_ACC, _ACC_NORM],
        },
    ),
    "hellaswag": (
        ("hellaswag/hellaswag_val_full.txt.bz2",),
        _hellaswag,
        {
            "doc_to_text": "{{query}}",
            "doc_to_target": "{{label}}",
            "doc_to_choice": "choices",
            "metric_list": [_ACC, _ACC_NORM],
        },
    ),
    "hellaswag_sample1000": (
        ("hellaswag/hellaswag_val_sample1000.jsonl",),
        _hellaswag_json,
        {
            "doc_to_text": "{{query}}",
            "doc_to_target": "{{label}}",
            "doc_to_choice": "choices",
            "metric_list": [_ACC, _ACC_NORM],
        },
    ),
    "winogrande": (
        ("winogrande/winogrande_dev_llmfoundry.jsonl",),
        _winogrande,
        {
            "doc_to_text": _winogrande_text,
            "doc_to_target": _winogrande_target,
            "doc_to_choice": _winogrande_choice,
            "metric_list": [_ACC],
        },
    ),
    "arc_easy": (
        ("arc/ARC-Easy-Test.jsonl",),
        _arc,
        {
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_target": "{{choices.label.index(answerKey)}}",
            "doc_to_choice": "{{choices.text}}",
            "metric_list": [_ACC, _ACC_NORM],
        },
    ),
    "arc_challenge": (
        ("arc/ARC-Challenge-Test.jsonl",),
        _arc,
        {
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_target": "{{choices.label.index(answerKey)}}",
            "doc_to_choice": "{{choices.text}}",
            "metric_list": [_ACC, _ACC_NORM],
        },
    ),
    "boolq": (
        ("boolq/val.jsonl",),
        _boolq,
        {
            "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
            "doc_to_target": "label",
            "doc_to_choice": ["no", "yes"],
            "metric_list": [_ACC],
        },
    ),
    "openbookqa": (
        ("openbookqa/test.tsv",),
        _openbookqa,
        {
            "doc_to_text": "question_stem",
            "doc_to_target": "{{choices.label.index(answerKey.lstrip())}}",
            "doc_to_choice": "{{choices.text}}",
            "metric_list": [_ACC, _ACC_NORM],
        },
    ),
}

LOCAL_TASKS: tuple[str, ...] = tuple(sorted(_TASKS))
"""Names of the tasks defined here, read from local files."""


def task_files(name: str, data_dir: str | Path | None = None) -> list[Path]:
    """Paths of the local files behind task ``name``.

    Args:
        name: one of :data:`LOCAL_TASKS`.
        data_dir: the shared data folder; None uses :func:`lit_prune.presets.data_root`.

    Raises:
        ValueError: if ``name`` is not a local task.
        FileNotFoundError: if no data folder is found or a file is missing.
    """
    if name not in _TASKS:
        raise ValueError(f"`name` must be one of {list(LOCAL_TASKS)}, got {name!r}")
    root = Path(data_dir) if data_dir is not None else data_root()
    if root is None:
        raise FileNotFoundError(
            f"No shared data folder for task {name!r}: pass `data_dir` or set $LIT_PRUNE_DATA_DIR "
            "(expected ../shared/data next to the checkout)"
        )
    paths = [root / rel for rel in _TASKS[name][0]]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"Task {name!r} needs {path}, which does not exist: pass `data_dir` or set $LIT_PRUNE_DATA_DIR"
            )
    return paths


def load_docs(name: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Doc]:
    """The documents of local task ``name`` in the fields lm-eval's task YAML reads (the first ``limit``)."""
    files = task_files(name, data_dir)
    docs = _TASKS[name][1](files, limit)
    if not docs:
        raise ValueError(f"Task {name!r}: no items read from {[str(p) for p in files]}")
    return docs


def _dataset(docs: list[Doc], **_: Any) -> datasets.DatasetDict:
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def task_config(name: str, data_dir: str | Path | None = None, limit: int | None = None) -> dict[str, Any]:
    """An lm-eval ``TaskConfig`` dict for local task ``name``, with the documents loaded in memory.

    Args:
        name: one of :data:`LOCAL_TASKS`.
        data_dir: the shared data folder; None uses :func:`lit_prune.presets.data_root`.
        limit: read only the first ``limit`` items (None: all).

    Returns:
        A dict for ``lm_eval.api.task.ConfigurableTask(config=...)`` (zero-shot, ``test`` split).
    """
    docs = load_docs(name, data_dir, limit)
    return {
        "task": name,
        "dataset_path": "json",  # unused: ``custom_dataset`` supplies the data
        "custom_dataset": functools.partial(_dataset, docs),
        "test_split": "test",
        "output_type": "multiple_choice",
        "num_fewshot": 0,
        "metadata": {"version": 1.0, "source": "lit_prune.eval.tasks"},
        **_TASKS[name][2],
    }
