"""Greedy decoding with a reserved KV cache gives exactly what ``transformers.generate`` gives."""

from __future__ import annotations

import pytest
import torch

from gmsa.decoding import greedy_generate, kv_cache_bytes, penalise_repeats

QUESTIONS = ["What is the capital of France?", "Who jumps?"]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France and its largest city."]


def left_padded_prompt(gmsa):
    """Decoder inputs ``[soft tokens; question]`` for two contexts of different lengths."""
    compressed = gmsa.compress([TEXTS[0], TEXTS[1] + " " + TEXTS[0]], rate=2)
    return gmsa.decoder_prompt(compressed, QUESTIONS)


def hf_generate(gmsa, packed, max_new_tokens, penalty, eos):
    return gmsa.model.decoder.generate(
        inputs_embeds=packed.inputs_embeds,
        attention_mask=packed.attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        repetition_penalty=penalty,
        eos_token_id=eos,
        pad_token_id=gmsa.tokenizer.pad_token_id,
    )


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_matches_transformers_generate_on_one_prompt(backbone_dir, qwen_dir, make_gmsa, family, penalty):
    gmsa = make_gmsa(backbone_dir if family == "llama" else qwen_dir)
    packed = gmsa.decoder_prompt(gmsa.compress(TEXTS[1], rate=2), QUESTIONS[:1])
    ours, _ = greedy_generate(gmsa.model.decoder, packed.inputs_embeds, packed.attention_mask, 12, penalty)
    assert ours.shape == (1, 12)
    assert torch.equal(ours, hf_generate(gmsa, packed, 12, penalty, None))


def test_left_padded_batch_equals_one_prompt_at_a_time(tiny_gmsa):
    # (transformers 5.23's generate does not give this for left-padded inputs_embeds on SmolLM2)
    compressed = tiny_gmsa.compress([TEXTS[0], TEXTS[1] + " " + TEXTS[0]], rate=2)
    packed = tiny_gmsa.decoder_prompt(compressed, QUESTIONS)
    assert packed.attention_mask[:, 0].tolist() == [0, 1]  # the first sample is left-padded
    decoder = tiny_gmsa.model.decoder
    batched, _ = greedy_generate(decoder, packed.inputs_embeds, packed.attention_mask, 10, 1.3)
    for i in range(2):
        alone = tiny_gmsa.decoder_prompt(compressed[i], QUESTIONS[i : i + 1])
        single, _ = greedy_generate(decoder, alone.inputs_embeds, alone.attention_mask, 10, 1.3)
        assert torch.equal(batched[i : i + 1], single)


def test_stops_at_eos_and_pads_finished_samples(tiny_gmsa):
    packed = left_padded_prompt(tiny_gmsa)
    decoder = tiny_gmsa.model.decoder
    free, _ = greedy_generate(decoder, packed.inputs_embeds, packed.attention_mask, 8)
    eos = int(free[0, 2])  # pretend the first sample's third token ends it
    ours, _ = greedy_generate(decoder, packed.inputs_embeds, packed.attention_mask, 8, eos_token_id=eos, pad_token_id=1)
    stops = [row.index(eos) if eos in row else len(row) - 1 for row in free.tolist()]
    for row, stop, expected in zip(ours.tolist(), stops, free.tolist()):
        assert row[: stop + 1] == expected[: stop + 1]
        assert all(token == 1 for token in row[stop + 1 :])
    assert ours.shape[1] == max(stops) + 1  # stops as soon as every sample has ended


def test_cache_holds_prompt_and_generated_tokens(tiny_gmsa):
    packed = left_padded_prompt(tiny_gmsa)
    config = tiny_gmsa.model.decoder.config
    _, cache = greedy_generate(tiny_gmsa.model.decoder, packed.inputs_embeds, packed.attention_mask, 5)
    positions = packed.inputs_embeds.shape[1] + 4  # the last token is sampled, never fed back
    head_dim = config.hidden_size // config.num_attention_heads
    expected = 2 * config.num_hidden_layers * 2 * config.num_key_value_heads * positions * head_dim * 4
    assert cache.get_seq_length() == positions
    assert kv_cache_bytes(cache) == expected


