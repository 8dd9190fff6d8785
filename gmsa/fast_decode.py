"""Faster decoding on CPU: the decoder's LoRA merged into its weights, int8 weights for the steps.

A decoding step reads every weight of the decoder to produce one token; on a CPU it is bound by
memory traffic and per-call overhead, not arithmetic (the output projection over the vocabulary
alone is a fifth of SmolLM2-135M's weights). Two things cut it:

* :func:`gmsa.model.inference_copy`: a trained GMSA decoder carries LoRA adapters on every projection (the AE
  adapter and the KEFT one), each adding two small matmuls, a scale and an add per projection
  and step. The copy has them merged into plain linear layers (in fp32, rounded once); every
  tensor that merging does not change is shared with the original, not copied.
* :class:`Int8StepLinear`: a linear layer keeps its weight (used, unchanged, for the prefill and
  anything wider than ``max_rows`` rows) and adds an int8 copy with one scale per output channel,
  used for the narrow inputs of the decoding steps (bf16 only) through ATen's weight-only int8
  kernel. A prefill's hidden states and KV cache are bit-identical (a one-row output head, as with
  ``logits_to_keep=1``, takes the int8 path); step outputs differ by the int8 rounding of the weights.

:class:`FastDecoder` builds and caches the copy GMSA decodes with; ``int8="auto"`` adopts the int8
steps where a start-up measurement finds them faster (:func:`measure_int8_step_speedup`).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .model import inference_copy, lora_tensors, same_tensors

STEP_ROWS = 8  # inputs with at most this many rows (batch x new tokens) take the int8 path
INT8_MIN_SPEEDUP = 1.2  # below this, the int8 rounding of the decoding steps is not worth it
INT8_SETTINGS = ("auto", "on", "off")


def int8_kernel_available() -> bool:
    """Whether this torch has the weight-only int8 matmul kernel."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x (rows, in) @ dequantised(qweight (out, in)).T`` with per-output-channel ``scale``, weights read as int8.

    ATen has no public weight-only int8 matmul (torchao, not installed here, wraps this same op).
    """
    return torch.ops.aten._weight_int8pack_mm(x, qweight, scale)  # noqa: SLF001 (no public wrapper, see above)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``(out, in)`` weight -> int8 ``(out, in)`` and fp32 scales ``(out,)``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


class Int8StepLinear(nn.Module):
    """An ``nn.Linear`` whose narrow inputs (decoding steps) use an int8 copy of its weight.

    The int8 copy is a snapshot of the weight taken at construction; after changing the weight
    in place, call :meth:`refresh` (:class:`FastDecoder` rebuilds its copies by itself).
    """

    def __init__(self, linear: nn.Linear, max_rows: int = STEP_ROWS):
        super().__init__()
        self.in_features, self.out_features, self.max_rows = linear.in_features, linear.out_features, max_rows
        self.weight, self.bias = linear.weight, linear.bias  # shared (a tied output embedding stays tied)
        self.register_buffer("qweight", torch.empty(0, dtype=torch.int8), persistent=False)
        self.register_buffer("qscale", torch.empty(0), persistent=False)
        self.refresh()

    def refresh(self) -> None:
        """Quantise the current weight again."""
        qweight, scale = quantize_rows(self.weight)
        self.qweight, self.qscale = qweight.to(self.weight.device), scale.to(self.weight.device, self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        narrow = rows <= self.max_rows and x.dtype == self.weight.dtype == torch.bfloat16 and x.device.type == "cpu"
        if not narrow or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features).contiguous()
        out = int8_matmul(flat, self.qweight, self.qscale).reshape(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int8 steps up to {self.max_rows} rows"
        )


def int8_steps(decoder: nn.Module, max_rows: int = STEP_ROWS) -> int:
    """Give every plain ``nn.Linear`` of ``decoder`` (output head included) an int8 step path, in place.

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
        setattr(owner, child, Int8StepLinear(getattr(owner, child), max_rows))
    return len(names)


def plain_linears(decoder: nn.Module) -> int:
    """Undo :func:`int8_steps`: put plain ``nn.Linear`` layers (same weights) back; returns how many."""
    names = [name for name, module in decoder.named_modules() if isinstance(module, Int8StepLinear)]
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
class Int8Choice:
    """Whether the decoding steps run on int8 weights, and why."""

    on: bool
    reason: str


