"""What ``gmsa bench`` measures: :class:`BenchSettings`, one field per command-line option."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cli_options import option
from ..config import DTYPE_CHOICES
from ..engine_args import GGUF_TYPES
from ..fast_decode import INT8_SETTINGS

BENCH_DTYPES = (*DTYPE_CHOICES, "float16")


@dataclass
class BenchSettings:
    """What ``gmsa bench`` measures; each field is one of its options (:mod:`gmsa.cli_options`)."""

    model: str | None = option(None, "GMSA checkpoint (default: untrained GMSA on the default backbone)")
    lengths: list[int] = option(factory=lambda: [512, 2048, 8192, 32768])
    rates: list[int] = option(factory=lambda: [4, 8, 16, 32])
    new_tokens: int = 32
    repeats: int = 3
    device: str = option("cpu", "cpu or cuda")
    dtype: str = option(
        "auto",
        "GMSA's inference dtype (auto: bf16 where this machine computes it faster, else fp32); the uncompressed "
        "prompt is timed in each candidate dtype",
        choices=BENCH_DTYPES,
    )
    baseline_dtypes: list[str] | None = option(
        None,
        "dtypes of the uncompressed prompt (default: float32, and bfloat16 where auto picks it); "
        "speed-ups are against the fastest",
    )
    int8_steps: str | bool = option(
        "auto",
        "decoding steps with int8 weights (bf16 on CPU only; auto: where a start-up matmul measures them faster)",
        choices=INT8_SETTINGS,
    )
    llamacpp: str | None = option(
        None,
        "also time the uncompressed prompt and GMSA (fresh, stored) decoding in llama.cpp, on GGUF weights of this "
        "type (needs llama-cpp-python)",
        choices=GGUF_TYPES,
    )
    compile: bool = option(
        True,
        "run GMSA's encoder and the torch prefill of the torch+llamacpp arms eagerly, not compiled ahead of time as "
        "the llama.cpp engine runs them by default (gmsa.aot; built or loaded before the untimed warm-up)",
        flag="--no-compile",
    )
    check_fp32: bool = option(True, "skip comparing greedy answers with an fp32 GMSA", flag="--no-fp32-check")
    threads: int | None = option(None, "torch CPU threads (default: torch's choice)")
    batch_size: int = option(8, "encoder windows per batch")
    window: int | None = option(None, "tokens per encoder window (default: the model's)")
    k_enc: int = option(4, "encoder layers of the untrained GMSA (without --model)")
    text: str | None = option(None, "JSONL (text/context fields) or text file of passages")
    out: str | None = option(None, "results JSON (default reports/bench/bench-DEVICE.json)")
    plot: bool = option(True, "write no plot")
    run_beyond_window: bool = option(False, "also time uncompressed prompts beyond the window")
    note: str = option("", "free text stored with the results (e.g. machine load)")

    def __post_init__(self) -> None:
        if self.out is None:
            self.out = f"reports/bench/bench-{self.device.split(':')[0]}.json"

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
        names = set(BENCH_DTYPES)
        if self.dtype not in names:
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.baseline_dtypes is not None and (
            not self.baseline_dtypes or set(self.baseline_dtypes) - names - {"auto"}
        ):
            raise ValueError(f"--baseline-dtypes must be float32, bfloat16 or float16, got {self.baseline_dtypes}")
        if self.llamacpp is not None and self.llamacpp not in GGUF_TYPES:
            raise ValueError(f"--llamacpp must be one of {', '.join(GGUF_TYPES)}, got {self.llamacpp!r}")
        if self.int8_steps not in (*INT8_SETTINGS, True, False):
            raise ValueError(f"--int8-steps must be auto, on or off, got {self.int8_steps!r}")

    @property
    def gmsa_dtype(self) -> str | torch.dtype:
        return getattr(torch, self.dtype) if self.dtype == "float16" else self.dtype
