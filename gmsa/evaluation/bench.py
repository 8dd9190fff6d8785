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
import copy
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

from ..compressed import Compressed
from ..decoding import greedy_generate, kv_cache_bytes
from ..version import __version__

QUESTION = "What is the main subject of the text above?"
REPETITION_PENALTY = 1.3
DEFAULT_TEXT = Path("data/ae/test.jsonl")
SHIPPED_TEXT = Path(__file__).parents[1] / "assets" / "demo.json"
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
        decoder = model.decoder if model is not None else self.gmsa
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


def measure(
    subject, prepare: Callable[[], object], build: Callable[[object], tuple], first_phase: str, n_new: int
) -> Measurement:
    """Time ``prepare`` (tokenise, compress or load) + ``build`` (the prompt) + prefill + decoding.

    ``subject`` is a GMSA or a plain decoder; ``build`` returns ``(decoder, embeds, mask)``.
    """
    device = next(subject.parameters()).device if isinstance(subject, torch.nn.Module) else subject.device
    load_average = os.getloadavg()[0]
    with PeakMemory(device) as memory, PhaseClock(subject, device) as clock:
        start = stamp(device)
        compressed = prepare()
        prepared = stamp(device)
        decoder, embeds, mask = build(compressed)
        built = stamp(device)
        tokens, _ = greedy_generate(decoder, embeds, mask, n_new, REPETITION_PENALTY, None)
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


# ----------------------------------------------------------------- the three kinds of run
@dataclass(frozen=True)
class Arm:
    """One configuration to time at one context length."""

    method: str  # "uncompressed" or "gmsa"
    rate: int = 1
    mode: str = "-"  # "fresh" or "stored" for gmsa
    dtype: str = ""  # the uncompressed prompt runs in plain transformers, once per dtype

    @property
    def name(self) -> str:
        if self.method == "uncompressed":
            return f"uncompressed-{self.dtype}" if self.dtype else "uncompressed"
        return f"gmsa-{self.mode}-r{self.rate}"


@dataclass
class Subjects:
    """What is timed: the GMSA (in its inference dtype) and the plain decoders of the uncompressed prompt."""

    gmsa: object
    baselines: dict[str, torch.nn.Module]  # dtype name -> the backbone in plain transformers
    reference: object | None = None  # an fp32 GMSA whose greedy answers the timed ones are compared with
    notes: dict = field(default_factory=dict)


def run_arm(subjects: Subjects, arm: Arm, text: str, n_new: int, batch_size: int, stored: Path) -> Measurement:
    """Time one run of ``arm``; a fresh run leaves its soft tokens in ``stored`` for the stored runs."""
    gmsa = subjects.gmsa
    if arm.method == "uncompressed":
        decoder = subjects.baselines[arm.dtype]
        return measure(
            decoder, lambda: prompt_ids(gmsa, text), lambda ids: plain_prompt(decoder, ids), "tokenize", n_new
        )

    def build(compressed: Compressed) -> tuple:
        packed = gmsa.decoder_prompt(compressed, [QUESTION])
        return gmsa.model.decoder, packed.inputs_embeds, packed.attention_mask

    if arm.mode == "stored":
        return measure(gmsa, lambda: Compressed.load(stored), build, "load", n_new)
    compress = lambda: gmsa.compress(text, rate=arm.rate, batch_size=batch_size)  # noqa: E731
    result = measure(gmsa, compress, build, "compress_other", n_new)
    if not stored.exists():
        result.compressed.save(stored)
    return result


def prompt_ids(gmsa, text: str) -> torch.Tensor:
    """``(1, T)`` token ids of ``[context; question]``, as the uncompressed prompt reads them."""
    return torch.tensor([gmsa.tokenize_contexts([text])[0] + gmsa.prompt_ids_for(QUESTION)])


