"""Splitting long contexts into windows: the pure planning functions, then GMSA.compress on them."""

from __future__ import annotations

import math

import pytest
import torch

from gmsa import GMSAConfig
from gmsa.chunking import (
    Window,
    length_sorted_batches,
    plan_windows,
    soft_tokens_to_drop,
    split_ids,
    window_spans,
)

WORDS = "The quick brown fox jumps over the lazy dog . Paris is the capital of France and its largest city".split()


def words(n: int, offset: int = 0) -> str:
    """A text of exactly ``n`` tokens for the tiny word-level tokenizer."""
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n))


# ----------------------------------------------------------------- pure planning
def test_a_text_that_fits_is_one_window():
    assert window_spans(10, window=16) == [(0, 10, 0)]
    assert window_spans(16, window=16) == [(0, 16, 0)]


def test_an_empty_text_is_one_empty_window():
    assert window_spans(0, window=16) == [(0, 0, 0)]


def test_windows_without_overlap_tile_the_text():
    assert window_spans(40, window=16) == [(0, 16, 0), (16, 32, 16), (32, 40, 32)]


def test_windows_with_overlap_reread_the_previous_tokens():
    assert window_spans(40, window=16, overlap=4) == [(0, 16, 0), (12, 28, 16), (24, 40, 28)]


@pytest.mark.parametrize("n_tokens", [1, 15, 16, 17, 63, 64, 65, 1000])
@pytest.mark.parametrize("window,overlap", [(16, 0), (16, 4), (16, 15), (7, 3), (1, 0)])
def test_every_token_is_new_in_exactly_one_window(n_tokens, window, overlap):
    ids = list(range(100, 100 + n_tokens))
    spans = window_spans(n_tokens, window, overlap)
    assert all(0 < stop - start <= window for start, stop, _ in spans)
    assert all(first_new - start in (0, overlap) for start, _, first_new in spans)
    assert [t for start, stop, first_new in spans for t in ids[first_new:stop]] == ids
    assert split_ids(ids, window, overlap) == [ids[start:stop] for start, stop, _ in spans]


@pytest.mark.parametrize(
    "window,overlap,message",
    [(0, 0, "window must be >= 1"), (8, 8, "overlap must be >= 0 and smaller"), (8, -1, "overlap must be")],
)
def test_bad_window_settings_are_errors(window, overlap, message):
    with pytest.raises(ValueError, match=message):
        window_spans(10, window, overlap)


def test_non_integer_window_is_a_type_error():
    with pytest.raises(TypeError, match="window must be an integer"):
        window_spans(10, 8.0)


def test_plan_keeps_texts_and_order():
    plan = plan_windows([5, 20, 0], window=8)
    assert [(w.text, w.start, w.stop) for w in plan] == [(0, 0, 5), (1, 0, 8), (1, 8, 16), (1, 16, 20), (2, 0, 0)]


def test_batches_hold_every_index_once_sorted_by_length():
    lengths = [3, 50, 7, 50, 1, 20, 9]
    batches = length_sorted_batches(lengths, batch_size=3)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert [len(b) for b in batches] == [3, 3, 1]
    flat = [lengths[i] for batch in batches for i in batch]
    assert flat == sorted(lengths, reverse=True)


def test_a_token_cap_splits_long_rows_and_keeps_short_ones_together():
    lengths = [2048, 300, 2048, 100, 2047, 120, 2048]
    batches = length_sorted_batches(lengths, batch_size=8, max_tokens=4096)
    assert [[lengths[i] for i in batch] for batch in batches] == [[2048, 2048], [2048, 2047], [300, 120, 100]]
    assert length_sorted_batches([5000, 10], batch_size=8, max_tokens=4096) == [[0], [1]]  # too long: alone
    assert length_sorted_batches(lengths, batch_size=8, max_tokens=None) == [[0, 2, 6, 4, 1, 5, 3]]


