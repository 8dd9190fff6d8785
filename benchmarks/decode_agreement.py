"""Do the faster decoding paths give the fp32 path's greedy answers? A fixed set of QA examples, and restatements.

The shipped checkpoint compresses each context (rate 4) and answers its question greedily
(``GMSA.generate``: repetition penalty 1.3, at most ``--new-tokens`` tokens, EOS ends an answer),
once per decoding path:

* ``fp32`` (the reference): fp32 weights, the decoder's LoRA adapters unmerged, plain steps;
* ``fp32 merged``: fp32, LoRA merged into the weights (:func:`gmsa.model.inference_copy`);
* ``bf16``: bf16 weights, LoRA unmerged, plain steps (the earlier default);
* ``bf16 merged``: bf16, LoRA merged;
* ``bf16 merged + int8 steps``: bf16, LoRA merged, decoding steps on int8 weights (the default
  where :func:`gmsa.fast_decode.resolve_int8` adopts them);
* ``bf16 merged + int4 steps``: the same with int4 step weights (``FastDecoder(int4="on")``);
* ``llama.cpp TYPE`` (``--llamacpp TYPE ...``): the fp32 model's decoder (its active adapters merged in fp32)
  exported as a GGUF of weight type TYPE and decoded in llama.cpp (``gmsa.llamacpp``, one thread);
* ``torch+llama.cpp TYPE`` (``--hybrid TYPE ...``): the default path (bf16 merged + int8 steps) reads the
  prompt, its KV cache goes to llama.cpp (``gmsa.kv_handoff``), which decodes on the bf16 model's decoder
  exported as a GGUF of weight type TYPE (``--engine llamacpp``'s default prefill; its steps on repacked weights);
* ``torch (compiled)+llama.cpp TYPE`` (``--hybrid-compiled TYPE ...``): the same with the encoder and the prefill
  compiled ahead of time (the command line's default path, :mod:`gmsa.aot`).

``--paths`` runs a subset (the reference ``fp32`` always runs).

Per path: answers identical to the reference's, mean leading tokens shared with it, and token F1
against the gold answers (does a difference change quality?). Timing plays no part: any load
is fine. The fixed set: every ``--stride``-th example of ``data/qa/test.jsonl`` up to ``--examples``.

Restatements (``--restate N``, 0: none): ``GMSA.reconstruct`` at rate 4 of the seeded sample of N
passages of at most 128 tokens that ``gmsa eval reconstruct --data data/ae/test.jsonl --max-tokens
128 --limit N`` draws, per path: corpus BLEU (with its bootstrap s.e.), mean ROUGE-L, restatements
identical to the fp32 path's, and the ROUGE-L difference to the default path paired per passage.

    python benchmarks/decode_agreement.py --out reports/bench/decode-agreement-cpu.json
    python benchmarks/decode_agreement.py --paths fp32 --llamacpp q8_0 f16 \
        --out reports/bench/decode-agreement-llamacpp-cpu.json
    python benchmarks/decode_agreement.py --paths fp32 --hybrid q8_0 \
        --out reports/bench/decode-agreement-hybrid-cpu.json
    python benchmarks/decode_agreement.py --paths fp32 --hybrid-compiled q8_0 \
        --out reports/bench/decode-agreement-hybrid-compiled-cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from gmsa import GMSA
from gmsa.evaluation.common import load_examples, select_examples
from gmsa.evaluation.metrics import bleu, bleu_standard_error, rouge, token_f1
from gmsa.fast_decode import FastDecoder
from gmsa.gguf_export import WEIGHT_TYPES
from gmsa.llamacpp import llamacpp_engine

PATHS = {  # name: (dtype, merge LoRA, int8 steps, int4 steps)
    "fp32": ("float32", False, "off", "off"),
    "fp32 merged": ("float32", True, "off", "off"),
    "bf16": ("bfloat16", False, "off", "off"),
    "bf16 merged": ("bfloat16", True, "off", "off"),
    "bf16 merged + int8 steps": ("bfloat16", True, "on", "off"),
    "bf16 merged + int4 steps": ("bfloat16", True, "on", "on"),
}
DEFAULT_PATH = "bf16 merged + int8 steps"


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


def restatement_sample(path: Path, tokenizer, limit: int) -> list[str]:
    """The passages ``gmsa eval reconstruct --max-tokens 128 --limit N`` (seed 0) restates."""
    examples, _ = load_examples(path, "reconstruct", tokenizer)
    fitting = [e for e in examples if e.n_tokens <= 128]
    return [e.context for e in select_examples(fitting, limit, 0, lambda e: e.bucket)]


def restatement_scores(restated: dict[str, list[str]], passages: list[str]) -> list[dict]:
    rouge_l = {name: [rouge(t, p)["rougeL"] for t, p in zip(texts, passages)] for name, texts in restated.items()}
    default = DEFAULT_PATH if DEFAULT_PATH in restated else "fp32"
    summary = []
    for name, texts in restated.items():
        paired = [a - b for a, b in zip(rouge_l[name], rouge_l[default])]
        summary.append(
            {
                "path": name,
                "bleu": bleu(texts, passages),
                "bleu_se": bleu_standard_error(texts, passages),
                "rougeL": statistics.mean(rouge_l[name]),
                "rougeL_minus_default": statistics.mean(paired),
                "rougeL_minus_default_se": statistics.stdev(paired) / len(paired) ** 0.5 if len(paired) > 1 else 0.0,
                "identical_to_fp32": sum(a == b for a, b in zip(texts, restated["fp32"])),
            }
        )
        print(
            f"{name:<26} restated: BLEU {summary[-1]['bleu']:.3f} ± {summary[-1]['bleu_se']:.3f}, ROUGE-L "
            f"{summary[-1]['rougeL']:.3f} ({summary[-1]['rougeL_minus_default']:+.3f} ± "
            f"{summary[-1]['rougeL_minus_default_se']:.3f} vs {default}), identical to fp32 "
            f"{summary[-1]['identical_to_fp32']}/{len(passages)}"
        )
    return summary


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
    parser.add_argument("--restate", type=int, default=16, help="passages to restate per path (0: none)")
    parser.add_argument("--restate-data", default="data/ae/test.jsonl")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS), help="torch paths to run")
    parser.add_argument("--llamacpp", nargs="*", choices=list(WEIGHT_TYPES), default=[], help="GGUF types to run")
    parser.add_argument(
        "--hybrid", nargs="*", choices=list(WEIGHT_TYPES), default=[], help="GGUF types to run after a torch prefill"
    )
    parser.add_argument(
        "--hybrid-compiled",
        nargs="*",
        choices=list(WEIGHT_TYPES),
        default=[],
        help="the same, the encoder and the prefill compiled",
    )
    parser.add_argument("--out", default="reports/bench/decode-agreement-cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = fixed_set(Path(args.data), args.examples, args.stride)
    hybrid = args.hybrid or args.hybrid_compiled
    dtypes = {"float32"} | {PATHS[name][0] for name in args.paths} | ({"bfloat16"} if hybrid else set())
    models = {dtype: GMSA.from_pretrained(dtype=dtype) for dtype in sorted(dtypes)}
    tokenizer = models["float32"].tokenizer
    passages = restatement_sample(Path(args.restate_data), tokenizer, args.restate) if args.restate else []
    found: dict[str, list[str]] = {}
    restated: dict[str, list[str]] = {}
    runs = {name: PATHS[name] for name in dict.fromkeys(["fp32", *args.paths])}
    runs |= {f"llama.cpp {kind}": ("float32", kind) for kind in args.llamacpp}
    runs |= {f"torch+llama.cpp {kind}": ("bfloat16", kind) for kind in args.hybrid}
    runs |= {f"torch (compiled)+llama.cpp {kind}": ("bfloat16", kind) for kind in args.hybrid_compiled}
    for name, setting in runs.items():
        gmsa = models[setting[0]]
        if "llama.cpp" in name:
            prefill = "torch" if name.startswith("torch") else "llamacpp"
            if prefill == "torch":  # the default path reads the prompt
                gmsa.fast_decoder = FastDecoder(int8="on", merge=True)
            compiled = "(compiled)" in name
            gmsa.engine = llamacpp_engine(gmsa, setting[1], args.threads, prefill=prefill, compile_prefill=compiled)
            if compiled:  # the compiled path end to end, as the command line runs it: the encoder too
                gmsa.compile()
        else:
            gmsa.fast_decoder = FastDecoder(int8=setting[2], merge=setting[1], int4=setting[3])
        found[name] = answers(gmsa, rows, args.new_tokens, args.batch_size)
        if passages:
            restated[name] = gmsa.reconstruct(gmsa.compress(passages, rate=4, batch_size=args.batch_size))
        gmsa.engine, gmsa.compiled_encoder = None, None
        print(f"{name}: {found[name][:3]}", flush=True)
    reference = found["fp32"]
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
    restatements = restatement_scores(restated, passages) if passages else []
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
        "restate_data": args.restate_data,
        "restatements": restatements,
        "restated": restated,
        "passages": passages,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
