"""``gmsa bench``: end-to-end latency of the uncompressed prompt vs GMSA, in one run.

For each context length, on the same backbone, the same text (real passages cut to an exact
token count) and the same question, three kinds of run answer with exactly ``new_tokens``
greedy tokens through the same decoding code (:func:`gmsa.decoding.greedy_generate`):

* ``uncompressed``: the decoder reads ``[context tokens; question]``;
* ``fresh`` (per rate): compress the text, then read ``[soft tokens; question]``;
* ``stored`` (per rate): load the soft tokens from a ``.safetensors`` file, then the same.

Each run is split into phases (tokenise/load, encoder, merge+LSA, prompt building, prefill,
decode) by forward hooks. Repeats are interleaved, alternating the order (A B C, C B A, ...)
so that slow drift of a shared machine does not favour one side; medians, ranges and the
per-repeat paired ratios against the uncompressed run of the same repeat are reported.
Results go to a JSON file and a plot next to it.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .compressed import Compressed
from .decoding import greedy_generate, kv_cache_bytes
from .version import __version__

QUESTION = "What is the main subject of the text above?"
REPETITION_PENALTY = 1.3
DEFAULT_TEXT = Path("data/ae/test.jsonl")
SHIPPED_TEXT = Path(__file__).parent / "assets" / "demo.json"
CLOCKS = ("wall", "cpu")  # wall-clock seconds; CPU seconds of this process (steadier on a shared machine)
PHASES = ("tokenize", "load", "compress_other", "encoder", "merge_lsa", "prompt_build", "prefill", "decode")


# ----------------------------------------------------------------- inputs
def read_passages(path: Path | None) -> tuple[list[str], str]:
    """Passages of real text and where they came from.

    ``path`` may be a JSONL file (``text`` or ``context`` fields) or a plain text file. Without
    one: ``data/ae/test.jsonl`` if present, else the shipped demo passage, else the docstrings
    of Python's standard library.
    """
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"no such text file: {path}")
    for candidate in [path] if path is not None else [DEFAULT_TEXT, SHIPPED_TEXT]:
        passages = [p for p in _passages_in(candidate) if p.strip()] if candidate.is_file() else []
        if passages:
            return passages, str(candidate)
    if path is not None:
        raise ValueError(f"{path} holds no text")
    modules = ("argparse", "json", "pathlib", "statistics", "threading", "typing")
    return [importlib.import_module(name).__doc__ or "" for name in modules], "Python standard library docstrings"


def _passages_in(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [str(row.get("text") or row.get("context") or "") for row in rows]
    if path.suffix == ".json":
        return [str(json.loads(text).get("text", ""))]
    return [text]


def exact_length_text(tokenizer, passages: list[str], n_tokens: int) -> tuple[str, bool]:
    """A text of exactly ``n_tokens`` tokens: the passages joined in order (cycled if too short).

    Returns the text and whether the passages had to be repeated.
    """
    joined, repeated = "", False
    while True:
        for passage in passages:
            joined += passage + "\n\n"
            ids = tokenizer(joined, add_special_tokens=False, verbose=False)["input_ids"]
            if len(ids) >= n_tokens + 8:
                return _cut_to_tokens(tokenizer, ids, n_tokens), repeated
        repeated = True


def _cut_to_tokens(tokenizer, ids: list[int], n_tokens: int) -> str:
    """Decode a prefix of ``ids`` whose re-tokenisation has exactly ``n_tokens`` tokens."""
    for take in [n_tokens + d for d in (0, -1, 1, -2, 2, -3, 3, -4, 4)]:
        text = tokenizer.decode(ids[:take])
        if len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) == n_tokens:
            return text
    raise ValueError(f"cannot cut the text to exactly {n_tokens} tokens")


# ----------------------------------------------------------------- measuring
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
    """Forward hooks that stamp when the encoder, the LSA and each decoder call start and end."""

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
        model = self.gmsa.model
        encoders = {id(m): m for m in (model.encoder, self.gmsa.inference_encoder())}.values()
        self._handles = [
            *(encoder.register_forward_pre_hook(self._stamp("encoder_start")) for encoder in encoders),
            *(encoder.register_forward_hook(self._stamp("encoder_end")) for encoder in encoders),
            model.lsa.register_forward_hook(self._stamp("lsa_end")),
            model.decoder.register_forward_pre_hook(self._stamp("decoder_start")),
            model.decoder.register_forward_hook(self._decoder_end, with_kwargs=True),
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


def measure(gmsa, prepare: Callable[[], Compressed], first_phase: str, n_new: int) -> Measurement:
    """Time ``prepare`` (tokenise, compress or load) + prompt building + prefill + decoding."""
    device = gmsa.device
    load_average = os.getloadavg()[0]
    with PeakMemory(device) as memory, PhaseClock(gmsa, device) as clock:
        start = stamp(device)
        compressed = prepare()
        prepared = stamp(device)
        packed = gmsa._decoder_prompt(compressed, [QUESTION])
        built = stamp(device)
        greedy_generate(
            gmsa.model.decoder, packed.inputs_embeds, packed.attention_mask, n_new, REPETITION_PENALTY, None
        )
        end = stamp(device)
    decoder_start, prefill_end = clock.first("decoder_start"), clock.first("decoder_end")
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
    e2e = {name: end[k] - start[k] for k, name in enumerate(CLOCKS)}
    prompt_tokens = int(packed.attention_mask.shape[1])
    return Measurement(e2e, phases, prompt_tokens, clock.prompt_kv_bytes, memory.added_bytes, load_average, compressed)


# ----------------------------------------------------------------- the three kinds of run
@dataclass(frozen=True)
class Arm:
    """One configuration to time at one context length."""

    method: str  # "uncompressed" or "gmsa"
    rate: int = 1
    mode: str = "-"  # "fresh" or "stored" for gmsa

    @property
    def name(self) -> str:
        return "uncompressed" if self.method == "uncompressed" else f"gmsa-{self.mode}-r{self.rate}"


def run_arm(gmsa, arm: Arm, text: str, n_new: int, batch_size: int, stored: Path) -> Measurement:
    """Time one run of ``arm``; a fresh run leaves its soft tokens in ``stored`` for the stored runs."""
    if arm.method == "uncompressed":
        return measure(gmsa, lambda: embedded_context(gmsa, text), "tokenize", n_new)
    if arm.mode == "stored":
        return measure(gmsa, lambda: Compressed.load(stored), "load", n_new)
    result = measure(gmsa, lambda: gmsa.compress(text, rate=arm.rate, batch_size=batch_size), "compress_other", n_new)
    if not stored.exists():
        result.compressed.save(stored)
    return result


def embedded_context(gmsa, text: str) -> Compressed:
    """The uncompressed baseline as a rate-1 "compressed" context: the text's token embeddings."""
    ids = gmsa.tokenize_contexts([text])[0]
    embeddings = gmsa.model.embed(torch.tensor(ids, device=gmsa.device))
    return Compressed([embeddings], [1], [len(ids)], gmsa.config.backbone_fingerprint, gmsa.checkpoint_id)


