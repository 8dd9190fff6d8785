"""Greedy decoding from input embeddings with a KV cache reserved up front.

``transformers``' ``generate`` grows its default cache by concatenation: every new token
copies the whole cache of every layer, which on a 2k-token CPU prompt made each decoding
step several times slower than the step itself. A static cache avoids the copies but makes
the prefill attend over the full reserved length with an explicit mask (slower than causal
flash attention). Here the prefill runs the causal fast path and writes into buffers sized for
``prompt + max_new_tokens``; each step writes one slot and attends over the filled prefix.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Generator
from typing import Any, ParamSpec, TypeVar

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

P = ParamSpec("P")
R = TypeVar("R")


class ReservedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values live in buffers of ``capacity`` positions.

    ``keys``/``values`` are views ``(B, heads, filled, head_dim)`` of the buffers, so the
    model and the mask code see exactly the filled length, as with a ``DynamicLayer``.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.filled = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        batch, heads, _, key_dim = key_states.shape
        self._keys = key_states.new_empty(batch, heads, self.capacity, key_dim)
        self._values = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.filled + key_states.shape[-2]
        if end > self.capacity:
            self._grow(max(end, 2 * self.capacity))
        self._keys[:, :, self.filled : end] = key_states
        self._values[:, :, self.filled : end] = value_states
        first_update, self.filled = self.filled == 0, end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        if first_update:  # the prefill attends over exactly these (contiguous) tensors
            return key_states, value_states
        return self.keys, self.values

    def _grow(self, capacity: int) -> None:
        for name in ("_keys", "_values"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:2], capacity, old.shape[-1])
            new[:, :, : self.filled] = old[:, :, : self.filled]
            setattr(self, name, new)
        self.capacity = capacity


def reserved_cache(decoder: PreTrainedModel, capacity: int) -> DynamicCache:
    """A cache for ``decoder`` whose full-attention layers reserve ``capacity`` positions.

    Sliding-window (or other special) layers keep the type ``transformers`` picks for them.
    """
    cache = DynamicCache(config=decoder.config)
    cache.layers = [ReservedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def kv_cache_bytes(cache: DynamicCache) -> int:
    """Bytes of the filled keys and values over all layers (what the tokens occupy)."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def penalise_repeats(logits: torch.Tensor, generated: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL repetition penalty on the tokens generated so far (as ``transformers`` applies it).

    ``logits`` ``(B, V)``, ``generated`` ``(B, n)`` token ids -> penalised ``(B, V)``.
    """
    if penalty == 1.0 or generated.shape[1] == 0:
        return logits
    scores = logits.gather(1, generated)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(1, generated, scores)


class RepeatDetector:
    """Flags a sample whose last ``n`` generated tokens already occurred in that order before."""

    def __init__(self, batch: int, n: int):
        self.n = n
        self.seen: list[set[tuple[int, ...]]] = [set() for _ in range(batch)]

    def update(self, generated: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        """``(B, steps)`` ids so far, ``(B,)`` already-finished flags -> ``(B,)`` "just looped" flags."""
        looped = torch.zeros_like(finished)
        if self.n < 1 or generated.shape[1] < self.n:
            return looped
        for i, row in enumerate(generated[:, -self.n :].tolist()):
            gram = tuple(row)
            if not finished[i]:
                looped[i] = gram in self.seen[i]
                self.seen[i].add(gram)
        return looped


def drain(steps: Generator[Any, Any, R]) -> R:
    """Run a step-wise generator (``greedy_steps``, ``GMSA.compress_steps``) to its end; return its value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def run_to_end(steps: Callable[P, Generator[Any, Any, R]], name: str) -> Callable[P, R]:
    """The plain function ``name`` of a step-wise one: the same parameters, the generator's return value.

    ``greedy_generate = run_to_end(greedy_steps, "greedy_generate")`` states the parameters once;
    type checkers, IDEs and ``help`` show them on both functions.
    """

    @functools.wraps(steps)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return drain(steps(*args, **kwargs))

    run.__name__, run.__qualname__ = name, steps.__qualname__.removesuffix(steps.__name__) + name
    run.__doc__ = f"{steps.__name__} run to its end: what it returns.\n\n{inspect.cleandoc(steps.__doc__ or '')}"
    run.__signature__ = inspect.signature(steps).replace(return_annotation=inspect.Signature.empty)
    return run


