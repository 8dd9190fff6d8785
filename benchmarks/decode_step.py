"""What a decoding step costs on this CPU with the decoder's weights held in different forms.

The decoder reads a prompt of ``--prompt`` context tokens and the bench's question (the real
bench text: ~522 positions, what GMSA at rate 4 leaves of a 2k-token context), then decodes
``--new-tokens`` greedy tokens (repetition penalty 1.3). Variants, timed interleaved with the order
alternating per repeat:

* the backbone alone (what the uncompressed prompt runs on): ``fp32``, ``bf16``, and
  ``bf16 + int8 steps`` (:class:`gmsa.fast_decode.StepLinear`);
* the shipped GMSA's decoder (an AE and a KEFT LoRA on every projection): ``fp32 LoRA`` and
  ``bf16 LoRA`` (adapters unmerged, the earlier path), ``bf16 merged`` (LoRA merged into the
  weights, :func:`gmsa.model.inference_copy`) and ``bf16 merged + int8 steps`` (what
  ``GMSA.generate`` decodes with where :func:`gmsa.fast_decode.resolve_int8` adopts int8);
* candidates for the steps of that merged decoder: ``+ int4 steps`` (``FastDecoder(int4="on")``,
  groups of 32), and from ``benchmarks/step_kernels.py``: ``+ int8 steps, fused`` (q/k/v and
  gate/up in one call each), ``+ W8A8 steps`` (fbgemm's dynamic int8 x int8 kernel), ``+ bf16 packed
  steps`` (oneDNN's reordered bf16 weight).

Per variant: the prefill seconds, the median and minimum per-step milliseconds (each step is
stamped by a forward pre-hook; wall clock), and how many leading greedy tokens equal those of the
fp32 variant of its group.

    python benchmarks/decode_step.py --threads 1 --out reports/bench/decode-step-cpu.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from step_kernels import KERNELS, with_kernel  # benchmarks/step_kernels.py (on the path when run as a script)

from gmsa import GMSA
from gmsa.backbone import load_backbone
from gmsa.decoding import greedy_generate
from gmsa.evaluation.bench import QUESTION, REPETITION_PENALTY
from gmsa.evaluation.passages import exact_length_text, read_passages
from gmsa.fast_decode import FastDecoder
from gmsa.model import inference_copy
from gmsa.precision import cpu_has_native_bf16, cpu_model

GROUPS = {"backbone": "fp32", "GMSA decoder": "fp32 LoRA"}  # group: its reference variant


def variants(chosen: list[str] | None) -> tuple[dict[str, tuple[str, torch.nn.Module]], object]:
    """name -> (group, decoder) (those in ``chosen``, or all, and the references), and the tokenizer."""
    plain, tokenizer = load_backbone("default", dtype=torch.float32)
    plain.requires_grad_(False)  # frozen: FastDecoder leaves a model that is being trained as it is
    lora32 = GMSA.from_pretrained(dtype="float32")
    lora16 = GMSA.from_pretrained(dtype="bfloat16")
    for gmsa in (lora32, lora16):
        gmsa.hold_inference_dtype()
    bf16 = functools.cache(lambda: copy.deepcopy(plain).to(torch.bfloat16))
    merged = functools.cache(lambda: FastDecoder(int8="off").of(lora16.model.decoder))

    def on_kernel(kernel: str, fused: bool = False) -> Callable[[], torch.nn.Module]:
        return lambda: with_kernel(inference_copy(merged(), False), KERNELS[kernel], fused)

    builders = {
        "fp32": ("backbone", lambda: plain),
        "bf16": ("backbone", bf16),
        "bf16 + int8 steps": ("backbone", lambda: FastDecoder(int8="on").of(bf16())),
        "fp32 LoRA": ("GMSA decoder", lambda: lora32.model.decoder),
        "bf16 LoRA": ("GMSA decoder", lambda: lora16.model.decoder),
        "bf16 merged": ("GMSA decoder", merged),
        "bf16 merged + int8 steps": ("GMSA decoder", lambda: FastDecoder(int8="on").of(lora16.model.decoder)),
        "bf16 merged + int4 steps": (
            "GMSA decoder",
            lambda: FastDecoder(int8="on", int4="on").of(lora16.model.decoder),
        ),
        "bf16 merged + int8 steps, fused": ("GMSA decoder", on_kernel("int8 weight-only", fused=True)),
        "bf16 merged + W8A8 steps": ("GMSA decoder", on_kernel("W8A8 fbgemm")),
        "bf16 merged + bf16 packed steps": ("GMSA decoder", on_kernel("bf16 oneDNN packed")),
    }
    unknown = set(chosen or ()) - set(builders)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {list(builders)}")
    keep = set(chosen or builders) | set(GROUPS.values())
    return {name: (group, build()) for name, (group, build) in builders.items() if name in keep}, tokenizer


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


def leading(tokens: list[int], reference: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=512, help="context tokens before the question")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="*", help="names of the variants to time (default: all)")
    parser.add_argument("--out", default="reports/bench/decode-step-cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models, tokenizer = variants(args.variants)  # built outside inference mode: the models' tensors stay plain ones
    with torch.inference_mode():
        run(args, models, tokenizer)


def run(args: argparse.Namespace, models: dict, tokenizer) -> None:
    text, _ = exact_length_text(tokenizer, read_passages(None)[0], args.prompt)
    ids = torch.tensor([tokenizer(text + QUESTION, add_special_tokens=False)["input_ids"]])
    embeds = {name: m.get_input_embeddings()(ids) for name, (_, m) in models.items()}
    for name, (_, model) in models.items():  # warm-up
        timed_run(model, embeds[name][:, :16], 3)
    prefill: dict[str, list[float]] = {name: [] for name in models}
    steps: dict[str, list[float]] = {name: [] for name in models}
    tokens: dict[str, list[int]] = {}
    names = list(models)
    for repeat in range(args.repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            seconds, per_step, tokens[name] = timed_run(models[name][1], embeds[name], args.new_tokens)
            prefill[name].append(seconds)
            steps[name] += per_step
            print(
                f"[{repeat + 1}] {name:<34} prefill {seconds:.2f} s, step {statistics.median(per_step) * 1e3:.1f} ms",
                flush=True,
            )
    rows = []
    for name in names:
        group = models[name][0]
        reference = tokens[GROUPS[group]]
        row = {
            "variant": name,
            "group": group,
            "prefill_s_median": statistics.median(prefill[name]),
            "step_ms_median": statistics.median(steps[name]) * 1e3,
            "step_ms_min": min(steps[name]) * 1e3,
            "tokens_equal_fp32": tokens[name] == reference,
            "same_prefix_tokens": leading(tokens[name], reference),
        }
        rows.append(row)
        print(
            f"{group:<13} {name:<34} prefill {row['prefill_s_median']:.2f} s  step median "
            f"{row['step_ms_median']:.1f} ms (min {row['step_ms_min']:.1f})  = fp32 tokens: "
            f"{row['same_prefix_tokens']}/{len(reference)} leading"
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
        "answers": {name: tokenizer.decode(found) for name, found in tokens.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