# ----------------------------------------------------------------- what fits
def decoder_prompt_tokens(arm: Arm, length: int, question_tokens: int) -> int:
    return (length if arm.method == "uncompressed" else max(1, math.ceil(length / arm.rate))) + question_tokens


def estimated_bytes(decoder_config, prompt_tokens: int, new_tokens: int, encoder_tokens: int, dtype_bytes: int) -> int:
    """A generous estimate of the memory one run adds: KV cache + the widest activations."""
    layers, hidden = decoder_config.num_hidden_layers, decoder_config.hidden_size
    heads = decoder_config.num_attention_heads
    kv_heads = getattr(decoder_config, "num_key_value_heads", None) or heads
    head_dim = getattr(decoder_config, "head_dim", None) or hidden // heads
    kv = 2 * layers * kv_heads * head_dim * (prompt_tokens + new_tokens) * dtype_bytes
    widest = max(prompt_tokens, encoder_tokens)
    activations = widest * (4 * decoder_config.intermediate_size + 12 * hidden) * dtype_bytes
    if getattr(decoder_config, "_attn_implementation", "sdpa") == "eager":
        activations += 2 * heads * widest * widest * dtype_bytes
    return kv + activations


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as handle:
        fields = dict(line.split(":", 1) for line in handle)
    return int(fields["MemAvailable"].split()[0]) * 1024


