import json

import pytest
import torch

from gmsa import GMSA, BackboneNotFoundError, CheckpointError, Compressed, IncompatibleContextError
from gmsa.checkpoint import MANIFEST_NAME, WEIGHTS_NAME

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France and its largest city."]


def test_compress_shapes_and_metadata(tiny_gmsa):
    compressed = tiny_gmsa.compress(TEXTS, rate=4)
    assert len(compressed) == 2
    assert compressed.n_tokens == [10, 11]
    assert compressed.n_soft_tokens == [3, 3]  # ceil(10 / 4), ceil(11 / 4)
    assert compressed.soft_tokens[0].shape == (3, tiny_gmsa.model.hidden_size)
    assert compressed.rates == [4, 4]
    assert compressed.backbone_fingerprint == tiny_gmsa.config.backbone_fingerprint


def test_generate_and_reconstruct_return_text(tiny_gmsa):
    compressed = tiny_gmsa.compress(TEXTS, rate=2)
    answers = tiny_gmsa.generate(compressed, ["What is the capital?", "Who jumps?"], max_new_tokens=5)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert len(tiny_gmsa.reconstruct(compressed)) == 2


def test_batched_generation_equals_one_by_one(tiny_gmsa):
    """Batches of contexts of mixed lengths (a full and a part batch) answer as each context alone."""
    texts = [*TEXTS, f"{TEXTS[1]} {TEXTS[0]}", "Paris is the capital."]
    questions = ["What is the capital of France?", "Who jumps?", "Which city?", "What is Paris?"]
    compressed = tiny_gmsa.compress(texts, rate=2)
    batched = tiny_gmsa.generate(compressed, questions, max_new_tokens=6, batch_size=3)
    single = [tiny_gmsa.generate(compressed[i], questions[i], max_new_tokens=6)[0] for i in range(len(texts))]
    assert batched == single and len(set(single)) > 1
    restated = [tiny_gmsa.reconstruct(compressed[i], max_new_tokens=8)[0] for i in range(len(texts))]
    assert tiny_gmsa.reconstruct(compressed, batch_size=3, max_new_tokens=8) == restated


def test_batches_of_padded_windows_compress_as_each_text_alone(tiny_gmsa):
    """Mixed lengths padded into one batch (no token cap) give each text's soft tokens as read alone."""
    texts = [*TEXTS, f"{TEXTS[1]} {TEXTS[0]} {TEXTS[1]}", "Paris."]
    together = tiny_gmsa.compress(texts, rate=2, batch_size=8, max_batch_tokens=10**6)
    alone = tiny_gmsa.compress(texts, rate=2, batch_size=8, max_batch_tokens=1)  # every text its own batch
    for a, b in zip(together.soft_tokens, alone.soft_tokens):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_one_context_many_questions(tiny_gmsa):
    compressed = tiny_gmsa.compress(TEXTS[0], rate=4)
    assert len(tiny_gmsa.generate(compressed, ["Who jumps?", "Over what?", "Which fox?"], max_new_tokens=3)) == 3


def test_save_load_gives_identical_outputs(tiny_gmsa, tmp_path):
    with torch.no_grad():
        for param in tiny_gmsa.model.lsa.parameters():  # make the trained parts non-trivial
            param.add_(0.01 * torch.randn_like(param))
    tiny_gmsa.save_pretrained(tmp_path / "ckpt", dtype=None)
    loaded = GMSA.from_pretrained(tmp_path / "ckpt", dtype="float32")
    a = tiny_gmsa.compress(TEXTS, rate=4)
    b = loaded.compress(TEXTS, rate=4)
    for x, y in zip(a.soft_tokens, b.soft_tokens):
        assert torch.equal(x, y)
    assert tiny_gmsa.generate(a, ["Who?"] * 2, max_new_tokens=4) == loaded.generate(b, ["Who?"] * 2, max_new_tokens=4)


def test_save_pretrained_keeps_only_trained_parts(tiny_gmsa, tmp_path):
    tiny_gmsa.save_pretrained(tmp_path / "ckpt")
    from safetensors.torch import load_file

    names = load_file(tmp_path / "ckpt" / WEIGHTS_NAME).keys()
    assert names and all(n.startswith(("encoder.", "lsa.")) for n in names)
    assert all("lora_" in n for n in names if n.startswith("encoder."))


@pytest.mark.parametrize("rate", [0, -2])
def test_rate_below_one_is_an_error(tiny_gmsa, rate):
    with pytest.raises(ValueError, match="rate must be an integer >= 1"):
        tiny_gmsa.compress(TEXTS, rate=rate)


@pytest.mark.parametrize("rate", [2.5, "4", True])
def test_non_integer_rate_is_an_error(tiny_gmsa, rate):
    with pytest.raises(TypeError, match="rate must be an integer"):
        tiny_gmsa.compress(TEXTS, rate=rate)


@pytest.mark.parametrize(
    "texts,error", [("", ValueError), ("   \n", ValueError), ([], TypeError), (42, TypeError), ([1], TypeError)]
)
def test_bad_texts_are_errors(tiny_gmsa, texts, error):
    with pytest.raises(error):
        tiny_gmsa.compress(texts)


