"""``gmsa bench``: end-to-end latency of the uncompressed prompt vs GMSA, in one run.

For each context length, on the same backbone, the same text (real passages cut to an exact
token count) and the same question, these runs answer with exactly ``new_tokens`` greedy tokens:

* ``uncompressed``: plain ``transformers`` ``generate`` reads ``[context tokens; question]``
  (per dtype; the fastest is the reference of the speed-ups);
* ``uncompressed-gmsa-loop``: the same prompt through gmsa's decoding (``GMSA.fast_decoder``),
  reported, not a reference;
* ``fresh`` (per rate): compress the text, then GMSA's decoding reads ``[soft tokens; question]``;
* ``stored`` (per rate): load the soft tokens from a ``.safetensors`` file, then the same.

Each run is split into phases (tokenise/load, encoder, merge+LSA, prompt building, prefill,
decode) by forward hooks. Repeats are interleaved, alternating the order (A B C, C B A, ...)
so that slow drift of a shared machine does not favour one side; medians, ranges and the
per-repeat paired ratios against the uncompressed run of the same repeat are reported.
Results go to a JSON file, a markdown summary and a plot next to it (:mod:`gmsa.evaluation.bench_report`);
the instruments are in :mod:`gmsa.evaluation.timing`.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..cli_options import add_options, from_args
from ..compressed import Compressed
from ..decoding import greedy_generate
from ..version import __version__
from .bench_llamacpp import LLAMACPP_LOOPS, add_llamacpp_ratios, llamacpp_arms, llamacpp_decoders, run_llamacpp_arm
from .bench_report import format_table, target_checks, write_results
from .bench_settings import BENCH_DTYPES, BenchSettings  # noqa: F401  (re-exported)
from .passages import exact_length_text, read_passages
from .timing import Arm, Measurement, add_ratios, gmsa_loop, hf_generate, measure, summarise

QUESTION = "What is the main subject of the text above?"
REPETITION_PENALTY = 1.3


# ----------------------------------------------------------------- the three kinds of run
@dataclass
class Subjects:
    """What is timed: the GMSA (in its inference dtype) and the plain decoders of the uncompressed prompt."""

    gmsa: object
    baselines: dict[str, torch.nn.Module]  # dtype name -> the backbone in plain transformers
    reference: object | None = None  # an fp32 GMSA whose greedy answers the timed ones are compared with
    notes: dict = field(default_factory=dict)
    loop_dtype: str = ""  # also time the uncompressed prompt through gmsa's decoding, in this dtype
    llamacpp: dict = field(default_factory=dict)  # decoders in llama.cpp and torch prefills (--llamacpp)

    @property
    def llamacpp_type(self) -> str | None:
        return self.notes.get("llamacpp", {}).get("weight_type")


def run_arm(subjects: Subjects, arm: Arm, text: str, n_new: int, batch_size: int, stored: Path) -> Measurement:
    """Time one run of ``arm``; a fresh run leaves its soft tokens in ``stored`` for the stored runs."""
    gmsa = subjects.gmsa
    if arm.loop in LLAMACPP_LOOPS:
        return run_llamacpp_arm(subjects, arm, text, n_new, batch_size, stored, REPETITION_PENALTY, QUESTION)
    if arm.method == "uncompressed":
        decoder = subjects.baselines[arm.dtype]
        if arm.loop == "gmsa":  # the speed-ups of gmsa's decoding that do not need compression
            decoder = gmsa.fast_decoder.of(decoder)
        generate = gmsa_loop if arm.loop == "gmsa" else hf_generate
        tokenize = lambda: prompt_ids(gmsa, text)  # noqa: E731
        build_plain = lambda ids: plain_prompt(decoder, ids)  # noqa: E731
        return measure(decoder, tokenize, build_plain, "tokenize", n_new, REPETITION_PENALTY, generate)

    def build(compressed: Compressed) -> tuple:
        packed = gmsa.decoder_prompt(compressed, [QUESTION])
        return gmsa.fast_decoder.of(gmsa.model.decoder), packed.inputs_embeds, packed.attention_mask

    if arm.mode == "stored":
        return measure(gmsa, lambda: Compressed.load(stored), build, "load", n_new, REPETITION_PENALTY)
    compress = lambda: gmsa.compress(text, rate=arm.rate, batch_size=batch_size)  # noqa: E731
    result = measure(gmsa, compress, build, "compress_other", n_new, REPETITION_PENALTY)
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
    dtype = getattr(torch, arm.dtype) if arm.dtype and arm.loop not in LLAMACPP_LOOPS else gmsa.inference_dtype
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
    from ..fast_decode import StepLinear
    from ..precision import resolve_dtype

    gmsa, described = load_model(settings)
    if settings.compile:  # the encoder compiled ahead of time, as on the llama.cpp engine's default path
        gmsa.compile()
    choice = gmsa.dtype_choice
    log(f"GMSA inference dtype {str(gmsa.inference_dtype).removeprefix('torch.')}: {choice.reason if choice else ''}")
    notes = {"gmsa_dtype_reason": choice.reason if choice else "", "bf16_matmul_speedup": None}
    notes["compiled_encoder"] = settings.compile
    gmsa.fast_decoder.int8 = settings.int8_steps
    fast = gmsa.fast_decoder.of(gmsa.model.decoder)
    notes["int8_step_layers"] = sum(isinstance(m, StepLinear) for m in fast.modules())
    notes["int8_steps_reason"] = gmsa.fast_decoder.int8_choice.reason
    notes["step_weights"] = gmsa.fast_decoder.step_kind or "bf16"
    notes["decoder_lora_merged"] = fast is not gmsa.model.decoder
    log(f"GMSA decoding steps on {notes['step_weights']} weights ({notes['int8_steps_reason']})")
    names = settings.baseline_dtypes
    if names is None or names == ["auto"]:
        auto = resolve_dtype("auto", settings.device)
        notes["bf16_matmul_speedup"] = auto.bf16_speedup
        names = ["float32", "bfloat16"] if auto.dtype == torch.bfloat16 else ["float32"]
        if auto.dtype != torch.bfloat16:
            log(f"uncompressed prompt in float32 only: {auto.reason}")
    plain, _ = load_backbone(gmsa.config.backbone, dtype=torch.float32)
    plain.requires_grad_(False)  # frozen, as GMSA's decoder: gmsa's decoding leaves a model in training alone
    baselines = {name: copy.deepcopy(plain).to(settings.device, getattr(torch, name)) for name in names}
    del plain
    reference = None
    if settings.check_fp32:  # the fp32 path: fp32 weights, LoRA unmerged, plain steps
        reference, _ = load_model(settings, "float32")
    loop_dtype = str(gmsa.inference_dtype).removeprefix("torch.")
    return Subjects(gmsa, baselines, reference, notes, loop_dtype if loop_dtype in baselines else ""), described


def add_llamacpp(subjects: Subjects, settings: BenchSettings, workdir: Path, log: Callable) -> None:
    """GMSA's decoder and the plain backbone as GGUF files of type ``--llamacpp``, loaded in llama.cpp."""
    import llama_cpp

    threads = settings.threads or torch.get_num_threads()
    plain = subjects.baselines.get("float32") or next(iter(subjects.baselines.values()))
    subjects.llamacpp = llamacpp_decoders(subjects.gmsa, plain, settings.llamacpp, threads, workdir)
    subjects.notes["llamacpp"] = {
        "llama_cpp_python": llama_cpp.__version__,
        "weight_type": settings.llamacpp,
        "threads": threads,
        "kv_cache": "f16",
        "gguf": subjects.llamacpp["gmsa"].path.name,
        "extra_buffers": "on for the torch-prefill arms' steps (repacked/AMX weights), off where llama.cpp prefills",
        "compile_prefill": settings.compile,
    }
    log(f"llama.cpp arms: llama-cpp-python {llama_cpp.__version__}, {settings.llamacpp} weights, {threads} threads")


