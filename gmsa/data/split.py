"""Seeded by-document splitting and cutting documents into passages."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.90, 0.05, 0.05)

CountTokens = Callable[[str], int]


def unit_hash(key: str) -> float:
    """Map a string to a float in ``[0, 1)`` via sha256 (stable across runs)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(
    doc_id: str,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    forced_test: Collection[str] = (),
) -> str:
    """The split of a document, a pure function of ``doc_id`` and ``seed``.

    Because the split only depends on the id, the same document lands in the
    same split in every output (AE prose and QA alike). Ids in ``forced_test``
    (documents shared with evaluation-only sources) always go to ``test``.
    """
    if doc_id in forced_test:
        return "test"
    u = unit_hash(f"{seed}:{doc_id}")
    edge = 0.0
    for name, frac in zip(SPLITS, fractions):
        edge += frac
        if u < edge:
            return name
    return SPLITS[-1]


def doc_rng(doc_id: str, seed: int) -> random.Random:
    """A per-document RNG, so cutting does not depend on processing order."""
    return random.Random(f"{seed}:cut:{doc_id}")


def draw_target(rng: random.Random, min_tokens: int, max_tokens: int) -> int:
    """A passage length drawn log-uniformly in ``[min_tokens, max_tokens]``.

    With 32-512 this gives about half the passages <= 128 tokens, a quarter
    in 129-256 and a quarter in 257-512.
    """
    lo, hi = math.log(min_tokens), math.log(max_tokens)
    return round(math.exp(rng.uniform(lo, hi)))


@dataclass(frozen=True)
class Passage:
    """A passage cut from a document."""

    text: str
    n_tokens: int


def _split_long_unit(text: str, count: CountTokens, max_tokens: int) -> list[str]:
    """Split a unit longer than ``max_tokens`` into chunks at whitespace.

    Words are packed greedily by their individual token counts (linear time),
    then each chunk is re-measured and halved again if joining overshot.
    """
    sep = "\n" if "\n" in text else " "
    words = text.split(sep)
    if len(words) == 1:
        return [text]  # nothing to split at; the caller drops it if too long
    chunks: list[list[str]] = [[]]
    total = 0
    for word in words:
        n = count(sep + word)
        if chunks[-1] and total + n > max_tokens:
            chunks.append([])
            total = 0
        chunks[-1].append(word)
        total += n
    out: list[str] = []
    for chunk in chunks:
        piece = sep.join(chunk)
        if len(chunk) > 1 and count(piece) > max_tokens:
            half = len(chunk) // 2
            out += _split_long_unit(sep.join(chunk[:half]), count, max_tokens)
            out += _split_long_unit(sep.join(chunk[half:]), count, max_tokens)
        else:
            out.append(piece)
    return out


def _units(paragraphs: Sequence[Sequence[str]], count: CountTokens, max_tokens: int) -> list[tuple[str, str, int]]:
    """Flatten paragraphs of sentences into ``(joiner, text, n_tokens)`` units."""
    units: list[tuple[str, str, int]] = []
    for para in paragraphs:
        for i, sent in enumerate(para):
            joiner = " " if i else "\n"
            n = count(sent)
            if n <= max_tokens:
                units.append((joiner, sent, n))
                continue
            for j, piece in enumerate(_split_long_unit(sent, count, max_tokens)):
                units.append((joiner if j == 0 else " ", piece, count(piece)))
    return units


def _join(units: Sequence[tuple[str, str, int]]) -> str:
    """Join units with their joiners (the first joiner is dropped)."""
    return "".join(j + t for j, t, _ in units).lstrip("\n ")


def cut_passages(
    paragraphs: Sequence[Sequence[str]],
    count: CountTokens,
    rng: random.Random,
    min_tokens: int = 32,
    max_tokens: int = 512,
) -> list[Passage]:
    """Cut a document (paragraphs of sentences) into passages at sentence ends.

    For each passage a target length is drawn log-uniformly in
    ``[min_tokens, max_tokens]``; sentences are added while the passage stays
    within the target. Sentences are joined by a space and paragraphs by a
    newline. Passages are re-measured after joining and kept only if their
    length is within ``[min_tokens, max_tokens]``.
    """
    units = _units(paragraphs, count, max_tokens)
    passages: list[Passage] = []
    i = 0
    while i < len(units):
        target = draw_target(rng, min_tokens, max_tokens)
        j, total = i + 1, units[i][2]
        while j < len(units) and total + units[j][2] <= target:
            total += units[j][2]
            j += 1
        chosen = units[i:j]
        text = _join(chosen)
        n = count(text)
        while n > max_tokens and len(chosen) > 1:  # joining can add tokens
            chosen = chosen[:-1]
            j -= 1
            text = _join(chosen)
            n = count(text)
        if n >= min_tokens and n <= max_tokens:
            passages.append(Passage(text, n))
        i = j
    return passages
