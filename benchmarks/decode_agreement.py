"""Do the faster decoding paths give the fp32 path's greedy answers? A fixed set of QA examples.

The shipped checkpoint compresses each context (rate 4) and answers its question greedily
(``GMSA.generate``: repetition penalty 1.3, at most ``--new-tokens`` tokens, EOS ends an answer),
once per decoding path:

* ``fp32`` (the reference): fp32 weights, the decoder's LoRA adapters unmerged, plain steps;
* ``fp32 merged``: fp32, LoRA merged into the weights (:func:`gmsa.model.inference_copy`);
* ``bf16``: bf16 weights, LoRA unmerged, plain steps (the earlier default);
* ``bf16 merged``: bf16, LoRA merged;
* ``bf16 merged + int8 steps``: bf16, LoRA merged, decoding steps on int8 weights (the default
  where :func:`gmsa.fast_decode.resolve_int8` adopts them).

Per path: answers identical to the reference's, mean leading tokens shared with it, and token F1
against the gold answers (does a difference change quality?). Timing plays no part: any load
is fine. The fixed set: every ``--stride``-th example of ``data/qa/test.jsonl`` up to ``--examples``.

    python benchmarks/decode_agreement.py --out reports/bench/decode-agreement-cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from gmsa import GMSA
from gmsa.evaluation.metrics import token_f1
from gmsa.fast_decode import FastDecoder

PATHS = {  # name: (dtype, merge LoRA, int8 steps)
    "fp32": ("float32", False, "off"),
    "fp32 merged": ("float32", True, "off"),
    "bf16": ("bfloat16", False, "off"),
    "bf16 merged": ("bfloat16", True, "off"),
    "bf16 merged + int8 steps": ("bfloat16", True, "on"),
}


def fixed_set(path: Path, examples: int, stride: int) -> list[dict]:
    lines = path.read_text().split("\n")  # not splitlines(): the texts hold U+2028
    rows = [json.loads(line) for line in lines if line.strip()]
    return rows[::stride][:examples]


def answers(gmsa: GMSA, rows: list[dict], new_tokens: int, batch_size: int) -> list[str]:
    out: list[str] = []
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        compressed = gmsa.compress([row["context"] for row in part], rate=4, batch_size=batch_size)
        out += gmsa.generate(compressed, [row["question"] for row in part], new_tokens, batch_size=batch_size)
    return out


def leading(tokenizer, answer: str, reference: str) -> int:
    a, b = tokenizer(answer)["input_ids"], tokenizer(reference)["input_ids"]
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/qa/test.jsonl")
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--stride", type=int, default=97)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="reports/bench/decode-agreement-cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = fixed_set(Path(args.data), args.examples, args.stride)
    models = {dtype: GMSA.from_pretrained(dtype=dtype) for dtype in ("float32", "bfloat16")}
    found: dict[str, list[str]] = {}
    for name, (dtype, merge, int8) in PATHS.items():
        gmsa = models[dtype]
        gmsa.fast_decoder = FastDecoder(int8=int8, merge=merge)
        found[name] = answers(gmsa, rows, args.new_tokens, args.batch_size)
        print(f"{name}: {found[name][:3]}", flush=True)
    reference, tokenizer = found["fp32"], models["float32"].tokenizer
    summary = []
    for name, got in found.items():
        summary.append(
            {
                "path": name,
                "identical_to_fp32": sum(a == b for a, b in zip(got, reference)),
                "examples": len(rows),
                "mean_leading_tokens_shared": statistics.mean(leading(tokenizer, a, b) for a, b in zip(got, reference)),
                "token_f1": statistics.mean(token_f1(a, row["answers"]) for a, row in zip(got, rows)),
            }
        )
        print(
            f"{name:<26} identical to fp32 {summary[-1]['identical_to_fp32']}/{len(rows)}, leading tokens shared "
            f"{summary[-1]['mean_leading_tokens_shared']:.1f}, token F1 {summary[-1]['token_f1']:.3f}"
        )
    out = {
        "checkpoint": "shipped (GMSA.from_pretrained())",
        "data": args.data,
        "examples": len(rows),
        "stride": args.stride,
        "rate": 4,
        "new_tokens": args.new_tokens,
        "batch_size": args.batch_size,
        "paths": summary,
        "answers": found,
        "questions": [row["question"] for row in rows],
        "gold": [row["answers"] for row in rows],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