def arms_for(
    rates: list[int], baseline_dtypes: list[str] | None = None, gmsa_dtype: str = "", llamacpp: str | None = None
) -> list[Arm]:
    """The uncompressed prompt in plain transformers per dtype (and through gmsa's decoding in GMSA's
    dtype, ``gmsa_dtype``), then GMSA fresh and stored per rate; then the same in llama.cpp (``llamacpp``:
    the GGUF weight type)."""
    arms = [Arm("uncompressed", dtype=name) for name in baseline_dtypes or [""]]
    if gmsa_dtype:
        arms.append(Arm("uncompressed", dtype=gmsa_dtype, loop="gmsa"))
    for rate in rates:
        arms += [Arm("gmsa", rate, "fresh"), Arm("gmsa", rate, "stored")]
    return arms + (llamacpp_arms(llamacpp, rates) if llamacpp else [])


def warm_up(subjects: Subjects, passages: list[str], settings: BenchSettings, workdir: Path) -> None:
    """One untimed run of every code path on a short text (kernels, allocator, caches)."""
    text, _ = exact_length_text(subjects.gmsa.tokenizer, passages, 64)
    for arm in arms_for(settings.rates[:1], list(subjects.baselines), subjects.loop_dtype, subjects.llamacpp_type):
        run_arm(subjects, arm, text, 2, settings.batch_size, workdir / "warmup.safetensors")


