"""End-to-end ``prepare`` on the fixture archives: schema, no leakage, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gmsa.data.base import Document
from gmsa.data.prepare import DEFAULT_SOURCES, cap_documents, prepare


def words(text: str) -> int:
    """Whitespace token counter standing in for a real tokenizer."""
    return len(text.split())


SPLITS = ("train", "val", "test")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def prepared(archives: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("out")
    prepare(out, DEFAULT_SOURCES, count_tokens=words, paths=archives, min_tokens=8, max_tokens=96, progress=False)
    return out


def test_outputs_and_schema(prepared: Path) -> None:
    for split in SPLITS:
        for row in _rows(prepared / "ae" / f"{split}.jsonl"):
            assert set(row) == {"text", "source", "doc_id", "n_tokens"}
            assert 8 <= row["n_tokens"] <= 96 and row["n_tokens"] == words(row["text"])
        for row in _rows(prepared / "qa" / f"{split}.jsonl"):
            assert set(row) == {"context", "question", "answers", "source", "doc_id", "n_tokens"}
            assert isinstance(row["answers"], list) and row["answers"]
    ae_sources = {r["source"] for s in SPLITS for r in _rows(prepared / "ae" / f"{s}.jsonl")}
    assert ae_sources == {"sotu", "brown", "moby_dick", "xsum", "narrativeqa", "pydoc"}
    stats = json.loads((prepared / "stats.json").read_text())
    assert stats["eval_only"] == ["bigbench_disflqa", "coqa", "disflqa"]


def test_no_document_in_two_splits(prepared: Path) -> None:
    where: dict[str, set[str]] = {}
    for kind in ("ae", "qa"):
        for split in SPLITS:
            for row in _rows(prepared / kind / f"{split}.jsonl"):
                where.setdefault(row["doc_id"], set()).add(split)
    assert where and all(len(s) == 1 for s in where.values())


def test_eval_only_sources_only_in_test(prepared: Path) -> None:
    for split in ("train", "val"):
        sources = {r["source"] for r in _rows(prepared / "qa" / f"{split}.jsonl")}
        assert not sources & {"coqa", "disflqa", "bigbench_disflqa"}
    test_sources = {r["source"] for r in _rows(prepared / "qa" / "test.jsonl")}
    assert {"coqa", "disflqa"} <= test_sources


def test_no_duplicate_passages(prepared: Path) -> None:
    texts = [r["text"] for s in SPLITS for r in _rows(prepared / "ae" / f"{s}.jsonl")]
    assert len(texts) == len(set(texts))


def test_byte_identical_reruns(prepared: Path, archives: dict[str, Path], tmp_path: Path) -> None:
    prepare(tmp_path, DEFAULT_SOURCES, count_tokens=words, paths=archives, min_tokens=8, max_tokens=96, progress=False)
    for kind in ("ae", "qa"):
        for split in SPLITS:
            name = f"{kind}/{split}.jsonl"
            assert (tmp_path / name).read_bytes() == (prepared / name).read_bytes(), name
    assert (tmp_path / "stats.json").read_bytes() == (prepared / "stats.json").read_bytes()


def test_seed_changes_assignment(archives: dict[str, Path], tmp_path: Path) -> None:
    a = prepare(tmp_path / "a", ["brown", "sotu"], count_tokens=words, paths=archives, seed=0, progress=False)
    b = prepare(tmp_path / "b", ["brown", "sotu"], count_tokens=words, paths=archives, seed=3, progress=False)
    assert a["files"] != b["files"]


def test_unknown_source_rejected(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="unknown source"):
        prepare(tmp_path, ["nope"], count_tokens=words)


def test_cap_documents_is_seeded_subset() -> None:
    docs = [Document(f"d/{i}", "x", (("word " * 100,),)) for i in range(20)]
    kept = cap_documents(docs, 2000, seed=0)
    assert 0 < len(kept) < 20 and kept == cap_documents(docs, 2000, seed=0)
    assert cap_documents(docs, None, 0) == docs


def test_shared_passage_follows_eval_only_source_to_test() -> None:
    from gmsa.data.base import QAItem
    from gmsa.data.prepare import qa_rows

    shared = [QAItem("ctx", f"q{i}?", ("a",), "quac", f"squad/{i}") for i in range(50)]
    held = [QAItem("ctx", "other?", ("a",), "coqa", f"squad/{i}") for i in range(50)]
    forced = {it.doc_id for it in held}
    rows = qa_rows(shared + held, words, 0, forced, {"coqa"}, progress=False)
    assert not rows["train"] and not rows["val"] and len(rows["test"]) == 100


def test_items_without_a_question_or_an_answer_are_dropped() -> None:
    from gmsa.data.base import QAItem
    from gmsa.data.prepare import qa_rows

    items = [
        QAItem("ctx", "", ("nearly $41 trillion",), "coqa", "d/1"),
        QAItem("ctx", "what?", ("", " "), "coqa", "d/2"),
        QAItem("ctx", "how?", ("fine",), "coqa", "d/3"),
    ]
    rows = qa_rows(items, words, 0, set(), {"coqa"}, progress=False)
    assert [r["question"] for r in rows["test"]] == ["how?"]


def test_token_counter_uses_encode_without_special_tokens() -> None:
    from gmsa.data.prepare import token_counter

    class StandIn:
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return [0] * (len(text.split()) + (1 if add_special_tokens else 0))

    assert token_counter(StandIn())("a b c") == 3


def test_cap_documents_is_independent_of_the_split() -> None:
    from gmsa.data.split import assign_split

    docs = [Document(f"d/{i}", "x", (("word " * 10,),)) for i in range(400)]
    kept = cap_documents(docs, 100 * 51, seed=0)
    splits = {assign_split(d.doc_id, 0) for d in kept}
    assert splits == {"train", "val", "test"}


def test_tests_cannot_download_corpus_packages(tmp_path: Path) -> None:
    # tests/conftest.py refuses: make test on a fresh machine must fetch nothing
    with pytest.raises(AssertionError, match=r"download corpus packages \['brown'\]"):
        prepare(tmp_path, ["brown"], count_tokens=words, progress=False)
