"""Text normalisation, sentence splitting and detokenisation."""

from __future__ import annotations

from gmsa.data.clean import (
    dedup_key,
    detokenize,
    detokenize_text,
    fix_mojibake,
    normalize_text,
    split_paragraphs,
    split_sentences,
)


def test_fix_mojibake_repairs_utf8_read_as_cp1252() -> None:
    assert fix_mojibake("through suicide\u00e2\u0080\u0094at the") == "through suicide\u2014at the"
    assert fix_mojibake("\u00e2\u0080\u009cI purpose") == "\u201cI purpose"
    assert fix_mojibake("caf\u00c3\u00a9") == "caf\u00e9"


def test_fix_mojibake_leaves_real_accents() -> None:
    for s in ["Éléonore", "naïve café", "São Paulo", "Ångström"]:
        assert fix_mojibake(s) == s


def test_normalize_text_whitespace_and_controls() -> None:
    raw = "  A\u00a0b\u200b c\t\td \r\n\r\n\r\n\nnext\x07 para  "
    assert normalize_text(raw) == "A b c d\n\nnext para"


def test_normalize_text_nfc() -> None:
    assert normalize_text("e\u0301") == "\u00e9"


def test_split_paragraphs() -> None:
    assert split_paragraphs("a\nb\n\n\nc") == ["a b", "c"]


def test_split_sentences_basic_and_abbreviations() -> None:
    para = (
        "Mr. Smith went to Washington, D.C. on Jan. 5. He met Dr. J. R. Jones at 3 p.m. today. "
        'Was it useful? "Yes!" he said. The U.S. Senate agreed. 3 votes were cast.'
    )
    assert split_sentences(para) == [
        "Mr. Smith went to Washington, D.C. on Jan. 5.",
        "He met Dr. J. R. Jones at 3 p.m. today.",
        "Was it useful?",
        '"Yes!" he said.',
        "The U.S. Senate agreed.",
        "3 votes were cast.",
    ]


def test_split_sentences_no_split_before_lowercase() -> None:
    assert split_sentences("It costs $5.50 per unit. e.g. this one.") == ["It costs $5.50 per unit. e.g. this one."]


def test_detokenize_brown_quotes_and_punctuation() -> None:
    toks = [
        "``",
        "Only",
        "a",
        "relative",
        "handful",
        "of",
        "such",
        "reports",
        "was",
        "received",
        "''",
        ",",
        "the",
        "jury",
        "said",
        ".",
    ]
    assert detokenize(toks) == '"Only a relative handful of such reports was received", the jury said.'


def test_detokenize_doubled_terminals_and_brackets() -> None:
    assert detokenize(["by", "Mayor-nominate", "Ivan", "Allen", "Jr.", "."]) == "by Mayor-nominate Ivan Allen Jr."
    assert detokenize(["the", "boost", ";", ";"]) == "the boost;"
    assert detokenize(["a", "(", "small", ")", "test", ",", "is", "n't", "it", "?"]) == "a (small) test, isn't it?"
    assert detokenize(["he", "said", "'", "pro", "'", "and", "'", "con", "'"]) == "he said 'pro' and 'con'"


def test_detokenize_text_squad_style() -> None:
    text = "the Earth ' s atmosphere ( see Occurrence ) . In 1466 , perhaps 40 , 000 people died in 1910 – 1940 ."
    assert detokenize_text(text) == (
        "the Earth's atmosphere (see Occurrence). In 1466, perhaps 40,000 people died in 1910–1940."
    )


def test_dedup_key_ignores_case_space_punctuation() -> None:
    assert dedup_key("Hello,  World!") == dedup_key("hello world")
