"""Faster decoding steps on CPU: int8 weights for the one-token steps after the prefill.

A decoding step reads every weight of the decoder to produce one token; on a CPU it is bound by
memory traffic and per-call overhead, not arithmetic (the output projection over the vocabulary
alone is a fifth of SmolLM2-135M's weights). :class:`Int8StepLinear` keeps a linear layer's weight
(used, unchanged, for the prefill and anything wider than ``max_rows`` rows) and adds an int8 copy
with one scale per output channel, used for the narrow inputs of the decoding steps through ATen's
weight-only int8 kernel (``aten._weight_int8pack_mm``; bf16 weights and activations only). Prefill outputs are
therefore bit-identical to the plain model; step outputs differ by the int8 rounding of the weights.
The int8 copy is refreshed when the weight changes in place (e.g. a training step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

STEP_ROWS = 8  # inputs with at most this many rows (batch x new tokens) take the int8 path


def int8_kernel_available() -> bool:
    """Whether this torch has the weight-only int8 matmul kernel."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``(out, in)`` weight -> int8 ``(out, in)`` and fp32 scales ``(out,)``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


class Int8StepLinear(nn.Module):
    """An ``nn.Linear`` whose narrow inputs (decoding steps) use an int8 copy of its weight."""

    def __init__(self, linear: nn.Linear, max_rows: int = STEP_ROWS):
        super().__init__()
        self.in_features, self.out_features, self.max_rows = linear.in_features, linear.out_features, max_rows
        self.weight, self.bias = linear.weight, linear.bias  # shared (a tied output embedding stays tied)
        self.register_buffer("qweight", torch.empty(0, dtype=torch.int8), persistent=False)
        self.register_buffer("qscale", torch.empty(0), persistent=False)
        self._seen: tuple | None = None
        self._refresh()

    def _refresh(self) -> None:
        version = -1 if self.weight.is_inference() else self.weight._version  # inference tensors have none
        key = (self.weight.data_ptr(), version, self.weight.dtype, self.weight.device)
        if key != self._seen:
            qweight, scale = quantize_rows(self.weight)
            self.qweight, self.qscale = qweight.to(self.weight.device), scale.to(self.weight.device, self.weight.dtype)
            self._seen = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        narrow = rows <= self.max_rows and x.dtype == self.weight.dtype == torch.bfloat16 and x.device.type == "cpu"
        if not narrow or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        self._refresh()
        flat = x.reshape(rows, self.in_features).contiguous()
        out = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.qscale).reshape(*x.shape[:-1], -1)
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
