"""`camex-train-tokenizer` and `camex-preprocess` (camex_ds.cli.tokenizer, camex_ds.cli.preprocess) as their
tools/*.py wrappers: help, one-line errors with exit 2, and a tokenizer trained then used to preprocess."""
from __future__ import annotations

import subprocess
import sys

import pytest

from camex_ds.data import TokenDataset
from tests.unit.data.corpora import REPO, VOCAB, corpus  # noqa: F401 (fixtures)


def run_tool(*args, cwd=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("tool", ["tools/train_tokenizer.py", "tools/preprocess_data.py"])
def test_cli_help(tool):
    result = run_tool(str(REPO / tool), "--help")
    assert result.returncode == 0 and "--data PATH" in result.stdout and "hf:NAME" in result.stdout


def test_cli_errors_exit_2_with_one_line(tmp_path):
    for tool in ("tools/train_tokenizer.py", "tools/preprocess_data.py"):
        result = run_tool(str(REPO / tool), "--data", str(tmp_path / "missing"), "--no_progress", cwd=tmp_path)
        assert result.returncode == 2
        missing = tmp_path / "missing"
        assert result.stderr == f"error: data path '{missing}' does not exist (a hub dataset is written hf:NAME)\n"


def test_cli_train_then_preprocess(corpus, tmp_path):
    result = run_tool(str(REPO / "tools/train_tokenizer.py"), "--data", str(corpus), "--vocab_size", str(VOCAB),
                      "--output", str(tmp_path / "tok"), "--no_progress")
    assert result.returncode == 0, result.stderr
    result = run_tool(str(REPO / "tools/preprocess_data.py"), "--data", str(corpus), "--tokenizer",
                      str(tmp_path / "tok.model"), "--output", str(tmp_path / "data"), "--no_progress")
    assert result.returncode == 0, result.stderr
    assert "validation" in result.stdout
    assert TokenDataset(tmp_path / "data", "validation").num_tokens > 0