def plain_prompt(decoder: torch.nn.Module, ids: torch.Tensor) -> tuple:
    device = next(decoder.parameters()).device
    ids = ids.to(device)
    return decoder, decoder.get_input_embeddings()(ids), torch.ones_like(ids)


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
    dtype = getattr(torch, arm.dtype) if arm.dtype else gmsa.inference_dtype
    dtype_bytes = torch.finfo(dtype).bits // 8
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
    dtype: str = "auto"  # GMSA's inference dtype; the uncompressed prompt is timed in each candidate dtype
    baseline_dtypes: list[str] | None = None  # None: float32, and bfloat16 too where auto would pick it
    int8_steps: bool = False  # GMSA's decoding steps with int8 weights (gmsa.fast_decode)
    check_fp32: bool = True  # compare the greedy answers with an fp32 GMSA's (untimed)
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
        names = {"auto", "float32", "bfloat16", "float16"}
        if self.dtype not in names:
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.baseline_dtypes is not None and (
            not self.baseline_dtypes or set(self.baseline_dtypes) - names - {"auto"}
        ):
            raise ValueError(f"--baseline-dtypes must be float32, bfloat16 or float16, got {self.baseline_dtypes}")

    @property
    def gmsa_dtype(self) -> str | torch.dtype:
        return getattr(torch, self.dtype) if self.dtype == "float16" else self.dtype


def load_model(settings: BenchSettings, dtype: str | torch.dtype | None = None):
    """The GMSA to time: ``--model DIR`` or an untrained one on the real default backbone."""
    from ..api import GMSA
    from ..config import GMSAConfig
    from .common import UNTRAINED_DEFAULTS

    dtype = settings.gmsa_dtype if dtype is None else dtype
    if settings.model:
        gmsa = GMSA.from_pretrained(settings.model, dtype=dtype, device=settings.device)
        described = f"checkpoint {settings.model}"
    else:
        torch.manual_seed(0)  # the untrained encoder LoRA (its B factors are zero: same weights for every seed)
        config = GMSAConfig(**(UNTRAINED_DEFAULTS | {"k_enc": settings.k_enc}))
        gmsa = GMSA.from_backbone("default", config, dtype=dtype)
        gmsa.model.to(settings.device)
        described = f"untrained GMSA (k_enc={settings.k_enc}) on the default backbone (speed does not need training)"
    gmsa.hold_inference_dtype()
    if settings.window is not None:
        if settings.window > gmsa.config.max_context_tokens:
            raise ValueError(f"--window {settings.window} exceeds the encoder window {gmsa.config.max_context_tokens}")
        gmsa.config.window_tokens = settings.window
    return gmsa, described


def load_subjects(settings: BenchSettings, log: Callable) -> tuple[Subjects, str]:
    """The GMSA at its inference dtype, the plain decoders of the uncompressed prompt, the fp32 reference."""
    from ..backbone import load_backbone
    from ..fast_decode import int8_kernel_available, int8_steps
    from ..precision import resolve_dtype

    gmsa, described = load_model(settings)
    choice = gmsa.dtype_choice
    log(f"GMSA inference dtype {str(gmsa.inference_dtype).removeprefix('torch.')}: {choice.reason if choice else ''}")
    notes = {"gmsa_dtype_reason": choice.reason if choice else "", "bf16_matmul_speedup": None}
    if settings.int8_steps:
        if not int8_kernel_available() or gmsa.inference_dtype != torch.bfloat16:
            raise ValueError("--int8-steps needs bf16 inference and torch's _weight_int8pack_mm kernel")
        notes["int8_step_layers"] = int8_steps(gmsa.model.decoder)
    names = settings.baseline_dtypes
    if names is None or names == ["auto"]:
        auto = resolve_dtype("auto", settings.device)
        notes["bf16_matmul_speedup"] = auto.bf16_speedup
        names = ["float32", "bfloat16"] if auto.dtype == torch.bfloat16 else ["float32"]
        if auto.dtype != torch.bfloat16:
            log(f"uncompressed prompt in float32 only: {auto.reason}")
    plain, _ = load_backbone(gmsa.config.backbone, dtype=torch.float32)
    baselines = {name: copy.deepcopy(plain).to(settings.device, getattr(torch, name)) for name in names}
    del plain
    reference = None
    if settings.check_fp32 and gmsa.inference_dtype != torch.float32 or settings.int8_steps:
        reference, _ = load_model(settings, "float32")
    return Subjects(gmsa, baselines, reference, notes), described


