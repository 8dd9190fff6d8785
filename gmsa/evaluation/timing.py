"""Timing the arms of ``gmsa bench``: wall and CPU clocks, phases by forward hooks, peak memory, KV-cache size.

:func:`measure` times one run of an :class:`Arm` (prepare the context, build the prompt, prefill, decode)
and splits it into ``PHASES`` on both ``CLOCKS``; :func:`summarise` and :func:`add_ratios` turn the
repeats of each arm into a result row with its speed-ups.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..compressed import Compressed
from ..decoding import greedy_generate, kv_cache_bytes

CLOCKS = ("wall", "cpu")  # wall-clock seconds; CPU seconds of this process (steadier on a shared machine)
PHASES = ("tokenize", "load", "compress_other", "encoder", "merge_lsa", "prompt_build", "prefill", "decode")


@dataclass(frozen=True)
class Arm:
    """One configuration to time at one context length."""

    method: str  # "uncompressed" or "gmsa"
    rate: int = 1
    mode: str = "-"  # "fresh" or "stored" for gmsa
    dtype: str = ""  # the uncompressed prompt runs in plain transformers, once per dtype
    # plain transformers generate ("hf", uncompressed only), gmsa's decoding ("gmsa"; GMSA's own arms say "hf"),
    # or llama.cpp ("llamacpp": ``dtype`` is then the GGUF weight type; "hybrid": gmsa's decoder reads the prompt,
    # llama.cpp decodes from its KV cache)
    loop: str = "hf"

    @property
    def name(self) -> str:
        if self.method == "uncompressed":
            through = {"gmsa": "-gmsa-loop", "llamacpp": "-llamacpp", "hybrid": "-torch+llamacpp"}.get(self.loop, "")
            return f"uncompressed{through}-{self.dtype}" if self.dtype else f"uncompressed{through}"
        through = {"llamacpp": f"-llamacpp-{self.dtype}", "hybrid": f"-torch+llamacpp-{self.dtype}"}.get(self.loop, "")
        return f"gmsa-{self.mode}-r{self.rate}{through}"


def stamp(device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds now (after waiting for the GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS, so the next run's resident-memory peak is its own."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory a block adds: CUDA allocator peak, or resident memory sampled every 5 ms on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.added_bytes = 0

    def __enter__(self) -> PeakMemory:
        _release_freed_memory()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = self._peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.added_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._stop.set()
        self._thread.join()
        self.added_bytes = max(self._peak, _rss_bytes()) - self._start


class PhaseClock:
    """Forward hooks that stamp when the encoder, the LSA and each decoder call start and end.

    ``gmsa`` is a GMSA (its encoders, LSA and decoder are stamped) or a plain decoder.
    """

    def __init__(self, gmsa, device: torch.device):
        self.gmsa, self.device = gmsa, device
        self.events: list[tuple[str, tuple[float, float]]] = []
        self.prompt_kv_bytes = 0

    def _stamp(self, name: str) -> Callable:
        def hook(*_args) -> None:
            self.events.append((name, stamp(self.device)))

        return hook

    def _decoder_end(self, _module, _args, kwargs, _output) -> None:
        if not any(name == "decoder_end" for name, _ in self.events):
            self.prompt_kv_bytes = kv_cache_bytes(kwargs["past_key_values"])
        self.events.append(("decoder_end", stamp(self.device)))

    def __enter__(self) -> PhaseClock:
        model = self.gmsa.model if hasattr(self.gmsa, "inference_encoder") else None
        decoder = self.gmsa.fast_decoder.of(model.decoder) if model is not None else self.gmsa
        self._handles = [
            decoder.register_forward_pre_hook(self._stamp("decoder_start")),
            decoder.register_forward_hook(self._decoder_end, with_kwargs=True),
        ]
        if model is not None:
            encoders = {id(m): m for m in (model.encoder, self.gmsa.inference_encoder())}.values()
            self._handles += [
                *(encoder.register_forward_pre_hook(self._stamp("encoder_start")) for encoder in encoders),
                *(encoder.register_forward_hook(self._stamp("encoder_end")) for encoder in encoders),
                model.lsa.register_forward_hook(self._stamp("lsa_end")),
            ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def first(self, name: str) -> tuple[float, float]:
        return next(t for n, t in self.events if n == name)

    def total_between(self, start: str, end: str, clock: int) -> float:
        """Summed time (``clock`` 0: wall, 1: CPU) from each ``start`` stamp to the next ``end`` stamp."""
        total, opened = 0.0, None
        for name, stamps in self.events:
            if name == start:
                opened = stamps[clock]
            elif name == end and opened is not None:
                total, opened = total + stamps[clock] - opened, None
        return total


@dataclass
class Measurement:
    """One timed run, by clock (``wall``, ``cpu``): seconds end to end and per phase; sizes; memory."""

    e2e: dict[str, float]
    phases: dict[str, dict[str, float]]
    prompt_tokens: int
    kv_cache_bytes: int
    peak_memory_bytes: int
    load_average: float = 0.0  # the machine's 1-minute load average when the run started
    compressed: Compressed | None = field(default=None, repr=False)
    tokens: list[int] = field(default_factory=list)  # the greedy answer


def gmsa_loop(decoder, embeds: torch.Tensor, mask: torch.Tensor, n_new: int, penalty: float) -> torch.Tensor:
    """``n_new`` greedy tokens through gmsa's decoding loop (EOS ignored)."""
    return greedy_generate(decoder, embeds, mask, n_new, penalty, None)[0]


