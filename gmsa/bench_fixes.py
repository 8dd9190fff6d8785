"""``gmsa bench --fixes``: interleaved before/after timings of the decoding and encoder speed fixes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from .bench import (
    CLOCKS,
    QUESTION,
    REPETITION_PENALTY,
    BenchSettings,
    PhaseClock,
    embedded_context,
    environment,
    exact_length_text,
    finished,
    ratios,
    spread,
    stamp,
)
from .decoding import greedy_generate


def fix_variants(gmsa, text: str, settings: BenchSettings) -> dict[str, Callable[[], None]]:
    """The old and new code for decoding and for the encoder, on the same inputs."""
    ids = torch.tensor([gmsa.tokenize_contexts([text])[0]], device=gmsa.device)
    mask = torch.ones_like(ids)
    packed = gmsa.decoder_prompt(embedded_context(gmsa, text), [QUESTION])
    decoder, n_new = gmsa.model.decoder, settings.new_tokens

    def transformers_generate() -> None:  # the decoding used before: generate() with its growing cache
        decoder.generate(
            inputs_embeds=packed.inputs_embeds,
            attention_mask=packed.attention_mask,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            repetition_penalty=REPETITION_PENALTY,
            pad_token_id=gmsa.tokenizer.pad_token_id,
            disable_compile=True,
        )

    return {
        "generate_transformers": transformers_generate,
        "generate_reserved_cache": lambda: greedy_generate(
            decoder, packed.inputs_embeds, packed.attention_mask, n_new, REPETITION_PENALTY
        ),
        "encode_lora": lambda: gmsa.model.compress(ids, mask, settings.rates[0]),
        "encode_merged_lora": lambda: gmsa.model.compress(ids, mask, settings.rates[0], gmsa.inference_encoder()),
    }


def run_fixes(
    gmsa, passages: list[str], settings: BenchSettings, described: str, source: str, log: Callable, started: dict
) -> dict:
    """Interleaved before/after timings (wall and CPU) of the decoding and encoder fixes at the first length.

    Decoding is split by the decoder hooks into the prefill (the same work in both) and the
    decoding steps after it (where the cache differs).
    """
    import warnings

    length = settings.lengths[0]
    text, repeated = exact_length_text(gmsa.tokenizer, passages, length)
    times: dict[str, dict[str, list[float]]] = {clock: {} for clock in CLOCKS}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # generate() warns that the penalty skips the prompt embeddings
        variants = fix_variants(gmsa, text, settings)
        for variant in variants.values():
            variant()  # warm-up
        for repeat in range(settings.repeats):
            for name, variant in variants.items() if repeat % 2 == 0 else list(variants.items())[::-1]:
                for part, seconds in _timed_parts(gmsa, variant).items():
                    for clock in CLOCKS:
                        times[clock].setdefault(f"{name}:{part}", []).append(seconds[clock])
                log(f"  [{repeat + 1}/{settings.repeats}] {name:<24} {times['wall'][f'{name}:total'][-1]:8.2f} s wall")
    pairs = {
        "decoding steps after the prefill": ("generate_transformers:decode", "generate_reserved_cache:decode"),
        "prefill (same work, control)": ("generate_transformers:prefill", "generate_reserved_cache:prefill"),
        "prefill + decoding": ("generate_transformers:total", "generate_reserved_cache:total"),
        "encoder (k_enc layers + merge + LSA)": ("encode_lora:total", "encode_merged_lora:total"),
    }
    results = {
        "environment": environment(gmsa, settings, described, source, repeated) | {"length": length},
        "seconds": {clock: {name: spread(values) for name, values in times[clock].items()} for clock in CLOCKS},
        "speedup_old_over_new": {
            clock: {what: ratios(times[clock][old], times[clock][new]) for what, (old, new) in pairs.items()}
            for clock in CLOCKS
        },
    }
    results["environment"] |= started | finished()
    out = Path(settings.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for clock, speedups in results["speedup_old_over_new"].items():
        for what, value in speedups.items():
            paired = f"{value['paired_min']:.2f}-{value['paired_max']:.2f}"
            log(f"{what} [{clock}]: old/new = {value['ratio_of_medians']:.2f}x (paired {paired})")
    return results


def _timed_parts(gmsa, variant: Callable[[], object]) -> dict[str, dict[str, float]]:
    """Seconds by clock of a whole call, and of its decoder prefill and later decoder calls."""
    with PhaseClock(gmsa, gmsa.device) as clock:
        start = stamp(gmsa.device)
        variant()
        end = stamp(gmsa.device)
    parts = {"total": {c: end[k] - start[k] for k, c in enumerate(CLOCKS)}}
    if any(name == "decoder_end" for name, _ in clock.events):
        decoder_start, prefill_end = clock.first("decoder_start"), clock.first("decoder_end")
        parts["prefill"] = {c: prefill_end[k] - decoder_start[k] for k, c in enumerate(CLOCKS)}
        parts["decode"] = {c: end[k] - prefill_end[k] for k, c in enumerate(CLOCKS)}
    return parts