@functools.cache
def measure_int8_step_speedup(shape: tuple[int, int] = (8192, 576), repeats: int = 5) -> float:
    """bf16 time / int8 time of one decoding-step matmul (one row times an ``(out, in)`` weight), cached.

    The weight (an output head's shape, larger than a core's cache) is read from memory as in a real step.
    """
    own = torch.Generator().manual_seed(0)  # leaves the global RNG alone
    weight = torch.randn(*shape, generator=own).to(torch.bfloat16)
    x = torch.randn(1, shape[1], generator=own).to(torch.bfloat16)
    qweight, scale = quantize_rows(weight)
    scale = scale.to(torch.bfloat16)
    return _best_seconds(lambda: F.linear(x, weight), repeats) / max(
        _best_seconds(lambda: int8_matmul(x, qweight, scale), repeats), 1e-9
    )


def _best_seconds(run, repeats: int) -> float:
    run()  # warm-up: kernel selection and packing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def resolve_int8(setting: str | bool, dtype: torch.dtype, device: torch.device) -> Int8Choice:
    """Whether a decoder in ``dtype`` on ``device`` takes int8 decoding steps: ``"on"``/``True``,
    ``"off"``/``False``, or ``"auto"`` (bf16 on a CPU, where one measured step matmul is faster)."""
    setting = {True: "on", False: "off"}.get(setting, setting)
    if setting not in INT8_SETTINGS:
        raise ValueError(f"int8 steps must be one of {INT8_SETTINGS} (or a bool), got {setting!r}")
    if setting == "off":
        return Int8Choice(False, "switched off")
    possible = dtype == torch.bfloat16 and torch.device(device).type == "cpu" and int8_kernel_available()
    if not possible:
        why = f"int8 steps need a bf16 decoder on a CPU and torch's int8 kernel (have {dtype} on {device})"
        if setting == "on":
            raise ValueError(why)
        return Int8Choice(False, why)
    if setting == "on":
        return Int8Choice(True, "requested")
    speedup = measure_int8_step_speedup()
    if speedup >= INT8_MIN_SPEEDUP:
        return Int8Choice(True, f"int8 step matmul {speedup:.2f}x faster than bf16")
    return Int8Choice(False, f"int8 step matmul at {speedup:.2f}x the speed of bf16")


class FastDecoder:
    """The decoder GMSA decodes with: :func:`inference_copy` of the model's decoder (with int8 steps
    where :func:`resolve_int8` says so), cached per set of active adapters and rebuilt whenever a
    LoRA tensor changes (loaded weights, a move to another device or dtype).

    A decoder that is being trained (in training mode, or with a parameter that requires grad)
    is returned as it is, and so is every decoder with ``merge=False, int8="off"`` (the plain path).
    Base weights changed in place under an unchanged LoRA are not detected.
    A plain object, not a module: the copies are no part of the model's parameters or state.
    """

    def __init__(self, int8: str | bool = "auto", merge: bool = True, keep: int = 2):
        self.int8, self.merge, self.keep = int8, merge, keep
        self.int8_choice: Int8Choice | None = None
        self._built: dict[tuple, tuple[list[torch.Tensor], nn.Module]] = {}

    def of(self, decoder: nn.Module) -> nn.Module:
        """The module to decode with in place of ``decoder`` (same inputs, same outputs up to rounding)."""
        if decoder.training or any(p.requires_grad for p in decoder.parameters()):
            return decoder
        weight = next(decoder.parameters())
        self.int8_choice = resolve_int8(self.int8, weight.dtype, weight.device)
        adapters = tuple(
            (tuple(m.active_adapters), m.disable_adapters) for m in decoder.modules() if isinstance(m, LoraLayer)
        )
        if not (adapters and self.merge) and not self.int8_choice.on:
            return decoder
        lora = lora_tensors(decoder)
        key = (id(decoder), weight.dtype, weight.device, adapters, self.merge, self.int8_choice.on)
        built = self._built.get(key)
        if built is None or not same_tensors(lora, built[0]):
            self._built.pop(key, None)
            while len(self._built) >= self.keep:
                self._built.pop(next(iter(self._built)))
            fast = inference_copy(decoder, self.merge)
            if self.int8_choice.on:
                int8_steps(fast)
            self._built[key] = ([p.clone() for p in lora], fast)
        return self._built[key][1]
