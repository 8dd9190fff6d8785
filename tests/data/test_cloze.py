"""Cloze translation: span choice, wh-words, fronting, split safety and determinism on hand-written prose."""

import json

import pytest

from gmsa.data.cli import main
from gmsa.data.cloze import candidate_spans, cloze_rows, sentence_questions, words_of
from gmsa.data.split import assign_split


def questions(sentence: str) -> dict[str, tuple[str, str]]:
    """``answer -> (kind, question)`` for one sentence."""
    return {answer: (span.kind, question) for span, question, answer in sentence_questions(sentence)}


def spans(sentence: str) -> list[tuple[str, str]]:
    words = words_of(sentence)
    return [(" ".join(w.core for w in words[s.first : s.last + 1]), s.kind) for s in candidate_spans(words)]


def test_spans_are_years_counts_and_capitalised_runs_of_up_to_four_words_not_at_the_start():
    found = spans("Herschel was born in the Electorate of Hanover in 1738, one of ten children of Isaac Herschel.")
    assert ("Herschel", "name") not in found[:1]  # the sentence's first word is capitalised anyway
    assert set(found) == {
        ("Electorate of Hanover", "place"),
        ("1738", "year"),
        ("ten", "number"),
        ("Isaac Herschel", "name"),
    }
    assert spans("They met the First Second Third Fourth Fifth Regiment at dawn on the hill.") == []


def test_no_span_from_stop_words_months_or_quotation_openings():
    assert spans('He said that in March I saw "Nobody" there with them all.') == []


def test_a_number_counts_only_when_a_noun_follows_it():
    assert ("300", "number") in spans("The ship carried 300 men across the water.")
    assert spans("The ship carried 300, and then more were added to it.") == []


@pytest.mark.parametrize(
    ("sentence", "answer", "kind", "question"),
    [
        (
            "His father was an oboist in the Hanover Military Band.",
            "Hanover Military Band",
            "place",
            "Where was his father an oboist?",
        ),
        ("The treaty was signed by the envoys in 1831.", "1831", "year", "When was the treaty signed by the envoys?"),
        (
            "The treaty was signed by Andrew Jackson at noon.",
            "Andrew Jackson",
            "person",
            "Who was the treaty signed by at noon?",
        ),
        (
            "The ship carried 300 men across the water.",
            "300",
            "number",
            "The ship carried how many men across the water?",
        ),
        (
            "Our minister went to Colombia to procure a reduction in duties.",
            "Colombia",
            "place",
            "Our minister went to which place to procure a reduction in duties?",
        ),
        (
            '"Go away," Mr. Smith said to the boy at the gate.',
            "Smith",
            "person",
            '"Go away," who said to the boy at the gate?',
        ),
        (
            "The report praised the work of the Coast Guard last year.",
            "Coast Guard",
            "name",
            "The report praised the work of what last year?",
        ),
    ],
)
def test_wh_word_and_fronting(sentence, answer, kind, question):
    assert questions(sentence)[answer] == (kind, question)


def test_no_fronting_past_an_opening_phrase():
    kind, question = questions("In 1755 the regiment was ordered to England.")["England"]
    assert (kind, question) == ("place", "In 1755 the regiment was ordered to which place?")


def test_a_question_never_contains_its_answer_and_ends_with_a_question_mark():
    for answer, (_, question) in questions("Paris was far from Paris and from London in 1850.").items():
        assert answer.lower() not in question.lower()
        assert question.endswith("?") and not question.endswith("??")


def doc_in(split: str, prefix: str = "brown/doc") -> str:
    return next(f"{prefix}{i}" for i in range(1000) if assign_split(f"{prefix}{i}", 0) == split)


PROSE = "Herschel was born in the Electorate of Hanover in 1738. His father was an oboist in the Hanover Military Band."


def prose_row(doc_id: str, text: str = PROSE, source: str = "brown", n_tokens: int = 40) -> dict:
    return {"text": text, "source": source, "doc_id": doc_id, "n_tokens": n_tokens}


def test_rows_come_only_from_the_requested_split_whatever_the_file():
    train, val, test = doc_in("train"), doc_in("val"), doc_in("test")
    rows = [prose_row(train), prose_row(val), prose_row(test)]
    made = cloze_rows(rows, n=10)
    assert [row["doc_id"] for row in made] == [train]
    assert [row["doc_id"] for row in cloze_rows(rows, n=10, split="val")] == [val]


def test_rows_have_the_qa_schema_and_skip_code_docs_and_long_passages():
    train = doc_in("train")
    skipped = [prose_row(doc_in("train", "pydoc/x"), source="pydoc"), prose_row(train + "x", n_tokens=500)]
    skipped = [row for row in skipped if assign_split(row["doc_id"], 0) == "train"]
    (row,) = cloze_rows([prose_row(train), *skipped], n=5)
    assert set(row) >= {"context", "question", "answers", "source", "doc_id"}
    assert (row["context"], row["source"], row["doc_id"]) == (PROSE, "cloze", train)
    assert row["answers"][0] in row["context"] and row["question"].endswith("?")


def test_rows_are_deterministic_and_independent_of_input_order():
    ids = [f"brown/d{i}" for i in range(200) if assign_split(f"brown/d{i}", 0) == "train"][:30]
    rows = [prose_row(doc_id) for doc_id in ids]
    first = cloze_rows(rows, n=10, seed=3)
    assert len(first) == 10
    assert cloze_rows(list(reversed(rows)), n=10, seed=3) == first
    assert cloze_rows(rows, n=10, seed=4) != first


def test_n_must_be_positive():
    with pytest.raises(ValueError, match="n must be"):
        cloze_rows([], n=0)


def test_cli_writes_jsonl(tmp_path, capsys):
    source = tmp_path / "train.jsonl"
    source.write_text(json.dumps(prose_row(doc_in("train"))) + "\n")
    out = tmp_path / "qa" / "cloze.jsonl"
    assert main(["data", "cloze", "--from", str(source), "--out", str(out), "--n", "3"]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["source"] == "cloze"
    assert json.loads(capsys.readouterr().out)["rows"] == 1
