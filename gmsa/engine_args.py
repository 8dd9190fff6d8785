"""The ``--engine`` options of ``gmsa answer``, ``reconstruct`` and ``serve`` (light: checked before torch loads)."""

from __future__ import annotations

import argparse

ENGINES = ("auto", "hf", "vllm", "llamacpp")
GGUF_TYPES = ("q8_0", "f16", "bf16", "f32")  # gmsa.gguf_export.WEIGHT_TYPES, named here without importing it
PREFILLS = ("torch", "llamacpp")  # gmsa.llamacpp.PREFILLS
COMPILE_SETTINGS = ("on", "off")


def add_engine_args(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    """``--engine``, ``--engine-url``, ``--engine-model``, ``--gguf-type``, ``--engine-threads``, ``--engine-prefill``,
    ``--engine-compile``, ``--engine-no-repack`` (shared by ``gmsa answer`` and ``gmsa serve``)."""
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default=default,
        help=f"where the decoder runs (default {default}; auto: llamacpp where llama-cpp-python is installed and the "
        "model is on the CPU, the fastest path there, else hf)",
    )
    parser.add_argument("--engine-url", default=None, help="a `vllm serve --enable-prompt-embeds` server (vllm)")
    parser.add_argument(
        "--engine-model",
        default=None,
        help="exported decoder: a directory for vllm, a .gguf file for llamacpp (default: exported into the cache)",
    )
    parser.add_argument(
        "--gguf-type", choices=GGUF_TYPES, default=None, help="weights of the exported GGUF (llamacpp; default q8_0)"
    )
    parser.add_argument(
        "--engine-threads", type=int, default=None, help="llama.cpp threads (llamacpp; default: torch's thread count)"
    )
    parser.add_argument(
        "--engine-prefill",
        choices=PREFILLS,
        default=None,
        help="who reads the prompt (llamacpp; default torch: gmsa's decoder, its KV cache then handed to llama.cpp)",
    )
    parser.add_argument(
        "--engine-compile",
        nargs="?",
        const="on",
        choices=COMPILE_SETTINGS,
        default=None,
        help="gmsa's encoder and prefill compiled ahead of time (llamacpp with the torch prefill; default on: built "
        "once per model shape and machine, about a minute, then loaded from the cache; each 14-25 %% faster)",
    )
    parser.add_argument(
        "--engine-no-repack",
        action="store_const",
        const=True,
        default=None,
        help="llama.cpp steps on its plain weights, not repacked for AMX (llamacpp; repacked by default with the torch "
        "prefill: 1.5-1.7x faster steps here)",
    )


def check_engine_args(args: argparse.Namespace) -> None:
    """A ValueError for an engine option that the chosen ``--engine`` does not take."""
    takes = {"engine_url": ("vllm",), "engine_model": ("vllm", "llamacpp"), "gguf_type": ("llamacpp",)}
    for option in ("engine_threads", "engine_prefill", "engine_no_repack"):
        takes[option] = ("llamacpp",)
    takes["engine_compile"] = ("llamacpp", "auto")  # auto picks llama.cpp where it can
    for option, engines in takes.items():
        if getattr(args, option, None) is not None and args.engine not in engines:
            flag = "--" + option.replace("_", "-")
            needed = " or ".join(f"--engine {name}" for name in engines)
            raise ValueError(f"{flag} is for {needed}: add it, or drop {flag}")
    threads = getattr(args, "engine_threads", None)
    if threads is not None and threads < 1:
        raise ValueError(f"--engine-threads must be >= 1, got {threads}")