def arms_for(rates: list[int], baseline_dtypes: list[str] | None = None) -> list[Arm]:
    arms = [Arm("uncompressed", dtype=name) for name in baseline_dtypes or [""]]
    for rate in rates:
        arms += [Arm("gmsa", rate, "fresh"), Arm("gmsa", rate, "stored")]
    return arms


def warm_up(subjects: Subjects, passages: list[str], settings: BenchSettings, workdir: Path) -> None:
    """One untimed run of every code path on a short text (kernels, allocator, caches)."""
    text, _ = exact_length_text(subjects.gmsa.tokenizer, passages, 64)
    for arm in arms_for(settings.rates[:1], list(subjects.baselines)):
        run_arm(subjects, arm, text, 2, settings.batch_size, workdir / "warmup.safetensors")


def run_length(
    subjects: Subjects, length: int, text: str, settings: BenchSettings, workdir: Path, log: Callable
) -> list[dict]:
    """All arms at one context length, repeats interleaved in alternating order."""
    gmsa = subjects.gmsa
    question_tokens = len(gmsa.prompt_ids_for(QUESTION))
    all_arms = arms_for(settings.rates, list(subjects.baselines))
    arms, skipped = [], {}
    for arm in all_arms:
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
                result = run_arm(subjects, arm, text, settings.new_tokens, settings.batch_size, stored)
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
    rows = [summarise(arm, length, runs.get(arm), skipped.get(arm), settings.new_tokens) for arm in all_arms]
    for row, arm in zip(rows, all_arms):
        row["beyond_trained_window"] = beyond_window(gmsa, arm, length, settings, question_tokens)
        if arm.method == "gmsa" and runs.get(arm):
            row["answer"] = gmsa.tokenizer.decode(runs[arm][0].tokens)
    add_ratios(rows, runs, all_arms)
    add_agreement(rows, runs, all_arms, subjects, text, settings.new_tokens)
    return rows


def add_agreement(
    rows: list[dict], runs: dict[Arm, list[Measurement]], arms: list[Arm], subjects: Subjects, text: str, n_new: int
) -> None:
    """Whether each arm's greedy answer equals the fp32 path's: the fp32 uncompressed prompt, or an fp32 GMSA."""
    reference_runs = {arm.rate: None for arm in arms if arm.method == "gmsa"}
    base32 = next((runs.get(arm) for arm in arms if arm.dtype == "float32"), None)
    for row, arm in zip(rows, arms):
        if not runs.get(arm):
            continue
        if arm.method == "uncompressed":
            reference = base32[0].tokens if base32 else None
        elif subjects.reference is None:
            continue
        else:
            if reference_runs[arm.rate] is None:
                reference_runs[arm.rate] = fp32_answer(subjects.reference, text, arm.rate, n_new)
            reference = reference_runs[arm.rate]
        if reference is not None:
            row["fp32_agreement"] = agreement(runs[arm][0].tokens, reference)


def fp32_answer(reference, text: str, rate: int, n_new: int) -> list[int]:
    packed = reference.decoder_prompt(reference.compress(text, rate=rate), [QUESTION])
    tokens, _ = greedy_generate(
        reference.model.decoder, packed.inputs_embeds, packed.attention_mask, n_new, REPETITION_PENALTY
    )
    return tokens[0].tolist()