def run_length(
    subjects: Subjects, length: int, text: str, settings: BenchSettings, workdir: Path, log: Callable
) -> list[dict]:
    """All arms at one context length, repeats interleaved in alternating order."""
    gmsa = subjects.gmsa
    question_tokens = len(gmsa.prompt_ids_for(QUESTION))
    all_arms = arms_for(settings.rates, list(subjects.baselines), subjects.loop_dtype, subjects.llamacpp_type)
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
            log(f"  [{repeat + 1}/{settings.repeats}] {length:>6} {arm.name:<31} {wall:8.2f} s wall {cpu:8.2f} s cpu")
    rows = [summarise(arm, length, runs.get(arm), skipped.get(arm), settings.new_tokens) for arm in all_arms]
    for row, arm in zip(rows, all_arms):
        row["beyond_trained_window"] = beyond_window(gmsa, arm, length, settings, question_tokens)
        if arm.method == "gmsa" and runs.get(arm):
            row["answer"] = gmsa.tokenizer.decode(runs[arm][0].tokens)
    add_ratios(rows, runs, all_arms)
    add_llamacpp_ratios(rows, runs, all_arms)
    add_agreement(rows, runs, all_arms, subjects, text, settings.new_tokens)
    return rows


def add_agreement(
    rows: list[dict], runs: dict[Arm, list[Measurement]], arms: list[Arm], subjects: Subjects, text: str, n_new: int
) -> None:
    """Whether each arm's greedy answer equals the fp32 path's: the fp32 uncompressed prompt, or an fp32 GMSA."""
    reference_runs = {arm.rate: None for arm in arms if arm.method == "gmsa"}
    base32 = next((runs.get(arm) for arm in arms if arm.dtype == "float32" and arm.loop == "hf"), None)
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
    subjects, described = load_subjects(settings, log)
    gmsa = subjects.gmsa
    rows, any_repeated = [], False
    with torch.inference_mode(), tempfile.TemporaryDirectory(prefix="gmsa-bench-") as workdir:
        if settings.llamacpp:
            add_llamacpp(subjects, settings, Path(workdir), log)
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
    write_results(results, Path(settings.out), settings.plot)
    log(format_table(results))
    return results


# ----------------------------------------------------------------- command line
def register(subparsers) -> None:
    """Add ``gmsa bench`` to the ``gmsa`` command line: the fields of :class:`BenchSettings`, and ``--from-json``."""
    p = subparsers.add_parser("bench", help="latency of the uncompressed prompt vs GMSA (JSON + plot)")
    add_options(p, BenchSettings)
    p.add_argument("--from-json", default=None, help="only rewrite the .md and .png of an existing results JSON")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    if not args.from_json:
        run_bench(from_args(BenchSettings, args), log=lambda line: print(line, flush=True))
        return 0
    path = Path(args.from_json)
    if not path.is_file():
        raise FileNotFoundError(f"no such results file: {path}")
    results = json.loads(path.read_text())
    if "rows" not in results:
        raise ValueError(f"{path} is not a `gmsa bench` results file (no rows)")
    write_results(results, path, plot=args.plot)
    print(format_table(results))
    return 0