def skip_reason(gmsa, arm: Arm, length: int, settings: BenchSettings, question_tokens: int) -> str | None:
    """Why ``arm`` is not run at ``length`` (``None``: it is run).

    The uncompressed prompt is skipped when the context alone exceeds the trained window; runs
    whose prompt + new tokens exceed it by a little are run and flagged ``beyond_trained_window``.
    """
    config = gmsa.model.decoder.config
    prompt = decoder_prompt_tokens(arm, length, question_tokens)
    window = getattr(config, "max_position_embeddings", None)
    if arm.method == "uncompressed" and window and length > window and not settings.run_beyond_window:
        return (
            f"the {length}-token context alone is beyond the backbone's trained window "
            f"(max_position_embeddings={window}): not a valid baseline (--run-beyond-window times it anyway)"
        )
    encoder_tokens = 0
    if arm.mode == "fresh":
        n_windows = math.ceil(length / gmsa.config.window)
        encoder_tokens = min(length, gmsa.config.window) * min(n_windows, settings.batch_size)
    dtype_bytes = torch.finfo(gmsa.model.decoder.dtype).bits // 8
    need = estimated_bytes(config, prompt, settings.new_tokens, encoder_tokens, dtype_bytes)
    have = available_bytes(gmsa.device)
    if need > 0.8 * have:
        return f"needs about {need / 2**30:.1f} GiB, only {have / 2**30:.1f} GiB available: does not fit in memory"
    return None


def beyond_window(gmsa, arm: Arm, length: int, settings: BenchSettings, question_tokens: int) -> bool:
    window = getattr(gmsa.model.decoder.config, "max_position_embeddings", None)
    return bool(window) and decoder_prompt_tokens(arm, length, question_tokens) + settings.new_tokens > window


# ----------------------------------------------------------------- the benchmark
@dataclass
class BenchSettings:
    """What ``gmsa bench`` measures (the command-line options)."""

    model: str | None = None
    lengths: list[int] = field(default_factory=lambda: [512, 2048, 8192, 32768])
    rates: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    new_tokens: int = 32
    repeats: int = 3
    device: str = "cpu"
    dtype: str | None = None
    threads: int | None = None
    batch_size: int = 8
    window: int | None = None
    k_enc: int = 4
    text: str | None = None
    out: str = "reports/bench/bench-cpu.json"
    plot: bool = True
    run_beyond_window: bool = False
    fixes: bool = False
    note: str = ""

    def check(self) -> None:
        for name in ("lengths", "rates"):
            values = getattr(self, name)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"--{name} must be integers >= 1, got {values}")
        for name in ("new_tokens", "repeats", "batch_size", "k_enc"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"--window must be >= 1, got {self.window}")
        if self.device not in {"cpu", "cuda"} and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: no CUDA device is available")
        if self.dtype not in {None, "float32", "bfloat16", "float16"}:
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        name = self.dtype or ("float32" if self.device == "cpu" else "bfloat16")
        return getattr(torch, name)


def load_model(settings: BenchSettings):
    """The GMSA to time: ``--model DIR`` or an untrained one on the real default backbone."""
    from .api import GMSA
    from .config import GMSAConfig

    if settings.model:
        gmsa = GMSA.from_pretrained(settings.model, dtype=settings.torch_dtype, device=settings.device)
        described = f"checkpoint {settings.model}"
    else:
        gmsa = GMSA.from_backbone("default", GMSAConfig(k_enc=settings.k_enc), dtype=settings.torch_dtype)
        gmsa.model.to(settings.device)
        described = f"untrained GMSA (k_enc={settings.k_enc}) on the default backbone (speed does not need training)"
    if settings.window is not None:
        if settings.window > gmsa.config.max_context_tokens:
            raise ValueError(f"--window {settings.window} exceeds the encoder window {gmsa.config.max_context_tokens}")
        gmsa.config.window_tokens = settings.window
    return gmsa, described


