"""Zero-shot lm-eval on local task files: every task end to end on a tiny LLaMA, references and errors."""

from __future__ import annotations

import bz2
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from lit_prune.eval import ZeroShotResult, zero_shot
from lit_prune.eval.tasks import LOCAL_TASKS, hellaswag_query, load_docs

N_ITEMS = 6  # written per task; the tests score the first 5
LIMIT = 5
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "pruning",
    "removes",
    "blocks",
    "heads",
    "and",
    "neurons",
    "from",
    "a",
    "language",
    "model",
]


def _text(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(n))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_data(root: Path) -> Path:
    """Small files in the exact layouts of the shared benchmark folder (see shared/data/SOURCES.md)."""
    rng = range(N_ITEMS)
    _write_jsonl(
        root / "piqa/dev.jsonl",
        [{"id": f"p{i}", "goal": _text(i, 5) + "?", "sol1": _text(i + 1, 4), "sol2": _text(i + 2, 6)} for i in rng],
    )
    (root / "piqa/dev-labels.lst").write_text("".join(f"{i % 2}\n" for i in rng))

    lines = []
    for i in rng:
        lines += [f"Activity {i}: {_text(i, 6)}. {_text(i + 1, 2)}", str(i % 4)]
        lines += [_text(i + k, 3 + k) + "." for k in range(4)]
    (root / "hellaswag").mkdir()
    with bz2.open(root / "hellaswag/hellaswag_val_full.txt.bz2", "wt") as f:
        f.write("\n".join(lines) + "\n")

    endings = [[_text(i + k, 2 + k) for k in range(4)] for i in rng]
    endings[0][1] = "[step] " + endings[0][1]
    _write_jsonl(
        root / "hellaswag/hellaswag_val_sample1000.jsonl",
        [
            {
                "ind": i,
                "activity_label": f"Act {i}",
                "ctx_a": _text(i, 5) + ".",
                "ctx_b": "the fox",
                "ctx": "",
                "split": "val",
                "split_type": "indomain",
                "label": str(i % 4),
                "endings": endings[i],
                "source_id": "x",
            }
            for i in rng
        ],
    )
    _write_jsonl(
        root / "winogrande/winogrande_dev_llmfoundry.jsonl",
        [
            {
                "context_options": [f"{_text(i, 5)} fox", f"{_text(i, 5)} dog"],
                "continuation": _text(i + 4, 4) + ".",
                "gold": i % 2,
            }
            for i in rng
        ],
    )
    for name in ("Easy", "Challenge"):
        rows = []
        for i in rng:
            labels = ["1", "2", "3", "4"] if i == 2 else ["A", "B", "C", "D"]  # NYSEDREGENTS-style numeric keys
            choices = [{"text": _text(i + k, 2 + k), "label": lab} for k, lab in enumerate(labels)]
            rows.append(
                {"id": f"a{i}", "question": {"stem": _text(i, 7) + "?", "choices": choices}, "answerKey": labels[i % 4]}
            )
        _write_jsonl(root / f"arc/ARC-{name}-Test.jsonl", rows)
    _write_jsonl(
        root / "boolq/val.jsonl",
        [
            {
                "question": _text(i, 5),
                "passage": f"Title -- {_text(i + 2, 9)}",
                "idx": i,
                "label": ["true", "false"][i % 2],
            }
            for i in rng
        ],
    )
    (root / "openbookqa").mkdir()
    tsv = ["ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key"]
    for i in rng:
        stem, opts = _text(i, 6), [_text(i + k, 2) for k in range(4)]
        choices = " ".join(f"({lab}) {opt}" for lab, opt in zip("ABCD", opts))
        tsv.append(f"{i}\t{stem}\t{choices}\t{stem} {choices}\t{'ABCD'[i % 4]}")
    (root / "openbookqa/test.tsv").write_text("\n".join(tsv) + "\n")
    return root


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return _write_data(tmp_path / "data")


def _loglikelihood(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, context: str, continuation: str) -> float:
    """Sum of the continuation's token log-probs, tokenized the way lm-eval's causal HFLM does."""
    ctx_ids = tok.encode(context)
    whole = tok.encode(context + continuation)
    cont_ids = whole[len(ctx_ids) :]
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].float()  # (T, V)
    logprobs = torch.log_softmax(logits, dim=-1)
    start = len(whole) - len(cont_ids)
    return sum(float(logprobs[start - 1 + k, t]) for k, t in enumerate(cont_ids))


def _reference(
    model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, items: list[tuple[list[tuple[str, str]], list[str], int]]
) -> tuple[float, float]:
    """acc and acc_norm: argmax of summed log-likelihoods, and of those divided by the choice's length in chars."""
    acc = norm = 0.0
    for pairs, choices, gold in items:
        lls = [_loglikelihood(model, tok, ctx, cont) for ctx, cont in pairs]
        acc += float(max(range(len(lls)), key=lambda k: lls[k]) == gold)
        norm += float(max(range(len(lls)), key=lambda k: lls[k] / len(choices[k])) == gold)
    return acc / len(items), norm / len(items)


