"""Seeded by-document splits and passage cutting."""

from __future__ import annotations

import random
from collections import Counter

from gmsa.data.split import assign_split, cut_passages, draw_target


def words(text: str) -> int:
    """Whitespace token counter standing in for a real tokenizer."""
    return len(text.split())


def test_assign_split_is_deterministic_and_seeded() -> None:
    ids = [f"doc/{i}" for i in range(2000)]
    a = [assign_split(d, seed=0) for d in ids]
    assert a == [assign_split(d, seed=0) for d in ids]
    assert a != [assign_split(d, seed=1) for d in ids]
    counts = Counter(a)
    assert 1700 < counts["train"] < 1900 and 50 < counts["val"] < 150 and 50 < counts["test"] < 150


def test_assign_split_forced_test() -> None:
    ids = [f"doc/{i}" for i in range(100)]
    assert all(assign_split(d, 0, forced_test=set(ids)) == "test" for d in ids)


def test_draw_target_range_and_shape() -> None:
    rng = random.Random(0)
    t = [draw_target(rng, 32, 512) for _ in range(4000)]
    assert min(t) >= 32 and max(t) <= 512
    short = sum(x <= 128 for x in t) / len(t)
    mid = sum(128 < x <= 256 for x in t) / len(t)
    assert 0.45 < short < 0.55 and 0.2 < mid < 0.3


def _doc(n_paras: int = 20, n_sents: int = 6) -> list[list[str]]:
    rng = random.Random(1)
    return [
        [" ".join(f"w{p}{s}{k}" for k in range(rng.randint(3, 25))) + "." for s in range(n_sents)]
        for p in range(n_paras)
    ]


def test_cut_passages_bounds_and_sentence_boundaries() -> None:
    doc = _doc()
    sentences = {s for p in doc for s in p}
    passages = cut_passages(doc, words, random.Random(0), min_tokens=8, max_tokens=64)
    assert passages
    for p in passages:
        assert 8 <= p.n_tokens <= 64 and p.n_tokens == words(p.text)
        for line in p.text.split("\n"):  # paragraphs joined by newlines
            assert line.endswith(".")
            for chunk in line.split(". "):
                assert chunk.rstrip(".") + "." in sentences  # whole sentences only
    assert len({p.text for p in passages}) == len(passages)


def test_cut_passages_deterministic() -> None:
    doc = _doc()
    a = cut_passages(doc, words, random.Random(7), 8, 64)
    b = cut_passages(doc, words, random.Random(7), 8, 64)
    assert a == b


def test_cut_passages_splits_overlong_units() -> None:
    long_sentence = " ".join(f"w{i}" for i in range(300)) + "."
    code = "\n".join(f"x{i} = {i}" for i in range(200))
    passages = cut_passages([[long_sentence], [code]], words, random.Random(0), 8, 64)
    assert passages and all(p.n_tokens <= 64 for p in passages)
    assert sum(p.n_tokens for p in passages) >= 300 + 600 - 2 * 64
