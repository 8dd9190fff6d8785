"""What a decoding step costs on this CPU with the decoder's weights held in different forms.

The decoder reads a prompt of ``--prompt`` positions (the real bench text and question, as GMSA
at rate 4 leaves them for a 2k-token context: ~522), then decodes ``--new-tokens`` greedy tokens
(repetition penalty 1.3). Variants, timed interleaved with the order alternating per repeat:

* ``fp32``, ``bf16``: plain weights;
* ``bf16+int8-steps``: bf16 weights, decoding steps through int8 copies (:mod:`gmsa.fast_decode`);
* ``int8-dynamic``: ``torch.ao.quantization.quantize_dynamic`` (int8 weights, activations
  quantized per call; fp32 otherwise; deprecated in torch, measured for comparison).

Per variant: the prefill seconds, the median and minimum per-step milliseconds (each step is
stamped by a forward pre-hook), and whether the greedy tokens equal the fp32 ones.

    python benchmarks/decode_step.py --threads 2 --out reports/bench/decode-step-cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

from gmsa.backbone import load_backbone
from gmsa.decoding import greedy_generate
from gmsa.evaluation.bench import QUESTION, REPETITION_PENALTY
from gmsa.evaluation.passages import exact_length_text, read_passages
from gmsa.fast_decode import int8_steps
from gmsa.precision import cpu_has_native_bf16, cpu_model


def variants(decoder: torch.nn.Module) -> dict[str, torch.nn.Module]:
    bf16 = copy.deepcopy(decoder).to(torch.bfloat16)
    stepped = copy.deepcopy(bf16)
    int8_steps(stepped)
    found = {"fp32": decoder, "bf16": bf16, "bf16+int8-steps": stepped}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        found["int8-dynamic"] = quantize_dynamic(copy.deepcopy(decoder), {torch.nn.Linear}, dtype=torch.qint8)
    return found


def timed_run(decoder, embeds: torch.Tensor, n_new: int) -> tuple[float, list[float], list[int]]:
    stamps: list[float] = []
    handle = decoder.register_forward_pre_hook(lambda *_: stamps.append(time.perf_counter()))
    try:
        tokens, _ = greedy_generate(
            decoder, embeds, torch.ones(embeds.shape[:2], dtype=torch.long), n_new, REPETITION_PENALTY
        )
    finally:
        handle.remove()
    end = time.perf_counter()
    return stamps[1] - stamps[0], [b - a for a, b in zip(stamps[1:], stamps[2:] + [end])], tokens[0].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512, help="context tokens before the question")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="reports/bench/decode-step-cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    decoder, tokenizer = load_backbone("default", dtype=torch.float32)
    text, _ = exact_length_text(tokenizer, read_passages(None)[0], args.prompt)
    ids = torch.tensor([tokenizer(text + QUESTION, add_special_tokens=False)["input_ids"]])
    models = variants(decoder)
    embeds = {name: decoder.get_input_embeddings()(ids).to(next(m.parameters()).dtype) for name, m in models.items()}
    for name, model in models.items():  # warm-up
        timed_run(model, embeds[name][:, :16], 3)
    prefill: dict[str, list[float]] = {name: [] for name in models}
    steps: dict[str, list[float]] = {name: [] for name in models}
    tokens: dict[str, list[int]] = {}
    names = list(models)
    for repeat in range(args.repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            seconds, per_step, tokens[name] = timed_run(models[name], embeds[name], args.new_tokens)
            prefill[name].append(seconds)
            steps[name] += per_step
            print(
                f"[{repeat + 1}] {name:<16} prefill {seconds:.2f} s, step {statistics.median(per_step) * 1e3:.1f} ms",
                flush=True,
            )
    rows = []
    for name in names:
        row = {
            "variant": name,
            "prefill_s_median": statistics.median(prefill[name]),
            "step_ms_median": statistics.median(steps[name]) * 1e3,
            "step_ms_min": min(steps[name]) * 1e3,
            "tokens_equal_fp32": tokens[name] == tokens["fp32"],
            "same_prefix_tokens": next(
                (i for i, (a, b) in enumerate(zip(tokens[name], tokens["fp32"])) if a != b), len(tokens["fp32"])
            ),
        }
        rows.append(row)
        print(
            f"{name:<16} prefill {row['prefill_s_median']:.2f} s  step median {row['step_ms_median']:.1f} ms "
            f"(min {row['step_ms_min']:.1f})  = fp32 tokens: {row['tokens_equal_fp32']} "
            f"({row['same_prefix_tokens']}/{len(tokens['fp32'])} leading)"
        )
    out = {
        "cpu_model": cpu_model(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "threads": args.threads,
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "load_average": os.getloadavg(),
        "rows": rows,
        "answer_fp32": tokenizer.decode(tokens["fp32"]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
