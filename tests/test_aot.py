"""Programs compiled ahead of time: the eager numbers, built once and reused, weights bound to whichever module runs,
and the eager module wherever a program cannot be used."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from gmsa import aot
from gmsa.aot import CompiledPrefill, CompiledStack, PrefillProgram, StackProgram, program_info, program_path
from gmsa.kv_handoff import TorchPrefill, cache_layers, torch_prefill
from gmsa.merge import causal_states

NO_COMPILER = shutil.which(os.environ.get("CXX", "g++")) is None
needs_compiler = pytest.mark.skipif(NO_COMPILER, reason="AOTInductor needs a C++ compiler (g++ or $CXX)")
MIN_POSITIONS = CompiledPrefill.min_length


def load(backbone_dir):
    return AutoModelForCausalLM.from_pretrained(backbone_dir).eval()


def load_like(decoder, seed: int):
    """A decoder of ``decoder``'s shape with other weights (another checkpoint or adapter set)."""
    other = type(decoder)(decoder.config).eval()
    other.load_state_dict(decoder.state_dict())
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return other


def assert_same_prefill(compiled: CompiledPrefill, decoder, prompt: torch.Tensor) -> None:
    logits, layers = compiled(decoder, prompt)
    expected_logits, cache = torch_prefill(decoder, prompt)
    np.testing.assert_allclose(logits.numpy(), expected_logits, rtol=1e-4, atol=1e-4)
    for (keys, values), (expected_keys, expected_values) in zip(layers, cache_layers(cache), strict=True):
        torch.testing.assert_close(keys, expected_keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(values, expected_values, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def built(backbone_dir, tmp_path_factory):
    """One prefill program, built for the tiny decoder into a fresh directory (the slow part: a C++ compile, ~15 s)."""
    if NO_COMPILER:
        pytest.skip("AOTInductor needs a C++ compiler (g++ or $CXX); without one the prefill runs eagerly")
    directory = tmp_path_factory.mktemp("compiled")
    decoder = load(backbone_dir)
    compiled = CompiledPrefill(directory)
    assert compiled.takes(decoder, (20, decoder.config.hidden_size))
    return directory, decoder, compiled


def test_the_compiled_prefill_gives_the_eager_prefills_numbers_at_any_length(built):
    _, decoder, compiled = built
    rows = torch.randn(300, decoder.config.hidden_size)
    for prompt in (rows[:MIN_POSITIONS], rows[:37], rows):
        assert_same_prefill(compiled, decoder, prompt)


def test_a_built_program_is_reused_from_the_cache_and_bound_to_other_weights(built, monkeypatch):
    directory, first, _ = built
    monkeypatch.setattr(aot, "build_program", lambda *args: pytest.fail("built again"))
    other = load_like(first, seed=1)
    fresh = CompiledPrefill(directory)  # another process: loads the file
    assert fresh.takes(other, (50, 64))
    assert_same_prefill(fresh, other, torch.randn(50, other.config.hidden_size))
    assert fresh.takes(first, (50, 64))  # back to the first decoder: rebound, not rebuilt
    assert_same_prefill(fresh, first, torch.randn(23, first.config.hidden_size))


def test_the_program_key_follows_the_modules_shape_not_its_weights(built):
    _, decoder, _ = built
    same_shape = load_like(decoder, seed=2)
    assert program_info(PrefillProgram(same_shape)) == program_info(PrefillProgram(decoder))
    assert program_info(StackProgram(decoder.model))["program"] == "StackProgram"
    wider = type(decoder)(decoder.config.__class__(**(decoder.config.to_dict() | {"intermediate_size": 48})))
    assert program_path(program_info(PrefillProgram(wider))) != program_path(program_info(PrefillProgram(decoder)))
    in_bf16 = program_info(PrefillProgram(same_shape.to(torch.bfloat16)))
    assert in_bf16["module"] != program_info(PrefillProgram(decoder))["module"]


def test_a_decoder_whose_weights_were_replaced_is_bound_again(built):
    directory, first, _ = built
    decoder = load_like(first, seed=3)
    compiled = CompiledPrefill(directory)
    prompt = torch.randn(30, decoder.config.hidden_size)
    assert_same_prefill(compiled, decoder, prompt)
    decoder.load_state_dict(load_like(first, seed=4).state_dict(), assign=True)  # new tensors, same module
    assert_same_prefill(compiled, decoder, prompt)


def test_short_prompts_and_sliding_window_decoders_stay_eager(backbone_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(aot, "build_program", lambda *args: pytest.fail("nothing to build"))
    compiled = CompiledPrefill(tmp_path)
    decoder = load(backbone_dir)
    assert not compiled.takes(decoder, (MIN_POSITIONS - 1, 64))
    assert compiled(decoder, torch.randn(MIN_POSITIONS - 1, 64)) is None  # the caller then runs it eagerly
    decoder.config.sliding_window = 16
    assert not compiled.takes(decoder, (40, 64))
    assert compiled(decoder, torch.randn(40, 64)) is None


def test_a_program_that_cannot_be_built_leaves_the_eager_prefill_with_one_warning(
    backbone_dir, tmp_path, monkeypatch, caplog
):
    calls = []

    def broken(*args):
        calls.append(args[-1])
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(aot, "build_program", broken)
    decoder = load(backbone_dir)
    path = program_path(program_info(PrefillProgram(decoder)), tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a zip archive")  # a corrupt cached file is built again, not trusted
    prefill = TorchPrefill(lambda: decoder, compile=True, directory=tmp_path)
    prompt = torch.randn(30, decoder.config.hidden_size)
    with caplog.at_level(logging.WARNING, logger="gmsa.aot"):
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
    monkeypatch.setattr(aot, "build_program", lambda *args: pytest.fail("built again"))
    prompt = torch.randn(40, decoder.config.hidden_size)
    eager_logits, eager_layers = TorchPrefill(lambda: decoder).layers(prompt)
    logits, layers = TorchPrefill(lambda: decoder, compile=True, directory=directory).layers(prompt)
    np.testing.assert_allclose(logits, eager_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layers[-1][0], eager_layers[-1][0], rtol=1e-4, atol=1e-4)
    assert TorchPrefill(lambda: decoder).compiled is None


# ----------------------------------------------------------------- the encoder
@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory):
    """Where the tiny encoder's program is built once for the tests below."""
    return tmp_path_factory.mktemp("compiled-stack")


@needs_compiler
def test_a_compiled_gmsa_compresses_as_the_eager_one(make_gmsa, backbone_dir, stack_dir):
    """One stack program serves every batch size and window length; a batch of uneven texts gives the eager
    soft tokens, and a window shorter than two tokens stays eager."""
    eager, compiled = make_gmsa(backbone_dir), make_gmsa(backbone_dir).compile(stack_dir)
    texts = ["a short text", "a much longer text that fills more than one group " * 3, "x"]
    expected = eager.compress(texts, rate=4)
    for batch in (texts, texts[1:2]):
        for got, want in zip(compiled.compress(batch, rate=4).soft_tokens, eager.compress(batch, rate=4).soft_tokens):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert [len(t) for t in compiled.compress(texts, rate=4).soft_tokens] == [len(t) for t in expected.soft_tokens]
    assert len(list(stack_dir.glob("StackProgram-*.pt2"))) == 1


@needs_compiler
def test_the_stack_program_gives_the_eager_states_for_any_batch(make_gmsa, backbone_dir, stack_dir):
    stack = make_gmsa(backbone_dir).model.inference_encoder()
    compiled = CompiledStack(stack_dir)  # the program the test above built (built here if run alone)
    for batch, length in ((1, 30), (3, 17), (2, 64)):
        embeds = torch.randn(batch, length, stack.config.hidden_size)
        assert compiled.takes(stack, tuple(embeds.shape))
        torch.testing.assert_close(compiled(stack, embeds), causal_states(stack, embeds), rtol=1e-4, atol=1e-4)
    assert not compiled.takes(stack, (1, 1, stack.config.hidden_size))


def test_a_gmsa_in_training_or_not_compiled_runs_its_own_encoder(tiny_gmsa, tmp_path):
    assert tiny_gmsa.inference_encoder() is tiny_gmsa.model.inference_encoder()  # not compiled by default
    tiny_gmsa.compile(tmp_path)
    runner = tiny_gmsa.inference_encoder()
    assert isinstance(runner, aot.StackRunner) and tiny_gmsa.inference_encoder() is runner  # one, kept
    tiny_gmsa.model.train()
    assert tiny_gmsa.inference_encoder() is tiny_gmsa.model.encoder
