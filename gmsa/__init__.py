"""gmsa: compress long LLM contexts into a few soft tokens (GMSA, arXiv 2505.12215)."""

from .api import GMSA, CheckpointError
from .backbone import BackboneNotFoundError
from .compressed import Compressed, IncompatibleContextError
from .config import GMSAConfig
from .version import __version__

__all__ = [
    "GMSA",
    "GMSAConfig",
    "Compressed",
    "CheckpointError",
    "BackboneNotFoundError",
    "IncompatibleContextError",
    "__version__",
]
