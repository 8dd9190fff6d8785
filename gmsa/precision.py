"""Which dtype this machine computes fastest in, measured at start-up rather than configured.

The project runs on CPUs that differ between machines: some have native bf16 matmul (Intel AMX,
AMD Zen 4's AVX512-BF16), where bf16 is several times faster than fp32; others emulate it and
are tens of times slower. ``resolve_dtype("auto")`` times one matmul of a transformer's shape in
both dtypes (well under a second) and picks bf16 only where it pays. Frozen weights are then
held in that dtype once (``hold_frozen_in``); trainable weights and optimizer state stay fp32.
"""

from __future__ import annotations

import functools
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import DTYPE_CHOICES

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
BF16_MIN_SPEEDUP = 1.2  # below this, bf16's rounding is not worth it

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype to compute in and why: ``bf16_speedup`` is the measured fp32/bf16 time ratio."""

    dtype: torch.dtype
    reason: str
    bf16_speedup: float | None = None

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_has_native_bf16() -> bool:
    """Whether the CPU advertises bf16 arithmetic (AMX-BF16 or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _best_matmul_seconds(dtypes: tuple[torch.dtype, ...], shape: tuple[int, int, int], repeats: int) -> list[float]:
    """The fastest of ``repeats`` timings of one matmul per dtype, the dtypes taking turns.

    Taking turns and keeping the minimum makes the ratio hold on a busy machine: a stall (another
    process taking a core mid-matmul) hits one timing, not one dtype. Measured back to back with
    3 repeats, a training run that started beside a benchmark once read bf16 at 0.29x of fp32 on a
    CPU where it is 5.6x faster.
    """
    rows, inner, cols = shape
    own = torch.Generator().manual_seed(0)  # leaves the global RNG (and so training's resumability) untouched
    a = torch.randn(rows, inner, generator=own)
    b = torch.randn(inner, cols, generator=own)
    operands = [(a.to(dtype), b.to(dtype)) for dtype in dtypes]
    for x, y in operands:
        torch.mm(x, y)  # warm-up: kernel selection and packing
    best = [float("inf")] * len(dtypes)
    for _ in range(repeats):
        for i, (x, y) in enumerate(operands):
            start = time.perf_counter()
            torch.mm(x, y)
            best[i] = min(best[i], time.perf_counter() - start)
    return best


@functools.cache
def measure_cpu_bf16_speedup(shape: tuple[int, int, int] = (256, 576, 1536), repeats: int = 9) -> float:
    """fp32 time / bf16 time of one ``(rows, inner) @ (inner, cols)`` matmul on this CPU (cached)."""
    fp32, bf16 = _best_matmul_seconds((torch.float32, torch.bfloat16), shape, repeats)
    return fp32 / max(bf16, 1e-9)


def resolve_dtype(requested: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> DtypeChoice:
    """The dtype to run in on ``device``: as requested, or for ``"auto"`` the measured fastest one."""
    if isinstance(requested, torch.dtype):
        return DtypeChoice(requested, "requested")
    if requested not in DTYPES and requested != "auto":
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {requested!r}")
    if requested != "auto":
        return DtypeChoice(DTYPES[requested], "requested")
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice(torch.bfloat16, f"{torch.cuda.get_device_name(device)} supports bf16")
        return DtypeChoice(torch.float32, f"{torch.cuda.get_device_name(device)} has no bf16")
    if device.type != "cpu":
        return DtypeChoice(torch.float32, f"no bf16 measurement for {device.type}")
    speedup = measure_cpu_bf16_speedup()
    native = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    where = f"{cpu_model()} ({native}, {torch.get_num_threads()} threads)"
    if speedup >= BF16_MIN_SPEEDUP:
        return DtypeChoice(torch.bfloat16, f"bf16 matmul {speedup:.2f}x faster than fp32 on {where}", speedup)
    return DtypeChoice(torch.float32, f"bf16 matmul at {speedup:.2f}x the speed of fp32 on {where}", speedup)


def log_choice(choice: DtypeChoice, what: str = "compute") -> None:
    log.info("%s dtype %s: %s", what, choice.name, choice.reason)


def hold_frozen_in(module: nn.Module, dtype: torch.dtype) -> int:
    """Cast ``module``'s frozen floating-point parameters to ``dtype`` in place, once; return how many.

    Trainable parameters stay as they are (fp32), so their updates and optimizer state keep full
    precision; autocast then finds the frozen weights already in ``dtype`` and casts nothing per step.
    """
    count = 0
    for param in module.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            count += 1
    return count
