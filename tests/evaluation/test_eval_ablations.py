"""The memory-token ablation (``merge="memory"``) and the other ablation switches."""

from __future__ import annotations

import math

import pytest
import torch

from gmsa import GMSA, GMSAConfig
from gmsa.merge import MeanPooling
from gmsa.model import pad, set_stage, trained_state_dict
from gmsa.training.config import TrainConfig

TEXTS = ["Paris is the capital of France and its largest city.", "The quick brown fox jumps over the lazy dog."]


@pytest.fixture
def memory_gmsa(backbone_dir, make_gmsa) -> GMSA:
    return make_gmsa(backbone_dir, merge="memory")


def _batch(gmsa: GMSA, texts: list[str]):
    ids = gmsa.tokenizer(texts, add_special_tokens=False)["input_ids"]
    return ids, *pad(ids, gmsa.tokenizer.pad_token_id)


def test_config_validates_merge():
    assert GMSAConfig().merge == "mean"
    with pytest.raises(ValueError, match="merge must be mean or memory"):
        GMSAConfig(merge="max")
    assert TrainConfig.from_dict({"merge": "memory"}).model_config().merge == "memory"


@pytest.mark.parametrize("rate", [1, 2, 3, 4])
def test_memory_gives_ceil_l_over_rate_soft_tokens(memory_gmsa, rate):
    compressed = memory_gmsa.compress(TEXTS, rate=rate)
    lengths = [len(ids) for ids in memory_gmsa.tokenize_contexts(TEXTS)]
    assert compressed.n_soft_tokens == [math.ceil(n / rate) for n in lengths]


def test_memory_batch_equals_one_by_one(memory_gmsa):
    """Padding of a shorter sample must not change its memory states (mask-correctness)."""
    ids, context_ids, context_mask = _batch(memory_gmsa, TEXTS)
    assert len(set(map(len, ids))) == 2  # really different lengths
    with torch.no_grad():
        rates = torch.tensor([2, 3])
        soft, mask = memory_gmsa.model.compress(context_ids, context_mask, rates)
        for i in range(2):
            n = len(ids[i])
            alone, _ = memory_gmsa.model.compress(
                context_ids[i : i + 1, :n], context_mask[i : i + 1, :n], rates[i : i + 1]
            )
            assert int(mask[i].sum()) == alone.shape[1]
            torch.testing.assert_close(soft[i, : alone.shape[1]], alone[0], atol=1e-5, rtol=1e-4)


def test_memory_states_read_the_context_and_the_table(memory_gmsa):
    first = memory_gmsa.compress([TEXTS[0]], rate=4).soft_tokens[0]
    other_text = memory_gmsa.compress(["Paris is the capital of Spain and its largest city."], rate=4).soft_tokens[0]
    assert first.shape == other_text.shape and not torch.allclose(first, other_text)
    with torch.no_grad():
        memory_gmsa.model.merger.embeddings.add_(1.0)
    assert not torch.allclose(first, memory_gmsa.compress([TEXTS[0]], rate=4).soft_tokens[0])


def test_memory_is_trained_in_the_ae_stage_and_saved(memory_gmsa, tmp_path):
    model = memory_gmsa.model
    trainable = set_stage(model, "ae")
    assert "merger.embeddings" in trainable
    assert not any(name.startswith("decoder.") for name in trainable)
    ids, context_ids, context_mask = _batch(memory_gmsa, TEXTS)
    prompt_ids, prompt_mask = pad([ids[0][:3]] * 2, memory_gmsa.tokenizer.pad_token_id)
    loss = model(
        context_ids=context_ids,
        context_mask=context_mask,
        rates=2,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        target_ids=context_ids,
        target_mask=context_mask,
    )
    loss.backward()
    assert model.merger.embeddings.grad is not None and model.merger.embeddings.grad.abs().sum() > 0
    assert "memory.embeddings" in trained_state_dict(model)

    memory_gmsa.model.eval()
    before = memory_gmsa.compress(TEXTS, rate=2).soft_tokens
    memory_gmsa.save_pretrained(tmp_path / "memory", dtype=None)
    loaded = GMSA.from_pretrained(tmp_path / "memory", dtype="float32")
    assert loaded.config.merge == "memory"
    for a, b in zip(before, loaded.compress(TEXTS, rate=2).soft_tokens):
        torch.testing.assert_close(a, b)


def test_mean_models_have_no_memory_table(tiny_gmsa):
    assert isinstance(tiny_gmsa.model.merger, MeanPooling) and not list(tiny_gmsa.model.merger.parameters())
    assert not any(key.startswith("memory.") for key in trained_state_dict(tiny_gmsa.model))


@pytest.mark.parametrize("lsa_init", ["random", "linear"])
def test_lsa_ablations_still_compress(backbone_dir, make_gmsa, lsa_init):
    gmsa = make_gmsa(backbone_dir, lsa_init=lsa_init)
    assert gmsa.compress(TEXTS, rate=4).n_soft_tokens == [
        math.ceil(len(ids) / 4) for ids in gmsa.tokenize_contexts(TEXTS)
    ]
