"""How much of a passage its soft tokens carry, in nats per token: a sensitive AE progress signal.

Reconstruction BLEU stays at zero until a compressor is far along; the cross entropy of the
restated passage moves from the first steps, but part of any fall is the decoder learning the
passages' style, which needs no soft tokens at all. The control separates the two: the same
targets decoded from the soft tokens of *other* passages (a cyclic shift of the batch). The
gap ``mismatched - matched`` is what the soft tokens tell the decoder about their own passage.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..model import GMSAModel
from ..training.data import Example, collate


@dataclass(frozen=True)
class Information:
    """Mean target cross entropy (nats per token) with matched and with mismatched soft tokens.

    ``matched_accuracy``: the share of target tokens the decoder's argmax gets right, teacher-forced,
    from the matched soft tokens.
    """

    matched: float
    mismatched: float
    matched_accuracy: float = float("nan")

    @property
    def nats_per_token(self) -> float:
        return self.mismatched - self.matched


def shifted(examples: list[Example]) -> list[Example]:
    """Each example's target paired with the next example's context (the last with the first)."""
    return [replace(example, context=examples[(i + 1) % len(examples)].context) for i, example in enumerate(examples)]


@torch.no_grad()
def soft_token_information(
    model: GMSAModel, examples: list[Example], rate: int, pad_id: int, batch_size: int = 8
) -> Information:
    """Token-weighted mean cross entropy of ``examples``' targets from their own and from shifted soft tokens.

    Needs at least two examples with distinct contexts; the shift is within the whole list, so
    every batch mixes passages (batches of one still get another passage's soft tokens).
    """
    if len(examples) < 2:
        raise ValueError("the control needs at least two examples")
    device = next(model.parameters()).device
    scores = []
    for pairs in (examples, shifted(examples)):
        loss, correct, tokens = 0.0, 0, 0
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, [rate] * len(chunk), pad_id).items()}
            logits = model.target_logits(**batch).float()
            targets = batch["target_ids"][batch["target_mask"].bool()]
            loss += float(F.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(dim=-1) == targets).sum())
            tokens += len(targets)
        scores.append((loss / tokens, correct / tokens))
    (matched, accuracy), (mismatched, _) = scores
    return Information(matched, mismatched, accuracy)
