"""Stored soft tokens: safetensors round trip, corruption, mismatched backbone/checkpoint/version, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from gmsa import Compressed, IncompatibleContextError, __version__
from gmsa.cli import main

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France and its largest city."]


@pytest.fixture
def stored(tiny_gmsa, tmp_path):
    """Two compressed texts written to disk: (in-memory object, path)."""
    compressed = tiny_gmsa.compress(TEXTS, rate=4)
    path = tmp_path / "ctx.safetensors"
    compressed.save(path)
    return compressed, path


def test_round_trip_keeps_tensors_and_metadata(stored):
    compressed, path = stored
    loaded = Compressed.load(path)
    assert len(loaded) == 2
    for a, b in zip(compressed.soft_tokens, loaded.soft_tokens):
        assert torch.equal(a, b)
    assert (loaded.rates, loaded.n_tokens) == ([4, 4], [10, 11])
    assert loaded.backbone_fingerprint == compressed.backbone_fingerprint != ""
    assert loaded.checkpoint_id == compressed.checkpoint_id
    assert loaded.gmsa_version == __version__
    assert loaded.extra == compressed.extra
    assert set(loaded.extra) == {"backbone", "window", "overlap"}


def test_round_trip_keeps_the_dtype(tmp_path):
    compressed = Compressed([torch.randn(3, 8).to(torch.bfloat16)], [4], [12], "fp", "ckpt")
    compressed.save(tmp_path / "bf16.safetensors")
    loaded = Compressed.load(tmp_path / "bf16.safetensors")
    assert loaded.soft_tokens[0].dtype == torch.bfloat16
    assert torch.equal(loaded.soft_tokens[0], compressed.soft_tokens[0])


def test_stored_context_answers_like_the_fresh_one(tiny_gmsa, stored):
    compressed, path = stored
    questions = ["Who jumps?", "What is the capital?"]
    assert tiny_gmsa.generate(Compressed.load(path), questions, max_new_tokens=5) == tiny_gmsa.generate(
        compressed, questions, max_new_tokens=5
    )


def test_flipped_byte_in_the_soft_tokens_is_detected(stored):
    _, path = stored
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # the last bytes are tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(IncompatibleContextError, match="is corrupt: its soft tokens do not match the checksum"):
        Compressed.load(path)


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # truncated
        lambda data: b"not a safetensors file at all",
        lambda data: b"",
        lambda data: data[:8] + b"x" + data[9:],  # broken header
    ],
)
def test_damaged_file_is_a_clear_error(stored, damage):
    _, path = stored
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(IncompatibleContextError, match="not a gmsa compressed-context file"):
        Compressed.load(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(IncompatibleContextError, match="not a gmsa compressed-context file"):
        Compressed.load(tmp_path / "nope.safetensors")


def test_foreign_safetensors_file_is_refused(tmp_path):
    save_file({"weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(IncompatibleContextError, match="not a gmsa compressed-context file"):
        Compressed.load(tmp_path / "model.safetensors")


def test_file_without_checksum_is_refused(tmp_path):
    meta = {"rates": [4], "n_tokens": [8], "backbone_fingerprint": "x", "checkpoint_id": "y"}
    save_file({"soft.0": torch.zeros(2, 4)}, tmp_path / "old.safetensors", metadata={"gmsa": json.dumps(meta)})
    with pytest.raises(IncompatibleContextError, match="soft_tokens_sha256"):
        Compressed.load(tmp_path / "old.safetensors")


def test_inconsistent_metadata_is_refused(tmp_path):
    broken = Compressed([torch.zeros(2, 4)], [4, 4], [8], "x", "y")
    with pytest.raises(IncompatibleContextError, match="1 soft-token tensors, 2 rates and 1 token counts"):
        broken.check_structure()


def test_context_of_another_backbone_is_refused(stored, qwen_dir, make_gmsa):
    _, path = stored
    other = make_gmsa(qwen_dir)
    with pytest.raises(IncompatibleContextError, match="soft tokens were made for backbone"):
        other.generate(Compressed.load(path), ["Who?", "Where?"])


def test_context_of_another_checkpoint_is_refused(tiny_gmsa, stored):
    compressed, _ = stored
    compressed.checkpoint_id = "0123456789abcdef"
    with pytest.raises(IncompatibleContextError, match="checkpoint 0123456789abcdef .*compress the text again"):
        tiny_gmsa.generate(compressed, ["Who?", "Where?"])


def test_context_of_another_gmsa_version_is_refused(tiny_gmsa, stored, tmp_path):
    compressed, _ = stored
    compressed.gmsa_version = "0.0.1"
    compressed.save(tmp_path / "old.safetensors")
    with pytest.raises(IncompatibleContextError, match="written by gmsa 0.0.1, this is gmsa"):
        tiny_gmsa.generate(Compressed.load(tmp_path / "old.safetensors"), ["Who?", "Where?"])


# ----------------------------------------------------------------- constructors
def made(n_texts: int, checkpoint: str = "ck", **extra) -> Compressed:
    tensors = [torch.full((i + 1, 4), float(i)) for i in range(n_texts)]
    return Compressed.from_embeddings(tensors, 2, [2 * (i + 1) for i in range(n_texts)], "fp", checkpoint, extra)


def test_from_embeddings_gives_every_text_the_rate():
    extra = {"window": 64}
    compressed = Compressed.from_embeddings([torch.zeros(3, 4), torch.zeros(1, 4)], 4, [12, 3], "fp", "ck", extra)
    assert (compressed.rates, compressed.n_tokens, compressed.n_soft_tokens) == ([4, 4], [12, 3], [3, 1])
    assert compressed.made_by == ("fp", "ck", __version__)
    extra["window"] = 0
    assert compressed.extra == {"window": 64}  # a copy, not the caller's dict
    compressed.check_structure()


def test_concat_keeps_order_and_extra():
    first, second = made(2, window=8), made(1)
    joined = Compressed.concat([first, second])
    assert joined.n_soft_tokens == [1, 2, 1] and joined.n_tokens == [2, 4, 2]
    assert all(torch.equal(a, b) for a, b in zip(joined.soft_tokens, first.soft_tokens + second.soft_tokens))
    assert joined.extra == {"window": 8} and joined.extra is not first.extra


def test_concat_refuses_soft_tokens_of_another_checkpoint():
    with pytest.raises(IncompatibleContextError, match="cannot join soft tokens"):
        Compressed.concat([made(1), made(1, checkpoint="other")])


def test_joined_is_one_text_of_every_soft_token():
    compressed = made(3, window=8)
    one = compressed.joined()
    assert (len(one), one.n_soft_tokens, one.n_tokens, one.rates) == (1, [6], [12], [2])
    assert torch.equal(one.soft_tokens[0], torch.cat(compressed.soft_tokens)) and one.extra == {"window": 8}


def test_indexing_keeps_the_metadata():
    compressed = made(3, window=8)
    compressed.gmsa_version = "older"
    part = compressed[1:]
    assert part.n_tokens == [4, 6] and part.made_by == compressed.made_by and part.extra == {"window": 8}
    assert compressed[0].n_soft_tokens == [1]


def test_a_shared_context_answers_like_the_same_context_repeated(tiny_gmsa):
    context = tiny_gmsa.compress(TEXTS[0], rate=2)
    questions = ["Who jumps?", "Over what?", "Which fox?"]
    repeated = Compressed.concat([context] * len(questions))
    shared = tiny_gmsa.generate(context, questions, max_new_tokens=4)
    assert shared == tiny_gmsa.generate(repeated, questions, max_new_tokens=4)


# ----------------------------------------------------------------- CLI round trip
@pytest.fixture
def checkpoint(tiny_gmsa, tmp_path):
    tiny_gmsa.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_cli_compress_then_answer_from_the_stored_context(checkpoint, tmp_path, capsys):
    source = tmp_path / "passage.txt"
    source.write_text(TEXTS[1])
    ctx = tmp_path / "ctx.safetensors"
    assert main(["compress", "--model", str(checkpoint), str(source), "--rate", "2", "--out", str(ctx), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_tokens"] == [11] and summary["n_soft_tokens"] == [6]
    assert Compressed.load(ctx).rates == [2]
    args = ["answer", "--model", str(checkpoint), "--context", str(ctx), "-q", "What is the capital?", "--json"]
    assert main(args + ["--max-new-tokens", "4"]) == 0
    answers = json.loads(capsys.readouterr().out)["answers"]
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_cli_answer_with_a_context_of_another_checkpoint_exits_2(checkpoint, stored, capsys):
    _, ctx = stored  # made by the untrained tiny model, not by the saved checkpoint
    assert main(["answer", "--model", str(checkpoint), "--context", str(ctx), "-q", "Who?", "-q", "Where?"]) == 2
    assert "compress the text again" in capsys.readouterr().err


def test_cli_answer_with_a_corrupt_context_exits_2(checkpoint, tmp_path, capsys):
    ctx = tmp_path / "bad.safetensors"
    ctx.write_bytes(b"garbage")
    assert main(["answer", "--model", str(checkpoint), "--context", str(ctx), "-q", "Who?"]) == 2
    assert "not a gmsa compressed-context file" in capsys.readouterr().err
