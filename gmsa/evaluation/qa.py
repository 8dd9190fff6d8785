"""QA evaluation: answer each question from the (compressed) context, score EM / F1 / contains.

The primary metric is ``contains`` (accuracy: a normalised gold answer occurs as whole words
in the normalised output), the paper's NQ setting; free-form greedy outputs of up to 100
tokens rarely equal the gold answer exactly, so EM (``em``) and token F1 (``f1``) are
reported next to it.
"""

from __future__ import annotations

import math
from collections import defaultdict

from ..api import GMSA
from ..config import GMSAConfig
from .baselines import BASELINES, Generation, GMSAMethod, LLMLingua, Method, Output, Uncompressed
from .common import EvalRun, Example, cost_summary, evaluate_methods, mean, prediction_row
from .metrics import normalize_answer, qa_scores

PRIMARY_METRIC = "contains"
QA_METRICS = ("contains", "em", "f1")


def base_decoder_model(models: list[tuple[str, GMSA]], backbone: str | None) -> GMSA:
    """A GMSA whose decoder is the untouched backbone: an AE-only model if one is given, else a new one."""
    for _, gmsa in models:
        if gmsa.config.decoder_tuning == "none":
            return gmsa
    source = backbone or models[0][1].config.backbone
    return GMSA.from_backbone(source, GMSAConfig(k_enc=1, k_lsa=0, ae_decoder_lora_r=0))


def build_qa_methods(
    models: list[tuple[str, GMSA]],
    baselines: list[str],
    generation: Generation,
    base: GMSA,
    small_lm_dir: str = "",
    iterative_size: int = 32,
) -> list[tuple[Method, str]]:
    """``(method, model label)`` pairs: each GMSA model (+ its KEFT decoder on the full prompt), then baselines.

    Baselines run on ``base``'s decoder (the backbone as it is); the label of a baseline is "".
    """
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}; choose from {sorted(BASELINES)}")
    methods: list[tuple[Method, str]] = []
    for label, gmsa in models:
        methods.append((GMSAMethod(f"gmsa[{label}]", gmsa, generation), label))
        if gmsa.config.decoder_tuning != "none" and "uncompressed" in baselines:
            methods.append((Uncompressed(f"uncompressed[{label} decoder]", gmsa, generation), label))
    for name in baselines:
        if name == "llmlingua":
            methods.append((LLMLingua(name, base, generation, str(small_lm_dir), iterative_size), ""))
        else:
            methods.append((BASELINES[name](name, base, generation), ""))
    return methods


def standard_error(values: list[float]) -> float:
    """Standard error of the mean (sample standard deviation / sqrt(n)); 0 for fewer than 2 values."""
    if len(values) < 2:
        return 0.0
    centre = mean(values)
    return math.sqrt(sum((v - centre) ** 2 for v in values) / (len(values) - 1) / len(values))


YES_NO = {"yes", "no"}


def is_yes_no(answers: list[str]) -> bool:
    """A question whose gold answers are all "yes"/"no" (after SQuAD normalisation)."""
    return all(normalize_answer(answer) in YES_NO for answer in answers)


def aggregate_qa(rows: list[dict]) -> dict:
    """Means (in %) of the per-example scores, the primary metric's standard error, budget and time.

    Also the primary metric on the open questions alone (gold answer not yes/no: a model that says
    "yes" to everything scores on the others) and the share of outputs that are a bare yes/no.
    """
    summary = {"n": len(rows)}
    for name in QA_METRICS:
        summary[name] = 100 * mean([row["scores"][name] for row in rows])
    summary[f"{PRIMARY_METRIC}_se"] = 100 * standard_error([row["scores"][PRIMARY_METRIC] for row in rows])
    open_scores = [row["scores"][PRIMARY_METRIC] for row in rows if not is_yes_no(row["answers"])]
    summary["n_open"] = len(open_scores)
    if open_scores:
        summary[f"{PRIMARY_METRIC}_open"] = 100 * mean(open_scores)
        summary[f"{PRIMARY_METRIC}_open_se"] = 100 * standard_error(open_scores)
    summary["yes_no_outputs"] = 100 * mean([float(normalize_answer(row["output"]) in YES_NO) for row in rows])
    return summary | cost_summary(rows)


def evaluate_qa(methods: list[tuple[Method, str]], run: EvalRun) -> tuple[list[dict], list[dict]]:
    """Run every method at every rate (once for rate-independent ones); return results and predictions."""

    def predict(method: Method, rate: int | None, outputs: list[dict]) -> list[dict]:
        return [_prediction(method, rate, example, output) for example, output in zip(run.examples, outputs)]

    return evaluate_methods("qa", methods, run, _answer, predict, _result)


def _answer(method: Method, batch: list[Example], rate: int | None) -> list[Output]:
    return method.run([e.context for e in batch], [e.question for e in batch], rate or 1)


def _prediction(method: Method, rate: int | None, example: Example, output: dict) -> dict:
    return prediction_row(method, rate, example) | {
        "question": example.question,
        "answers": list(example.answers),
        "output": output["text"],
        "context_tokens": output["context_tokens"],
        "extra": output["extra"],
        "seconds": output["seconds"],
        "scores": qa_scores(output["text"], example.answers),
    }


def _result(method: Method, label: str, rate: int | None, rows: list[dict]) -> dict:
    by_source: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_source[row["source"]].append(row)
    metrics = aggregate_qa(rows)
    if lingua := [row for row in rows if "llmlingua_tokens" in row["extra"]]:
        over = [row["extra"]["llmlingua_tokens"] > row["context_tokens"] for row in lingua]
        metrics["over_budget_cut"] = 100 * mean([float(flag) for flag in over])
    return {
        "method": method.name,
        "model": label,
        "rate": rate,
        "metrics": metrics,
        "by_source": {name: aggregate_qa(group) for name, group in sorted(by_source.items())},
    }
