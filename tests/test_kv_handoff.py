"""The KV-cache handoff from gmsa's PyTorch prefill to llama.cpp: its byte layout, and (where llama-cpp-python is
installed) that llama.cpp decodes from it as from its own prefill."""

from __future__ import annotations

import ctypes
import struct

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gmsa.gguf_export import rotary_rows_for_gguf, write_gguf
from gmsa.kv_handoff import STATE_MAGIC, TorchPrefill, cache_layers, llama_head_order, state_blob, torch_prefill


def test_keys_take_the_order_of_the_exported_rows():
    heads, head_dim = 2, 8
    weight = torch.arange(heads * head_dim, dtype=torch.float32)[:, None]  # row i holds i
    exported = rotary_rows_for_gguf(weight, heads)[:, 0].reshape(heads, head_dim)
    keys = torch.arange(heads * head_dim, dtype=torch.float32).reshape(heads, head_dim)
    assert torch.equal(llama_head_order(keys), exported)


@pytest.mark.parametrize(("kv_type", "v_trans"), [("f16", True), ("bf16", False), ("f32", True)])
def test_the_blob_has_llama_cpps_layout(kv_type, v_trans):
    n, heads, head_dim, n_layer = 3, 2, 4, 2
    layers = [(torch.randn(heads, n, head_dim), torch.randn(heads, n, head_dim)) for _ in range(n_layer)]
    blob = state_blob(layers, kv_type, v_trans)
    element = {"f16": 2, "bf16": 2, "f32": 4}[kv_type]
    kv_dim = heads * head_dim
    header, cells = 16, 12 * n
    assert struct.unpack_from("<IiII", blob) == (STATE_MAGIC, 0, 1, n)
    assert [struct.unpack_from("<iIi", blob, header + 12 * i) for i in range(n)] == [(i, 1, 0) for i in range(n)]
    assert struct.unpack_from("<II", blob, header + cells) == (int(v_trans), n_layer)
    k_part = 12 + n * kv_dim * element
    v_header = 12
    assert len(blob) == header + cells + 8 + n_layer * (k_part + v_header + n * kv_dim * element)
    if kv_type == "f32":
        start = header + cells + 8 + 12
        first_keys = np.frombuffer(blob, "<f4", n * kv_dim, start).reshape(n, heads, head_dim)
        assert np.array_equal(first_keys, llama_head_order(layers[0][0]).transpose(0, 1).numpy())
        start = header + cells + 8 + n_layer * k_part + 12
        first_values = np.frombuffer(blob, "<f4", n * kv_dim, start).reshape(kv_dim, n)
        assert np.array_equal(first_values, layers[0][1].transpose(1, 2).reshape(kv_dim, n).numpy())
    buffer = np.full(len(blob) + 5, 7, dtype=np.uint8)  # a buffer large enough is written over, not reallocated
    reused = state_blob(layers, kv_type, v_trans, buffer)
    assert reused.base is buffer and bytes(reused) == bytes(blob)
    assert state_blob(layers, kv_type, v_trans, buffer[:4]).base is None  # too small: a new array
    with pytest.raises(ValueError, match="kv_type must be one of"):
        state_blob(layers, "q8_0", v_trans)


def test_a_batched_cache_is_refused(backbone_dir):
    model = AutoModelForCausalLM.from_pretrained(backbone_dir).eval()
    _, cache = torch_prefill(model, torch.randn(4, model.config.hidden_size))
    assert cache_layers(cache)[0][0].shape[1] == 4
    with torch.no_grad():
        cache = model(inputs_embeds=torch.randn(2, 4, model.config.hidden_size), use_cache=True).past_key_values
    with pytest.raises(ValueError, match="one-row cache"):
        cache_layers(cache)


# ----------------------------------------------------------------- with llama.cpp
@pytest.fixture
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def llama_state(decoder) -> bytes:
    """The state llama.cpp itself writes for sequence 0."""
    llama, context = decoder.llama, decoder.context
    size = llama.llama_state_seq_get_size(context, 0)
    buffer = (ctypes.c_uint8 * size)()
    assert llama.llama_state_seq_get_data(context, buffer, size, 0) == size
    return bytes(buffer)


@pytest.mark.parametrize("flash_attention", [False, True])
def test_llama_cpp_decodes_from_the_handed_cache_as_from_its_own(llama_cpp, backbone_dir, tmp_path, flash_attention):
    from gmsa.llamacpp import LlamaCppDecoder

    model = AutoModelForCausalLM.from_pretrained(backbone_dir).eval()
    path = write_gguf(model, tmp_path / "tiny.f32.gguf", AutoTokenizer.from_pretrained(backbone_dir), "f32")
    decoder = LlamaCppDecoder(path, kv_type="f32", flash_attention=flash_attention)
    torch.manual_seed(0)
    embeds = torch.randn(37, model.config.hidden_size) * 0.05
    own = decoder.prefill(embeds, 4)
    own_state = np.frombuffer(llama_state(decoder), np.uint8)
    own_step = decoder.step(11, 37)
    handed = TorchPrefill(lambda: model)(decoder, embeds, 4)
    handed_state = np.frombuffer(llama_state(decoder), np.uint8)
    handed_step = decoder.step(11, 37)
    # the same bytes where llama.cpp writes its bookkeeping, the same keys and values (f32) up to rounding
    assert handed_state.size == own_state.size
    header = 16 + 12 * 37 + 8 + 12
    assert np.array_equal(handed_state[:header], own_state[:header])
    config = model.config
    kv_dim = config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    keys = (np.frombuffer(state[header:].tobytes()[: 37 * kv_dim * 4], "<f4") for state in (handed_state, own_state))
    assert np.allclose(*keys, atol=1e-4)  # the first layer's keys
    # the last layer's values (with flash attention, llama.cpp rounds each layer's queries to f16)
    last_values = (state[-37 * kv_dim * 4 :].view("<f4") for state in (handed_state, own_state))
    assert np.allclose(*last_values, atol=5e-2 if flash_attention else 1e-4)
    scale = np.abs(own_step).max()
    tolerance = 1e-2 if flash_attention else 1e-3  # llama.cpp's flash attention rounds the queries to f16
    assert np.abs(handed - own).max() <= tolerance * scale  # torch's and llama.cpp's prefill logits
    assert np.abs(handed_step - own_step).max() <= tolerance * scale  # the step reads the handed cache at 0..36
    ids = decoder.greedy_ids(embeds, 6, 1.3, prefill=TorchPrefill(lambda: model))
    assert ids == decoder.greedy_ids(embeds, 6, 1.3)
    with pytest.raises(ValueError, match="reads \\(n, H\\) embeddings"):
        TorchPrefill(lambda: model)(decoder, torch.tensor([1, 2]), 4)
    decoder.close()
