"""Nats per token that soft tokens carry about their own passage, for several checkpoints.

    python benchmarks/soft_token_information.py --model untrained:k_enc=4,lsa_match_embedding_scale=false \
        --model ae=checkpoints/ae/model --model default --out reports/train/information --bleu 16

For each model and rate: the mean cross entropy of restating held-out passages from their own
soft tokens (matched) and from another passage's (mismatched); the gap is the information
(``gmsa.evaluation.information``); the teacher-forced token accuracy from the matched soft tokens;
with ``--bleu N``, the greedy restatement BLEU of the first N passages and, beside it, the ceiling:
the same decoder restating the uncompressed passages. A KEFT decoder LoRA is switched off, as in
``reconstruct`` (an AE-stage decoder adapter stays on).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from gmsa.evaluation.common import ModelSpec, load_model, unique_labels
from gmsa.evaluation.information import soft_token_information
from gmsa.evaluation.metrics import bleu
from gmsa.model import autoencoder_decoder
from gmsa.training.data import autoencoder_examples, read_jsonl


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True, help="repeatable, as for `gmsa eval`")
    parser.add_argument("--data", default="data/ae/val.jsonl")
    parser.add_argument("--limit", type=int, default=48, help="passages (a seeded sample)")
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rates", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bleu", type=int, default=0, help="greedy BLEU on this many of the passages (0 = skip)")
    parser.add_argument("--out", default="reports/train/information")
    return parser.parse_args()


def measure(spec: ModelSpec, args: argparse.Namespace, rows: list[dict]) -> dict:
    gmsa = load_model(spec, None, args.seed)
    gmsa.model.eval()
    tok = gmsa.tokenizer
    examples = autoencoder_examples(rows, tok, gmsa.config.ae_prompt, args.max_tokens, args.min_tokens)
    examples = random.Random(args.seed).sample(examples, min(args.limit, len(examples)))
    result = {"source": spec.source, "passages": len(examples)}
    texts = tok.batch_decode([e.context for e in examples[: args.bleu]])
    if texts:
        result["ceiling_bleu"] = round(bleu(gmsa.reconstruct(gmsa.uncompressed(texts)), texts), 4)
    for rate in args.rates:
        with autoencoder_decoder(gmsa.model):
            info = soft_token_information(gmsa.model, examples, rate, tok.pad_token_id)
        result[f"x{rate}"] = {
            "matched": round(info.matched, 4),
            "mismatched": round(info.mismatched, 4),
            "nats_per_token": round(info.nats_per_token, 4),
            "accuracy": round(info.matched_accuracy, 4),
        }
        if texts:
            result[f"x{rate}"]["bleu"] = round(bleu(gmsa.reconstruct(gmsa.compress(texts, rate=rate)), texts), 4)
        print(spec.label or spec.source, f"x{rate}", result[f"x{rate}"], flush=True)
    return result


COLUMNS = ("matched", "nats_per_token", "accuracy", "bleu")


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def markdown(results: dict, args: argparse.Namespace) -> str:
    lines = [
        f"Soft-token information on {args.data} ({args.min_tokens}-{args.max_tokens} tokens), nats per token:",
        "mismatched minus matched restatement cross entropy (higher = the soft tokens say more about their passage);",
        "accuracy: teacher-forced token accuracy from the matched soft tokens; BLEU: greedy restatement of the first",
        f"{args.bleu} passages; ceiling: the same decoder restating the uncompressed passages.",
        "",
        "| model | ceiling BLEU | "
        + " | ".join(f"x{r} matched | x{r} information | x{r} accuracy | x{r} BLEU" for r in args.rates)
        + " |",
        "|---|---:|" + "---:|" * (4 * len(args.rates)),
    ]
    for label, result in results.items():
        cells = [_cell(result.get("ceiling_bleu"))]
        cells += [_cell(result[f"x{r}"].get(k)) for r in args.rates for k in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    specs = [ModelSpec.parse(text) for text in args.model]
    labels = unique_labels([spec.label or spec.source for spec in specs])
    rows = read_jsonl(args.data)
    start = time.perf_counter()
    results = {label: measure(spec, args, rows) for label, spec in zip(labels, specs)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"data": args.data, "limit": args.limit, "seconds": round(time.perf_counter() - start, 1)}
    out.with_suffix(".json").write_text(json.dumps(meta | {"results": results}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results, args))
    print(markdown(results, args))


if __name__ == "__main__":
    main()
