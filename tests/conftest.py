"""Shared fixtures: tiny random-weight backbones saved as local HF model directories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from gmsa import GMSA, GMSAConfig

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France and its largest city.",
    "Group merging averages the hidden states of consecutive tokens.",
    "A compressed context can answer many questions without being read again.",
    "Restate the aforementioned Text.",
] * 4

FAMILIES = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on a few sentences (fast, no download)."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def tiny_backbone_dir(root: Path, family: str = "llama", layers: int = 4, seed: int = 0) -> Path:
    """Save a 4-layer, hidden-64 random causal LM + tokenizer as a local model directory."""
    tokenizer = tiny_tokenizer()
    config = FAMILIES[family](
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        # the default 0.02 makes a frozen random decoder nearly constant (uniform logits
        # whatever the soft tokens say); 0.2 leaves it something to learn to steer
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    path = root / f"{family}-{layers}l-s{seed}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def no_corpus_downloads():
    """Tests never download corpus packages (~400 MB): they pass fixture archives (``paths=``) to ``prepare``."""

    def refuse(keys, root=None):
        raise AssertionError(f"a test asked to download corpus packages {list(keys)}; pass paths= (fixture archives)")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("gmsa.data.prepare.fetch_all", refuse)
        yield


@pytest.fixture(scope="session")
def backbone_dir(tmp_path_factory) -> Path:
    return tiny_backbone_dir(tmp_path_factory.mktemp("backbones"))


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory) -> Path:
    return tiny_backbone_dir(tmp_path_factory.mktemp("backbones"), family="qwen2")


# A tiny compressor with the paper's frozen decoder (no AE decoder LoRA) and soft tokens scaled like embeddings
TINY = {"k_enc": 2, "k_lsa": 1, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "max_context_tokens": 64}
TINY |= {"ae_decoder_lora_r": 0, "decoder_lora_r": 16, "lsa_match_embedding_scale": True}


def make_gmsa(path: Path, **overrides) -> GMSA:
    torch.manual_seed(0)
    # fp32 whatever this machine's fastest dtype: unit tests must not depend on the CPU they run on
    return GMSA.from_backbone(path, GMSAConfig(**(TINY | overrides)), dtype="float32")


class StreamRecorder:
    """A ``transformers`` streamer that keeps every token it is given and counts the ends."""

    def __init__(self):
        self.tokens, self.ends = [], 0

    def put(self, value):
        self.tokens += value.tolist()

    def end(self):
        self.ends += 1


@pytest.fixture(name="stream_recorder")
def stream_recorder_fixture() -> type[StreamRecorder]:
    return StreamRecorder


@pytest.fixture
def tiny_gmsa(backbone_dir) -> GMSA:
    return make_gmsa(backbone_dir)


@pytest.fixture(name="make_gmsa")
def make_gmsa_fixture():
    """The ``make_gmsa(path, **config_overrides)`` factory."""
    return make_gmsa