def arms_for(rates: list[int]) -> list[Arm]:
    arms = [Arm("uncompressed")]
    for rate in rates:
        arms += [Arm("gmsa", rate, "fresh"), Arm("gmsa", rate, "stored")]
    return arms


def warm_up(gmsa, passages: list[str], settings: BenchSettings, workdir: Path) -> None:
    """One untimed run of every code path on a short text (kernels, allocator, caches)."""
    text, _ = exact_length_text(gmsa.tokenizer, passages, 64)
    for arm in arms_for(settings.rates[:1]):
        run_arm(gmsa, arm, text, 2, settings.batch_size, workdir / "warmup.safetensors")


def run_length(gmsa, length: int, text: str, settings: BenchSettings, workdir: Path, log: Callable) -> list[dict]:
    """All arms at one context length, repeats interleaved in alternating order."""
    question_tokens = len(gmsa._prompt_ids(QUESTION))
    arms, skipped = [], {}
    for arm in arms_for(settings.rates):
        reason = skip_reason(gmsa, arm, length, settings, question_tokens)
        if reason:
            skipped[arm] = reason
            log(f"  skip {arm.name} at {length} tokens: {reason}")
        else:
            arms.append(arm)
    runs: dict[Arm, list[Measurement]] = {arm: [] for arm in arms}
    for repeat in range(settings.repeats):
        for arm in arms if repeat % 2 == 0 else arms[::-1]:
            if arm in skipped:
                continue
            stored = workdir / f"ctx-{length}-r{arm.rate}.safetensors"
            if arm.mode == "stored" and not stored.exists():
                skipped[arm] = "no stored soft tokens: the fresh run at this rate did not complete"
                runs.pop(arm, None)
                continue
            try:
                result = run_arm(gmsa, arm, text, settings.new_tokens, settings.batch_size, stored)
            except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
                if not isinstance(err, (torch.OutOfMemoryError, MemoryError)) and "alloc" not in str(err).lower():
                    raise
                skipped[arm] = f"out of memory: {str(err).splitlines()[0][:200]}"
                log(f"  skip {arm.name} at {length} tokens: {skipped[arm]}")
                runs.pop(arm, None)
                continue
            result.compressed = None
            runs[arm].append(result)
            wall, cpu = result.e2e["wall"], result.e2e["cpu"]
            log(f"  [{repeat + 1}/{settings.repeats}] {length:>6} {arm.name:<20} {wall:8.2f} s wall {cpu:8.2f} s cpu")
    all_arms = arms_for(settings.rates)
    rows = [summarise(arm, length, runs.get(arm), skipped.get(arm), settings.new_tokens) for arm in all_arms]
    for row, arm in zip(rows, all_arms):
        row["beyond_trained_window"] = beyond_window(gmsa, arm, length, settings, question_tokens)
    add_ratios(rows, runs, all_arms)
    return rows


def finished() -> dict:
    return {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_average_end": os.getloadavg()}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


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
            "compress_tokens_per_s": _per_second(length, compress_s) if arm.mode == "fresh" else None,
            "prefill_tokens_per_s": _per_second(first.prompt_tokens, phases["prefill"]),
            "decode_tokens_per_s": _per_second(decode_steps, phases["decode"]) if decode_steps else None,
        }
    return row


def _per_second(count: float, seconds: float) -> float | None:
    return count / seconds if seconds > 0 else None


def add_ratios(rows: list[dict], runs: dict[Arm, list[Measurement]], arms: list[Arm]) -> None:
    """Speed-ups against the uncompressed run, per clock: ratio of medians and per-repeat paired ratios."""
    base = runs.get(arms[0]) or []
    for row, arm in zip(rows, arms):
        if row["status"] != "ok" or not base or arm.method == "uncompressed":
            continue
        mine = runs[arm]
        for clock in CLOCKS:
            row[clock]["speedup_e2e"] = ratios([b.e2e[clock] for b in base], [m.e2e[clock] for m in mine])
            row[clock]["speedup_prefill"] = ratios(
                [b.phases[clock]["prefill"] for b in base], [m.phases[clock]["prefill"] for m in mine]
            )
        row["kv_cache_ratio"] = row["kv_cache_bytes"] / base[0].kv_cache_bytes


