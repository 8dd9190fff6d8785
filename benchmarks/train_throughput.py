"""AE-stage training throughput on this machine: tokens/s and s/step per configuration.

    python benchmarks/train_throughput.py --tokens 256 --batch 4 --steps 3

Prints one JSON row per configuration and writes them to reports/train/throughput.json.
Tokens counted = context tokens + target tokens per step (what the run actually processes).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from gmsa.backbone import load_backbone
from gmsa.config import GMSAConfig
from gmsa.data import autoencoder_examples, collate, read_jsonl
from gmsa.model import GMSAModel, set_stage

CONFIGS = [
    {"dtype": "float32", "k_enc": 4, "ckpt": False},
    {"dtype": "float32", "k_enc": 8, "ckpt": False},
    {"dtype": "float32", "k_enc": 8, "ckpt": True},
    {"dtype": "bfloat16", "k_enc": 8, "ckpt": False},
]


def measure(decoder, tokenizer, examples, setting: dict, steps: int) -> dict:
    model = GMSAModel(decoder, GMSAConfig(k_enc=setting["k_enc"]))
    set_stage(model, "ae")
    if setting["ckpt"]:
        for stack in (model.encoder, model.decoder):
            stack.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = collate(examples, [4, 8] * (len(examples) // 2), tokenizer.pad_token_id)
    tokens = int(batch["context_mask"].sum() + batch["target_mask"].sum())
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and kernels
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting["dtype"] == "bfloat16"):
            loss = model(**batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    return {
        **setting,
        "s_per_step": round(step_s, 2),
        "tokens_per_s": round(tokens / step_s, 1),
        "tokens_per_step": tokens,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="data/ae/val.jsonl")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bf16-steps", type=int, default=1, help="bf16 is very slow without native bf16 matmul")
    parser.add_argument("--out", default="reports/train/throughput.json")
    args = parser.parse_args()
    decoder, tokenizer = load_backbone()
    rows = read_jsonl(args.data)
    examples = autoencoder_examples(rows, tokenizer, GMSAConfig().ae_prompt, 10**6)
    examples = [e for e in examples if len(e.context) >= args.tokens][: args.batch]
    for e in examples:  # exactly --tokens context tokens each
        e.context = e.context[: args.tokens]
        e.target = e.context + [tokenizer.eos_token_id]
    results = []
    for setting in CONFIGS:
        steps = args.bf16_steps if setting["dtype"] == "bfloat16" else args.steps
        results.append(measure(decoder, tokenizer, examples, setting, steps))
        print(json.dumps(results[-1]), flush=True)
    meta = {"threads": torch.get_num_threads(), "batch": args.batch, "context_tokens": args.tokens}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
