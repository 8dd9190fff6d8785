"""The prefill compiled ahead of time: the eager prefill's numbers, built once and reused, weights bound to whichever
decoder runs, and the eager prefill wherever it cannot be used."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from gmsa import aot_prefill
from gmsa.aot_prefill import MIN_POSITIONS, CompiledPrefill, program_info, program_path
from gmsa.kv_handoff import TorchPrefill, cache_layers, torch_prefill


def load(backbone_dir, seed: int | None = None):
    decoder = AutoModelForCausalLM.from_pretrained(backbone_dir).eval()
    if seed is not None:  # same shape, other weights (another checkpoint or adapter set)
        torch.manual_seed(seed)
        with torch.no_grad():
            for parameter in decoder.parameters():
                parameter.add_(0.02 * torch.randn_like(parameter))
    return decoder


def assert_same_prefill(compiled: CompiledPrefill, decoder, prompt: torch.Tensor) -> None:
    logits, layers = compiled(decoder, prompt)
    expected_logits, cache = torch_prefill(decoder, prompt)
    np.testing.assert_allclose(logits.numpy(), expected_logits, rtol=1e-4, atol=1e-4)
    for (keys, values), (expected_keys, expected_values) in zip(layers, cache_layers(cache), strict=True):
        torch.testing.assert_close(keys, expected_keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(values, expected_values, rtol=1e-4, atol=1e-4)


NO_COMPILER = shutil.which(os.environ.get("CXX", "g++")) is None


@pytest.fixture(scope="module")
def built(backbone_dir, tmp_path_factory):
    """One program, built for the tiny decoder into a fresh directory (the slow part: a C++ compile, ~15 s)."""
    if NO_COMPILER:
        pytest.skip("AOTInductor needs a C++ compiler (g++ or $CXX); without one the prefill runs eagerly")
    directory = tmp_path_factory.mktemp("compiled-prefill")
    decoder = load(backbone_dir)
    compiled = CompiledPrefill(directory)
    assert compiled.takes(decoder, 20)
    return directory, decoder, compiled


def test_the_compiled_prefill_gives_the_eager_prefills_numbers_at_any_length(built):
    _, decoder, compiled = built
    rows = torch.randn(300, decoder.config.hidden_size)
    for prompt in (rows[:MIN_POSITIONS], rows[:37], rows):
        assert_same_prefill(compiled, decoder, prompt)


def test_a_built_program_is_reused_from_the_cache_and_bound_to_other_weights(built, monkeypatch):
    directory, _, _ = built
    monkeypatch.setattr(aot_prefill, "build_program", lambda *args: pytest.fail("built again"))
    other = load_like(built, seed=1)
    fresh = CompiledPrefill(directory)  # another process: loads the file
    assert fresh.takes(other, 50)
    assert_same_prefill(fresh, other, torch.randn(50, other.config.hidden_size))
    first = built[1]
    assert fresh.takes(first, 50)  # back to the first decoder: rebound, not rebuilt
    assert_same_prefill(fresh, first, torch.randn(23, first.config.hidden_size))


def load_like(built, seed: int):
    decoder = built[1]
    other = type(decoder)(decoder.config).eval()
    other.load_state_dict(decoder.state_dict())
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return other


def test_the_program_key_follows_the_decoders_shape_not_its_weights(built):
    _, decoder, _ = built
    same_shape = load_like(built, seed=2)
    assert program_info(same_shape) == program_info(decoder)
    wider = type(decoder)(decoder.config.__class__(**(decoder.config.to_dict() | {"intermediate_size": 48})))
    assert program_path(program_info(wider)) != program_path(program_info(decoder))
    assert program_info(same_shape.to(torch.bfloat16))["decoder"] != program_info(decoder)["decoder"]


def test_a_decoder_whose_weights_were_replaced_is_bound_again(built):
    directory, _, _ = built
    decoder = load_like(built, seed=3)
    compiled = CompiledPrefill(directory)
    prompt = torch.randn(30, decoder.config.hidden_size)
    assert_same_prefill(compiled, decoder, prompt)
    decoder.load_state_dict(load_like(built, seed=4).state_dict(), assign=True)  # new tensors, same module
    assert_same_prefill(compiled, decoder, prompt)


def test_short_prompts_and_sliding_window_decoders_stay_eager(backbone_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(aot_prefill, "build_program", lambda *args: pytest.fail("nothing to build"))
    compiled = CompiledPrefill(tmp_path)
    decoder = load(backbone_dir)
    assert not compiled.takes(decoder, MIN_POSITIONS - 1)
    decoder.config.sliding_window = 16
    assert not compiled.takes(decoder, 40)


def test_a_program_that_cannot_be_built_leaves_the_eager_prefill_with_one_warning(
    backbone_dir, tmp_path, monkeypatch, caplog
):
    calls = []

    def broken(decoder, path):
        calls.append(path)
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(aot_prefill, "build_program", broken)
    decoder = load(backbone_dir)
    path = program_path(program_info(decoder), tmp_path)
    path.write_bytes(b"not a zip archive")  # a corrupt cached file is built again, not trusted
    prefill = TorchPrefill(lambda: decoder, compile=True, directory=tmp_path)
    prompt = torch.randn(30, decoder.config.hidden_size)
    with caplog.at_level(logging.WARNING, logger="gmsa.aot_prefill"):
        logits, layers = prefill.layers(prompt)
        prefill.layers(prompt)
    expected, cache = torch_prefill(decoder, prompt)
    np.testing.assert_array_equal(logits, expected)
    assert len(layers) == len(cache_layers(cache)) and calls == [path]  # tried once
    messages = [record.message for record in caplog.records]
    assert sum("unavailable" in message and "no C++ compiler" in message for message in messages) == 1
    assert any("rebuilding" in message for message in messages)


def test_the_handoff_prefill_compiles_only_when_asked(built, monkeypatch):
    directory, decoder, _ = built
    monkeypatch.setattr(aot_prefill, "build_program", lambda *args: pytest.fail("built again"))
    prompt = torch.randn(40, decoder.config.hidden_size)
    eager_logits, eager_layers = TorchPrefill(lambda: decoder).layers(prompt)
    logits, layers = TorchPrefill(lambda: decoder, compile=True, directory=directory).layers(prompt)
    np.testing.assert_allclose(logits, eager_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layers[-1][0], eager_layers[-1][0], rtol=1e-4, atol=1e-4)
    assert TorchPrefill(lambda: decoder).compiled is None
