"""Candidate matmul kernels for GMSA's decoding steps, timed on the shipped decoder's real weights.

A decoding step multiplies one row (a batch of answers: up to 8) by every weight of the decoder:
per layer q, k, v, o (576 x 576, 192 x 576 twice, 576 x 576), gate, up (1536 x 576 each), down
(576 x 1536), then the tied output head (49,152 x 576); 30 layers. Candidates (each prepared once
from the bf16 weight, LoRA merged, as :class:`gmsa.fast_decode.FastDecoder` holds it):

* ``bf16``: ``F.linear`` on the bf16 weight (what a step without compressed weights runs);
* ``bf16 oneDNN packed``: the same weight reordered once for oneDNN (``mkldnn._reorder_linear_weight``);
* ``int8 weight-only``: ATen's ``_weight_int8pack_mm`` (:class:`gmsa.fast_decode.StepLinear`, the default);
* ``W8A8 _int_mm``, ``W8A8 oneDNN qlinear``, ``W8A8 fbgemm``: int8 weights (one scale per output
  channel) and the input quantised to int8 per call (per row for ``_int_mm``, per tensor for the
  others), multiplied in int8 (``torch._int_mm``; oneDNN's prepacked ``qlinear_pointwise``;
  fbgemm's ``quantized::linear_dynamic``, 7-bit inputs);
* ``int4 gN``: asymmetric int4 in groups of N input columns, ATen's ``_weight_int4pack_mm_for_cpu``
  (:func:`gmsa.fast_decode.quantize_groups`; group 128 falls back to 64 where 576 input columns
  are not a multiple of it).

Per kernel and rows (``--rows``): microseconds per call for each weight shape (median over the 30
layers' weights and the repeats; each call reads another layer's weight, as a step does), and the
milliseconds of one whole step's matmuls, unfused (7 per layer) and fused (q/k/v concatenated,
gate/up concatenated: 4 per layer), each + the head. Kernels are timed interleaved, the order
alternating per repeat. Also the relative error of each kernel's output against the fp32 product
(one row, real weights, random input).

    python benchmarks/step_kernels.py --threads 1 --out reports/bench/step-kernels-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gmsa import GMSA
from gmsa.fast_decode import INT4_KERNEL_GROUPS, FastDecoder, int4_matmul, int8_matmul, quantize_groups, quantize_rows
from gmsa.precision import cpu_model

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
FUSED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}
UNFUSED_STEP = PROJECTIONS
FUSED_STEP = ("qkv", "o", "gate_up", "down")


def _quantize_input(x: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    peak = xf.abs().amax(dim=1, keepdim=True) if per_row else xf.abs().amax()
    scale = peak.clamp(min=1e-12) / 127
    return (xf / scale).round_().clamp_(-127, 127).to(torch.int8), scale


class Bf16:
    name = "bf16"
    bytes_per_weight = 2.0

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Bf16Packed:
    name = "bf16 oneDNN packed"
    bytes_per_weight = 2.0

    def __init__(self, weight: torch.Tensor):
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")


class Int8WeightOnly:
    name = "int8 weight-only"
    bytes_per_weight = 1.0

    def __init__(self, weight: torch.Tensor):
        self.qweight, scale = quantize_rows(weight)
        self.scale = scale.to(torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, self.qweight, self.scale)


class W8A8IntMM:
    name = "W8A8 _int_mm"
    bytes_per_weight = 1.0

    def __init__(self, weight: torch.Tensor):
        qweight, self.scale = quantize_rows(weight)
        self.qweight_t = qweight.t()  # (in, out), column-major: what _int_mm runs fastest here

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        qx, x_scale = _quantize_input(x, per_row=True)
        return (torch._int_mm(qx, self.qweight_t) * x_scale * self.scale).to(torch.bfloat16)


class W8A8OneDNN:
    name = "W8A8 oneDNN qlinear"
    bytes_per_weight = 1.0

    def __init__(self, weight: torch.Tensor):
        qweight, self.scale = quantize_rows(weight)
        self.packed = torch.ops.onednn.qlinear_prepack(qweight, [1, weight.shape[1]])
        self.weight_zero = torch.zeros(weight.shape[0], dtype=torch.int32)
        self.zero = torch.zeros((), dtype=torch.int32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        qx, x_scale = _quantize_input(x, per_row=False)
        return torch.ops.onednn.qlinear_pointwise.tensor(
            qx,
            x_scale,
            self.zero,
            self.packed,
            self.scale,
            self.weight_zero,
            None,
            1.0,
            0,
            torch.bfloat16,
            "none",
            [],
            "",
        )


class W8A8Fbgemm:
    name = "W8A8 fbgemm"
    bytes_per_weight = 1.0

    def __init__(self, weight: torch.Tensor):
        qweight, scale = quantize_rows(weight)
        zeros = torch.zeros(weight.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are deprecated in torch 2.13
            warnings.simplefilter("ignore")
            quantized = torch._make_per_channel_quantized_tensor(qweight, scale.double(), zeros, 0)
            self.packed = torch.ops.quantized.linear_prepack(quantized, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, True).to(torch.bfloat16)


def int4_kernel(group: int) -> type:
    class Int4:
        name = f"int4 g{group}"
        bytes_per_weight = 0.5 + 4 / group  # + a bf16 scale and zero point per group

        def __init__(self, weight: torch.Tensor):
            self.group = next(g for g in (group, group // 2, group // 4) if weight.shape[1] % g == 0)
            self.packed, scale_zeros = quantize_groups(weight, self.group)
            self.scale_zeros = scale_zeros.to(torch.bfloat16)

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return int4_matmul(x, self.packed, self.group, self.scale_zeros)

    assert group in INT4_KERNEL_GROUPS
    return Int4


KERNELS: dict[str, Callable] = {
    k.name: k
    for k in (
        Bf16,
        Bf16Packed,
        Int8WeightOnly,
        W8A8IntMM,
        W8A8OneDNN,
        W8A8Fbgemm,
        int4_kernel(32),
        int4_kernel(64),
        int4_kernel(128),
    )
}


# ------------------------------------------------------------------ whole decoders with a kernel
class KernelLinear(nn.Module):
    """A linear layer whose inputs of at most 8 rows go through ``kernel``; wider ones use the bf16 weight."""

    def __init__(self, linear: nn.Linear, kernel: Callable):
        super().__init__()
        self.weight, self.bias, self.kernel = linear.weight, linear.bias, kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > 8:
            return F.linear(x, self.weight, self.bias)
        return self.kernel(x.reshape(rows, x.shape[-1]).contiguous()).reshape(*x.shape[:-1], -1)


class FusedGroup:
    """Projections of the same input in one call: the first member computes all, the others take their slice
    (a benchmark device: it relies on ``transformers`` calling q, k, v and gate, up in turn on one tensor)."""

    def __init__(self, linears: list[nn.Linear], kernel: type):
        self.kernel = kernel(torch.cat([linear.weight.detach() for linear in linears]))
        self.sizes = [linear.out_features for linear in linears]
        self.input, self.parts = None, ()

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0 or self.input is not x:
            rows = x.numel() // x.shape[-1]
            out = self.kernel(x.reshape(rows, x.shape[-1]).contiguous()).reshape(*x.shape[:-1], -1)
            self.input, self.parts = x, out.split(self.sizes, dim=-1)
        part = self.parts[index]
        if index == len(self.sizes) - 1:
            self.input, self.parts = None, ()
        return part


class FusedMember(nn.Module):
    def __init__(self, linear: nn.Linear, group: FusedGroup, index: int):
        super().__init__()
        self.weight, self.bias, self.group, self.index = linear.weight, linear.bias, group, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] > 8:
            return F.linear(x, self.weight, self.bias)
        return self.group.part(self.index, x)


def with_kernel(decoder: nn.Module, kernel: type, fused: bool = False) -> nn.Module:
    """``decoder`` (Llama-style, LoRA merged) with every projection and the head on ``kernel``, in place."""
    for layer in decoder.get_decoder().layers:
        attention, mlp = layer.self_attn, layer.mlp
        groups = {attention: ("q_proj", "k_proj", "v_proj"), mlp: ("gate_proj", "up_proj")}
        for owner, names in groups.items():
            if fused:
                group = FusedGroup([getattr(owner, n) for n in names], kernel)
                for index, name in enumerate(names):
                    setattr(owner, name, FusedMember(getattr(owner, name), group, index))
            else:
                for name in names:
                    setattr(
                        owner, name, KernelLinear(getattr(owner, name), kernel(getattr(owner, name).weight.detach()))
                    )
        attention.o_proj = KernelLinear(attention.o_proj, kernel(attention.o_proj.weight.detach()))
        mlp.down_proj = KernelLinear(mlp.down_proj, kernel(mlp.down_proj.weight.detach()))
    head = decoder.get_output_embeddings()
    decoder.lm_head = KernelLinear(head, kernel(head.weight.detach()))
    return decoder


# ----------------------------------------------------------------------------- the microbenchmark
def real_weights(model: str) -> dict[str, list[torch.Tensor]]:
    """Shape name -> the 30 layers' bf16 weights (LoRA merged), the fused concatenations and the head."""
    gmsa = GMSA.from_pretrained(model, dtype="bfloat16")
    gmsa.hold_inference_dtype()
    decoder = FastDecoder(int8="off").of(gmsa.model.decoder)
    weights: dict[str, list[torch.Tensor]] = {name: [] for name in (*PROJECTIONS, *FUSED)}
    for layer in decoder.get_decoder().layers:
        owners = {"q": layer.self_attn, "k": layer.self_attn, "v": layer.self_attn, "o": layer.self_attn}
        for name in PROJECTIONS:
            weights[name].append(getattr(owners.get(name, layer.mlp), f"{name}_proj").weight.detach())
        for fused, parts in FUSED.items():
            weights[fused].append(torch.cat([weights[p][-1] for p in parts]))
    weights["head"] = [decoder.get_output_embeddings().weight.detach()]
    return weights