@pytest.mark.parametrize("max_tokens", [0, 2.5, True])
def test_bad_token_cap_is_an_error(max_tokens):
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1 or None"):
        length_sorted_batches([1, 2], 2, max_tokens)


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True])
def test_bad_batch_size_is_an_error(batch_size):
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        length_sorted_batches([1, 2], batch_size)


def test_dropped_soft_tokens_cover_the_overlap():
    assert soft_tokens_to_drop(Window(0, 12, 28, 16), rate=4) == 1
    assert soft_tokens_to_drop(Window(0, 0, 16, 0), rate=4) == 0
    with pytest.raises(ValueError, match="multiple of the compression rate"):
        soft_tokens_to_drop(Window(0, 12, 28, 16), rate=8)


# ----------------------------------------------------------------- config
@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"window_tokens": 0}, "window_tokens must be between 1 and max_context_tokens"),
        ({"window_tokens": 4096}, "window_tokens must be between 1 and max_context_tokens"),
        ({"window_overlap": 2048}, "window_overlap must be >= 0 and smaller than the window"),
        ({"window_tokens": 64, "window_overlap": 64}, "smaller than the window \\(64\\)"),
        ({"max_total_tokens": 0}, "max_total_tokens must be >= 1"),
    ],
)
def test_bad_window_config_is_an_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        GMSAConfig(**overrides)


def test_config_window_defaults_to_the_encoder_window():
    assert GMSAConfig(max_context_tokens=512).window == 512
    assert GMSAConfig(max_context_tokens=512, window_tokens=128).window == 128


# ----------------------------------------------------------------- GMSA.compress on windows
@pytest.fixture
def windowed(backbone_dir, make_gmsa):
    """A tiny GMSA whose encoder reads at most 16 tokens at a time."""
    return make_gmsa(backbone_dir, max_context_tokens=16, max_total_tokens=200)


def test_long_text_gives_one_soft_token_per_rate_tokens(windowed):
    compressed = windowed.compress(words(70), rate=4)
    assert compressed.n_tokens == [70]
    assert compressed.n_soft_tokens == [math.ceil(70 / 4)]
    assert compressed.extra["window"] == 16 and compressed.extra["overlap"] == 0


def test_windows_are_compressed_independently_and_concatenated_in_order(windowed):
    text = words(40, offset=3)
    pieces = [windowed.compress(words(n, offset=3 + start), rate=4) for start, n in ((0, 16), (16, 16), (32, 8))]
    whole = windowed.compress(text, rate=4)
    expected = torch.cat([p.soft_tokens[0] for p in pieces])
    torch.testing.assert_close(whole.soft_tokens[0], expected, atol=1e-5, rtol=1e-5)


