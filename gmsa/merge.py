"""Merging: how the encoder turns a context into one vector per group of ``rate`` tokens.

One small interface, one class per strategy (as kvpress does with its presses):

* :class:`MeanPooling` (``GMSAConfig.merge = "mean"``, the method): the encoder reads the
  context and each group of ``rate`` consecutive states is mean-pooled (:func:`group_merge`).
* :class:`MemoryTokens` (``"memory"``, an ablation): ICAE-style learned memory tokens. Each
  sample's real context tokens are followed by ``ceil(L / rate)`` learned memory embeddings
  (slots ``0..n-1`` of one shared table); the encoder reads ``[context; memory]`` causally and
  the final states at the memory positions are the merged vectors. The table is trained in the
  AE stage together with the encoder LoRA and the LSA.

Either way the merged vectors then go through the LSA (:class:`gmsa.model.LayerSemanticAlignment`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from .config import GMSAConfig


def check_rate(rate: object) -> int:
    """A compression rate as a caller gives it: an integer >= 1, else a TypeError / ValueError."""
    if isinstance(rate, bool) or not isinstance(rate, int):
        raise TypeError(f"rate must be an integer >= 1, got {rate!r}")
    if rate < 1:
        raise ValueError(f"rate must be an integer >= 1, got {rate}")
    return rate


def rates_per_sample(rates: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
    """``(B,)`` long rates from one int or a per-sample tensor; each must be >= 1."""
    rates = torch.as_tensor(rates, device=device, dtype=torch.long).expand(batch)
    if bool((rates < 1).any()):
        raise ValueError(f"compression rates must be >= 1, got {rates.tolist()}")
    return rates


def merged_lengths(lengths: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
    """Number of soft tokens per sample: ``ceil(L / rate)``, and 1 for an empty context."""
    return torch.clamp((lengths + rates - 1) // rates, min=1)


def causal_states(stack: nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    """Final states of a causal ``stack`` (the encoder, the LSA blocks) over right-padded ``(B, L, H)`` rows.

    No padding mask is passed, on purpose: in a causal stack each real token attends only to earlier
    positions, which are all real when padding comes last, so the real tokens' states are exactly those
    of the unpadded rows (positions count from 0 either way). Padding positions get states nobody
    reads. A mask would only cost time: it turns SDPA's causal kernel into a masked one (three long texts
    batched on a CPU: 1.01-1.16 s with the mask, 0.72-0.77 s without; docs/speed.md).
    """
    return stack(inputs_embeds=embeds).last_hidden_state


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
    rates = rates_per_sample(rates, batch, hidden.device)
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


class Merger(nn.Module):
    """A merging strategy: encoder + embedded context -> merged vectors (a module: it may hold learned weights).

    Subclasses implement :meth:`forward`; :meth:`from_config` builds one for a model.
    """

    @classmethod
    def from_config(cls, decoder: PreTrainedModel, config: GMSAConfig) -> Merger:
        return cls()

    def forward(
        self, encoder: nn.Module, token_embeds: torch.Tensor, attention_mask: torch.Tensor, rates: torch.Tensor | int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``encoder`` over the context and merge its states.

        Args:
            encoder: the encoder stack, a causal model called with ``inputs_embeds`` (:func:`causal_states`).
            token_embeds: ``(B, L, H)`` embedded context tokens, right-padded.
            attention_mask: ``(B, L)`` 1 for real tokens (which come first), 0 for padding.
            rates: ``(B,)`` integer rate per sample, or one int for all.

        Returns:
            merged: ``(B, N, H)``, ``N = max_b ceil(L_b / rate_b)`` (1 for an empty context).
            merged_mask: ``(B, N)`` 1 where a merged vector is real.
        """
        raise NotImplementedError


class MeanPooling(Merger):
    """GMSA's group merging: the mean of each group of ``rate`` consecutive encoder states."""

    def forward(self, encoder, token_embeds, attention_mask, rates):
        return group_merge(causal_states(encoder, token_embeds), attention_mask, rates)


class MemoryTokens(Merger):
    """The ablation: a table of ``max_slots`` learned memory embeddings that the encoder reads after the context.

    Args:
        decoder: the backbone; its token embeddings set the width and the initial scale.
        max_slots: most memory tokens one sample can need (``max_context_tokens`` covers rate 1).
    """

    def __init__(self, decoder: PreTrainedModel, max_slots: int):
        super().__init__()
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        token_embeddings = decoder.get_input_embeddings().weight
        scale = float(token_embeddings.detach().float().std())
        table = torch.randn(max_slots, token_embeddings.shape[-1]) * scale
        self.embeddings = nn.Parameter(table.to(token_embeddings.dtype))

    @classmethod
    def from_config(cls, decoder: PreTrainedModel, config: GMSAConfig) -> MemoryTokens:
        return cls(decoder, config.max_context_tokens)

    @property
    def max_slots(self) -> int:
        return int(self.embeddings.shape[0])

    def forward(self, encoder, token_embeds, attention_mask, rates):
        batch, _, hidden = token_embeds.shape
        device = token_embeds.device
        mask = attention_mask.to(torch.long)
        lengths = mask.sum(dim=1)
        n_memory = merged_lengths(lengths, rates_per_sample(rates, batch, device))
        if int(n_memory.max()) > self.max_slots:
            raise ValueError(f"a sample needs {int(n_memory.max())} memory tokens, the table has {self.max_slots}")

        width = int((lengths + n_memory).max())
        positions = torch.arange(width, device=device).expand(batch, width)
        is_context = positions < lengths[:, None]
        is_memory = ~is_context & (positions < (lengths + n_memory)[:, None])
        slots = (positions - lengths[:, None])[is_memory]

        inputs = token_embeds.new_zeros(batch, width, hidden)
        inputs[is_context] = token_embeds[mask.bool()]
        inputs[is_memory] = self.embeddings[slots].to(inputs.dtype)
        states = causal_states(encoder, inputs)  # [context; memory; padding]: padding still comes last

        n_out = int(n_memory.max())
        merged_mask = torch.arange(n_out, device=device)[None, :] < n_memory[:, None]
        merged = states.new_zeros(batch, n_out, hidden)
        merged[merged_mask] = states[is_memory]
        return merged, merged_mask.long()


MERGERS: dict[str, type[Merger]] = {"mean": MeanPooling, "memory": MemoryTokens}


def build_merger(decoder: PreTrainedModel, config: GMSAConfig) -> Merger:
    """The merger ``config.merge`` names, built for ``decoder``."""
    return MERGERS[config.merge].from_config(decoder, config)