def relative_error(kernel: Callable, weight: torch.Tensor) -> float:
    x = torch.randn(1, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    exact = x.float() @ weight.float().T
    return ((kernel(x).float() - exact).norm() / exact.norm()).item()


def read_bandwidth_gbs(megabytes: int = 512, repeats: int = 3) -> float:
    """GB/s of summing an fp32 tensor far larger than the caches: what one step's weight reads can reach."""
    data = torch.ones(megabytes * 2**18)
    return megabytes / 1024 / min(seconds(data.sum) for _ in range(repeats))


def seconds(run: Callable) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure(weights: dict, kernels: dict, rows: int, repeats: int) -> dict:
    """Per kernel: microseconds per call of each shape, and one step's matmuls (ms), unfused and fused."""
    inputs = {name: torch.randn(rows, ws[0].shape[1]).to(torch.bfloat16) for name, ws in weights.items()}
    names = list(kernels)

    def step(kernel: str, shapes: tuple[str, ...]) -> None:
        ks = kernels[kernel]
        for layer in range(len(ks["q"])):
            for shape in shapes:
                ks[shape][layer](inputs[shape])
        ks["head"][0](inputs["head"])

    def per_call(kernel: str, shape: str) -> float:
        ks = kernels[kernel][shape]
        return seconds(lambda: [k(inputs[shape]) for k in ks]) / len(ks)

    for name in names:  # warm-up: kernel selection, packing
        step(name, UNFUSED_STEP)
        step(name, FUSED_STEP)
    calls = {(n, s): [] for n in names for s in weights}
    steps = {(n, f): [] for n in names for f in ("unfused", "fused")}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            for shape in weights:
                calls[(name, shape)].append(per_call(name, shape))
            steps[(name, "unfused")].append(seconds(lambda n=name: step(n, UNFUSED_STEP)))
            steps[(name, "fused")].append(seconds(lambda n=name: step(n, FUSED_STEP)))
    return {
        name: {
            "us_per_call": {shape: statistics.median(calls[(name, shape)]) * 1e6 for shape in weights},
            "step_ms_unfused": statistics.median(steps[(name, "unfused")]) * 1e3,
            "step_ms_fused": statistics.median(steps[(name, "fused")]) * 1e3,
            "step_ms_unfused_min": min(steps[(name, "unfused")]) * 1e3,
            "step_ms_fused_min": min(steps[(name, "fused")]) * 1e3,
        }
        for name in names
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gmsa/pretrained/gmsa-smollm2-135m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kernels", nargs="*", choices=list(KERNELS), help="default: all")
    parser.add_argument("--out", default="reports/bench/step-kernels-cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weights = real_weights(args.model)
    chosen = args.kernels or list(KERNELS)
    with torch.inference_mode():
        kernels = {name: {shape: [KERNELS[name](w) for w in ws] for shape, ws in weights.items()} for name in chosen}
        errors = {name: relative_error(KERNELS[name](weights["gate"][0]), weights["gate"][0]) for name in chosen}
        results = {rows: measure(weights, kernels, rows, args.repeats) for rows in args.rows}
    step_weights = sum(w.numel() for name, ws in weights.items() if name not in FUSED for w in ws)
    bandwidth = read_bandwidth_gbs()
    print(f"memory read bandwidth ({args.threads} thread(s)): {bandwidth:.1f} GB/s")
    for rows, found in results.items():
        print(f"\nrows={rows}: microseconds per call (median), and one step's matmuls in ms (median)")
        print(
            f"{'kernel':<22}" + "".join(f"{s:>9}" for s in weights) + f"{'step':>8}{'fused':>8}{'GB/s':>6}{'error':>8}"
        )
        for name, row in found.items():
            per = row["us_per_call"]
            print(
                f"{name:<22}"
                + "".join(f"{per[s]:>9.1f}" for s in weights)
                + f"{row['step_ms_unfused']:>8.2f}{row['step_ms_fused']:>8.2f}"
                + f"{step_weights * KERNELS[name].bytes_per_weight / row['step_ms_unfused'] / 1e6:>6.1f}"
                + f"{errors[name]:>8.4f}"
            )
    out = {
        "cpu_model": cpu_model(),
        "threads": args.threads,
        "repeats": args.repeats,
        "load_average": os.getloadavg(),
        "read_bandwidth_gbs": bandwidth,
        "step_weights": step_weights,
        "bytes_per_weight": {name: KERNELS[name].bytes_per_weight for name in chosen},
        "shapes": {name: list(ws[0].shape) for name, ws in weights.items()},
        "relative_error_gate_proj_layer0": errors,
        "results": {str(rows): found for rows, found in results.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