@pytest.mark.parametrize("task", LOCAL_TASKS)
def test_zero_shot_each_local_task(
    task: str, data_dir: Path, tiny_model: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    tiny_model.train()
    result = zero_shot(tiny_model, tiny_tokenizer, tasks=[task], limit=LIMIT, batch_size=4, data_dir=data_dir)
    assert isinstance(result, ZeroShotResult)
    assert result.n_items == {task: LIMIT}
    assert 0.0 <= result.acc[task] <= 1.0
    assert result.avg == result.acc[task]
    assert (task in result.acc_norm) == (task not in ("winogrande", "boolq"))  # as in lm-eval
    assert tiny_model.training  # mode restored


def test_zero_shot_matches_reference(
    data_dir: Path, tiny_model: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    result = zero_shot(
        tiny_model, tiny_tokenizer, tasks=("piqa", "winogrande", "arc_easy"), limit=LIMIT, data_dir=data_dir
    )
    piqa = [
        (
            [(f"Question: {d['goal']}\nAnswer:", " " + s) for s in (d["sol1"], d["sol2"])],
            [d["sol1"], d["sol2"]],
            d["label"],
        )
        for d in load_docs("piqa", data_dir, LIMIT)
    ]
    wino = [
        ([(ctx, " " + d["continuation"]) for ctx in d["context_options"]], d["context_options"], d["gold"])
        for d in load_docs("winogrande", data_dir, LIMIT)
    ]
    arc = [
        (
            [(f"Question: {d['question']}\nAnswer:", " " + t) for t in d["choices"]["text"]],
            d["choices"]["text"],
            d["choices"]["label"].index(d["answerKey"]),
        )
        for d in load_docs("arc_easy", data_dir, LIMIT)
    ]
    acc, norm = _reference(tiny_model, tiny_tokenizer, piqa)
    assert result.acc["piqa"] == pytest.approx(acc)
    assert result.acc_norm["piqa"] == pytest.approx(norm)
    assert result.acc["winogrande"] == pytest.approx(_reference(tiny_model, tiny_tokenizer, wino)[0])
    acc, norm = _reference(tiny_model, tiny_tokenizer, arc)
    assert result.acc["arc_easy"] == pytest.approx(acc)
    assert result.acc_norm["arc_easy"] == pytest.approx(norm)
    assert result.avg == pytest.approx(sum(result.acc.values()) / 3)


def test_local_docs_follow_lm_eval_fields(data_dir: Path) -> None:
    arc = load_docs("arc_challenge", data_dir)
    assert len(arc) == N_ITEMS
    assert arc[2]["choices"]["label"] == ["1", "2", "3", "4"] and arc[2]["answerKey"] == "3"
    boolq = load_docs("boolq", data_dir, 2)
    assert [d["label"] for d in boolq] == [1, 0]
    obqa = load_docs("openbookqa", data_dir, 1)[0]
    assert obqa["choices"] == {"text": [_text(k, 2) for k in range(4)], "label": list("ABCD")}
    assert obqa["question_stem"] == _text(0, 6) and obqa["answerKey"] == "A"
    sample = load_docs("hellaswag_sample1000", data_dir, 1)[0]
    assert sample["query"] == f"Act 0: {_text(0, 5)}. The fox"
    assert sample["choices"][1] == " " + _text(1, 3)  # lm-eval strips before removing [step]
    hs = load_docs("hellaswag", data_dir, 1)[0]
    assert hs["label"] == 0 and len(hs["choices"]) == 4
    # lm-eval capitalizes ctx_b, removes [...] and collapses double spaces
    assert hellaswag_query("Pole vault: A man runs. a few women") == "Pole vault: A man runs. A few women"
    assert hellaswag_query("Home: How to [foo] x  y.") == "Home: How to x y."


def test_zero_shot_wrappers(
    data_dir: Path, tiny_model: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    """A module holding the model in ``.model`` and a PEFT wrapper give the plain model's scores."""
    peft = pytest.importorskip("peft")
    plain = zero_shot(tiny_model, tiny_tokenizer, tasks=["piqa"], limit=LIMIT, data_dir=data_dir)

    holder = torch.nn.Module()
    holder.model = tiny_model
    assert zero_shot(holder, tiny_tokenizer, tasks=["piqa"], limit=LIMIT, data_dir=data_dir).acc == plain.acc

    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=True)  # B = 0: same model
    wrapped = peft.get_peft_model(tiny_model, config)
    wrapped.train()
    assert zero_shot(wrapped, tiny_tokenizer, tasks=["piqa"], limit=LIMIT, data_dir=data_dir).acc == plain.acc
    assert wrapped.training


class _StubTaskManager:
    all_tasks = ["lambada_openai"]


def test_zero_shot_misconfiguration(
    data_dir: Path,
    tmp_path: Path,
    tiny_model: LlamaForCausalLM,
    tiny_tokenizer: PreTrainedTokenizerFast,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lm_eval.tasks

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", _StubTaskManager)
    with pytest.raises(ValueError, match=r"local tasks \['arc_challenge'.*got unknown \['nope'\]"):
        zero_shot(tiny_model, tiny_tokenizer, tasks=["piqa", "nope"], data_dir=data_dir)
    with pytest.raises(ValueError, match="`tasks` must name at least one task"):
        zero_shot(tiny_model, tiny_tokenizer, tasks=[], data_dir=data_dir)
    with pytest.raises(ValueError, match="`limit` must be a positive integer"):
        zero_shot(tiny_model, tiny_tokenizer, tasks=["piqa"], limit=0, data_dir=data_dir)
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        zero_shot(tiny_model, tiny_tokenizer, tasks=["piqa"], batch_size=0, data_dir=data_dir)
    with pytest.raises(TypeError, match="`model` must be a Hugging Face causal LM"):
        zero_shot(torch.nn.Linear(2, 2), tiny_tokenizer, tasks=["piqa"], limit=1, data_dir=data_dir)
    with pytest.raises(ValueError, match="`name` must be one of"):
        load_docs("nope", data_dir)

    missing = tmp_path / "empty"
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match=r"boolq/val\.jsonl.*LIT_PRUNE_DATA_DIR"):
        zero_shot(tiny_model, tiny_tokenizer, tasks=["boolq"], data_dir=missing)
    monkeypatch.setenv("LIT_PRUNE_DATA_DIR", str(missing))
    with pytest.raises(FileNotFoundError, match=r"piqa/dev\.jsonl.*LIT_PRUNE_DATA_DIR"):
        zero_shot(tiny_model, tiny_tokenizer, tasks=["piqa"])
    (data_dir / "boolq/val.jsonl").write_text(json.dumps({"question": "q", "passage": "p", "label": "maybe"}) + "\n")
    with pytest.raises(ValueError, match="BoolQ `label` must be 'true' or 'false', got 'maybe'"):
        load_docs("boolq", data_dir)


def test_zero_shot_eval_callback_scores_the_pruned_model_and_logs(
    data_dir: Path, tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    import lightning.pytorch as pl
    from conftest import tiny_config
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from lit_prune import CausalLMModule
    from lit_prune.callbacks import DepthPruning, ZeroShotEval

    torch.manual_seed(0)
    module = CausalLMModule(model=LlamaForCausalLM(tiny_config()), tokenizer=tiny_tokenizer)
    windows = [{"input_ids": w} for w in torch.randint(4, 200, (8, 16), generator=torch.Generator().manual_seed(0))]
    start = ZeroShotEval(
        tasks=["piqa", "arc_easy"], limit=LIMIT, batch_size=4, data_dir=str(data_dir), when="fit_start", verbose=0
    )
    end = ZeroShotEval(tasks=["piqa"], limit=LIMIT, batch_size=4, data_dir=str(data_dir), verbose=0)
    depth = DepthPruning(num_layers=1, calibration=DataLoader(windows, batch_size=4), verbose=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=CSVLogger(tmp_path),
        callbacks=[depth, start, end],
    )
    trainer.fit(module, train_dataloaders=DataLoader(windows, batch_size=4))
    (after_pruning,) = start.results
    pruned_then = zero_shot(module.model, tiny_tokenizer, ["piqa"], limit=LIMIT, batch_size=4, data_dir=data_dir)
    (at_end,) = end.results
    assert at_end.acc == pruned_then.acc  # the end-of-fit score is the trained, pruned model's
    assert set(after_pruning.acc) == {"piqa", "arc_easy"} and after_pruning.n_items == {"piqa": 5, "arc_easy": 5}
    metrics = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"zeroshot/piqa/acc", "zeroshot/arc_easy/acc_norm", "zeroshot/avg_acc"} <= set(metrics)


def test_zero_shot_eval_callback_misconfiguration() -> None:
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lit_prune.callbacks import ZeroShotEval

    with pytest.raises(MisconfigurationException, match="`tasks` must be a non-empty list"):
        ZeroShotEval(tasks="piqa")
    with pytest.raises(MisconfigurationException, match="`limit` must be None or an int >= 1, got 0"):
        ZeroShotEval(limit=0)
    with pytest.raises(MisconfigurationException, match="`batch_size` must be an int >= 1"):
        ZeroShotEval(batch_size=0)
    with pytest.raises(MisconfigurationException, match="`when` must be 'fit_start' or 'fit_end', got 'later'"):
        ZeroShotEval(when="later")  # type: ignore[arg-type]


def test_lit_prune_eval_tasks_and_limit(data_dir: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from lit_prune.cli import run_eval
    from lit_prune.eval import format_table

    summary = run_eval(
        [
            "--model.model",
            str(tiny_model_dir),
            "--eval.ppl",
            "false",
            "--eval.latency",
            "false",
            "--eval.data_dir",
            str(data_dir),
            "--tasks",
            "piqa, arc_easy",
            "--limit",
            "3",
            "--eval.progress",
            "false",
        ]
    )
    assert summary.zeroshot is not None and summary.zeroshot.n_items == {"piqa": 3, "arc_easy": 3}
    out = format_table([summary])  # what `lit-prune eval` prints (tests/test_cli.py checks the printing itself)
    assert "| piqa acc (acc_norm), % |" in out and "| zero-shot avg acc, % |" in out
    assert "items per task: piqa 3, arc_easy 3" in out
