"""gmsa: compress long LLM contexts into a few soft tokens (GMSA, arXiv 2505.12215).

The public names load their modules (torch, transformers) on first use, so that ``gmsa.cli``
can check its arguments before any of that is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import __version__

if TYPE_CHECKING:
    from .api import GMSA
    from .backbone import BackboneNotFoundError
    from .checkpoint import CheckpointError
    from .compressed import Compressed, IncompatibleContextError
    from .config import GMSAConfig

_HOMES = {
    "GMSA": "api",
    "CheckpointError": "checkpoint",
    "BackboneNotFoundError": "backbone",
    "Compressed": "compressed",
    "IncompatibleContextError": "compressed",
    "GMSAConfig": "config",
}

__all__ = [
    "GMSA",
    "GMSAConfig",
    "Compressed",
    "CheckpointError",
    "BackboneNotFoundError",
    "IncompatibleContextError",
    "__version__",
]


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
