"""A cheap warm-up objective for the autoencoder stage: the token probe.

Every soft token must name, slot by slot, the ``rate`` context tokens it merges: slot ``j``
of a soft token ``s`` is scored as ``lm_head(P_j s)``, where ``lm_head`` is the decoder's own
(frozen) output layer and ``P_j`` a learned linear map per slot. No decoder layer runs,
forward or backward, so a step costs the encoder + LSA only. It trains exactly what the
autoencoder stage trains (encoder LoRA + LSA) and pushes the soft tokens towards vectors
the decoder's embedding space can read (in tied models ``lm_head`` *is* the embedding
matrix). The probe maps are thrown away afterwards; the AE stage starts from the result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model import GMSAModel, rms, soft_cap


class TokenProbe(nn.Module):
    """One ``(H, H)`` map per slot of a group, a scaled identity at the start.

    The scale makes readouts start with the RMS of the token embeddings: soft tokens are
    normed hidden states, often far larger, and would otherwise start with huge logits
    (measured on SmolLM2: loss 18 instead of ~10).
    """

    def __init__(self, hidden_size: int, max_rate: int, scale: float = 1.0):
        super().__init__()
        eye = torch.eye(hidden_size).expand(max_rate, hidden_size, hidden_size)
        self.maps = nn.Parameter(eye * scale)

    @classmethod
    def for_model(cls, model: GMSAModel, max_rate: int) -> TokenProbe:
        """A probe scaled for ``model``, measured on seeded random ids (the same on every rank)."""
        ids = torch.randint(model.decoder.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
        ids = ids.to(model.decoder.device)
        with torch.no_grad():
            soft, _ = model.compress(ids, torch.ones_like(ids), 1)
        scale = rms(model.decoder.get_input_embeddings().weight).mean() / rms(soft).mean()
        return cls(model.hidden_size, max_rate, float(scale))

    @property
    def max_rate(self) -> int:
        return self.maps.shape[0]


def slot_targets(
    context_ids: torch.Tensor, context_mask: torch.Tensor, rates: torch.Tensor, n_groups: int, max_rate: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The token each (group, slot) merges: ids ``(B, N, R)`` and a mask ``(B, N, R)``.

    Slot ``j`` of group ``g`` holds token ``g * rate + j`` when that token exists and ``j < rate``.
    """
    batch, length = context_ids.shape
    groups = torch.arange(n_groups)[None, :, None]
    slots = torch.arange(max_rate)[None, None, :]
    rate = rates.reshape(batch, 1, 1)
    position = groups * rate + slots
    valid = (slots < rate) & (position < context_mask.sum(dim=1).reshape(batch, 1, 1))
    gathered = context_ids.gather(1, position.clamp(max=length - 1).reshape(batch, -1)).reshape(valid.shape)
    return gathered, valid


def probe_logits(
    model: GMSAModel, probe: TokenProbe, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(n, V)`` for every real context token, read from its soft token, and the ``(n,)`` tokens."""
    rates = torch.as_tensor(batch["rates"]).expand(batch["context_ids"].shape[0])
    if int(rates.max()) > probe.max_rate:
        raise ValueError(f"the probe has {probe.max_rate} slots, the batch asks for rate {int(rates.max())}")
    soft, soft_mask = model.compress(batch["context_ids"], batch["context_mask"], rates)
    targets, valid = slot_targets(batch["context_ids"], batch["context_mask"], rates, soft.shape[1], probe.max_rate)
    b, g, s = (valid & soft_mask.bool()[..., None]).nonzero(as_tuple=True)
    readouts = torch.einsum("nh,nkh->nk", soft[b, g], probe.maps[s])
    logits = model.decoder.get_output_embeddings()(readouts)
    return soft_cap(logits, getattr(model.decoder.config, "final_logit_softcapping", None)), targets[b, g, s]


def probe_loss(
    model: GMSAModel, probe: TokenProbe, batch: dict[str, torch.Tensor], reduction: str = "mean"
) -> torch.Tensor:
    """Cross entropy of every context token, predicted from the soft token that merges it (mean or sum)."""
    logits, targets = probe_logits(model, probe, batch)
    return F.cross_entropy(logits.float(), targets, reduction=reduction)


@torch.no_grad()
def probe_accuracy(model: GMSAModel, probe: TokenProbe, batch: dict[str, torch.Tensor]) -> float:
    """Share of context tokens the probe names exactly (argmax)."""
    return probe_scores(model, probe, batch)[1]


@torch.no_grad()
def probe_scores(model: GMSAModel, probe: TokenProbe, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Mean cross entropy and accuracy of the probe from one compression of the batch (for validation)."""
    logits, targets = probe_logits(model, probe, batch)
    loss = F.cross_entropy(logits.float(), targets)
    return float(loss), float((logits.argmax(dim=-1) == targets).float().mean())
