"""Ablation of group merging: ICAE-style learned memory tokens (``GMSAConfig.merge = "memory"``).

Instead of mean-pooling the encoder's states, each sample's real context tokens are followed
by ``ceil(L / rate)`` learned memory embeddings (slots ``0..n-1`` of one shared table); the
encoder reads ``[context; memory]`` causally and the final states at the memory positions
are the merged vectors, which then go through the LSA like group-merged ones. The table is
trained in the AE stage together with the encoder LoRA and the LSA.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from .merge import merged_lengths


class MemoryTokens(nn.Module):
    """A table of ``max_slots`` learned memory embeddings and the encoder pass that reads them.

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

    @property
    def max_slots(self) -> int:
        return int(self.embeddings.shape[0])

    def forward(
        self, encoder: nn.Module, token_embeds: torch.Tensor, attention_mask: torch.Tensor, rates: torch.Tensor | int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``[context; memory]`` per sample and return the memory states.

        Args:
            encoder: the encoder stack (called with ``inputs_embeds`` and ``attention_mask``).
            token_embeds: ``(B, L, H)`` embedded context tokens, right-padded.
            attention_mask: ``(B, L)`` 1 for real tokens (which come first), 0 for padding.
            rates: ``(B,)`` integer rate per sample, or one int for all.

        Returns:
            merged: ``(B, N, H)`` final encoder states at the memory positions,
                ``N = max_b ceil(L_b / rate_b)`` (1 for an empty context).
            merged_mask: ``(B, N)`` 1 where a memory state is real.
        """
        batch, _, hidden = token_embeds.shape
        device = token_embeds.device
        mask = attention_mask.to(torch.long)
        rates = torch.as_tensor(rates, device=device, dtype=torch.long).expand(batch)
        if bool((rates < 1).any()):
            raise ValueError(f"compression rates must be >= 1, got {rates.tolist()}")
        lengths = mask.sum(dim=1)
        n_memory = merged_lengths(lengths, rates)
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
        states = encoder(inputs_embeds=inputs, attention_mask=(is_context | is_memory).long()).last_hidden_state

        n_out = int(n_memory.max())
        merged_mask = torch.arange(n_out, device=device)[None, :] < n_memory[:, None]
        merged = states.new_zeros(batch, n_out, hidden)
        merged[merged_mask] = states[is_memory]
        return merged, merged_mask.long()