def ratios(old: list[float], new: list[float]) -> dict:
    """``old / new``: ratio of the medians, and median/min/max of the ratios of the runs paired by repeat."""
    paired = [a / b for a, b in zip(old, new)]
    return {
        "ratio_of_medians": statistics.median(old) / statistics.median(new),
        "paired_median": statistics.median(paired),
        "paired_min": min(paired),
        "paired_max": max(paired),
    }


def target_checks(rows: list[dict], length: int = 2048) -> list[dict]:
    """The issue's targets, evaluated on the measured rows at ``length`` tokens (when present), per clock."""
    checks = []

    def add(name: str, row: dict, clock: str, value: float, threshold: float, about: bool = False) -> None:
        met = abs(value - threshold) <= 0.1 * threshold if about else value >= threshold
        checks.append(
            {"target": name, "arm": row["arm"], "clock": clock, "measured": value, "threshold": threshold, "met": met}
        )

    for row in rows:
        if row["length"] != length or row["status"] != "ok" or "kv_cache_ratio" not in row:
            continue
        rate, mode = row["rate"], row["mode"]
        for clock in CLOCKS:
            e2e, prefill = row[clock]["speedup_e2e"]["ratio_of_medians"], row[clock]["speedup_prefill"]
            if rate == 4 and mode == "fresh":
                add("e2e speed-up >= 3x (rate 4, fresh)", row, clock, e2e, 3.0)
            if mode == "stored":
                add(f"prefill speed-up >= 0.8 x rate {rate}", row, clock, prefill["ratio_of_medians"], 0.8 * rate)
            if rate == 4 and mode == "stored":
                add("e2e speed-up >= 2.5x (rate 4, stored)", row, clock, e2e, 2.5)
        if mode == "stored":
            add(f"KV-cache bytes ~ 1/rate {rate} (+-10%)", row, "-", row["kv_cache_ratio"], 1 / rate, about=True)
    return checks


def environment(gmsa, settings: BenchSettings, described: str, text_source: str, repeated: bool) -> dict:
    """Everything needed to read the numbers: versions, machine, model, settings."""
    config = gmsa.model.decoder.config
    device = gmsa.device
    return {
        "gmsa_version": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(gmsa.model.decoder.dtype).replace("torch.", ""),
        "model": described,
        "backbone": {
            "name": gmsa.config.backbone,
            "fingerprint": gmsa.config.backbone_fingerprint,
            "random_weights": False,
            "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "max_position_embeddings": getattr(config, "max_position_embeddings", None),
            "attn_implementation": getattr(config, "_attn_implementation", None),
        },
        "k_enc": gmsa.config.k_enc,
        "k_lsa": gmsa.config.k_lsa,
        "encoder_window": gmsa.config.window,
        "window_overlap": gmsa.config.window_overlap,
        "batch_size": settings.batch_size,
        "new_tokens": settings.new_tokens,
        "repeats": settings.repeats,
        "question": QUESTION,
        "repetition_penalty": REPETITION_PENALTY,
        "text_source": text_source,
        "text_repeated": repeated,
        "note": settings.note,
        "settings": asdict(settings),
    }


def run_bench(settings: BenchSettings, log: Callable = print) -> dict:
    """Run the whole benchmark; write the JSON (and plot); return the results."""
    settings.check()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    started = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_average_start": os.getloadavg()}
    gmsa, described = load_model(settings)
    passages, source = read_passages(Path(settings.text) if settings.text else None)
    if settings.fixes:
        return run_fixes(gmsa, passages, settings, described, source, log, started)
    rows, any_repeated = [], False
    with torch.inference_mode(), tempfile.TemporaryDirectory(prefix="gmsa-bench-") as workdir:
        warm_up(gmsa, passages, settings, Path(workdir))
        for length in settings.lengths:
            text, repeated = exact_length_text(gmsa.tokenizer, passages, length)
            gc.collect()
            any_repeated |= repeated
            log(f"context of {length} tokens")
            rows += run_length(gmsa, length, text, settings, Path(workdir), log)
    results = {
        "environment": environment(gmsa, settings, described, source, any_repeated),
        "rows": rows,
        "targets_2k": target_checks(rows),
    }
    results["environment"] |= started | finished()
    write_results(results, Path(settings.out), settings.plot)
    log(format_table(results))
    return results


