"""The llama.cpp arms of ``gmsa bench`` (``--llamacpp TYPE``).

* ``uncompressed-llamacpp-TYPE``: the plain backbone, written as a GGUF of weight type ``TYPE``
  (:func:`gmsa.gguf_export.write_gguf`), reads ``[context tokens; question]`` as token ids: what a user
  who runs the uncompressed prompt in llama.cpp gets;
* ``gmsa-{fresh,stored}-rR-llamacpp-TYPE``: GMSA compresses (or loads) in this process, then its decoder,
  exported as a GGUF of the same type (:func:`gmsa.gguf_export.exported_gguf`), reads
  ``[soft tokens; question]`` as embeddings;
* ``gmsa-{fresh,stored}-rR-torch+llamacpp-TYPE``: the same, but GMSA's own decoder (``GMSA.fast_decoder``) reads
  the prompt and its KV cache is handed to llama.cpp (:mod:`gmsa.kv_handoff`), which decodes the steps on
  repacked (AMX) weights;
* ``uncompressed-torch+llamacpp-TYPE``: the uncompressed prompt the same way (the plain backbone in GMSA's
  dtype through gmsa's decoding reads it, llama.cpp steps on the plain GGUF): the fastest uncompressed
  pipeline the bench knows, reported beside the reference, not as it.

All decode ``new_tokens`` greedy tokens (EOS ignored, the bench's repetition penalty) in
:class:`gmsa.llamacpp.LlamaCppDecoder`, with the bench's thread count. Their speed-ups are given
against the bench's reference (plain transformers at its fastest dtype) like every arm, and the GMSA
arms' also against the uncompressed prompt through the same engine (``speedup_vs_llamacpp``:
``uncompressed-llamacpp-TYPE``, or ``uncompressed-torch+llamacpp-TYPE`` for the torch-prefill arms).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..compressed import Compressed
from ..gguf_export import exported_gguf, write_gguf
from ..kv_handoff import TorchPrefill
from ..llamacpp import LlamaCppDecoder
from .timing import Arm, Measurement, PeakMemory, PhaseClock, phase_times, ratios, stamp

KV_BYTES = 2  # llama.cpp's KV cache holds f16
LLAMACPP_LOOPS = ("llamacpp", "hybrid")  # the arms' decoding loops that run in llama.cpp


def llamacpp_decoders(gmsa, plain: torch.nn.Module, weight_type: str, threads: int, workdir: Path) -> dict:
    """GMSA's decoder (answering's adapters) and the plain backbone in llama.cpp: ``"gmsa"``, ``"plain"``, and
    ``"gmsa-steps"``, ``"plain-steps"`` on repacked (AMX) weights, for the arms whose prompt gmsa's torch prefill
    reads (:class:`gmsa.llamacpp.LlamaCppDecoder`: faster steps, no multi-position batches)."""
    from ..backbone import DEFAULT_BACKBONE, default_gguf_path

    template = default_gguf_path() if str(gmsa.config.backbone) == DEFAULT_BACKBONE else None
    plain_path = write_gguf(plain, workdir / f"backbone.{weight_type}.gguf", gmsa.tokenizer, weight_type, template)
    gmsa_path = exported_gguf(gmsa, weight_type)
    return {
        "gmsa": LlamaCppDecoder(gmsa_path, threads),
        "gmsa-steps": LlamaCppDecoder(gmsa_path, threads, extra_buffers=True),
        "plain": LlamaCppDecoder(plain_path, threads),
        "plain-steps": LlamaCppDecoder(plain_path, threads, extra_buffers=True),
    }


def llamacpp_arms(weight_type: str, rates: list[int]) -> list[Arm]:
    arms = [Arm("uncompressed", dtype=weight_type, loop=loop) for loop in LLAMACPP_LOOPS]
    for rate in rates:
        for loop in LLAMACPP_LOOPS:
            arms += [Arm("gmsa", rate, mode, dtype=weight_type, loop=loop) for mode in ("fresh", "stored")]
    return arms


def kv_bytes(config, positions: int) -> int:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * positions * KV_BYTES


def measure_llamacpp(
    subject,
    prepare: Callable[[], object],
    build: Callable[[object], torch.Tensor],
    first_phase: str,
    decoder,
    n_new: int,
    penalty: float,
    prefill: TorchPrefill | None = None,
) -> Measurement:
    """Time ``prepare`` + ``build`` (``(n, H)`` embeddings or ``(n,)`` ids) + llama.cpp's prefill and greedy decoding.

    ``subject``: the GMSA (its encoder and LSA are stamped, as in :func:`gmsa.evaluation.timing.measure`).
    ``prefill``: who reads the prompt, if not llama.cpp (:meth:`gmsa.llamacpp.LlamaCppDecoder.greedy_ids`).
    """
    device = subject.device
    load_average = os.getloadavg()[0]
    marks: list[tuple[float, float]] = []
    with PeakMemory(device) as memory, PhaseClock(subject, device) as clock:
        start = stamp(device)
        prepared_value = prepare()
        prepared = stamp(device)
        prompt = build(prepared_value)
        built = stamp(device)
        mark = lambda: marks.append(stamp(device))  # noqa: E731
        tokens = decoder.greedy_ids(prompt, n_new, penalty, None, on_prefill=mark, prefill=prefill)
        end = stamp(device)
    e2e, phases = phase_times((start, prepared, built, built, marks[0], end), first_phase, clock)
    n_prompt = int(prompt.shape[0])
    compressed = prepared_value if isinstance(prepared_value, Compressed) else None
    config = subject.model.decoder.config
    return Measurement(
        e2e, phases, n_prompt, kv_bytes(config, n_prompt), memory.added_bytes, load_average, compressed, tokens
    )


def held_prefill(subjects, name: str, decoder: Callable[[], torch.nn.Module]) -> TorchPrefill:
    """The torch prefill ``name`` of ``subjects``, made on first use and kept for every later run, as an engine
    holds one (its state buffer is reused); compiled ahead of time unless ``--no-compile``."""
    if name not in subjects.llamacpp:
        compiled = subjects.notes["llamacpp"].get("compile_prefill", True)
        subjects.llamacpp[name] = TorchPrefill(decoder, compiled)
    return subjects.llamacpp[name]


def run_llamacpp_arm(
    subjects, arm: Arm, text: str, n_new: int, batch_size: int, stored: Path, penalty: float, question: str
):
    """One timed run of a llama.cpp arm (a fresh run leaves its soft tokens in ``stored``, as :func:`run_arm` does)."""
    gmsa, decoders = subjects.gmsa, subjects.llamacpp
    if arm.method == "uncompressed":
        ids = lambda: torch.tensor(gmsa.tokenize_contexts([text])[0] + gmsa.prompt_ids_for(question))  # noqa: E731
        if arm.loop == "llamacpp":
            return measure_llamacpp(gmsa, ids, lambda x: x, "tokenize", decoders["plain"], n_new, penalty)
        plain = subjects.baselines[subjects.loop_dtype or next(iter(subjects.baselines))]
        prefill = held_prefill(subjects, "plain-prefill", lambda: gmsa.fast_decoder.of(plain))
        embed = lambda x: plain.get_input_embeddings()(x)  # noqa: E731
        return measure_llamacpp(gmsa, ids, embed, "tokenize", decoders["plain-steps"], n_new, penalty, prefill)

    def build(compressed: Compressed) -> torch.Tensor:
        return gmsa.prompt_embeds(compressed, [question])[0]

    prefill, decoder = None, decoders["gmsa"]
    if arm.loop == "hybrid":
        prefill = held_prefill(subjects, "gmsa-prefill", lambda: gmsa.fast_decoder.of(gmsa.model.decoder))
        decoder = decoders["gmsa-steps"]
    if arm.mode == "stored":
        load = lambda: Compressed.load(stored)  # noqa: E731
        return measure_llamacpp(gmsa, load, build, "load", decoder, n_new, penalty, prefill)
    compress = lambda: gmsa.compress(text, rate=arm.rate, batch_size=batch_size)  # noqa: E731
    result = measure_llamacpp(gmsa, compress, build, "compress_other", decoder, n_new, penalty, prefill)
    if not stored.exists():
        result.compressed.save(stored)
    return result


def add_llamacpp_ratios(rows: list[dict], runs: dict[Arm, list[Measurement]], arms: list[Arm]) -> None:
    """GMSA's llama.cpp arms against the uncompressed prompt through the same engine (llama.cpp alone, or torch
    prefill + llama.cpp steps) and weight type, per clock."""
    bases = {(a.loop, a.dtype): a for a in arms if a.method == "uncompressed" and a.loop in LLAMACPP_LOOPS}
    for row, arm in zip(rows, arms):
        base = bases.get((arm.loop, arm.dtype))
        if arm.method != "gmsa" or base is None or not runs.get(base) or not runs.get(arm):
            continue
        for clock in ("wall", "cpu"):
            against = ratios([b.e2e[clock] for b in runs[base]], [m.e2e[clock] for m in runs[arm]])
            row[clock]["speedup_vs_llamacpp"] = against | {"against": base.name}
