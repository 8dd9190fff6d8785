"""Compression throughput (context tokens per second) for batches of texts and long texts.

``GMSA.compress`` splits texts into encoder windows and encodes the windows of all texts of a
call together, ``batch_size`` at a time (sorted by length), each batch capped at ``max_batch_tokens``
padded tokens (on a CPU by default :data:`gmsa.chunking.CPU_BATCH_TOKENS`). This times, in one process
and with the runs interleaved (order alternating between repeats), each shape of input compressed
three ways: windows one at a time (``batch_size=1``), batched (``batch_size=8``, the default cap) and
batched without the cap (what ``compress`` did before session 11), and prints tokens/s and the ratios,
by wall clock and by this process's CPU time (the steadier one on a shared machine). The shipped
checkpoint (``GMSA.from_pretrained()``; ``--model`` another one), in the dtype ``--dtype`` picks (default: auto).

    python benchmarks/compress_throughput.py --threads 2 --out reports/bench/compress-throughput-cpu.json
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

CASES = {  # name: tokens of each text
    "1 x 2048": [2048],
    "8 x 512": [512] * 8,
    "4 x 2048": [2048] * 4,
    "1 x 8192 (4 windows)": [8192],
    "1 x 8300 (5 windows)": [8300],
    "3 texts: 3000, 5000, 2500": [3000, 5000, 2500],
    "32 texts of 100-460": [100 + (37 * i) % 361 for i in range(32)],
}
MODES = {  # name: compress options
    "one at a time": {"batch_size": 1},
    "batched": {"batch_size": 8},
    "batched, no cap": {"batch_size": 8, "max_batch_tokens": 10**9},
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
    lengths = sorted({n for sizes in CASES.values() for n in sizes})
    texts = {n: exact_length_text(gmsa.tokenizer, passages, n)[0] for n in lengths}
    runs = [(case, mode) for case in CASES for mode in MODES]
    seconds: dict[str, list[float]] = {f"{case} | {mode}": [] for case, mode in runs}
    cpu_seconds: dict[str, list[float]] = {key: [] for key in seconds}
    gmsa.compress(texts[512], rate=args.rate)  # warm-up
    for repeat in range(args.repeats):
        for case, mode in runs if repeat % 2 == 0 else runs[::-1]:
            key = f"{case} | {mode}"
            start, cpu_start = time.perf_counter(), time.process_time()
            gmsa.compress([texts[n] for n in CASES[case]], rate=args.rate, **MODES[mode])
            seconds[key].append(time.perf_counter() - start)
            cpu_seconds[key].append(time.process_time() - cpu_start)
            print(f"[{repeat + 1}] {key:<45} {seconds[key][-1]:.2f} s, {cpu_seconds[key][-1]:.2f} s CPU")
    rows = [summary(case, seconds, cpu_seconds) for case in CASES]
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


def summary(case: str, seconds: dict[str, list[float]], cpu_seconds: dict[str, list[float]]) -> dict:
    """One case's tokens/s per mode (wall and CPU medians) and the batched ratios; printed as a line."""
    tokens = sum(CASES[case])
    row: dict = {"case": case, "tokens": tokens}
    for mode in MODES:
        row[f"tokens_per_s {mode}"] = tokens / statistics.median(seconds[f"{case} | {mode}"])
        row[f"tokens_per_cpu_s {mode}"] = tokens / statistics.median(cpu_seconds[f"{case} | {mode}"])
    row["batched / one at a time"] = row["tokens_per_s batched"] / row["tokens_per_s one at a time"]
    row["batched / batched, no cap"] = row["tokens_per_s batched"] / row["tokens_per_s batched, no cap"]
    rates = ", ".join(f"{mode} {row[f'tokens_per_s {mode}']:.0f}" for mode in MODES)
    print(
        f"{case:<28} tok/s: {rates}; batched / one at a time {row['batched / one at a time']:.2f}x, "
        f"/ no cap {row['batched / batched, no cap']:.2f}x"
    )
    return row


if __name__ == "__main__":
    main()