def test_overlap_keeps_one_soft_token_per_rate_new_tokens(windowed):
    text = words(70)
    plain = windowed.compress(text, rate=4)
    overlapped = windowed.compress(text, rate=4, overlap=8)
    assert overlapped.n_soft_tokens == plain.n_soft_tokens == [18]
    assert overlapped.extra["overlap"] == 8
    # the first window is the same either way; later windows see other left context
    torch.testing.assert_close(overlapped.soft_tokens[0][:4], plain.soft_tokens[0][:4], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(overlapped.soft_tokens[0][4:8], plain.soft_tokens[0][4:8])


def test_overlapping_window_drops_exactly_the_reread_soft_tokens(windowed):
    text = words(28)  # windows (0, 16), (8, 24), (16, 28); the second keeps its soft tokens 2 and 3
    second_window = windowed.compress(words(16, offset=8), rate=4).soft_tokens[0]
    overlapped = windowed.compress(text, rate=4, overlap=8).soft_tokens[0]
    torch.testing.assert_close(overlapped[4:6], second_window[2:4], atol=1e-5, rtol=1e-5)


def test_overlap_not_a_multiple_of_the_rate_is_an_error(windowed):
    with pytest.raises(ValueError, match="multiple of the compression rate"):
        windowed.compress(words(40), rate=8, overlap=4)


def test_window_larger_than_the_encoder_is_an_error(windowed):
    with pytest.raises(ValueError, match="window must be between 1 and max_context_tokens \\(16\\), got 32"):
        windowed.compress(words(40), rate=4, window=32)


def test_text_over_the_hard_cap_is_a_clear_error(windowed):
    with pytest.raises(ValueError, match="text 1 has 201 tokens, more than max_total_tokens=200"):
        windowed.compress([words(10), words(201)], rate=4)


@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_batching_windows_of_many_texts_changes_nothing(windowed, batch_size):
    texts = [words(5), words(70, offset=1), words(16, offset=2), words(33, offset=4)]
    alone = [windowed.compress(t, rate=2).soft_tokens[0] for t in texts]
    together = windowed.compress(texts, rate=2, batch_size=batch_size)
    assert together.n_soft_tokens == [math.ceil(n / 2) for n in (5, 70, 16, 33)]
    for got, expected in zip(together.soft_tokens, alone):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_windowed_context_answers_questions(windowed):
    compressed = windowed.compress(words(90), rate=4)
    answers = windowed.generate(compressed, ["Who jumps?", "What is the capital?"], max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


# ----------------------------------------------------------------- the LoRA-merged inference encoder
@pytest.fixture
def lora_gmsa(backbone_dir, make_gmsa):
    """A tiny GMSA whose encoder LoRA is not zero (as after training)."""
    gmsa = make_gmsa(backbone_dir, max_context_tokens=16)
    with torch.no_grad():
        for name, param in gmsa.model.encoder.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return gmsa


def reference_soft_tokens(gmsa, text: str, rate: int) -> torch.Tensor:
    """What ``GMSAModel.compress`` (LoRA kept apart) gives for a text that fits one window."""
    ids = torch.tensor([gmsa.tokenize_contexts([text])[0]])
    with torch.no_grad():
        soft, _ = gmsa.model.compress(ids, torch.ones_like(ids), rate)
    return soft[0]


def test_merged_encoder_gives_the_same_soft_tokens(lora_gmsa, backbone_dir, make_gmsa):
    text = words(14)
    expected = reference_soft_tokens(lora_gmsa, text, 2)
    without_lora = make_gmsa(backbone_dir, max_context_tokens=16).compress(text, rate=2).soft_tokens[0]
    assert not torch.allclose(expected, without_lora, atol=1e-3)  # the LoRA matters
    torch.testing.assert_close(lora_gmsa.compress(text, rate=2).soft_tokens[0], expected, atol=1e-5, rtol=1e-5)
    merged = lora_gmsa.inference_encoder()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    assert not any(p.requires_grad for p in merged.parameters())


def test_merged_encoder_follows_changes_of_the_lora(lora_gmsa):
    text = words(14)
    before = lora_gmsa.compress(text, rate=2).soft_tokens[0]
    first = lora_gmsa.inference_encoder()
    with torch.no_grad():
        for name, param in lora_gmsa.model.encoder.named_parameters():
            if "lora_A" in name:
                param.mul_(2.0)  # an optimizer step changes the LoRA in place
    after = lora_gmsa.compress(text, rate=2).soft_tokens[0]
    assert lora_gmsa.inference_encoder() is not first
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, reference_soft_tokens(lora_gmsa, text, 2), atol=1e-5, rtol=1e-5)


def test_training_mode_uses_the_lora_encoder_itself(lora_gmsa):
    lora_gmsa.model.encoder.train()
    calls = []
    handle = lora_gmsa.model.encoder.register_forward_hook(lambda *args: calls.append(1))
    lora_gmsa.compress(words(10), rate=2)
    handle.remove()
    assert calls == [1]


def test_hooks_on_the_encoder_are_not_copied(lora_gmsa):
    calls = []
    handle = lora_gmsa.model.encoder.register_forward_hook(lambda *args: calls.append(1))
    lora_gmsa.compress(words(10), rate=2)  # builds the merged copy while the hook is registered
    handle.remove()
    lora_gmsa.compress(words(10), rate=2)
    assert calls == []
