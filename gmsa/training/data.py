"""Training data: JSONL rows -> pre-tokenised examples -> length-bucketed, resumable batches."""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ..model import pad


@dataclass
class Example:
    """One training example as token ids: compress ``context``, read ``prompt``, predict ``target``."""

    context: list[int]
    prompt: list[int]
    target: list[int]


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file (``.gz`` too); a clear error names the file and line of a broken row."""
    rows = []
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err})") from err
    return rows


def read_rows(path: str | list[str]) -> list[dict]:
    """The rows of a data file, or of each file of a list in turn (e.g. QA rows, then synthetic cloze rows)."""
    paths = [path] if isinstance(path, str) else list(path)
    if not paths:
        raise ValueError("data names no file")
    for name in paths:
        if not Path(name).is_file():
            hint = "`gmsa data prepare --out data`"
            if "cloze" in Path(name).name:
                hint = f"`gmsa data cloze --from data/ae/train.jsonl --out {name} --n 3000 --seed 0` (after {hint})"
            raise FileNotFoundError(f"no data file {name}: build it with {hint} first")
    return [row for name in paths for row in read_jsonl(name)]


def subsample_sources(rows: list[dict], fractions: dict[str, float], seed: int = 0) -> list[dict]:
    """Keep a seeded ``fractions[source]`` share of each listed source's rows (others all), in order.

    Rebalances a mix, e.g. ``{"boolq": 0.25}`` against a flood of yes/no answers.
    """
    for source, fraction in fractions.items():
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction for source {source!r} must be in [0, 1], got {fraction}")
    rng = random.Random(seed)
    return [row for row in rows if rng.random() < fractions.get(row.get("source"), 1.0)]


def _tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def autoencoder_examples(
    rows: list[dict], tokenizer: PreTrainedTokenizerBase, prompt: str, max_tokens: int, min_tokens: int = 1
) -> list[Example]:
    """AE stage: compress the text, then restate it (target = text + EOS)."""
    prompt_ids = _tokenize(tokenizer, [prompt])[0]
    contexts = _tokenize(tokenizer, [row["text"] for row in rows])
    eos = tokenizer.eos_token_id
    return [Example(ids, prompt_ids, ids + [eos]) for ids in contexts if min_tokens <= len(ids) <= max_tokens]


def qa_examples(rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> list[Example]:
    """KEFT stage: compress the context, read the question, answer (first gold answer + EOS)."""
    rows = [row for row in rows if row.get("answers")]
    contexts = _tokenize(tokenizer, [row["context"] for row in rows])
    questions = _tokenize(tokenizer, [row["question"] for row in rows])
    answers = _tokenize(tokenizer, [str(row["answers"][0]) for row in rows])
    eos = tokenizer.eos_token_id
    return [Example(c, q, a + [eos]) for c, q, a in zip(contexts, questions, answers) if 0 < len(c) <= max_tokens and q]


def collate(examples: list[Example], rates: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """The keyword arguments of ``GMSAModel.forward`` for a batch."""
    context_ids, context_mask = pad([e.context for e in examples], pad_id)
    prompt_ids, prompt_mask = pad([e.prompt for e in examples], pad_id)
    target_ids, target_mask = pad([e.target for e in examples], pad_id)
    return {
        "context_ids": context_ids,
        "context_mask": context_mask,
        "rates": torch.tensor(rates, dtype=torch.long),
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "target_ids": target_ids,
        "target_mask": target_mask,
    }


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, bucket: int = 64) -> list[list[int]]:
    """A seeded order of batches for one epoch: shuffle, sort within buckets by length, shuffle batches.

    Similar lengths share a batch, so little compute is spent on padding.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * bucket
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass
class BatchStream:
    """Endless, resumable stream of batches; ``position`` (epoch, index) is saved in checkpoints.

    Under data parallelism every rank walks the same global batches of ``batch_size * world``
    examples and keeps every ``world``-th one from ``rank`` on (similar lengths land on every
    rank); a global batch too small to give each rank an example is skipped.
    """

    examples: list[Example]
    batch_size: int
    rates: tuple[int, ...]
    pad_id: int
    seed: int = 0
    epoch: int = 0
    index: int = 0
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if not self.examples:
            raise ValueError("no training examples (check the data file and the length limits)")
        self._lengths = [len(e.context) + len(e.target) for e in self.examples]
        self._batches = self._epoch()

    def _epoch(self) -> list[list[int]]:
        batches = epoch_batches(self._lengths, self.batch_size * self.world, self.seed, self.epoch)
        return [b for b in batches if len(b) >= self.world]

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def seek(self, position: dict) -> None:
        self.epoch, self.index = position["epoch"], position["index"]
        self._batches = self._epoch()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            if self.index >= len(self._batches):
                self.seek({"epoch": self.epoch + 1, "index": 0})
            batch = [self.examples[i] for i in self._batches[self.index]]
            rng = random.Random(hash((self.seed, self.epoch, self.index)))
            rates = [rng.choice(self.rates) for _ in batch]
            self.index += 1
            shard = slice(self.rank, None, self.world)
            yield collate(batch[shard], rates[shard], self.pad_id)
