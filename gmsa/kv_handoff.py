"""A KV cache handed from gmsa's PyTorch prefill to llama.cpp (``--engine llamacpp --engine-prefill torch``).

llama.cpp's decoding step is faster than PyTorch's on a CPU, but its prefill is not (docs/speed.md: its
AMX kernels are off here, llama.cpp#20824). :class:`TorchPrefill` runs the prompt through gmsa's own
decoder (LoRA merged, bf16, ``logits_to_keep=1``, as :func:`gmsa.decoding.greedy_steps` does), writes the
keys and values in the byte layout of ``llama_state_seq_get_data`` for one sequence, and loads them into
the llama.cpp context with ``llama_state_seq_set_data``; llama.cpp then decodes from position ``n``.

The layout (llama.cpp ``src/llama-context.cpp``, ``state_seq_get_data``, and ``src/llama-kv-cache.cpp``,
``state_write``; llama-cpp-python 0.3.36), little-endian: ``u32 magic, i32 seq_id = 0``, ``u32 n_stream = 1``,
``u32 n_cells``, per cell ``i32 pos, u32 n_seq_id = 1, i32 seq_id``; ``u32 v_trans, u32 n_layer``; per layer
``i32 k_type, u64 k_row_bytes`` and the ``(n_cells, kv_heads * head_dim)`` keys; then per layer either
``i32 v_type, u64 v_row_bytes`` and ``(n_cells, kv_dim)`` values, or, transposed (no flash attention),
``i32 v_type, u32 element_bytes, u32 kv_dim`` and ``(kv_dim, n_cells)`` values.

The GGUF's q/k rows are permuted so that llama.cpp's RoPE rotates adjacent pairs (``(2i, 2i+1)``) where
``transformers`` rotates halves (``(i, i + d/2)``, :func:`gmsa.gguf_export.rotary_rows_for_gguf`); llama.cpp's
cached keys are therefore ``transformers``' post-RoPE keys with each head's dimensions interleaved the same way.
"""

from __future__ import annotations

import struct

import numpy as np
import torch
from transformers import DynamicCache

from .aot import CompiledPrefill

# ggml's type ids (ggml.h) of the cache types the handoff writes, and the torch dtype each is written from
STATE_MAGIC = 0xAF143CD8  # llama-context.cpp's io_magic: the first four bytes of a sequence's state
GGML_TYPES = {"f32": (0, torch.float32), "f16": (1, torch.float16), "bf16": (30, torch.bfloat16)}


def llama_head_order(keys: torch.Tensor) -> torch.Tensor:
    """``(..., head_dim)`` keys in ``transformers``' half-split RoPE order -> llama.cpp's interleaved order."""
    half = keys.shape[-1] // 2
    return keys.unflatten(-1, (2, half)).transpose(-1, -2).flatten(-2)


def state_blob(
    layers: list[tuple[torch.Tensor, torch.Tensor]], kv_type: str, v_trans: bool, out: np.ndarray | None = None
) -> np.ndarray:
    """One sequence's llama.cpp state (``uint8``) from per-layer ``(keys, values)`` of shape ``(kv_heads, n, head_dim)``
    (``transformers``' post-RoPE cache of one unpadded row, positions ``0..n-1``).

    Each layer's keys and values are written straight into their place in one buffer by a single ``copy_``
    (reordered and converted to the cache type at once): no intermediate copies of a cache of tens of MB.
    ``out``: a ``uint8`` buffer to write into when it is large enough (the start of it is returned), so that
    repeated handoffs do not fault in fresh pages for every state (0.05 s of a 47 MB state here)."""
    if kv_type not in GGML_TYPES:
        raise ValueError(f"kv_type must be one of {tuple(GGML_TYPES)}, got {kv_type!r}")
    type_id, dtype = GGML_TYPES[kv_type]
    element = torch.empty(0, dtype=dtype).element_size()
    heads, n, head_dim = layers[0][0].shape
    kv_dim, half = heads * head_dim, head_dim // 2
    cells = np.zeros(n, dtype=[("pos", "<i4"), ("n_seq_id", "<u4"), ("seq_id", "<i4")])
    cells["pos"], cells["n_seq_id"] = np.arange(n), 1
    header = (
        struct.pack("<IiII", STATE_MAGIC, 0, 1, n) + cells.tobytes() + struct.pack("<II", int(v_trans), len(layers))
    )
    k_header = struct.pack("<iQ", type_id, kv_dim * element)
    v_header = struct.pack("<iII", type_id, element, kv_dim) if v_trans else k_header
    part = n * kv_dim * element
    size = len(header) + len(layers) * (len(k_header) + len(v_header) + 2 * part)
    blob = out[:size] if out is not None and out.size >= size else np.empty(size, dtype=np.uint8)
    blob[: len(header)] = np.frombuffer(header, np.uint8)
    offset = len(header)

    def put(head: bytes, shape: tuple[int, ...], source: torch.Tensor) -> None:
        nonlocal offset
        blob[offset : offset + len(head)] = np.frombuffer(head, np.uint8)
        offset += len(head)
        target = torch.from_numpy(blob[offset : offset + part]).view(dtype).view(shape)
        target.copy_(source)  # one pass: reorder and convert to the cache type
        offset += part

    for keys, _ in layers:  # rows of keys, each head's dimensions interleaved (llama_head_order)
        put(k_header, (n, heads, half, 2), keys.cpu().unflatten(-1, (2, half)).permute(1, 0, 3, 2))
    for _, values in layers:  # values transposed (one row per dimension, no flash attention), or as rows
        values = values.cpu()
        if v_trans:
            put(v_header, (heads, head_dim, n), values.transpose(1, 2))
        else:
            put(v_header, (n, heads, head_dim), values.transpose(0, 1))
    return blob