# ----------------------------------------------------------------- before/after of the speed fixes
def fix_variants(gmsa, text: str, settings: BenchSettings) -> dict[str, Callable[[], None]]:
    """The old and new code for decoding and for the encoder, on the same inputs."""
    ids = torch.tensor([gmsa.tokenize_contexts([text])[0]], device=gmsa.device)
    mask = torch.ones_like(ids)
    packed = gmsa._decoder_prompt(embedded_context(gmsa, text), [QUESTION])
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
        "encode_merged_lora": lambda: gmsa._soft_tokens(ids, mask, settings.rates[0]),
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


# ----------------------------------------------------------------- output
def format_table(results: dict) -> str:
    """A plain-text table of the rows, with ratios against the uncompressed prompt (wall and CPU clocks)."""
    env = results["environment"]
    lines = [
        f"gmsa bench: {env['model']}; {env['device']} ({env['dtype']}, {env['torch_threads']} threads); "
        f"{env['new_tokens']} new tokens; {env['repeats']} repeats; seconds: median [min-max]",
        f"{'length':>6} {'arm':<17} {'wall e2e s':>22} {'cpu e2e s':>9} {'x e2e':>11} {'x prefill':>13} "
        f"{'compress':>8} {'decode':>6} {'KV MiB':>7} {'peak MiB':>8}",
        f"{'':>6} {'':<17} {'':>22} {'':>9} {'wall/cpu':>11} {'wall/cpu':>13} {'tok/s':>8} {'tok/s':>6}",
    ]
    for row in results["rows"]:
        if row["status"] != "ok":
            lines.append(f"{row['length']:>6} {row['arm']:<17} skipped: {row['reason']}")
            continue
        wall, cpu = row["wall"], row["cpu"]
        e2e = wall["e2e_s"]
        speed = "/".join(_fmt(c.get("speedup_e2e", {}).get("ratio_of_medians"), 5) for c in (wall, cpu))
        prefill = "/".join(_fmt(c.get("speedup_prefill", {}).get("ratio_of_medians"), 6) for c in (wall, cpu))
        flag = "  beyond trained window" if row["beyond_trained_window"] else ""
        lines.append(
            f"{row['length']:>6} {row['arm']:<17} {e2e['median']:8.2f} [{e2e['min']:6.2f}-{e2e['max']:6.2f}] "
            f"{cpu['e2e_s']['median']:9.2f} {speed:>11} {prefill:>13} {_fmt(wall['compress_tokens_per_s'], 8, 0)} "
            f"{_fmt(wall['decode_tokens_per_s'], 6, 1)} {row['kv_cache_bytes'] / 2**20:7.1f} "
            f"{row['peak_memory_bytes'] / 2**20:8.0f}{flag}"
        )
    for check in results["targets_2k"]:
        verdict = "met" if check["met"] else "NOT met"
        lines.append(
            f"target {check['target']} [{check['clock']}]: {check['measured']:.3g} vs {check['threshold']:.3g}"
            f" -> {verdict}"
        )
    return "\n".join(lines)


