"""resolve_model_source(): how a model reference becomes from_pretrained arguments, and its file checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from lit_prune.loading import resolve_model_source


def test_resolve_model_source_gguf(tmp_path: Path) -> None:
    gguf = tmp_path / "model.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_source(str(gguf)) == (str(tmp_path), "model.Q8_0.gguf")
    assert resolve_model_source(str(tmp_path), "model.Q8_0.gguf") == (str(tmp_path), "model.Q8_0.gguf")
    assert resolve_model_source("org/some-model") == ("org/some-model", None)  # a hub id is kept as is


def test_resolve_model_source_misconfiguration(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"GGUF file 'missing\.gguf' not found in '.*'"):
        resolve_model_source(str(tmp_path), gguf_file="missing.gguf")
    with pytest.raises(FileNotFoundError, match=r"GGUF file '.*nope\.gguf' does not exist"):
        resolve_model_source(str(tmp_path / "nope.gguf"))
