"""Quality metrics for reconstructions and answers."""

from __future__ import annotations

import sacrebleu


def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu, default 13a tokenisation) on a 0-1 scale, as the paper reports it."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not hypotheses:
        return 0.0
    return sacrebleu.corpus_bleu(hypotheses, [references]).score / 100.0