def _fmt(value: float | None, width: int, digits: int = 2) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def write_results(results: dict, out: Path, plot: bool) -> None:
    """The JSON, a markdown summary next to it, and (``plot``) the figure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown_report(results))
    if plot:
        plot_results(results, out.with_suffix(".png"))


def markdown_report(results: dict) -> str:
    """Markdown tables of a results JSON: all rows, the phase breakdown at 2k, the targets."""
    env = results["environment"]
    lines = [
        f"Model: {env['model']}. Device: {env['device']} ({env['device_name']}), {env['dtype']}, "
        f"{env['torch_threads']} torch thread(s), {env['new_tokens']} new tokens (greedy, repetition penalty "
        f"{env['repetition_penalty']}), {env['repeats']} interleaved repeats, encoder window {env['encoder_window']}. "
        f"Load average at start/end: {_loads(env, 'start')} / {_loads(env, 'end')}. {env['note']}",
        "",
        "Seconds are medians [min-max] over the repeats; speed-ups are uncompressed / GMSA (ratio of medians, "
        "with the range of the per-repeat paired ratios). CPU = this process's CPU time.",
        "",
        "| context | arm | wall e2e s | CPU e2e s | x e2e wall | x e2e CPU | x prefill CPU | compress tok/s (CPU) "
        "| decode tok/s (CPU) | KV MiB (ratio) | peak MiB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        if row["status"] != "ok":
            lines.append(f"| {row['length']} | {row['arm']} | skipped: {row['reason']} |||||||||")
            continue
        wall, cpu = row["wall"], row["cpu"]
        ratio = f" ({row['kv_cache_ratio']:.3f})" if "kv_cache_ratio" in row else ""
        flag = " (beyond trained window)" if row["beyond_trained_window"] else ""
        lines.append(
            f"| {row['length']} | {row['arm']}{flag} | {_spread(wall['e2e_s'])} | {_spread(cpu['e2e_s'])} "
            f"| {_speedup(wall.get('speedup_e2e'))} | {_speedup(cpu.get('speedup_e2e'))} "
            f"| {_speedup(cpu.get('speedup_prefill'))} | {_fmt(cpu['compress_tokens_per_s'], 0, 0)} "
            f"| {_fmt(cpu['decode_tokens_per_s'], 0, 1)} | {row['kv_cache_bytes'] / 2**20:.1f}{ratio} "
            f"| {row['peak_memory_bytes'] / 2**20:.0f} |"
        )
    lines += ["", *_breakdown_table(results["rows"]), "", *_targets_table(results["targets_2k"])]
    return "\n".join(lines) + "\n"


def _loads(env: dict, when: str) -> str:
    values = env.get(f"load_average_{when}")
    return "/".join(f"{v:.1f}" for v in values) if values else "?"


def _spread(value: dict) -> str:
    return f"{value['median']:.2f} [{value['min']:.2f}-{value['max']:.2f}]"


def _speedup(value: dict | None) -> str:
    if not value:
        return "-"
    return f"{value['ratio_of_medians']:.2f}x ({value['paired_min']:.2f}-{value['paired_max']:.2f})"


def _breakdown_table(rows: list[dict], length: int = 2048) -> list[str]:
    """Median CPU seconds per phase at ``length`` tokens."""
    mine = [row for row in rows if row["length"] == length and row["status"] == "ok"]
    if not mine:
        return []
    lines = [
        f"Where the time goes at {length} context tokens (median CPU seconds per phase):",
        "",
        "| arm | " + " | ".join(PHASES) + " | total |",
        "|---|" + "---:|" * (len(PHASES) + 1),
    ]
    for row in mine:
        phases = row["cpu"]["phases_s"]
        cells = " | ".join(f"{phases[name]:.2f}" if name in phases else "-" for name in PHASES)
        lines.append(f"| {row['arm']} | {cells} | {sum(phases.values()):.2f} |")
    return lines


def _targets_table(checks: list[dict]) -> list[str]:
    if not checks:
        return []
    lines = [
        "Targets at 2048 tokens:",
        "",
        "| target | arm | clock | measured | threshold | met |",
        "|---|---|---|---:|---:|---|",
    ]
    for c in checks:
        lines.append(
            f"| {c['target']} | {c['arm']} | {c['clock']} | {c['measured']:.3f} | {c['threshold']:.3f} "
            f"| {'yes' if c['met'] else 'no'} |"
        )
    return lines


def plot_results(results: dict, path: Path) -> None:
    """Latency vs context length by clock (left, middle) and the phase breakdown at one length (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in results["rows"] if row["status"] == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5))
    for axis, clock in zip(axes, CLOCKS):
        _plot_latency(axis, rows, clock)
    _plot_breakdown(axes[2], rows, "cpu")
    env = results["environment"]
    fig.suptitle(
        f"gmsa bench - {env['model'][:90]}\n{env['device']} {env['dtype']}, {env['torch_threads']} threads, "
        f"{env['new_tokens']} new tokens, {env['repeats']} repeats. {env['note'][:110]}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_latency(axis, rows: list[dict], clock: str) -> None:
    for arm in dict.fromkeys(row["arm"] for row in rows):
        mine = [row for row in rows if row["arm"] == arm]
        spreads = [row[clock]["e2e_s"] for row in mine]
        medians = [s["median"] for s in spreads]
        errors = [[m - s["min"] for m, s in zip(medians, spreads)], [s["max"] - m for m, s in zip(medians, spreads)]]
        style = "--" if "stored" in arm else "-"
        axis.errorbar([row["length"] for row in mine], medians, yerr=errors, fmt="o" + style, label=arm, capsize=3)
    axis.set(xscale="log", yscale="log", xlabel="context tokens", ylabel=f"end-to-end seconds ({clock} clock)")
    axis.set_title(f"compress + prefill + decode, {clock} time (median, min-max)", fontsize=9)
    if rows:
        axis.legend(fontsize=7)


def _plot_breakdown(axis, rows: list[dict], clock: str) -> None:
    with_base = sorted({row["length"] for row in rows if row["method"] == "uncompressed"})
    if not with_base:
        return
    length = 2048 if 2048 in with_base else with_base[-1]
    mine = [row for row in rows if row["length"] == length]
    bottom = [0.0] * len(mine)
    for phase in PHASES:
        heights = [row[clock]["phases_s"].get(phase, 0.0) for row in mine]
        if any(heights):
            axis.bar([row["arm"] for row in mine], heights, bottom=bottom, label=phase)
            bottom = [b + h for b, h in zip(bottom, heights)]
    axis.set_ylabel(f"seconds ({clock} clock, median per phase)")
    axis.set_title(f"where the time goes at {length} context tokens", fontsize=9)
    axis.tick_params(axis="x", rotation=60, labelsize=7)
    axis.legend(fontsize=7)


# ----------------------------------------------------------------- command line
def register(subparsers) -> None:
    """Add ``gmsa bench`` to the ``gmsa`` command line."""
    p = subparsers.add_parser("bench", help="latency of the uncompressed prompt vs GMSA (JSON + plot)")
    p.add_argument("--model", default=None, help="GMSA checkpoint (default: untrained GMSA on the default backbone)")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    p.add_argument("--rates", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default) or float16")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--batch-size", type=int, default=8, help="encoder windows per batch")
    p.add_argument("--window", type=int, default=None, help="tokens per encoder window (default: the model's)")
    p.add_argument("--k-enc", type=int, default=4, help="encoder layers of the untrained GMSA (without --model)")
    p.add_argument("--text", default=None, help="JSONL (text/context fields) or text file of passages")
    p.add_argument("--out", default=None, help="results JSON (default reports/bench/bench-DEVICE.json)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--run-beyond-window", action="store_true", help="also time uncompressed prompts beyond the window")
    p.add_argument("--fixes", action="store_true", help="time the old vs new decoding and encoder instead")
    p.add_argument("--from-json", default=None, help="only rewrite the .md and .png of an existing results JSON")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.from_json:
        path = Path(args.from_json)
        if not path.is_file():
            raise FileNotFoundError(f"no such results file: {path}")
        results = json.loads(path.read_text())
        if "rows" not in results:
            raise ValueError(f"{path} is not a `gmsa bench` results file (no rows; a --fixes file?)")
        write_results(results, path, plot=not args.no_plot)
        print(format_table(results))
        return 0
    settings = BenchSettings(
        model=args.model,
        lengths=args.lengths,
        rates=args.rates,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        batch_size=args.batch_size,
        window=args.window,
        k_enc=args.k_enc,
        text=args.text,
        out=args.out or f"reports/bench/{'fixes' if args.fixes else 'bench'}-{args.device.split(':')[0]}.json",
        plot=not args.no_plot,
        run_beyond_window=args.run_beyond_window,
        fixes=args.fixes,
        note=args.note,
    )
    run_bench(settings, log=lambda line: print(line, flush=True))
    return 0