def cache_layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)`` ``(kv_heads, n, head_dim)`` of a one-row ``transformers`` cache."""
    layers = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or keys.shape[0] != 1:
            raise ValueError("the handoff takes a one-row cache whose every layer holds full-attention keys and values")
        layers.append((keys[0], values[0]))
    return layers


@torch.inference_mode()
def torch_prefill(decoder: torch.nn.Module, embeds: torch.Tensor) -> tuple[np.ndarray, DynamicCache]:
    """``decoder`` over one ``(n, H)`` prompt at positions ``0..n-1``: the last position's logits and the cache."""
    cache = DynamicCache(config=decoder.config)
    output = decoder(
        inputs_embeds=embeds[None].to(decoder.dtype),
        position_ids=torch.arange(embeds.shape[0], device=embeds.device)[None],
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return output.logits[0, -1].float().cpu().numpy(), cache


class TorchPrefill:
    """A prefill for :meth:`gmsa.llamacpp.LlamaCppDecoder.greedy_ids`: ``decoder()`` (the PyTorch decoder that
    matches the GGUF, e.g. ``GMSA.fast_decoder.of(GMSA.model.decoder)``) reads the prompt embeddings, and its
    cache goes into the llama.cpp context.

    ``compile=True`` runs the prefill compiled ahead of time (:class:`gmsa.aot.CompiledPrefill`: built
    once per decoder shape and machine, about a minute, then loaded from gmsa's cache), which fuses the
    decoder's elementwise work: prefills 14-20 % faster on this CPU. Prompts it does not take (at most
    :data:`gmsa.fast_decode.STEP_ROWS` positions) and decoders it cannot compile run eagerly. The decoder
    itself is not changed. ``directory``: where compiled prefills are kept (default: gmsa's cache)."""

    def __init__(self, decoder, compile: bool = False, directory=None):  # noqa: A002  (torch.compile's own name for it)
        self.decoder = decoder
        self.compiled = CompiledPrefill(directory) if compile else None
        self.buffer = np.empty(0, dtype=np.uint8)  # the largest state so far, written over by each handoff

    def layers(self, prompt: torch.Tensor) -> tuple[np.ndarray, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The last position's logits and the per-layer keys and values of ``prompt`` (compiled where it can)."""
        decoder = self.decoder()
        compiled = self.compiled(decoder, prompt) if self.compiled is not None else None
        if compiled is not None:
            logits, layers = compiled
            return logits.cpu().numpy(), layers
        logits, cache = torch_prefill(decoder, prompt)
        return logits, cache_layers(cache)

    def __call__(self, target, prompt: torch.Tensor, reserve: int) -> np.ndarray:
        if prompt.dim() != 2:
            raise ValueError(f"the PyTorch prefill reads (n, H) embeddings, got a prompt shaped {tuple(prompt.shape)}")
        logits, layers = self.layers(prompt)
        blob = state_blob(layers, target.kv_type, target.v_trans, self.buffer)
        if blob.base is not self.buffer:
            self.buffer = blob
        target.load_state(blob, prompt.shape[0] + reserve)
        return logits
