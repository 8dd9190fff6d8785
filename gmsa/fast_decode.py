"""Faster decoding on CPU: the decoder's LoRA merged into its weights, int8 weights for the steps.

A decoding step reads every weight of the decoder to produce one token; on a CPU it is bound by
memory traffic and per-call overhead, not arithmetic (the output projection over the vocabulary
alone is a fifth of SmolLM2-135M's weights). Two things cut it:

* :func:`gmsa.model.inference_copy`: a trained GMSA decoder carries LoRA adapters on every projection (the AE
  adapter and the KEFT one), each adding two small matmuls, a scale and an add per projection
  and step. The copy has them merged into plain linear layers (in fp32, rounded once); every
  tensor that merging does not change is shared with the original, not copied.
* :class:`StepLinear`: a linear layer keeps its weight (used, unchanged, for the prefill and
  anything wider than ``max_rows`` rows) and adds a compressed copy used for the narrow inputs of
  the decoding steps (bf16 only): ``"int8"``, one scale per output channel, through ATen's
  weight-only int8 kernel, or ``"int4"``, a scale and a zero point per group of 32 input columns,
  through its int4 kernel (half the bytes again). A prefill's hidden states and KV cache are
  bit-identical (a one-row output head, as with ``logits_to_keep=1``, takes the step path); step
  outputs differ by the rounding of the weights.

:class:`FastDecoder` builds and caches the copy GMSA decodes with; ``int8="auto"`` adopts the int8
steps where a start-up measurement finds them faster (:func:`measure_int8_step_speedup`), and
``int4`` decides whether int4 replaces int8 (:func:`resolve_int4`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .model import TensorsState, inference_copy, lora_tensors

STEP_ROWS = 8  # inputs with at most this many rows (batch x new tokens) take the step path
INT8_MIN_SPEEDUP = 1.2  # below this, the int8 rounding of the decoding steps is not worth it
INT8_SETTINGS = ("auto", "on", "off")
INT4_SETTINGS = ("auto", "on", "off")
INT4_MIN_SPEEDUP = 1.2  # int8 time / int4 time below this: int4's coarser rounding is not worth it
INT4_GROUP = 32  # input columns per int4 scale: 6 % weight error on the shipped decoder (64: 9 %), same speed
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # the group sizes ATen's CPU int4 kernel takes
STEP_KINDS = ("int8", "int4")
INT4_DEFAULT = "off"  # int4 steps restate measurably worse than int8 on the shipped decoder (docs/speed.md)

log = logging.getLogger(__name__)


def int8_kernel_available() -> bool:
    """Whether this torch has the weight-only int8 matmul kernel."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int4_kernel_available() -> bool:
    """Whether this torch has the CPU weight-only int4 matmul kernel and its weight packing."""
    return all(
        hasattr(torch.ops.aten, op) for op in ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu")
    )


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x (rows, in) @ dequantised(qweight (out, in)).T`` with per-output-channel ``scale``, weights read as int8.

    ATen has no public weight-only int8 matmul (torchao, not installed here, wraps this same op).
    """
    return torch.ops.aten._weight_int8pack_mm(x, qweight, scale)  # noqa: SLF001 (no public wrapper, see above)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, group: int, scale_zeros: torch.Tensor) -> torch.Tensor:
    """``x (rows, in) @ dequantised(packed).T`` for a weight from :func:`quantize_groups`, read as int4 (CPU).

    As for int8, ATen's kernel has no public wrapper (torchao's int4 CPU layout wraps this op).
    """
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scale_zeros)  # noqa: SLF001


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``(out, in)`` weight -> int8 ``(out, in)`` and fp32 scales ``(out,)``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def int4_fits(out_features: int, in_features: int, group: int = INT4_GROUP) -> bool:
    """Whether ATen's CPU int4 kernel takes an ``(out, in)`` weight in groups of ``group`` input columns."""
    return group in INT4_KERNEL_GROUPS and in_features % group == 0 and out_features % 16 == 0