def test_question_count_must_match(tiny_gmsa):
    with pytest.raises(ValueError, match="3 questions for 2"):
        tiny_gmsa.generate(tiny_gmsa.compress(TEXTS), ["a?", "b?", "c?"])


def test_unknown_backbone_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneNotFoundError, match="unknown backbone"):
        GMSA.from_backbone(tmp_path / "nope")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no GMSA checkpoint"):
        GMSA.from_pretrained(tmp_path)


def test_corrupt_checkpoint_is_detected(tiny_gmsa, tmp_path):
    tiny_gmsa.save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        GMSA.from_pretrained(tmp_path / "ckpt")


def test_checkpoint_of_another_backbone_is_refused(tiny_gmsa, tmp_path, qwen_dir):
    tiny_gmsa.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="fingerprint"):
        GMSA.from_pretrained(tmp_path / "ckpt", backbone=qwen_dir)


def test_save_is_atomic_and_replaces(tiny_gmsa, tmp_path):
    target = tmp_path / "ckpt"
    tiny_gmsa.save_pretrained(target)
    tiny_gmsa.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert json.loads((target / MANIFEST_NAME).read_text())["sha256"][WEIGHTS_NAME]


def test_soft_tokens_of_another_checkpoint_are_refused(tiny_gmsa, tmp_path):
    compressed = tiny_gmsa.compress(TEXTS)
    compressed.save(tmp_path / "ctx.safetensors")
    tiny_gmsa.save_pretrained(tmp_path / "ckpt")
    other = GMSA.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(IncompatibleContextError, match="compress the text again"):
        other.generate(Compressed.load(tmp_path / "ctx.safetensors"), ["a?", "b?"])


def test_context_over_the_window_is_compressed_window_by_window(tiny_gmsa):
    compressed = tiny_gmsa.compress(" ".join(["fox"] * 100), rate=4)  # window: 64 tokens
    assert compressed.n_tokens == [100]
    assert compressed.n_soft_tokens == [16 + 9]


def test_context_over_the_hard_cap_names_the_limit(tiny_gmsa):
    tiny_gmsa.config.max_total_tokens = 80
    with pytest.raises(ValueError, match="80"):
        tiny_gmsa.compress(" ".join(["fox"] * 100))


def test_uncompressed_baseline_is_rate_one(tiny_gmsa):
    baseline = tiny_gmsa.uncompressed(TEXTS)
    assert baseline.n_soft_tokens == baseline.n_tokens == [10, 11]
    assert len(tiny_gmsa.generate(baseline, ["a?", "b?"], max_new_tokens=2)) == 2


def test_reconstruct_switches_a_keft_decoder_lora_off(make_gmsa, backbone_dir):
    from gmsa.model import enable_decoder_tuning

    gmsa = make_gmsa(backbone_dir)
    ctx = gmsa.compress(["The quick brown fox jumps over the lazy dog."], rate=2)
    before = gmsa.reconstruct(ctx)
    logits_before = gmsa.model.decoder(inputs_embeds=ctx.soft_tokens[0][None]).logits
    enable_decoder_tuning(gmsa.model, "lora")
    with torch.no_grad():
        for name, param in gmsa.model.decoder.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    assert not torch.allclose(gmsa.model.decoder(inputs_embeds=ctx.soft_tokens[0][None]).logits, logits_before)
    assert gmsa.reconstruct(ctx) == before
    after = gmsa.model.decoder(inputs_embeds=ctx.soft_tokens[0][None]).logits
    assert not torch.allclose(after, logits_before), "the LoRA must be back on after reconstruct"


def test_reconstruct_starts_stops_near_the_source_length_and_caps(tiny_gmsa, monkeypatch):
    import gmsa.api

    calls = []
    monkeypatch.setattr(gmsa.api, "greedy_texts", lambda *args, **kw: calls.append((args, kw)) or ["x"] * len(args[4]))
    compressed = tiny_gmsa.compress(TEXTS, rate=2)  # 10 and 11 tokens
    tiny_gmsa.reconstruct(compressed)
    tiny_gmsa.reconstruct(compressed, max_new_tokens=12, repeat_ngram=0)
    (args, kw), (capped_args, capped_kw) = calls
    assert args[4] == [int(10 * 1.25) + 8, int(11 * 1.25) + 8] and capped_args[4] == [12, 12]
    assert kw == {"min_new_tokens": 1, "repeat_ngram": 8} and capped_kw["repeat_ngram"] == 0


def test_a_streamer_gets_each_answer_in_turn(tiny_gmsa, stream_recorder):
    compressed = tiny_gmsa.compress(TEXTS, rate=2)
    questions = ["What is the capital?", "Who jumps?"]
    recorder = stream_recorder()
    streamed = tiny_gmsa.generate(compressed, questions, max_new_tokens=5, streamer=recorder)
    assert streamed == tiny_gmsa.generate(compressed, questions, max_new_tokens=5)
    assert recorder.ends == 2 and 2 <= len(recorder.tokens) <= 10
    recorder = stream_recorder()
    assert tiny_gmsa.reconstruct(compressed, streamer=recorder) == tiny_gmsa.reconstruct(compressed)
    assert recorder.ends == 2
