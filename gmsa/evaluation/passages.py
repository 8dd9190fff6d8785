"""Real text of an exact token count, for timing runs (``gmsa bench`` and ``benchmarks/``)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

DEFAULT_TEXT = Path("data/ae/test.jsonl")
SHIPPED_TEXT = Path(__file__).parents[1] / "assets" / "demo.json"


def read_passages(path: Path | None) -> tuple[list[str], str]:
    """Passages of real text and where they came from.

    ``path`` may be a JSONL file (``text`` or ``context`` fields) or a plain text file. Without
    one: ``data/ae/test.jsonl`` if present, else the shipped demo passage, else the docstrings
    of Python's standard library.
    """
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"no such text file: {path}")
    for candidate in [path] if path is not None else [DEFAULT_TEXT, SHIPPED_TEXT]:
        passages = [p for p in _passages_in(candidate) if p.strip()] if candidate.is_file() else []
        if passages:
            return passages, str(candidate)
    if path is not None:
        raise ValueError(f"{path} holds no text")
    modules = ("argparse", "json", "pathlib", "statistics", "threading", "typing")
    return [importlib.import_module(name).__doc__ or "" for name in modules], "Python standard library docstrings"


def _passages_in(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [str(row.get("text") or row.get("context") or "") for row in rows]
    if path.suffix == ".json":
        return [str(json.loads(text).get("text", ""))]
    return [text]


def exact_length_text(tokenizer, passages: list[str], n_tokens: int) -> tuple[str, bool]:
    """A text of exactly ``n_tokens`` tokens: the passages joined in order (cycled if too short).

    Returns the text and whether the passages had to be repeated.
    """
    joined, repeated = "", False
    while True:
        for passage in passages:
            joined += passage + "\n\n"
            ids = tokenizer(joined, add_special_tokens=False, verbose=False)["input_ids"]
            if len(ids) >= n_tokens + 8:
                return _cut_to_tokens(tokenizer, ids, n_tokens), repeated
        repeated = True


def _cut_to_tokens(tokenizer, ids: list[int], n_tokens: int) -> str:
    """Decode a prefix of ``ids`` whose re-tokenisation has exactly ``n_tokens`` tokens."""
    for take in [n_tokens + d for d in (0, -1, 1, -2, 2, -3, 3, -4, 4)]:
        text = tokenizer.decode(ids[:take])
        if len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) == n_tokens:
            return text
    raise ValueError(f"cannot cut the text to exactly {n_tokens} tokens")
