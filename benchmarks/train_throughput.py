"""AE-stage training throughput on this machine: tokens/s and s/step per configuration.

    python benchmarks/train_throughput.py --tokens 256 --batch 4 --steps 3

Prints one JSON row per configuration and writes them to reports/train/throughput.json.
Tokens counted = context tokens + target tokens per step (what the run actually processes).
``precision``: ``fp32``; ``bf16-autocast`` (fp32 weights, autocast re-casts the frozen ones
every step); ``bf16-held`` (what ``dtype = "auto"`` does where bf16 pays: frozen weights held in
bf16 once, trainable ones fp32, autocast). Each configuration gets a freshly loaded backbone (a
decoder LoRA or bf16 casting changes it in place).
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
from gmsa.model import GMSAModel, set_stage
from gmsa.precision import cpu_model, hold_frozen_in, resolve_dtype
from gmsa.training.data import autoencoder_examples, collate, read_jsonl

CONFIGS = [
    {"precision": "fp32", "k_enc": 4, "ae_decoder_lora": 16, "ckpt": False},
    {"precision": "bf16-autocast", "k_enc": 4, "ae_decoder_lora": 16, "ckpt": False},
    {"precision": "fp32", "k_enc": 4, "ae_decoder_lora": 0, "ckpt": False},
    {"precision": "bf16-held", "k_enc": 4, "ae_decoder_lora": 0, "ckpt": False},
    {"precision": "bf16-held", "k_enc": 4, "ae_decoder_lora": 16, "ckpt": False},
]


def measure(tokenizer, examples, setting: dict, steps: int) -> dict:
    decoder, _ = load_backbone()
    config = GMSAConfig(k_enc=setting["k_enc"], ae_decoder_lora_r=setting["ae_decoder_lora"])
    model = GMSAModel(decoder, config)
    set_stage(model, "ae")
    if setting["precision"] == "bf16-held":
        hold_frozen_in(model, torch.bfloat16)
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
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting["precision"] != "fp32"):
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
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--out", default="reports/train/throughput.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    choice = resolve_dtype("auto")
    print(f"dtype auto would pick {choice.name}: {choice.reason}", flush=True)
    _, tokenizer = load_backbone()
    rows = read_jsonl(args.data)
    examples = autoencoder_examples(rows, tokenizer, GMSAConfig().ae_prompt, 10**6)
    examples = [e for e in examples if len(e.context) >= args.tokens][: args.batch]
    for e in examples:  # exactly --tokens context tokens each
        e.context = e.context[: args.tokens]
        e.target = e.context + [tokenizer.eos_token_id]
    results = []
    for setting in CONFIGS:
        results.append(measure(tokenizer, examples, setting, args.steps))
        print(json.dumps(results[-1]), flush=True)
    meta = {
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "context_tokens": args.tokens,
        "cpu": cpu_model(),
        "auto_dtype": choice.name,
        "bf16_matmul_speedup": choice.bf16_speedup,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
