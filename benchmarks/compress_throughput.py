"""Compression throughput (context tokens per second) for batches of texts and long texts.

``GMSA.compress`` splits texts into encoder windows and encodes the windows of all texts of a
call together, ``batch_size`` at a time (sorted by length). This times, in one process and with
the cases interleaved (order alternating between repeats), each shape of input compressed with
its windows one at a time (``batch_size=1``) and batched (``batch_size=8``), and prints tokens/s
and the batched/one-at-a-time ratio, by wall clock and by this process's CPU time (the steadier one
on a shared machine). The shipped checkpoint (``GMSA.from_pretrained()``; ``--model`` another one),
in the inference dtype ``--dtype`` picks (default: auto).

    python benchmarks/compress_throughput.py --threads 1 --out reports/bench/compress-throughput-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from gmsa import GMSA
from gmsa.evaluation.passages import exact_length_text, read_passages
from gmsa.precision import cpu_has_native_bf16, cpu_model

CASES = {  # name: (number of texts, tokens per text)
    "1 x 2048": (1, 2048),
    "8 x 512": (8, 512),
    "4 x 2048": (4, 2048),
    "1 x 8192 (4 windows)": (1, 8192),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=None, help="GMSA checkpoint (default: the shipped one)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--rate", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="reports/bench/compress-throughput-cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gmsa = GMSA.from_pretrained(args.model, dtype=args.dtype)  # outside inference mode: plain tensors
    gmsa.hold_inference_dtype()
    with torch.inference_mode():
        measure(args, gmsa)


def measure(args: argparse.Namespace, gmsa: GMSA) -> None:
    passages, _ = read_passages(None)
    texts = {n_tokens: exact_length_text(gmsa.tokenizer, passages, n_tokens)[0] for _, n_tokens in CASES.values()}
    runs = [(case, batch) for case in CASES for batch in (1, 8)]
    seconds: dict[str, list[float]] = {f"{case} | batch {batch}": [] for case, batch in runs}
    cpu_seconds: dict[str, list[float]] = {key: [] for key in seconds}
    gmsa.compress(texts[512], rate=args.rate)  # warm-up
    for repeat in range(args.repeats):
        for case, batch in runs if repeat % 2 == 0 else runs[::-1]:
            count, n_tokens = CASES[case]
            key = f"{case} | batch {batch}"
            start, cpu_start = time.perf_counter(), time.process_time()
            gmsa.compress([texts[n_tokens]] * count, rate=args.rate, batch_size=batch)
            seconds[key].append(time.perf_counter() - start)
            cpu_seconds[key].append(time.process_time() - cpu_start)
            print(
                f"[{repeat + 1}] {case:<22} batch {batch}: {seconds[key][-1]:.2f} s, {cpu_seconds[key][-1]:.2f} s CPU"
            )
    rows = []
    for case, (count, n_tokens) in CASES.items():
        one, batched = (statistics.median(seconds[f"{case} | batch {b}"]) for b in (1, 8))
        cpu_one, cpu_batched = (statistics.median(cpu_seconds[f"{case} | batch {b}"]) for b in (1, 8))
        tokens = count * n_tokens
        rows.append(
            {
                "case": case,
                "tokens": tokens,
                "tokens_per_s_one_window_at_a_time": tokens / one,
                "tokens_per_s_batched": tokens / batched,
                "batched_speedup": one / batched,
                "tokens_per_cpu_s_one_window_at_a_time": tokens / cpu_one,
                "tokens_per_cpu_s_batched": tokens / cpu_batched,
                "batched_speedup_cpu": cpu_one / cpu_batched,
            }
        )
        print(
            f"{case:<22} {tokens / one:8.0f} tok/s one at a time, {tokens / batched:8.0f} batched: {one / batched:.2f}x"
            f" (per CPU second: {tokens / cpu_one:.0f}, {tokens / cpu_batched:.0f}: {cpu_one / cpu_batched:.2f}x)"
        )
    result = {
        "cpu_model": cpu_model(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "dtype": str(gmsa.inference_dtype).removeprefix("torch."),
        "dtype_reason": gmsa.dtype_choice.reason,
        "threads": args.threads,
        "rate": args.rate,
        "model": args.model or "shipped checkpoint",
        "k_enc": gmsa.config.k_enc,
        "repeats": args.repeats,
        "load_average": os.getloadavg(),
        "rows": rows,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