def hf_generate(decoder, embeds: torch.Tensor, mask: torch.Tensor, n_new: int, penalty: float) -> torch.Tensor:
    """``n_new`` greedy tokens through plain ``transformers`` ``generate`` (EOS suppressed until the end)."""
    with warnings.catch_warnings():  # the penalty applies to new tokens only: as in gmsa's loop, on purpose
        warnings.filterwarnings("ignore", "Passing `repetition_penalty` with `inputs_embeds`")
        return decoder.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            repetition_penalty=penalty,
            pad_token_id=decoder.config.eos_token_id,
        )


def measure(
    subject,
    prepare: Callable[[], object],
    build: Callable[[object], tuple],
    first_phase: str,
    n_new: int,
    repetition_penalty: float,
    generate: Callable = gmsa_loop,
) -> Measurement:
    """Time ``prepare`` (tokenise, compress or load) + ``build`` (the prompt) + prefill + greedy decoding.

    ``subject`` is a GMSA or a plain decoder; ``build`` returns ``(decoder, embeds, mask)``;
    ``generate`` (:func:`gmsa_loop` or :func:`hf_generate`) decodes.
    """
    device = next(subject.parameters()).device if isinstance(subject, torch.nn.Module) else subject.device
    load_average = os.getloadavg()[0]
    with PeakMemory(device) as memory, PhaseClock(subject, device) as clock:
        start = stamp(device)
        compressed = prepare()
        prepared = stamp(device)
        decoder, embeds, mask = build(compressed)
        built = stamp(device)
        tokens = generate(decoder, embeds, mask, n_new, repetition_penalty)
        end = stamp(device)
    stamps = (start, prepared, built, clock.first("decoder_start"), clock.first("decoder_end"), end)
    e2e, phases = phase_times(stamps, first_phase, clock)
    prompt_tokens = int(mask.shape[1])
    return Measurement(
        e2e,
        phases,
        prompt_tokens,
        clock.prompt_kv_bytes,
        memory.added_bytes,
        load_average,
        compressed,
        tokens[0].tolist(),
    )


def phase_times(stamps: tuple, first_phase: str, clock: PhaseClock) -> tuple[dict, dict]:
    """End-to-end and per-phase seconds, by clock, from the ``(start, prepared, built, prefill start, prefill end,
    end)`` stamps of one run; ``clock``'s encoder and LSA stamps split a fresh compression."""
    start, prepared, built, decoder_start, prefill_end, end = stamps
    phases = {}
    for k, name in enumerate(CLOCKS):
        phases[name] = {
            first_phase: prepared[k] - start[k],
            "prompt_build": built[k] - prepared[k],
            "prefill": prefill_end[k] - decoder_start[k],
            "decode": end[k] - prefill_end[k],
        }
        if first_phase == "compress_other":
            phases[name]["encoder"] = clock.total_between("encoder_start", "encoder_end", k)
            phases[name]["merge_lsa"] = clock.total_between("encoder_end", "lsa_end", k)
            phases[name]["compress_other"] -= phases[name]["encoder"] + phases[name]["merge_lsa"]
    return {name: end[k] - start[k] for k, name in enumerate(CLOCKS)}, phases