def quantize_groups(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of ``group`` input columns, packed for ATen's CPU kernel.

    ``(out, in)`` weight -> the packed weight and fp32 ``(in / group, out, 2)`` scales and zero points,
    ``weight ≈ (q - 8) * scale + zero`` with ``q`` in 0..15 (the kernel's convention).
    """
    out_features, in_features = weight.shape
    if not int4_fits(out_features, in_features, group):
        raise ValueError(
            f"int4 weights need a group size in {INT4_KERNEL_GROUPS} dividing the input features and output "
            f"features divisible by 16; got a ({out_features}, {in_features}) weight in groups of {group}"
        )
    groups = weight.detach().float().reshape(out_features, in_features // group, group)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(out_features, in_features), 1)  # noqa: SLF001
    return packed, torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous()


class StepLinear(nn.Module):
    """An ``nn.Linear`` whose narrow inputs (decoding steps) use a compressed copy of its weight.

    ``kind`` ``"int8"`` (:func:`quantize_rows`) or ``"int4"`` (:func:`quantize_groups`; a layer whose
    shape the int4 kernel does not take, :func:`int4_fits`, keeps int8). The copy is a snapshot of the
    weight taken at construction; after changing the weight in place, call :meth:`refresh`
    (:class:`FastDecoder` rebuilds its copies by itself).
    """

    def __init__(self, linear: nn.Linear, kind: str = "int8", max_rows: int = STEP_ROWS):
        super().__init__()
        if kind not in STEP_KINDS:
            raise ValueError(f"step weights must be one of {STEP_KINDS}, got {kind!r}")
        self.in_features, self.out_features, self.max_rows = linear.in_features, linear.out_features, max_rows
        self.kind = "int4" if kind == "int4" and int4_fits(self.out_features, self.in_features) else "int8"
        self.weight, self.bias = linear.weight, linear.bias  # shared (a tied output embedding stays tied)
        self.register_buffer("qweight", torch.empty(0, dtype=torch.int8), persistent=False)
        self.register_buffer("qscale", torch.empty(0), persistent=False)
        self.refresh()

    def refresh(self) -> None:
        """Quantise the current weight again."""
        qweight, scale = quantize_groups(self.weight) if self.kind == "int4" else quantize_rows(self.weight)
        self.qweight, self.qscale = qweight.to(self.weight.device), scale.to(self.weight.device, self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        narrow = rows <= self.max_rows and x.dtype == self.weight.dtype == torch.bfloat16 and x.device.type == "cpu"
        if not narrow or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features).contiguous()
        if self.kind == "int4":
            out = int4_matmul(flat, self.qweight, INT4_GROUP, self.qscale)
        else:
            out = int8_matmul(flat, self.qweight, self.qscale)
        out = out.reshape(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"{self.kind} steps up to {self.max_rows} rows"
        )


def step_weights(decoder: nn.Module, kind: str = "int8", max_rows: int = STEP_ROWS) -> int:
    """Give every plain ``nn.Linear`` of ``decoder`` (output head included) a ``kind`` step path, in place.

    Linear layers inside a peft adapter (a LoRA's base layer or its factors) are left as they
    are, so switching or merging adapters keeps working. Returns how many layers were converted.
    """
    tuned = [name for name, module in decoder.named_modules() if isinstance(module, BaseTunerLayer)]
    names = [
        name
        for name, module in decoder.named_modules()
        if type(module) is nn.Linear and not any(name.startswith(t + ".") for t in tuned)
    ]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = decoder.get_submodule(parent) if parent else decoder
        setattr(owner, child, StepLinear(getattr(owner, child), kind, max_rows))
    return len(names)


def plain_linears(decoder: nn.Module) -> int:
    """Undo :func:`step_weights`: put plain ``nn.Linear`` layers (same weights) back; returns how many."""
    names = [name for name, module in decoder.named_modules() if isinstance(module, StepLinear)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = decoder.get_submodule(parent) if parent else decoder
        step = getattr(owner, child)
        linear = nn.Linear(step.in_features, step.out_features, bias=step.bias is not None, device="meta")
        linear.weight, linear.bias = step.weight, step.bias
        setattr(owner, child, linear)
    return len(names)


# ----------------------------------------------------------------- the decoder GMSA decodes with
@dataclass(frozen=True)
class StepChoice:
    """Whether the decoding steps run on int8 (or int4) weights, and why."""

    on: bool
    reason: str


def _step_matmul_pair(shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 ``(out, in)`` weight and one input row, from a private generator (the global RNG is left alone)."""
    own = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=own).to(torch.bfloat16)
    return weight, torch.randn(1, shape[1], generator=own).to(torch.bfloat16)


@functools.cache
def measure_int8_step_speedup(shape: tuple[int, int] = (8192, 576), repeats: int = 5) -> float:
    """bf16 time / int8 time of one decoding-step matmul (one row times an ``(out, in)`` weight), cached.

    The weight (an output head's shape, larger than a core's cache) is read from memory as in a real step.
    """
    weight, x = _step_matmul_pair(shape)
    qweight, scale = quantize_rows(weight)
    scale = scale.to(torch.bfloat16)
    return _best_seconds(lambda: F.linear(x, weight), repeats) / max(
        _best_seconds(lambda: int8_matmul(x, qweight, scale), repeats), 1e-9
    )


@functools.cache
def measure_int4_step_speedup(shape: tuple[int, int] = (8192, 576), repeats: int = 5) -> float:
    """int8 time / int4 time of one decoding-step matmul, as :func:`measure_int8_step_speedup`, cached."""
    weight, x = _step_matmul_pair(shape)
    qweight, scale = quantize_rows(weight)
    packed, scale_zeros = quantize_groups(weight)
    scale, scale_zeros = scale.to(torch.bfloat16), scale_zeros.to(torch.bfloat16)
    return _best_seconds(lambda: int8_matmul(x, qweight, scale), repeats) / max(
        _best_seconds(lambda: int4_matmul(x, packed, INT4_GROUP, scale_zeros), repeats), 1e-9
    )


def _best_seconds(run, repeats: int) -> float:
    run()  # warm-up: kernel selection and packing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def _setting(setting: str | bool, allowed: tuple[str, ...], what: str) -> str:
    setting = {True: "on", False: "off"}.get(setting, setting)
    if setting not in allowed:
        raise ValueError(f"{what} steps must be one of {allowed} (or a bool), got {setting!r}")
    return setting


def _resolve(
    setting: str | bool, what: str, unmet: str | None, measure: Callable[[], float], min_speedup: float, versus: str
) -> StepChoice:
    """Off; impossible (``unmet`` says why; an error when forced on); on; or measured against ``versus``."""
    setting = _setting(setting, INT8_SETTINGS if what == "int8" else INT4_SETTINGS, what)
    if setting == "off":
        return StepChoice(False, "switched off")
    if unmet:
        if setting == "on":
            raise ValueError(unmet)
        return StepChoice(False, unmet)
    if setting == "on":
        return StepChoice(True, "requested")
    speedup = measure()
    if speedup >= min_speedup:
        return StepChoice(True, f"{what} step matmul {speedup:.2f}x faster than {versus}")
    return StepChoice(False, f"{what} step matmul at {speedup:.2f}x the speed of {versus}")


def resolve_int8(setting: str | bool, dtype: torch.dtype, device: torch.device) -> StepChoice:
    """Whether a decoder in ``dtype`` on ``device`` takes int8 decoding steps: ``"on"``/``True``,
    ``"off"``/``False``, or ``"auto"`` (bf16 on a CPU, where one measured step matmul is faster)."""
    possible = dtype == torch.bfloat16 and torch.device(device).type == "cpu" and int8_kernel_available()
    unmet = (
        None
        if possible
        else f"int8 steps need a bf16 decoder on a CPU and torch's int8 kernel (have {dtype} on {device})"
    )
    return _resolve(setting, "int8", unmet, lambda: measure_int8_step_speedup(), INT8_MIN_SPEEDUP, "bf16")


def resolve_int4(setting: str | bool, int8: StepChoice) -> StepChoice:
    """Whether int4 weights replace the int8 ones of the decoding steps (``int8``: :func:`resolve_int8`'s
    choice): ``"on"``/``True``, ``"off"``/``False``, or ``"auto"`` (where the int8 steps are on and
    one measured step matmul is :data:`INT4_MIN_SPEEDUP` times faster in int4)."""
    possible = int8.on and int4_kernel_available()
    unmet = (
        None
        if possible
        else (f"int4 steps replace int8 steps: they need those and torch's CPU int4 kernel (int8: {int8.reason})")
    )
    return _resolve(setting, "int4", unmet, lambda: measure_int4_step_speedup(), INT4_MIN_SPEEDUP, "int8")


class FastDecoder:
    """The decoder GMSA decodes with: :func:`inference_copy` of the model's decoder (with int8 or int4
    steps where :func:`resolve_int8` and :func:`resolve_int4` say so), cached per set of active
    adapters and rebuilt whenever a LoRA tensor changes (loaded weights, a move to another device or dtype).

    A decoder that is being trained (in training mode, or with a parameter that requires grad)
    is returned as it is, and so is every decoder with ``merge=False, int8="off"`` (the plain path).
    Base weights changed in place under an unchanged LoRA are not detected.
    A plain object, not a module: the copies are no part of the model's parameters or state.
    """

    def __init__(self, int8: str | bool = "auto", merge: bool = True, keep: int = 2, int4: str | bool = INT4_DEFAULT):
        self.int8, self.int4, self.merge, self.keep = int8, int4, merge, keep
        self.int8_choice: StepChoice | None = None
        self.int4_choice: StepChoice | None = None
        self._built: dict[tuple, tuple[TensorsState, nn.Module]] = {}

    @property
    def step_kind(self) -> str | None:
        """``"int4"``, ``"int8"`` or ``None`` (bf16 steps), as of the last :meth:`of`."""
        if self.int8_choice is None or not self.int8_choice.on:
            return None
        return "int4" if self.int4_choice is not None and self.int4_choice.on else "int8"

    def of(self, decoder: nn.Module) -> nn.Module:
        """The module to decode with in place of ``decoder`` (same inputs, same outputs up to rounding)."""
        if decoder.training or any(p.requires_grad for p in decoder.parameters()):
            return decoder
        weight = next(decoder.parameters())
        self.int8_choice = resolve_int8(self.int8, weight.dtype, weight.device)
        self.int4_choice = resolve_int4(self.int4, self.int8_choice)
        kind = self.step_kind
        adapters = tuple(
            (tuple(m.active_adapters), m.disable_adapters) for m in decoder.modules() if isinstance(m, LoraLayer)
        )
        if not (adapters and self.merge) and kind is None:
            return decoder
        lora = lora_tensors(decoder)
        key = (id(decoder), weight.dtype, weight.device, adapters, self.merge, kind)
        built = self._built.get(key)
        if built is None or not built[0].holds(lora):
            self._built.pop(key, None)
            while len(self._built) >= self.keep:
                self._built.pop(next(iter(self._built)))
            fast = inference_copy(decoder, self.merge)
            if kind is not None:
                step_weights(fast, kind)
            log.info(
                "decoding steps on %s weights (int8: %s; int4: %s)",
                kind or "bf16",
                self.int8_choice.reason,
                self.int4_choice.reason,
            )
            self._built[key] = (TensorsState(lora), fast)
        return self._built[key][1]
