import pytest
import torch

from gmsa.merge import group_merge, merged_lengths


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
