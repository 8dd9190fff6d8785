"""Record types shared by the per-source parsers."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from gmsa.data.clean import dedup_key, normalize_text, split_paragraphs, split_sentences

Paragraphs = tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Document:
    """A prose document: paragraphs, each a tuple of sentences (or one code block)."""

    doc_id: str
    source: str
    paragraphs: Paragraphs

    @property
    def text(self) -> str:
        """The document as plain text, paragraphs separated by a blank line."""
        return "\n\n".join(" ".join(p) for p in self.paragraphs)


@dataclass(frozen=True)
class QAItem:
    """One question over a context passage."""

    context: str
    question: str
    answers: tuple[str, ...]
    source: str
    doc_id: str
    meta: dict[str, str] = field(default_factory=dict, compare=False)


def content_id(prefix: str, text: str, n: int = 16) -> str:
    """A stable id ``prefix/<hash>`` for a text, insensitive to case, spacing and punctuation.

    Passages shared by several sources (e.g. SQuAD passages in two Disfl-QA
    copies) get the same id whatever their tokenisation.
    """
    return f"{prefix}/{hashlib.sha256(dedup_key(text).encode()).hexdigest()[:n]}"


def document_from_text(doc_id: str, source: str, text: str) -> Document:
    """Normalise ``text`` and split it into paragraphs of sentences."""
    paras = split_paragraphs(normalize_text(text))
    return Document(doc_id, source, tuple(tuple(split_sentences(p)) for p in paras))
