"""Merging: the pure mean function, rate checks, and the strategies behind ``GMSAConfig.merge``."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gmsa.config import MERGE_CHOICES, GMSAConfig
from gmsa.merge import (
    MERGERS,
    MeanPooling,
    MemoryTokens,
    Merger,
    build_merger,
    check_rate,
    group_merge,
    merged_lengths,
    rates_per_sample,
)


def test_groups_are_means_with_remainder():
    hidden = torch.arange(5, dtype=torch.float32).view(1, 5, 1)
    merged, mask = group_merge(hidden, torch.ones(1, 5), 2)
    assert merged.squeeze(-1).tolist() == [[0.5, 2.5, 4.0]]
    assert mask.tolist() == [[1, 1, 1]]


def test_padding_is_ignored_and_rates_mix_per_sample():
    hidden = torch.tensor([[1.0, 3.0, 5.0, 7.0], [2.0, 4.0, 99.0, 99.0]]).unsqueeze(-1)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    merged, merged_mask = group_merge(hidden, mask, torch.tensor([4, 1]))
    assert merged_mask.tolist() == [[1, 0], [1, 1]]
    assert merged[0, 0, 0] == 4.0
    assert merged[1, :, 0].tolist() == [2.0, 4.0]
    assert merged[0, 1, 0] == 0.0  # padding slot stays zero


def test_empty_context_gives_one_zero_vector():
    hidden = torch.randn(2, 3, 4)
    merged, mask = group_merge(hidden, torch.tensor([[0, 0, 0], [1, 1, 1]]), 2)
    assert merged.shape == (2, 2, 4)
    assert mask.tolist() == [[1, 0], [1, 1]]
    assert torch.equal(merged[0, 0], torch.zeros(4))


@pytest.mark.parametrize("length,rate,expected", [(0, 4, 1), (1, 4, 1), (4, 4, 1), (5, 4, 2), (128, 8, 16), (7, 1, 7)])
def test_merged_lengths_is_ceil(length, rate, expected):
    assert merged_lengths(torch.tensor([length]), torch.tensor([rate])).item() == expected


def test_batch_matches_one_by_one():
    torch.manual_seed(0)
    lengths, rates = [7, 3, 12], [4, 2, 8]
    hidden = torch.randn(3, 12, 5)
    mask = (torch.arange(12)[None] < torch.tensor(lengths)[:, None]).long()
    merged, merged_mask = group_merge(hidden, mask, torch.tensor(rates))
    for i, (n, r) in enumerate(zip(lengths, rates)):
        alone, _ = group_merge(hidden[i : i + 1, :n], torch.ones(1, n), r)
        k = alone.shape[1]
        assert torch.allclose(merged[i, :k], alone[0])
        assert merged_mask[i].sum() == k


def test_rate_below_one_is_refused():
    with pytest.raises(ValueError, match="rates must be >= 1"):
        group_merge(torch.randn(1, 3, 2), torch.ones(1, 3), 0)


# ----------------------------------------------------------------- rates
@pytest.mark.parametrize("rate", [1, 4, 64])
def test_check_rate_passes_integers(rate):
    assert check_rate(rate) == rate


@pytest.mark.parametrize(("rate", "error"), [(0, ValueError), (-2, ValueError), (2.5, TypeError), ("4", TypeError)])
def test_check_rate_refuses_the_rest(rate, error):
    with pytest.raises(error, match="rate must be an integer >= 1"):
        check_rate(rate)


def test_check_rate_refuses_a_bool():
    with pytest.raises(TypeError, match="rate must be an integer"):
        check_rate(True)


def test_rates_per_sample_expands_one_rate():
    assert rates_per_sample(3, 4, torch.device("cpu")).tolist() == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="rates must be >= 1"):
        rates_per_sample(torch.tensor([2, 0]), 2, torch.device("cpu"))


# ----------------------------------------------------------------- strategies
class Encoder(nn.Module):
    """A stand-in encoder stack: its states are its input embeddings times ``scale``; it records its inputs."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale, self.inputs = scale, []

    def forward(self, inputs_embeds, attention_mask=None):
        assert attention_mask is None  # right-padded rows in a causal stack need none (causal_states)
        self.inputs.append(inputs_embeds)
        return SimpleNamespace(last_hidden_state=inputs_embeds * self.scale)


def decoder_with_embeddings(rows: int = 10, width: int = 4):
    embeddings = nn.Embedding(rows, width)
    return SimpleNamespace(get_input_embeddings=lambda: embeddings)


def test_every_config_name_has_a_merger():
    assert set(MERGERS) == set(MERGE_CHOICES)
    assert all(issubclass(merger, Merger) for merger in MERGERS.values())


def test_build_merger_follows_the_config():
    decoder = decoder_with_embeddings()
    assert isinstance(build_merger(decoder, GMSAConfig()), MeanPooling)
    memory = build_merger(decoder, GMSAConfig(merge="memory", max_context_tokens=32))
    assert isinstance(memory, MemoryTokens) and memory.max_slots == 32


def test_mean_pooling_merges_the_encoder_states():
    torch.manual_seed(0)
    embeds, mask = torch.randn(2, 6, 4), torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    merged, merged_mask = MeanPooling()(Encoder(scale=2.0), embeds, mask, 2)
    expected, expected_mask = group_merge(2.0 * embeds, mask, 2)
    torch.testing.assert_close(merged, expected)
    assert torch.equal(merged_mask, expected_mask)
    assert not list(MeanPooling().parameters())


def test_memory_tokens_read_the_context_then_the_table():
    torch.manual_seed(0)
    table = MemoryTokens(decoder_with_embeddings(), max_slots=8)
    encoder = Encoder()
    embeds, mask = torch.randn(2, 5, 4), torch.tensor([[1] * 5, [1] * 2 + [0] * 3])
    merged, merged_mask = table(encoder, embeds, mask, torch.tensor([2, 2]))
    assert merged_mask.tolist() == [[1, 1, 1], [1, 0, 0]]  # ceil(5 / 2), ceil(2 / 2)
    # the stand-in encoder passes its inputs through, so the merged vectors are the table's first slots
    torch.testing.assert_close(merged[0], table.embeddings[:3])
    torch.testing.assert_close(merged[1, :1], table.embeddings[:1])
    read = encoder.inputs[0]  # each row: its context, then its memory tokens, then padding (zeros)
    torch.testing.assert_close(read[1, :2], embeds[1, :2])
    torch.testing.assert_close(read[1, 2], table.embeddings[0])
    assert read.shape[1] == 5 + 3 and not read[1, 3:].any()


def test_memory_table_too_small_is_an_error():
    table = MemoryTokens(decoder_with_embeddings(), max_slots=2)
    with pytest.raises(ValueError, match="needs 3 memory tokens, the table has 2"):
        table(Encoder(), torch.zeros(1, 9, 4), torch.ones(1, 9), 4)
    with pytest.raises(ValueError, match="max_slots must be >= 1"):
        MemoryTokens(decoder_with_embeddings(), max_slots=0)


def test_a_model_compresses_through_its_merger(tiny_gmsa):
    """The model asks its merger: another strategy plugs in without touching the model."""

    class FirstState(Merger):
        def forward(self, encoder, token_embeds, attention_mask, rates):
            states = encoder(inputs_embeds=token_embeds, attention_mask=attention_mask).last_hidden_state
            return states[:, :1], attention_mask[:, :1].long()

    tiny_gmsa.model.merger = FirstState()
    compressed = tiny_gmsa.compress(["The quick brown fox jumps over the lazy dog."], rate=2)
    assert compressed.n_soft_tokens == [1]
