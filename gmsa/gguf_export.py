"""The GMSA decoder as a GGUF file, for llama.cpp (``--engine llamacpp``, :mod:`gmsa.llamacpp`).

:func:`write_gguf` writes a Llama-architecture decoder (LoRA adapters merged by
:func:`gmsa.model.inference_copy`) with the ``gguf`` package: the hyper-parameters from its config,
the tokenizer's metadata copied from a template GGUF (the embedded SmolLM2 file, so the result is
what llama.cpp's own converter would write) or, without one, written from the HF tokenizer; the
2-D weights in ``q8_0`` (default), ``f16``, ``bf16`` or ``f32``, the norms in f32. llama.cpp
stores the query and key projections with the rows of each head interleaved for its rotary
embedding (``convert_hf_to_gguf.py``'s ``permute``; ``transformers``' GGUF loader undoes it):
:func:`rotary_rows_for_gguf` does the same.

:func:`exported_gguf` caches one file per checkpoint, set of active decoder adapters, weight type
and source dtype in gmsa's cache (as :func:`gmsa.engines.exported_decoder` does for vLLM).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PreTrainedTokenizerBase

from .backbone import DEFAULT_BACKBONE, cache_root, default_gguf_path
from .engine_base import EngineUnavailableError, GMSALike, export_info
from .model import inference_copy

WEIGHT_TYPES = {  # name: (type of the 2-D weights, the file type llama.cpp reports)
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
}
DEFAULT_WEIGHT_TYPE = "q8_0"
ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]  # "llama"


def rotary_rows_for_gguf(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's q/k projection rows (per head: first halves, then second halves of the rotary pairs) in
    llama.cpp's order (the pairs interleaved): ``convert_hf_to_gguf.py``'s ``permute``."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _check_llama(config) -> None:
    if config.model_type != "llama":
        raise EngineUnavailableError(
            f"the llama.cpp export writes Llama-architecture decoders (SmolLM2 is one), not {config.model_type!r}"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise EngineUnavailableError(f"the llama.cpp export does not write rope scaling ({rope})")


def _hyper_parameters(writer: gguf.GGUFWriter, config) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _copy_tokenizer_metadata(template: Path, writer: gguf.GGUFWriter, vocab_size: int) -> None:
    """Every ``tokenizer.*`` and descriptive ``general.*`` field of ``template`` (not its file type)."""
    reader = gguf.GGUFReader(template)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        found = "none" if tokens is None else len(tokens.data)
        raise ValueError(f"{template} has {found} tokenizer tokens, the decoder {vocab_size}")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in (
            "general.architecture",
            "general.file_type",
            "general.quantization_version",
        ):
            continue
        if not key.startswith(("tokenizer.", "general.")):
            continue
        main, sub = field.types[0], (field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
        writer.add_key_value(key, field.contents(), main, sub_type=sub)


def _tokenizer_metadata(tokenizer: PreTrainedTokenizerBase, writer: gguf.GGUFWriter, vocab_size: int) -> None:
    """Vocabulary metadata from a HF tokenizer: llama.cpp reads it at load; gmsa tokenises and detokenises itself."""
    names = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    names += [f"[gmsa-unused-{i}]" for i in range(len(names), vocab_size)]
    special = set(tokenizer.all_special_ids)
    kinds = [
        gguf.TokenType.CONTROL
        if i in special
        else gguf.TokenType.NORMAL
        if i < len(tokenizer)
        else gguf.TokenType.UNUSED
        for i in range(vocab_size)
    ]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"].get("merges") or []
    if merges:  # a byte-level BPE tokenizer, as llama.cpp's converter writes it
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    else:  # no merges (e.g. word-level): a SentencePiece-typed vocabulary, which needs none
        writer.add_tokenizer_model("llama")
        writer.add_token_scores([0.0] * vocab_size)
    writer.add_token_list(names[:vocab_size])
    writer.add_token_types([int(k) for k in kinds])
    for name, add in (
        ("eos_token_id", writer.add_eos_token_id),
        ("bos_token_id", writer.add_bos_token_id),
        ("pad_token_id", writer.add_pad_token_id),
        ("unk_token_id", writer.add_unk_token_id),
    ):
        if getattr(tokenizer, name, None) is not None:
            add(getattr(tokenizer, name))
    writer.add_add_bos_token(False)


def _tensor_data(
    name: str, weight: torch.Tensor, config, weight_type: str
) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """``weight`` (HF layout) as the bytes llama.cpp reads under ``name``, and their type."""
    weight = weight.detach().float().cpu()
    if name.endswith("attn_q.weight"):
        weight = rotary_rows_for_gguf(weight, config.num_attention_heads)
    elif name.endswith("attn_k.weight"):
        weight = rotary_rows_for_gguf(
            weight, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        )
    qtype = WEIGHT_TYPES[weight_type][0] if weight.dim() == 2 else gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.Q8_0 and weight.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = gguf.GGMLQuantizationType.F16  # rows that are not whole Q8_0 blocks (as llama.cpp's converter does)
    data = weight.numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return data, qtype
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), qtype
    return gguf.quants.quantize(data, qtype), qtype


def write_gguf(
    decoder: nn.Module,
    path: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    weight_type: str = DEFAULT_WEIGHT_TYPE,
    template: str | os.PathLike | None = None,
) -> Path:
    """Write ``decoder`` (a HF Llama causal LM; active LoRA adapters are merged) as a GGUF file at ``path``.

    The tokenizer metadata is copied from ``template`` (a GGUF of the same vocabulary) if given,
    else written from ``tokenizer``.
    """
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight type must be one of {', '.join(WEIGHT_TYPES)}, got {weight_type!r}")
    if template is None and tokenizer is None:
        raise ValueError("write_gguf needs a template GGUF or a tokenizer for the vocabulary metadata")
    config = decoder.config
    _check_llama(config)
    if any(isinstance(m, LoraLayer) for m in decoder.modules()):
        decoder = inference_copy(decoder)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(staging, ARCH)
    _hyper_parameters(writer, config)
    writer.add_file_type(WEIGHT_TYPES[weight_type][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if template is not None:
        _copy_tokenizer_metadata(Path(template), writer, config.vocab_size)
    else:
        _tokenizer_metadata(tokenizer, writer, config.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, weight in decoder.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads the tied output head from token_embd
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None or "rotary_emb" in hf_name:
            raise ValueError(f"no GGUF name for the decoder tensor {hf_name}")
        data, qtype = _tensor_data(name, weight, config, weight_type)
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    staging.replace(path)
    return path


# --------------------------------------------------------------------- the cached export of a GMSA's decoder
def active_adapters(decoder: nn.Module) -> str:
    """The decoder adapters in use (``"ae+keft"``, ``"ae"``; ``"none"``): which merge an export holds."""
    active = {
        name
        for module in decoder.modules()
        if isinstance(module, LoraLayer) and not module.disable_adapters
        for name in module.active_adapters
        if name in module.lora_A
    }
    return "+".join(sorted(active)) or "none"


def gguf_info(gmsa: GMSALike, weight_type: str) -> dict:
    """What identifies a GGUF export of ``gmsa``'s decoder (stored next to it, checked on reuse)."""
    decoder = gmsa.model.decoder
    return export_info(gmsa) | {
        "adapters": active_adapters(decoder),
        "weight_type": weight_type,
        "source_dtype": str(next(decoder.parameters()).dtype).removeprefix("torch."),
    }


def exported_gguf(gmsa: GMSALike, weight_type: str = DEFAULT_WEIGHT_TYPE, directory: str | Path | None = None) -> Path:
    """A GGUF of ``gmsa``'s decoder as it runs now (its active adapters merged): reused if ``directory``
    (default: gmsa's cache) holds it, else written. The default backbone's tokenizer metadata is copied
    from its own GGUF file; another backbone's is written from gmsa's tokenizer."""
    info = gguf_info(gmsa, weight_type)
    directory = Path(directory) if directory is not None else cache_root() / "engine-decoders"
    stem = f"{info['backbone_fingerprint'][:12]}-{info['checkpoint_id']}-{info['adapters']}-{info['source_dtype']}"
    path = directory / f"{stem}.{weight_type}.gguf"
    sidecar = path.with_suffix(".json")
    try:
        if path.is_file() and json.loads(sidecar.read_text()) == info:
            return path
    except (OSError, ValueError):
        pass
    template = default_gguf_path() if str(gmsa.config.backbone) == DEFAULT_BACKBONE else None
    write_gguf(gmsa.model.decoder, path, gmsa.tokenizer, weight_type, template)
    sidecar.write_text(json.dumps(info, indent=2) + "\n")
    return path
