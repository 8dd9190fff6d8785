"""What every decoding engine shares (:mod:`gmsa.engines`, :mod:`gmsa.llamacpp`): the engine interface,
what it reads of a GMSA, its error, and what identifies an exported decoder."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from .config import GMSAConfig
from .fast_decode import FastDecoder
from .model import GMSAModel
from .version import __version__


class GMSALike(Protocol):
    """What an engine reads of a :class:`gmsa.GMSA` (named by its shape: the API imports this module, not back)."""

    model: GMSAModel
    tokenizer: PreTrainedTokenizerBase
    checkpoint_id: str
    fast_decoder: FastDecoder

    @property
    def config(self) -> GMSAConfig: ...

    @property
    def inference_dtype(self) -> torch.dtype: ...

    def compile(self) -> GMSALike: ...


class EngineUnavailableError(RuntimeError):
    """The requested engine cannot run here (e.g. vLLM is not installed)."""


class Engine(ABC):
    """Greedy text from prompt embeddings (one ``(n_i, H)`` tensor per request)."""

    name = "engine"
    streams = False  # whether :meth:`generate` takes a ``streamer`` (``transformers.TextStreamer``'s put/end)
    compiled = False  # whether it runs gmsa's CPU path compiled ahead of time (then so should the encoder)

    @abstractmethod
    def generate(
        self,
        prompt_embeds: list[torch.Tensor],
        max_new_tokens: int | list[int],
        repetition_penalty: float = 1.0,
        min_new_tokens: int = 0,
        repeat_ngram: int = 0,
    ) -> list[str]:
        """Answer each ``(n_i, H)`` prompt with at most ``max_new_tokens`` (per prompt, or one for all) tokens,
        and no end-of-sequence before ``min_new_tokens`` tokens. ``repeat_ngram`` ``n > 0``: stop an answer
        once its last ``n`` tokens repeat (as :func:`gmsa.decoding.greedy_steps`; an engine that cannot
        says so in its documentation and decodes up to the limit)."""


def per_prompt_limits(max_new_tokens: int | list[int], n: int) -> list[int]:
    """``max_new_tokens`` for each of ``n`` prompts (one number for all, or one per prompt)."""
    return [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)


def export_info(gmsa: GMSALike) -> dict:
    """What identifies the decoder of ``gmsa`` (written next to an export, checked on reuse)."""
    config = gmsa.config
    return {
        "gmsa_version": __version__,
        "checkpoint_id": gmsa.checkpoint_id,
        "backbone_fingerprint": config.backbone_fingerprint,
        "decoder_tuning": config.decoder_tuning,
    }