@torch.inference_mode()
def greedy_steps(
    decoder: PreTrainedModel,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    repetition_penalty: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    min_new_tokens: int = 0,
    repeat_ngram: int = 0,
    streamer=None,
) -> Generator[torch.Tensor, None, tuple[torch.Tensor, DynamicCache]]:
    """Greedy decoding after one prefill over left-padded input embeddings, one forward pass per step.

    Args:
        inputs_embeds: ``(B, T, H)`` prompt embeddings, left-padded.
        attention_mask: ``(B, T)`` 1 for real positions.
        eos_token_id: a sample stops after emitting it (later slots get ``pad_token_id``);
            ``None`` always generates ``max_new_tokens`` tokens.
        min_new_tokens: EOS is not chosen before this many tokens (1: never an empty answer).
        repeat_ngram: ``n > 0`` stops a sample once its last ``n`` tokens repeat ``n`` tokens it
            generated before (greedy decoding that loops never leaves the loop).
        streamer: a ``transformers`` streamer (e.g. ``TextStreamer``) that gets each new token;
            batch size 1 only.

    Yields the ``(B, n)`` ids generated so far after each token (the first after the prefill), for a
    server that interleaves requests; closing the generator stops the decoding.

    Returns:
        ``(B, n)`` generated ids (``n <= max_new_tokens``: stops early once all samples ended),
        and the cache (prompt + generated tokens). :func:`greedy_generate` runs it to its end.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    batch, length, _ = inputs_embeds.shape
    if streamer is not None and batch != 1:
        raise ValueError(f"a streamer needs one prompt at a time, got {batch}")
    loops = RepeatDetector(batch, repeat_ngram)
    cache = reserved_cache(decoder, length + max_new_tokens)
    mask = attention_mask.to(torch.long)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    generated = torch.empty(batch, 0, dtype=torch.long, device=inputs_embeds.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=inputs_embeds.device)
    output = decoder(
        inputs_embeds=inputs_embeds,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    next_position = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        logits = penalise_repeats(output.logits[:, -1].float(), generated, repetition_penalty)
        if eos_token_id is not None and step < min_new_tokens:
            logits[:, eos_token_id] = float("-inf")
        token = torch.where(finished, torch.full_like(finished, pad_token_id, dtype=torch.long), logits.argmax(dim=-1))
        if eos_token_id is not None:
            finished |= token == eos_token_id
        generated = torch.cat([generated, token[:, None]], dim=1)
        finished |= loops.update(generated, finished)
        if streamer is not None:
            streamer.put(token.cpu())
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        yield generated
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        output = decoder(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=next_position,
            past_key_values=cache,
            use_cache=True,
        )
        next_position = next_position + 1
    if streamer is not None:
        streamer.end()
    return generated, cache


greedy_generate = run_to_end(greedy_steps, "greedy_generate")
"""Greedy decoding after one prefill: :func:`greedy_steps` run to its end, ``(B, n)`` ids and the cache."""


def answer_texts(tokenizer, output: torch.Tensor, max_new_tokens: list[int]) -> list[str]:
    """Greedy output ids ``(B, n)`` as text: row ``i`` keeps at most ``max_new_tokens[i]`` tokens, cut at EOS."""
    return [
        tokenizer.decode(row[:limit], skip_special_tokens=True).strip()
        for row, limit in zip(output.tolist(), max_new_tokens)
    ]


def greedy_texts(
    decoder: PreTrainedModel,
    tokenizer,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: list[int],
    repetition_penalty: float = 1.0,
    **stopping,
) -> list[str]:
    """Greedy answers as text: ``(B, T, H)`` left-padded embeds + ``(B, T)`` mask -> ``B`` strings.

    Row ``i`` keeps at most ``max_new_tokens[i]`` tokens, cut at the tokenizer's EOS.
    ``stopping``: ``min_new_tokens``, ``repeat_ngram``, ``streamer`` of :func:`greedy_generate`.
    """
    output, _ = greedy_generate(
        decoder,
        inputs_embeds,
        attention_mask,
        max(max_new_tokens),
        repetition_penalty=repetition_penalty,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **stopping,
    )
    return answer_texts(tokenizer, output, max_new_tokens)
