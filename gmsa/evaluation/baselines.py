"""The methods compared by ``gmsa eval``: GMSA models and the baselines, behind one small interface.

Every method answers with the same decoder call (``GMSA.generate``: greedy, the same
``max_new_tokens`` and repetition penalty) on the same input layout, so only the context
part differs::

    decoder input embeddings = [ context part ; question tokens ]     (no chat template,
                                                                       no special tokens)
    gmsa            context part = ceil(L / rate) soft tokens
    uncompressed    context part = the embeddings of all L context tokens
    closed-book     context part = nothing
    truncate-head   context part = embeddings of the first ceil(L / rate) context tokens
    truncate-tail   context part = embeddings of the last ceil(L / rate) context tokens
    llmlingua       context part = embeddings of the tokens of LLMLingua's compressed text,
                                   target ceil(L / rate) tokens (retried with a smaller target
                                   while over the budget, then cut to it)

``L`` counts the backbone's tokens of the context. Context and question are tokenised
separately (no separator between them), exactly as GMSA's decoder reads soft tokens + question.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ..api import GMSA
from ..compressed import Compressed


@dataclass(frozen=True)
class Generation:
    """Decoding settings shared by every method (the paper's: greedy, 100 tokens, penalty 1.3)."""

    max_new_tokens: int = 100
    repetition_penalty: float = 1.3

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass
class Output:
    """One method's answer (or reconstruction) and the number of context positions the decoder read."""

    text: str
    context_tokens: int
    extra: dict = field(default_factory=dict)


def budget(n_tokens: int, rate: int) -> int:
    """Token budget of a context of ``n_tokens`` at ``rate``: ``ceil(n_tokens / rate)``."""
    return math.ceil(n_tokens / rate)


def model_key(gmsa: GMSA) -> str:
    """A short id of a GMSA model: its weights' checksum and its whole config."""
    payload = json.dumps([gmsa.checkpoint_id, gmsa.config.to_dict()], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def decoder_key(gmsa: GMSA) -> str:
    """Id of the decoder a text baseline reads with: the backbone itself, unless KEFT tuned it.

    Baselines on an untuned decoder share their cached outputs across GMSA models.
    """
    if gmsa.config.decoder_tuning == "none":
        return f"backbone:{gmsa.config.backbone_fingerprint}"
    return model_key(gmsa)


@dataclass
class Method:
    """A way to answer a question about a context under a compression rate (kvpress-style).

    Subclasses implement :meth:`run`; ``rate_dependent = False`` marks methods whose output
    does not depend on the rate (evaluated once, shown at every rate).
    """

    name: str
    gmsa: GMSA
    generation: Generation = field(default_factory=Generation)
    rate_dependent: ClassVar[bool] = True

    def run(self, contexts: list[str], questions: list[str], rate: int) -> list[Output]:
        raise NotImplementedError

    def answer(self, contexts: list[str], questions: list[str], rate: int) -> list[str]:
        """Answers to ``questions[i]`` about ``contexts[i]``."""
        return [output.text for output in self.run(contexts, questions, rate)]

    def settings(self) -> dict:
        """Everything that changes this method's outputs (part of the cache key)."""
        return {"class": type(self).__name__, "model": model_key(self.gmsa), "generation": vars(self.generation)}

    @property
    def cache_id(self) -> str:
        return hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class GMSAMethod(Method):
    """Compress the context into ``ceil(L / rate)`` soft tokens, then answer or restate it."""

    def run(self, contexts: list[str], questions: list[str], rate: int) -> list[Output]:
        compressed = self.gmsa.compress(contexts, rate=rate)
        texts = self.gmsa.generate(
            compressed,
            questions,
            max_new_tokens=self.generation.max_new_tokens,
            repetition_penalty=self.generation.repetition_penalty,
        )
        return [Output(text, n) for text, n in zip(texts, compressed.n_soft_tokens)]

    def reconstruct(self, contexts: list[str], rate: int) -> list[Output]:
        """Greedy restatement from the soft tokens (``GMSA.reconstruct``: AE prompt, no penalty)."""
        compressed = self.gmsa.compress(contexts, rate=rate)
        return [Output(text, n) for text, n in zip(self.gmsa.reconstruct(compressed), compressed.n_soft_tokens)]


@dataclass
class UncompressedRestatement(GMSAMethod):
    """The ceiling of reconstruction: the same decoder, prompt and decoding restating the *uncompressed* text.

    A compressor read by this decoder cannot restate better than the decoder restates the text itself.
    """

    rate_dependent: ClassVar[bool] = False

    def reconstruct(self, contexts: list[str], rate: int | None) -> list[Output]:
        context = self.gmsa.uncompressed(contexts)
        return [Output(text, n) for text, n in zip(self.gmsa.reconstruct(context), context.n_soft_tokens)]


@dataclass
class TextContextMethod(Method):
    """Feed (a selection of) the context's own tokens to the decoder as embeddings."""

    def select(self, ids: list[int], text: str, rate: int) -> tuple[list[int], dict]:
        """The context token ids the decoder reads, and any details worth recording."""
        raise NotImplementedError

    def settings(self) -> dict:
        return super().settings() | {"model": decoder_key(self.gmsa)}

    @torch.inference_mode()
    def run(self, contexts: list[str], questions: list[str], rate: int) -> list[Output]:
        all_ids = self.gmsa.tokenizer(contexts, add_special_tokens=False)["input_ids"]
        chosen = [self.select(ids, text, rate) for ids, text in zip(all_ids, contexts)]
        embed = self.gmsa.model.embed
        device = self.gmsa.device
        context = Compressed(
            [embed(torch.tensor(ids, dtype=torch.long, device=device)) for ids, _ in chosen],
            [rate] * len(contexts),
            [len(ids) for ids in all_ids],
            self.gmsa.config.backbone_fingerprint,
            self.gmsa.checkpoint_id,
        )
        texts = self.gmsa.generate(
            context,
            questions,
            max_new_tokens=self.generation.max_new_tokens,
            repetition_penalty=self.generation.repetition_penalty,
        )
        return [Output(text, len(ids), extra) for text, (ids, extra) in zip(texts, chosen)]


@dataclass
class Uncompressed(TextContextMethod):
    """The original prompt: every context token."""

    rate_dependent: ClassVar[bool] = False

    def select(self, ids: list[int], text: str, rate: int) -> tuple[list[int], dict]:
        return list(ids), {}


@dataclass
class ClosedBook(TextContextMethod):
    """No context at all: what the decoder knows by itself."""

    rate_dependent: ClassVar[bool] = False

    def select(self, ids: list[int], text: str, rate: int) -> tuple[list[int], dict]:
        return [], {}


@dataclass
class TruncateHead(TextContextMethod):
    """The first ``ceil(L / rate)`` context tokens."""

    def select(self, ids: list[int], text: str, rate: int) -> tuple[list[int], dict]:
        return list(ids[: budget(len(ids), rate)]), {}


@dataclass
class TruncateTail(TextContextMethod):
    """The last ``ceil(L / rate)`` context tokens."""

    def select(self, ids: list[int], text: str, rate: int) -> tuple[list[int], dict]:
        keep = budget(len(ids), rate)
        return list(ids[len(ids) - keep :]), {}


@dataclass
class LLMLingua(TextContextMethod):
    """LLMLingua (``llmlingua.PromptCompressor``, token-level filter) with the backbone as its small LM.

    ``target_token`` is the budget in the small LM's (= the backbone's) tokens; contexts are
    short, so the iterative window is ``iterative_size`` tokens (llmlingua's default of 200
    leaves contexts under 200 tokens uncompressed). Its length control is approximate (and the
    kept pieces re-tokenise into more tokens), so when the result is over the budget it is
    compressed again with ``target_token`` shrunk by the overshoot, up to ``max_attempts``
    times; a result still over the budget is cut to it. ``extra`` records the last attempt's
    length (``llmlingua_tokens``) and the number of attempts.
    """

    small_lm_dir: str = ""
    iterative_size: int = 32
    max_attempts: int = 3
    _compressor: object = field(default=None, init=False, repr=False)

    def settings(self) -> dict:
        extra = {"small_lm": str(self.small_lm_dir), "iterative_size": self.iterative_size}
        return super().settings() | extra | {"max_attempts": self.max_attempts}

    @property
    def compressor(self):
        if self._compressor is None:
            from .llmlingua_offline import load_prompt_compressor

            self._compressor = load_prompt_compressor(Path(self.small_lm_dir))
        return self._compressor

    def _compress(self, text: str, target: int) -> list[int]:
        result = self.compressor.compress_prompt(
            [text], target_token=target, iterative_size=self.iterative_size, use_context_level_filter=False
        )
        return self.gmsa.tokenizer(result["compressed_prompt"], add_special_tokens=False)["input_ids"]

    def select(self, ids: list[int], text: str, rate: int) -> tuple[list[int], dict]:
        keep = budget(len(ids), rate)
        if keep >= len(ids):
            return list(ids), {"llmlingua_tokens": len(ids), "llmlingua_attempts": 0}
        target, attempt = keep, 0
        while attempt < self.max_attempts:
            attempt += 1
            compressed = self._compress(text, target)
            smaller = max(1, target * keep // len(compressed)) if compressed else target
            if len(compressed) <= keep or smaller == target:
                break
            target = smaller
        return list(compressed[:keep]), {"llmlingua_tokens": len(compressed), "llmlingua_attempts": attempt}


BASELINES: dict[str, type[TextContextMethod]] = {
    "uncompressed": Uncompressed,
    "closed-book": ClosedBook,
    "truncate-head": TruncateHead,
    "truncate-tail": TruncateTail,
    "llmlingua": LLMLingua,
}
