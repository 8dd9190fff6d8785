"""gmsa's CPU hot paths compiled ahead of time (AOTInductor), built once per module shape and machine, then cached.

Two programs: the llama.cpp engine's prefill (:class:`CompiledPrefill`, gmsa's decoder over one prompt, used by
:mod:`gmsa.kv_handoff`) and the encoder (:class:`CompiledStack`, a causal stack over right-padded windows, as
:func:`gmsa.merge.causal_states` runs it). In eager mode about a quarter of their time is elementwise work (norms,
rotary embeddings, activations) run op by op; inductor fuses it (docs/speed.md: 14-25 % off each on this CPU).
``torch.compile`` does that just in time, again in every process (23-50 s) and for some new shapes; here each module
is exported once with dynamic lengths (and batch) and compiled into a package in gmsa's cache (``compiled/``, a few
MB), which every later process loads in milliseconds.

A package holds no weights: they are bound at load time to the running module's own tensors, so one build serves
every checkpoint and adapter set of the same shape. Its key (:func:`program_info`) is what the compiled code depends
on: the program, the module's config, the names, shapes and dtypes of its tensors, the torch / transformers / gmsa
versions and the CPU's instruction sets. Both programs read unpadded (or right-padded) causal rows from position 0,
so attention is plain causal attention (:func:`causal_attention`): no mask is built, as in eager mode.
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
from transformers.modeling_outputs import BaseModelOutput

from .backbone import cache_root
from .fast_decode import STEP_ROWS
from .version import __version__

ATTENTION = "gmsa_causal"  # the attention the export traces (registered with transformers below)
MAX_POSITIONS = 1 << 17
MAX_BATCH = 1024
EXAMPLE_POSITIONS = 64  # the traced length (any length in range gives the same program)
FORMAT = 1  # of the cached programs; bump when a traced program changes
CPU_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx")

log = logging.getLogger(__name__)


def causal_attention(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None, **kwargs):
    """SDPA over right-padded rows from position 0 (``transformers``' attention-function interface)."""
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
    """The prefill: ``(1, n, H)`` embeddings -> the last position's fp32 logits ``(V,)``, and the keys and values of
    every layer, ``(layers, kv_heads, n, head_dim)`` each (``transformers``' post-RoPE cache)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.decoder = module

    def forward(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cache = DynamicCache(config=self.decoder.config)
        positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
        output = self.decoder(
            inputs_embeds=embeds, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1
        )
        keys = torch.stack([layer.keys[0] for layer in cache.layers])
        values = torch.stack([layer.values[0] for layer in cache.layers])
        return output.logits[0, -1].float(), keys, values


class StackProgram(nn.Module):
    """A causal stack (the encoder): right-padded ``(B, L, H)`` embeddings -> its final states ``(B, L, H)``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.stack = module

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.stack(inputs_embeds=embeds).last_hidden_state


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a compiled program cannot stand for ``module`` (``None``: it can)."""
    config = module.config
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"} or getattr(config, "sliding_window", None):
        return "it has sliding-window layers (the compiled programs use plain causal attention)"
    if next(module.parameters()).device.type != "cpu":
        return "they are built for the CPU"
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


def bound_tensors(program: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of ``program`` by each of its names (parameters and buffers, tied or not, persistent or not)."""
    return dict(program.named_parameters(remove_duplicate=False)) | dict(program.named_buffers(remove_duplicate=False))


def program_info(program: nn.Module) -> dict:
    """What the compiled ``program`` (a :class:`PrefillProgram` or :class:`StackProgram`) depends on (stored in its
    file name, checked on reuse)."""
    config = next(program.children()).config.to_dict()
    config.pop("_name_or_path", None)
    tensors = {name: [list(t.shape), str(t.dtype)] for name, t in bound_tensors(program).items()}
    shape = json.dumps({"config": config, "tensors": tensors}, sort_keys=True, default=str)
    return {
        "format": FORMAT,
        "program": type(program).__name__,
        "module": hashlib.sha256(shape.encode()).hexdigest(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gmsa": __version__,
        "machine": platform.machine(),
        "cpu_features": cpu_features(),
    }


def program_path(info: dict, directory: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]
    return (directory or cache_root() / "compiled") / f"{info['program']}-{digest}.pt2"


@contextlib.contextmanager
def traced_attention(config):
    """``config`` set to :data:`ATTENTION` while the export traces a module (restored after)."""
    before = config._attn_implementation  # noqa: SLF001 (transformers' own switch: set_attn_implementation checks the hub)
    config._attn_implementation = ATTENTION  # noqa: SLF001
    try:
        yield
    finally:
        config._attn_implementation = before  # noqa: SLF001


def build_program(program: nn.Module, example: torch.Tensor, dynamic: dict, path: Path) -> Path:
    """Export ``program`` (its input dims ``dynamic`` left dynamic) and compile it into ``path``, weights left out."""
    module = next(program.children())
    with traced_attention(module.config), torch.no_grad():
        exported = torch.export.export(program.eval(), (example,), dynamic_shapes={"embeds": dynamic}, strict=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.stem}.{os.getpid()}.tmp.pt2")  # AOTInductor wants the .pt2 suffix
    options = {"aot_inductor.package_constants_in_so": False}
    torch._inductor.aoti_compile_and_package(exported, package_path=str(staging), inductor_configs=options)  # noqa: SLF001 (AOTInductor's documented entry point)
    staging.replace(path)
    return path


def load_program(path: Path):
    """The compiled program in ``path``, its weights not yet bound (:func:`bind_weights`)."""
    return torch._inductor.aoti_load_package(str(path))  # noqa: SLF001 (AOTInductor's documented entry point)


def bind_weights(runner, program: nn.Module) -> dict[str, torch.Tensor]:
    """Point ``runner``'s weights at ``program``'s own tensors (shared, not copied); the tensors bound, which must be
    kept alive as long as the runner reads them."""
    tensors = bound_tensors(program)
    names = runner.get_constant_fqns()
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ValueError(f"the compiled program was built for another module (it needs {missing[:3]})")
    bound = {name: tensors[name] for name in names}
    runner.load_constants(bound, check_full_update=True, user_managed=True)
    return bound


def storage_of(program: nn.Module) -> tuple[int, ...]:
    """Where ``program``'s tensors are now (they move when the module is cast or its weights are replaced)."""
    return tuple(tensor.data_ptr() for tensor in bound_tensors(program).values())


class AheadOfTime:
    """The compiled program of whichever module it is called with: built on first use for its shape (or loaded from
    the cache), rebound when the module or its tensors change. If it cannot be built or loaded, it says why once (a
    warning) and :meth:`takes` turns that module down; calling the program then gives ``None`` and the caller runs
    the module eagerly.
    Subclasses name the program (``program``), an example input and its dynamic dims, and the shapes they take."""

    program: type[nn.Module]
    min_length = 2  # shorter inputs stay eager

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else None
        self.programs: dict[str, object] = {}  # program path -> loaded runner
        self.bound: tuple[nn.Module, tuple[int, ...], object, dict] | None = None  # module, storage, runner, tensors
        self.failed: dict[str, str] = {}  # program path -> why it is unavailable

    def example(self, module: nn.Module) -> tuple[torch.Tensor, dict]:
        """A traced input for ``module`` and its dynamic dims."""
        raise NotImplementedError

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether the program's dynamic dims take an input of ``shape``."""
        return self.min_length <= shape[-2] <= MAX_POSITIONS

    def takes(self, module: nn.Module, shape: tuple[int, ...]) -> bool:
        """Whether the compiled program runs ``module`` on an input of ``shape`` (building it if need be)."""
        return self.fits(shape) and self.runner(module) is not None

    def runner(self, module: nn.Module):
        """The loaded program bound to ``module``, or ``None`` where it is unavailable."""
        program = self.program(module)
        if self.bound is not None and self.bound[0] is module and self.bound[1] == storage_of(program):
            return self.bound[2]
        if unsupported_reason(module) is not None:
            return None
        path = program_path(program_info(program), self.directory)
        key = str(path)
        if key in self.failed:
            return None
        try:
            runner = self.programs.get(key) or self.loaded(path, module)
            tensors = bind_weights(runner, program)
        except Exception as err:  # noqa: BLE001 (any failure leaves the eager module, which always works)
            self.failed[key] = f"{type(err).__name__}: {err}"
            log.warning("the compiled %s is unavailable, it runs eagerly: %s", self.program.__name__, self.failed[key])
            return None
        self.programs[key], self.bound = runner, (module, storage_of(program), runner, tensors)
        return runner

    def loaded(self, path: Path, module: nn.Module):
        """The program in ``path``, built first if the file is missing or unreadable."""
        if path.is_file():
            try:
                return load_program(path)
            except (RuntimeError, OSError) as err:  # a corrupt file: build it again
                log.warning("rebuilding the compiled program %s (%s)", path, err)
        log.warning(
            "compiling gmsa's %s for this machine, once (under a minute); cached in %s (--engine-compile off skips it)",
            self.program.__name__,
            path.parent,
        )
        start = time.perf_counter()
        build_program(self.program(module), *self.example(module), path)
        log.info("compiled %s in %.1f s", path.name, time.perf_counter() - start)
        return load_program(path)

    def run(self, module: nn.Module, embeds: torch.Tensor):
        """The program's outputs for ``embeds``, or ``None`` where it does not take them (the caller runs eagerly)."""
        runner = self.runner(module) if self.fits(tuple(embeds.shape)) else None
        return None if runner is None else runner(embeds.to(module.dtype))


class CompiledPrefill(AheadOfTime):
    """The decoder's prefill over one prompt (:class:`PrefillProgram`); prompts of at most ``STEP_ROWS`` positions
    (they would take the decoding steps' int8 path) stay eager."""

    program = PrefillProgram
    min_length = STEP_ROWS + 1

    def example(self, module):
        embeds = torch.zeros(1, EXAMPLE_POSITIONS, module.config.hidden_size, dtype=module.dtype)
        return embeds, {1: torch.export.Dim("positions", min=self.min_length, max=MAX_POSITIONS)}

    @torch.inference_mode()
    def __call__(self, decoder: nn.Module, embeds: torch.Tensor) -> tuple[torch.Tensor, list] | None:
        """``(n, H)`` embeddings -> the last position's fp32 logits and per-layer ``(keys, values)``
        ``(kv_heads, n, head_dim)``, as :func:`gmsa.kv_handoff.torch_prefill` and ``cache_layers`` give them;
        ``None`` where the program does not take the prompt."""
        outputs = self.run(decoder, embeds[None])
        if outputs is None:
            return None
        logits, keys, values = outputs
        return logits, list(zip(keys.unbind(0), values.unbind(0), strict=True))


class CompiledStack(AheadOfTime):
    """A causal stack over right-padded ``(B, L, H)`` rows (:class:`StackProgram`; batch and length dynamic)."""

    program = StackProgram

    def example(self, module):
        embeds = torch.zeros(2, EXAMPLE_POSITIONS, module.config.hidden_size, dtype=module.dtype)
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        return embeds, {0: batch, 1: torch.export.Dim("length", min=self.min_length, max=MAX_POSITIONS)}

    def fits(self, shape: tuple[int, ...]) -> bool:
        return shape[0] <= MAX_BATCH and super().fits(shape)

    @torch.inference_mode()
    def __call__(self, stack: nn.Module, embeds: torch.Tensor) -> torch.Tensor | None:
        """The stack's final states over ``embeds``; ``None`` where the program does not take them."""
        return self.run(stack, embeds)


class StackRunner(nn.Module):
    """``stack`` called the way :func:`gmsa.merge.causal_states` calls it, through ``compiled`` wherever that takes
    the input, else eagerly."""

    def __init__(self, stack: nn.Module, compiled: CompiledStack):
        super().__init__()
        self.stack, self.compiled = stack, compiled

    def forward(self, inputs_embeds: torch.Tensor) -> BaseModelOutput:
        states = self.compiled(self.stack, inputs_embeds)
        return self.stack(inputs_embeds=inputs_embeds) if states is None else BaseModelOutput(last_hidden_state=states)
