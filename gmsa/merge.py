"""Group merging: mean-pool consecutive groups of ``rate`` token states into one vector."""

from __future__ import annotations

import torch


def merged_lengths(lengths: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
    """Number of soft tokens per sample: ``ceil(L / rate)``, and 1 for an empty context."""
    return torch.clamp((lengths + rates - 1) // rates, min=1)


def group_merge(
    hidden: torch.Tensor, mask: torch.Tensor, rates: torch.Tensor | int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pool each sample's real tokens in consecutive groups of its rate.

    Args:
        hidden: ``(B, L, H)`` encoder states, right-padded.
        mask: ``(B, L)`` 1 for real tokens, 0 for padding (real tokens come first).
        rates: ``(B,)`` integer rate per sample, or one int for all.

    Returns:
        merged: ``(B, N, H)`` with ``N = max_b ceil(L_b / rate_b)``; a trailing group shorter
            than the rate is averaged on its own; an empty context gives one zero vector.
        merged_mask: ``(B, N)`` 1 where a merged vector is real.
    """
    batch, length, _ = hidden.shape
    mask = mask.to(torch.long)
    rates = torch.as_tensor(rates, device=hidden.device, dtype=torch.long).expand(batch)
    if bool((rates < 1).any()):
        raise ValueError(f"compression rates must be >= 1, got {rates.tolist()}")
    counts_per_sample = merged_lengths(mask.sum(dim=1), rates)
    n_out = int(counts_per_sample.max())

    positions = torch.arange(length, device=hidden.device).expand(batch, length)
    group = torch.div(positions, rates[:, None], rounding_mode="floor").clamp(max=n_out - 1)
    weights = mask.to(hidden.dtype)
    sums = hidden.new_zeros(batch, n_out, hidden.shape[-1])
    sums.scatter_add_(1, group[..., None].expand_as(hidden), hidden * weights[..., None])
    counts = hidden.new_zeros(batch, n_out).scatter_add_(1, group, weights)
    merged = sums / counts.clamp(min=1)[..., None]
    merged_mask = (torch.arange(n_out, device=hidden.device)[None, :] < counts_per_sample[:, None]).long()
    return merged, merged_mask