def test_repetition_penalty_lowers_seen_tokens_only():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    penalised = penalise_repeats(logits, torch.tensor([[0, 1]]), 2.0)
    assert penalised.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    assert penalise_repeats(logits, torch.tensor([[0]]), 1.0) is logits


def test_zero_new_tokens_is_an_error(tiny_gmsa):
    packed = left_padded_prompt(tiny_gmsa)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        greedy_generate(tiny_gmsa.model.decoder, packed.inputs_embeds, packed.attention_mask, 0)


def first_repeat(row: list[int], n: int) -> int:
    """Length of ``row`` up to and including the first ``n``-gram seen before (``len(row)`` if none)."""
    seen = set()
    for end in range(n, len(row) + 1):
        gram = tuple(row[end - n : end])
        if gram in seen:
            return end
        seen.add(gram)
    return len(row)


def test_min_new_tokens_keeps_eos_from_ending_before_the_start(tiny_gmsa):
    packed = left_padded_prompt(tiny_gmsa)
    decoder = tiny_gmsa.model.decoder
    free, _ = greedy_generate(decoder, packed.inputs_embeds, packed.attention_mask, 6)
    eos = int(free[0, 0])  # pretend the first sample's first token ends it
    args = (decoder, packed.inputs_embeds, packed.attention_mask, 6)
    ended, _ = greedy_generate(*args, eos_token_id=eos, pad_token_id=1)
    assert ended[0, 0] == eos
    kept, _ = greedy_generate(*args, eos_token_id=eos, pad_token_id=1, min_new_tokens=3)
    assert eos not in kept[0, :3].tolist() and eos not in kept[1, :3].tolist()


@pytest.mark.parametrize("n", [1, 2])
def test_repeat_ngram_stops_a_sample_at_its_first_loop(tiny_gmsa, n):
    packed = left_padded_prompt(tiny_gmsa)
    decoder = tiny_gmsa.model.decoder
    free, _ = greedy_generate(decoder, packed.inputs_embeds, packed.attention_mask, 60)
    stops = [first_repeat(row, n) for row in free.tolist()]
    assert min(stops) < 60  # the tiny random decoder loops
    ours, _ = greedy_generate(decoder, packed.inputs_embeds, packed.attention_mask, 60, pad_token_id=1, repeat_ngram=n)
    assert ours.shape[1] == max(stops)
    for row, stop, expected in zip(ours.tolist(), stops, free.tolist()):
        assert row[:stop] == expected[:stop] and all(token == 1 for token in row[stop:])


def test_a_streamer_gets_every_token_then_the_end(tiny_gmsa, stream_recorder):
    compressed = tiny_gmsa.compress(TEXTS[1], rate=2)
    packed = tiny_gmsa.decoder_prompt(compressed, QUESTIONS[:1])
    recorder = stream_recorder()
    ids, _ = greedy_generate(tiny_gmsa.model.decoder, packed.inputs_embeds, packed.attention_mask, 7, streamer=recorder)
    assert recorder.tokens == ids[0].tolist() and recorder.ends == 1
    both = left_padded_prompt(tiny_gmsa)
    with pytest.raises(ValueError, match="one prompt at a time"):
        greedy_generate(tiny_gmsa.model.decoder, both.inputs_embeds, both.attention_mask, 7, streamer=recorder)


def test_a_repeat_is_found_once_it_recurs():
    from gmsa.decoding import RepeatDetector

    detector, running = RepeatDetector(1, 2), torch.zeros(1, dtype=torch.bool)
    ids = [1, 2, 1, 2, 1]
    flags = [bool(detector.update(torch.tensor([ids[: i + 1]]), running)[0]) for i in range(5)]
    assert flags == [False, False, False, True, True]