def spread(values: list[float]) -> dict:
    """Median, range and the values themselves."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def per_second(count: float, seconds: float) -> float | None:
    return count / seconds if seconds > 0 else None


def ratios(old: list[float], new: list[float]) -> dict:
    """``old / new``: ratio of the medians, and median/min/max of the ratios of the runs paired by repeat."""
    paired = [a / b for a, b in zip(old, new)]
    return {
        "ratio_of_medians": statistics.median(old) / statistics.median(new),
        "paired_median": statistics.median(paired),
        "paired_min": min(paired),
        "paired_max": max(paired),
    }


def summarise(arm: Arm, length: int, runs: list[Measurement] | None, reason: str | None, n_new: int) -> dict:
    """One result row: medians and ranges over the repeats, per clock (or why the arm was skipped)."""
    row = {"length": length, "arm": arm.name, "method": arm.method, "rate": arm.rate, "mode": arm.mode}
    if not runs:
        return row | {"status": "skipped", "reason": reason or "no run"}
    first = runs[0]
    row |= {
        "status": "ok",
        "prompt_tokens": first.prompt_tokens,
        "kv_cache_bytes": first.kv_cache_bytes,
        "peak_memory_bytes": int(statistics.median(r.peak_memory_bytes for r in runs)),
        "load_average_1min": [r.load_average for r in runs],
    }
    decode_steps = n_new - 1  # the first new token comes out of the prefill
    for clock in CLOCKS:
        names = [name for name in PHASES if name in first.phases[clock]]
        phases = {name: statistics.median(r.phases[clock][name] for r in runs) for name in names}
        compress_s = sum(phases.get(name, 0.0) for name in ("compress_other", "encoder", "merge_lsa"))
        row[clock] = {
            "e2e_s": spread([r.e2e[clock] for r in runs]),
            "phases_s": phases,
            "prefill_s": spread([r.phases[clock]["prefill"] for r in runs]),
            "decode_s": spread([r.phases[clock]["decode"] for r in runs]),
            "compress_tokens_per_s": per_second(length, compress_s) if arm.mode == "fresh" else None,
            "prefill_tokens_per_s": per_second(first.prompt_tokens, phases["prefill"]),
            "decode_tokens_per_s": per_second(decode_steps, phases["decode"]) if decode_steps else None,
        }
    return row


def add_ratios(rows: list[dict], runs: dict[Arm, list[Measurement]], arms: list[Arm]) -> None:
    """Speed-ups against the uncompressed prompt at its fastest dtype (per clock, by median end to end):
    ratio of medians and per-repeat paired ratios. ``against`` names that uncompressed arm (one in plain
    transformers: the uncompressed prompt through gmsa's decoding is reported, not a reference)."""
    bases = [arm for arm in arms if arm.method == "uncompressed" and arm.loop == "hf" and runs.get(arm)]
    for clock in CLOCKS:
        if not bases:
            return
        best = min(bases, key=lambda arm: statistics.median(m.e2e[clock] for m in runs[arm]))
        base = runs[best]
        for row, arm in zip(rows, arms):
            if row["status"] != "ok" or arm == best:
                continue
            mine = runs[arm]
            row[clock]["speedup_e2e"] = ratios([b.e2e[clock] for b in base], [m.e2e[clock] for m in mine])
            row[clock]["speedup_e2e"]["against"] = best.name
            row[clock]["speedup_prefill"] = ratios(
                [b.phases[clock]["prefill"] for b in base], [m.phases[clock]["prefill"] for m in mine]
            )
            if arm.method == "gmsa":
                row["kv_cache_ratio"] = row["kv_cache_bytes"] / base[0].kv_cache_bytes
