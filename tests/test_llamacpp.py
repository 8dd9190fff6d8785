"""The llama.cpp engine: its greedy rules, and (where llama-cpp-python is installed) its answers against gmsa's."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gmsa.cli import build_parser, main
from gmsa.engine_args import check_engine_args
from gmsa.engine_base import EngineUnavailableError
from gmsa.engines import HFEngine, engine_from_args
from gmsa.gguf_export import write_gguf
from gmsa.llamacpp import import_llama_cpp

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France and its largest city."]
QUESTIONS = ["What is the capital of France?", "Who jumps over the lazy dog?"]


def test_missing_llama_cpp_is_a_clear_error(monkeypatch, tiny_gmsa, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    with pytest.raises(EngineUnavailableError, match=r"pip install 'gmsa\[llamacpp\]'"):
        import_llama_cpp()
    tiny_gmsa.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ctx.txt").write_text(TEXTS[0])
    argv = ["answer", "--model", str(tmp_path / "ckpt"), str(tmp_path / "ctx.txt"), "-q", "Who?"]
    assert main(argv + ["--engine", "llamacpp"]) == 2
    assert "needs the `llama_cpp` package" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gguf-type", "f16"], "--gguf-type is for --engine llamacpp"),
        (["--engine-threads", "2"], "--engine-threads is for --engine llamacpp"),
        (["--engine-prefill", "torch"], "--engine-prefill is for --engine llamacpp"),
        (["--engine-no-repack"], "--engine-no-repack is for --engine llamacpp"),
        (["--engine", "hf", "--engine-compile"], "--engine-compile is for --engine llamacpp or --engine auto"),
        (["--engine", "llamacpp", "--engine-url", "http://h:1"], "--engine-url is for --engine vllm"),
        (["--engine", "llamacpp", "--engine-threads", "0"], "--engine-threads must be >= 1"),
    ],
)
def test_engine_options_that_do_not_fit_are_refused(argv, message):
    args = build_parser().parse_args(["answer", "-q", "?", *argv])
    with pytest.raises(ValueError, match=message):
        check_engine_args(args)


# ----------------------------------------------------------------- with llama.cpp
class StreamRecorder:
    """A streamer (``put`` ids, ``end`` after each text) that keeps each text's ids."""

    def __init__(self):
        self.texts, self.current = [], []

    def put(self, ids):
        self.current += ids.tolist()

    def end(self):
        self.texts.append(self.current)
        self.current = []


@pytest.fixture
def llama_cpp():
    return pytest.importorskip("llama_cpp")


@pytest.fixture
def f32_gguf(backbone_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(backbone_dir).eval()
    return model, write_gguf(model, tmp_path / "tiny.f32.gguf", AutoTokenizer.from_pretrained(backbone_dir), "f32")


def test_llama_cpp_reads_embeddings_and_ids_as_torch_does(llama_cpp, f32_gguf):
    from gmsa.llamacpp import LlamaCppDecoder

    model, path = f32_gguf
    decoder = LlamaCppDecoder(path, kv_type="f32")
    ids = torch.tensor([5, 9, 2, 14, 3, 7, 11])
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        expected = model(inputs_embeds=embeds[None]).logits[0]
        step = model(input_ids=torch.cat([ids, torch.tensor([4])])[None]).logits[0, -1]
    scale = expected.abs().max().item()  # llama.cpp rounds some intermediate products (e.g. attention) to f16
    assert np.abs(decoder.prefill(embeds) - expected[-1].numpy()).max() <= 1e-2 * scale
    assert np.abs(decoder.prefill(ids) - expected[-1].numpy()).max() <= 1e-2 * scale  # the cache was cleared between
    assert np.abs(decoder.step(4, len(ids)) - step.numpy()).max() <= 1e-2 * scale  # position n follows 0..n-1
    with pytest.raises(ValueError, match="embeddings or"):
        decoder.prefill(torch.zeros(3, 5))
    decoder.close()


def test_a_decoder_on_repacked_weights_takes_steps_but_no_multi_position_prompt(llama_cpp, f32_gguf):
    from gmsa.llamacpp import LlamaCppDecoder

    model, path = f32_gguf
    plain, repacked = LlamaCppDecoder(path, kv_type="f32"), LlamaCppDecoder(path, kv_type="f32", extra_buffers=True)
    with pytest.raises(ValueError, match=r"llama.cpp#20824.*prefill='torch'"):
        repacked.prefill(torch.tensor([5, 9, 2]))
    assert np.allclose(repacked.prefill(torch.tensor([5])), plain.prefill(torch.tensor([5])), atol=1e-4)
    assert np.allclose(repacked.step(9, 1), plain.step(9, 1), atol=1e-4)


def test_the_engine_answers_as_gmsa_decoding(llama_cpp, backbone_dir, make_gmsa, tmp_path, monkeypatch):
    from gmsa.llamacpp import llamacpp_engine

    monkeypatch.setenv("GMSA_CACHE", str(tmp_path))  # the exports go there
    gmsa = make_gmsa(backbone_dir, decoder_tuning="lora")
    torch.manual_seed(1)
    with torch.no_grad():  # a KEFT LoRA that changes the answers (restating switches it off)
        for name, param in gmsa.model.decoder.named_parameters():
            if "lora_B" in name:
                param.add_(0.05 * torch.randn_like(param))
    compressed = gmsa.compress(TEXTS, rate=2)
    rows = gmsa.prompt_embeds(compressed, QUESTIONS)
    hf = HFEngine(gmsa.model.decoder, gmsa.tokenizer, batch_size=1)
    engine = llamacpp_engine(gmsa, "f32", kv_type="f32")  # the prompt read by gmsa's decoder, its cache handed over
    own_prefill = llamacpp_engine(gmsa, "f32", kv_type="f32", prefill="llamacpp")
    assert engine.extra_buffers and not own_prefill.extra_buffers  # repacked weights only where llama.cpp only steps
    for penalty, limit, least in ((1.0, 8, 0), (1.3, 6, 3)):
        expected = hf.generate(rows, limit, penalty, least)
        assert engine.generate(rows, limit, penalty, least) == expected
        assert own_prefill.generate(rows, limit, penalty, least) == expected
    with pytest.raises(ValueError, match="prefill must be one of"):
        llamacpp_engine(gmsa, "f32", prefill="vllm")
    with pytest.raises(ValueError, match="needs prefill='torch'"):
        llamacpp_engine(gmsa, "f32", prefill="llamacpp", compile_prefill=True)
    settings = (([], True, True), (["--engine-no-repack", "--engine-compile", "off"], False, False))
    for flags, repacked, compiled in settings:
        args = build_parser().parse_args(["answer", "-q", "?", "--engine", "llamacpp", *flags])
        made = engine_from_args(args, gmsa)
        assert made.extra_buffers is repacked and (made.prefill.compiled is not None) is compiled
    expected = gmsa.generate(compressed, QUESTIONS, max_new_tokens=6), gmsa.reconstruct(compressed, max_new_tokens=9)
    streamed = StreamRecorder()
    gmsa.engine = engine
    assert gmsa.generate(compressed, QUESTIONS, max_new_tokens=6, streamer=streamed) == expected[0]
    assert [gmsa.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in streamed.texts] == expected[0]
    assert (
        gmsa.generate(compressed, QUESTIONS, max_new_tokens=6),
        gmsa.reconstruct(compressed, max_new_tokens=9),
    ) == expected
    assert len(engine.decoders) == 2  # one export with the KEFT LoRA merged, one without