def agreement(tokens: list[int], reference: list[int]) -> dict:
    """``identical``, and the number of leading tokens shared with the fp32 answer (greedy answers diverge for good)."""
    same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
    return {"identical": tokens == reference, "same_prefix_tokens": same, "tokens": len(reference)}


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
    """Speed-ups against the uncompressed prompt at its fastest dtype (per clock, by median end to end):
    ratio of medians and per-repeat paired ratios. ``against`` names that uncompressed arm."""
    bases = [arm for arm in arms if arm.method == "uncompressed" and runs.get(arm)]
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
    """The targets, on the measured rows at ``length`` tokens (and rate-4 fresh at 8192), per clock, against
    the uncompressed prompt at its fastest dtype."""
    checks = []

    def add(name: str, row: dict, clock: str, value: float, threshold: float, about: bool = False) -> None:
        met = abs(value - threshold) <= 0.1 * threshold if about else value >= threshold
        checks.append(
            {"target": name, "arm": row["arm"], "clock": clock, "measured": value, "threshold": threshold, "met": met}
        )

    for row in rows:
        if row["length"] == 8192 and row["status"] == "ok" and row["rate"] == 4 and row["mode"] == "fresh":
            for clock in CLOCKS:
                if "speedup_e2e" in row[clock]:
                    add("e2e speed-up >= 5x at 8192 tokens (rate 4, fresh)", row, clock, _e2e(row, clock), 5.0)
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
                add("e2e speed-up >= 3.5x (rate 4, stored)", row, clock, e2e, 3.5)
        if mode == "stored":
            add(f"KV-cache bytes ~ 1/rate {rate} (+-10%)", row, "-", row["kv_cache_ratio"], 1 / rate, about=True)
    return checks


def _e2e(row: dict, clock: str) -> float:
    return row[clock]["speedup_e2e"]["ratio_of_medians"]


def environment(gmsa, settings: BenchSettings, described: str, text_source: str, repeated: bool) -> dict:
    """Everything needed to read the numbers: versions, machine, model, settings."""
    from ..precision import cpu_has_native_bf16, cpu_model

    config = gmsa.model.decoder.config
    device = gmsa.device
    return {
        "cpu_model": cpu_model(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "gmsa_version": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(gmsa.inference_dtype).replace("torch.", ""),
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
    passages, source = read_passages(Path(settings.text) if settings.text else None)
    if settings.fixes:
        from .bench_fixes import run_fixes

        gmsa, described = load_model(settings)
        return run_fixes(gmsa, passages, settings, described, source, log, started)
    subjects, described = load_subjects(settings, log)
    gmsa = subjects.gmsa
    rows, any_repeated = [], False
    with torch.inference_mode(), tempfile.TemporaryDirectory(prefix="gmsa-bench-") as workdir:
        warm_up(subjects, passages, settings, Path(workdir))
        for length in settings.lengths:
            text, repeated = exact_length_text(gmsa.tokenizer, passages, length)
            gc.collect()
            any_repeated |= repeated
            log(f"context of {length} tokens")
            rows += run_length(subjects, length, text, settings, Path(workdir), log)
    environment_ = environment(gmsa, settings, described, source, any_repeated)
    environment_ |= subjects.notes | {"baseline_dtypes": list(subjects.baselines)}
    results = {
        "environment": environment_,
        "rows": rows,
        "targets_2k": target_checks(rows),
    }
    results["environment"] |= started | finished()
    from .bench_report import format_table, write_results

    write_results(results, Path(settings.out), settings.plot)
    log(format_table(results))
    return results


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
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="GMSA's inference dtype (auto: bf16 where this machine computes it faster, else fp32)",
    )
    p.add_argument(
        "--baseline-dtypes",
        nargs="+",
        default=None,
        help="dtypes of the uncompressed prompt (default: float32, and bfloat16 where auto picks it); "
        "speed-ups are against the fastest",
    )
    p.add_argument("--int8-steps", action="store_true", help="GMSA's decoding steps with int8 weights (bf16 only)")
    p.add_argument("--no-fp32-check", action="store_true", help="skip comparing greedy answers with an fp32 GMSA")
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
        from .bench_report import format_table, write_results

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
        baseline_dtypes=args.baseline_dtypes,
        int8_steps=args.int8_steps,
        check_fp32=not args.no_fp32_check,
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
