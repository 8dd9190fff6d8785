"""gmsa's prefill compiled ahead of time (AOTInductor), built once per decoder shape and machine, then cached.

The llama.cpp engine reads each prompt with gmsa's own PyTorch decoder (:mod:`gmsa.kv_handoff`). In eager mode a
quarter of that prefill is elementwise work (norms, rotary embeddings, activations) run op by op; inductor fuses
it (docs/speed.md: about 18 % off the prefill on this CPU). ``torch.compile`` does that just in time, again in
every process (23-50 s) and for some new prompt shapes; here the decoder is exported once with a dynamic prompt
length and compiled to a shared library kept in gmsa's cache (``compiled-prefill/``, about 3 MB), which every
later process loads in milliseconds.

The library holds no weights: they are bound at load time to the running decoder's own tensors (so one build
serves every checkpoint and adapter set of the same shape). Its key (:func:`program_info`) is what the compiled
code depends on: the decoder's config, the names, shapes and dtypes of its tensors, the torch / transformers / gmsa
versions and the CPU's instruction sets. The prefill reads one unpadded prompt from position 0, so attention is
plain causal attention (:func:`causal_attention`): no mask is built, as in eager mode.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache

from .backbone import cache_root
from .fast_decode import STEP_ROWS
from .version import __version__

ATTENTION = "gmsa_prefill_causal"  # the attention the export traces (registered with transformers below)
MIN_POSITIONS = STEP_ROWS + 1  # shorter prompts would take the decoding steps' int8 path: they stay eager
MAX_POSITIONS = 1 << 17
EXAMPLE_POSITIONS = 64  # the traced prompt length (any length in range gives the same program)
FORMAT = 1  # of the cached program; bump when the traced program changes
CPU_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx")

log = logging.getLogger(__name__)


def causal_attention(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None, **kwargs):
    """SDPA over one unpadded prompt from position 0 (``transformers``' attention-function interface)."""
    out = F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


def no_mask(*args, **kwargs) -> None:
    """The mask function of :data:`ATTENTION`: the attention is causal by itself."""
    return None


AttentionInterface.register(ATTENTION, causal_attention)
AttentionMaskInterface.register(ATTENTION, no_mask)


class PrefillProgram(nn.Module):
    """What is exported: ``(1, n, H)`` embeddings -> the last position's fp32 logits ``(V,)``, and the keys and
    values of every layer, ``(layers, kv_heads, n, head_dim)`` each (``transformers``' post-RoPE cache)."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cache = DynamicCache(config=self.decoder.config)
        positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
        output = self.decoder(
            inputs_embeds=embeds, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1
        )
        keys = torch.stack([layer.keys[0] for layer in cache.layers])
        values = torch.stack([layer.values[0] for layer in cache.layers])
        return output.logits[0, -1].float(), keys, values


def unsupported_reason(decoder: nn.Module) -> str | None:
    """Why the program cannot stand for ``decoder``'s prefill (``None``: it can)."""
    config = decoder.config
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"} or getattr(config, "sliding_window", None):
        return "its decoder has sliding-window layers (the compiled prefill is plain causal attention)"
    if next(decoder.parameters()).device.type != "cpu":
        return "it is built for the CPU"
    return None


def cpu_features() -> list[str]:
    """The instruction sets the compiled code may use (from ``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        flags = next(
            line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines() if "flags" in line
        )
    except (OSError, StopIteration):
        return []
    return sorted({flag for flag in flags for feature in CPU_FEATURES if flag.startswith(feature)})


def bound_tensors(program: PrefillProgram) -> dict[str, torch.Tensor]:
    """Every tensor of ``program`` by each of its names (parameters and buffers, tied or not, persistent or not)."""
    return dict(program.named_parameters(remove_duplicate=False)) | dict(program.named_buffers(remove_duplicate=False))


def program_info(decoder: nn.Module) -> dict:
    """What a compiled program depends on (stored next to it, checked on reuse)."""
    config = decoder.config.to_dict()
    config.pop("_name_or_path", None)
    tensors = {name: [list(t.shape), str(t.dtype)] for name, t in bound_tensors(PrefillProgram(decoder)).items()}
    shape = json.dumps({"config": config, "tensors": tensors}, sort_keys=True, default=str)
    return {
        "format": FORMAT,
        "decoder": hashlib.sha256(shape.encode()).hexdigest(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gmsa": __version__,
        "machine": platform.machine(),
        "cpu_features": cpu_features(),
    }


def program_path(info: dict, directory: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]
    return (directory or cache_root() / "compiled-prefill") / f"prefill-{digest}.pt2"


@contextlib.contextmanager
def traced_attention(config):
    """``config`` set to :data:`ATTENTION` while the export traces the decoder (restored after)."""
    before = config._attn_implementation  # noqa: SLF001 (transformers' own switch: set_attn_implementation checks the hub)
    config._attn_implementation = ATTENTION  # noqa: SLF001
    try:
        yield
    finally:
        config._attn_implementation = before  # noqa: SLF001


def build_program(decoder: nn.Module, path: Path) -> Path:
    """Export ``decoder``'s prefill with a dynamic prompt length and compile it into ``path`` (weights left out)."""
    program = PrefillProgram(decoder).eval()
    example = torch.zeros(1, EXAMPLE_POSITIONS, decoder.config.hidden_size, dtype=decoder.dtype)
    positions = torch.export.Dim("positions", min=MIN_POSITIONS, max=MAX_POSITIONS)
    with traced_attention(decoder.config), torch.no_grad():
        exported = torch.export.export(program, (example,), dynamic_shapes={"embeds": {1: positions}}, strict=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.stem}.{os.getpid()}.tmp.pt2")  # AOTInductor wants the .pt2 suffix
    options = {"aot_inductor.package_constants_in_so": False}
    torch._inductor.aoti_compile_and_package(exported, package_path=str(staging), inductor_configs=options)  # noqa: SLF001 (AOTInductor's documented entry point)
    staging.replace(path)
    return path


def load_program(path: Path):
    """The compiled prefill in ``path``, its weights not yet bound (:func:`bind_weights`)."""
    return torch._inductor.aoti_load_package(str(path))  # noqa: SLF001 (AOTInductor's documented entry point)


def bind_weights(runner, decoder: nn.Module) -> dict[str, torch.Tensor]:
    """Point ``runner``'s weights at ``decoder``'s own tensors (shared, not copied); the tensors bound, which
    must be kept alive as long as the runner reads them."""
    tensors = bound_tensors(PrefillProgram(decoder))
    names = runner.get_constant_fqns()
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ValueError(f"the compiled prefill was built for another decoder (it needs {missing[:3]})")
    bound = {name: tensors[name] for name in names}
    runner.load_constants(bound, check_full_update=True, user_managed=True)
    return bound


def storage_of(decoder: nn.Module) -> tuple[int, ...]:
    """Where ``decoder``'s tensors are now (they move when it is cast or its weights are replaced)."""
    return tuple(tensor.data_ptr() for tensor in bound_tensors(PrefillProgram(decoder)).values())


class CompiledPrefill:
    """The compiled prefill of whichever decoder it is called with: built on first use for its shape (or loaded
    from the cache), rebound when the decoder or its tensors change. If it cannot be built or loaded, it says why once
    (a warning) and :meth:`takes` turns down that decoder, which the caller then runs eagerly."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else None
        self.programs: dict[str, object] = {}  # program path -> loaded runner
        self.bound: tuple[nn.Module, tuple[int, ...], object, dict] | None = None  # decoder, storage, runner, tensors
        self.failed: dict[str, str] = {}  # program path -> why it is unavailable

    def takes(self, decoder: nn.Module, positions: int) -> bool:
        """Whether the compiled program runs ``decoder`` over a prompt of ``positions`` (building it if need be)."""
        if not MIN_POSITIONS <= positions <= MAX_POSITIONS:
            return False
        return self.runner(decoder) is not None

    def runner(self, decoder: nn.Module):
        """The loaded program bound to ``decoder``, or ``None`` where it is unavailable."""
        if self.bound is not None and self.bound[0] is decoder and self.bound[1] == storage_of(decoder):
            return self.bound[2]
        if unsupported_reason(decoder) is not None:
            return None
        path = program_path(program_info(decoder), self.directory)
        key = str(path)
        if key in self.failed:
            return None
        try:
            runner = self.programs.get(key) or self.loaded(path, decoder)
            tensors = bind_weights(runner, decoder)
        except Exception as err:  # noqa: BLE001 (any failure leaves the eager prefill, which always works)
            self.failed[key] = f"{type(err).__name__}: {err}"
            log.warning("the compiled prefill is unavailable, the prefill runs eagerly: %s", self.failed[key])
            return None
        self.programs[key], self.bound = runner, (decoder, storage_of(decoder), runner, tensors)
        return runner

    def loaded(self, path: Path, decoder: nn.Module):
        """The program in ``path``, built first if the file is missing or unreadable."""
        if path.is_file():
            try:
                return load_program(path)
            except (RuntimeError, OSError) as err:  # a corrupt file: build it again
                log.warning("rebuilding the compiled prefill %s (%s)", path, err)
        log.warning(
            "compiling gmsa's prefill for this machine, once (about a minute); cached in %s (--engine-compile off "
            "skips it)",
            path.parent,
        )
        start = time.perf_counter()
        build_program(decoder, path)
        log.info("compiled the prefill in %.1f s", time.perf_counter() - start)
        return load_program(path)

    @torch.inference_mode()
    def __call__(self, decoder: nn.Module, embeds: torch.Tensor) -> tuple[torch.Tensor, list]:
        """``(n, H)`` embeddings -> the last position's fp32 logits and per-layer ``(keys, values)``
        ``(kv_heads, n, head_dim)``, as :func:`gmsa.kv_handoff.torch_prefill` and ``cache_layers`` give them."""
        runner = self.runner(decoder)
        if runner is None:
            raise ValueError("no compiled prefill for this decoder (check takes() first)")
        logits, keys, values = runner(embeds[None].to(decoder.dtype))
        return logits, list(zip(keys.unbind(0), values.unbind(0), strict=True))
