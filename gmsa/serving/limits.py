"""Size limits of ``gmsa serve`` in characters and tokens, checked before a request is queued (``TooLargeError``)."""

from __future__ import annotations

import copy
import json
import math

from ..api import GMSA
from .errors import TooLargeError
from .settings import ServeSettings


class Limits:
    """Counts tokens with its own copy of the model's tokenizer (so request threads never share the worker's)."""

    def __init__(self, gmsa: GMSA, settings: ServeSettings):
        self.settings = settings
        self.tokenizer = copy.deepcopy(gmsa.tokenizer)
        self.ae_prompt_tokens = self.count([gmsa.config.ae_prompt])[0]

    def count(self, texts: list[str]) -> list[int]:
        """Tokens of each text (no special tokens, as the model tokenizes contexts and questions)."""
        if not texts:
            return []
        return [len(row) for row in self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]

    # ----------------------------------------------------------------- characters and counts
    def check_texts(self, texts: list[str], what: str) -> None:
        """At most ``max_batch`` texts of at most ``max_text_chars`` characters."""
        settings = self.settings
        if len(texts) > settings.max_batch:
            raise TooLargeError(f"{len(texts)} {what}, more than this server's limit of {settings.max_batch}")
        for i, text in enumerate(texts):
            if len(text) > settings.max_text_chars:
                limit = settings.max_text_chars
                raise TooLargeError(f"{what}[{i}] has {len(text)} characters, more than this server's limit of {limit}")

    def check_metadata(self, metadata: dict | None) -> None:
        size = len(json.dumps(metadata or {}, ensure_ascii=False).encode("utf-8", "replace"))
        if size > self.settings.max_metadata_bytes:
            limit = self.settings.max_metadata_bytes
            raise TooLargeError(f"metadata is {size} bytes of JSON, more than this server's limit of {limit}")

    # ----------------------------------------------------------------- tokens
    def check_tokens(self, counts: list[int], what: str, limit: int) -> None:
        for i, n in enumerate(counts):
            if n > limit:
                raise TooLargeError(f"{what}[{i}] has {n} tokens, more than this server accepts ({limit})")

    def check_request(self, total: int) -> None:
        """All texts and questions of one request together."""
        if total > self.settings.max_request_tokens:
            limit = self.settings.max_request_tokens
            raise TooLargeError(
                f"the request has {total} tokens of text and questions, more than this server accepts ({limit})"
            )

    def texts_to_compress(self, texts: list[str], what: str = "texts") -> list[int]:
        """Token counts of texts to compress, within the per-text, per-request and per-batch limits."""
        counts = self.count(texts)
        self.check_tokens(counts, what, self.settings.max_text_tokens)
        self.check_request(sum(counts))
        self.check_batch(sum(counts), "texts to compress")
        return counts

    def questions(self, questions: list[str], n_soft: list[int], max_new_tokens: int) -> int:
        """Check each question and its prompt (soft tokens + question + new tokens); the answer's batch cost."""
        counts = self.count(questions)
        self.check_tokens(counts, "questions", self.settings.max_question_tokens)
        self.check_request(sum(counts))
        sequences = [soft + n + max_new_tokens for soft, n in zip(n_soft, counts)]
        self.check_sequences(sequences, "soft tokens + question + max_new_tokens")
        self.check_batch(sum(sequences), "prompts + new tokens")
        return sum(sequences)

    def reconstruction(self, n_soft: int, n_tokens: int, slack: float = 1.25) -> int:
        """The batch cost of restating one context (its soft tokens, the prompt, up to ``n_tokens * slack + 8`` new)."""
        sequence = n_soft + self.ae_prompt_tokens + math.ceil(n_tokens * slack) + 8
        self.check_sequences([sequence], "soft tokens + prompt + new tokens")
        return sequence

    def check_sequences(self, sequences: list[int], what: str) -> None:
        limit = self.settings.max_sequence_tokens
        for i, n in enumerate(sequences):
            if n > limit:
                raise TooLargeError(f"answer {i} needs {n} positions ({what}), more than this server accepts ({limit})")

    def check_batch(self, tokens: int, what: str) -> None:
        """One request must fit in one micro-batch (``max_batch_tokens``)."""
        limit = self.settings.max_batch_tokens
        if tokens > limit:
            raise TooLargeError(
                f"the request needs {tokens} tokens of {what} in one batch; this server's limit is {limit}"
            )
