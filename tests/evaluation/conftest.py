"""Fixtures of the evaluation tests: the three-example data files and an isolated cache."""

from __future__ import annotations

from pathlib import Path

import pytest

EVAL_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "eval"


@pytest.fixture
def eval_env(tmp_path, monkeypatch) -> Path:
    """A temporary ``$GMSA_CACHE`` (tiktoken's cache goes under it too); returns the work directory."""
    monkeypatch.setenv("GMSA_CACHE", str(tmp_path / "gmsa-cache"))
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    return tmp_path


@pytest.fixture
def qa_data() -> Path:
    return EVAL_FIXTURES / "qa.jsonl"


@pytest.fixture
def ae_data() -> Path:
    return EVAL_FIXTURES / "ae.jsonl"
