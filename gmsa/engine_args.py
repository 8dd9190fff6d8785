"""The ``--engine`` options of ``gmsa answer``, ``reconstruct`` and ``serve`` (light: checked before torch loads)."""

from __future__ import annotations

import argparse

ENGINES = ("hf", "vllm")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """``--engine``, ``--engine-url``, ``--engine-model`` (shared by ``gmsa answer`` and ``gmsa serve``)."""
    parser.add_argument("--engine", choices=ENGINES, default="hf", help="where the decoder runs")
    parser.add_argument("--engine-url", default=None, help="a `vllm serve --enable-prompt-embeds` server (vllm)")
    parser.add_argument(
        "--engine-model", default=None, help="exported decoder directory for vllm (default: exported into the cache)"
    )


def check_engine_args(args: argparse.Namespace) -> None:
    """A ValueError if ``--engine-url``/``--engine-model`` are given without ``--engine vllm``."""
    for option in ("engine_url", "engine_model"):
        if getattr(args, option, None) and args.engine != "vllm":
            flag = "--" + option.replace("_", "-")
            raise ValueError(f"{flag} is for the vllm engine: add --engine vllm, or drop {flag}")
