"""The model work of ``gmsa serve``: tasks, and how a micro-batch of them runs unit by unit.

A *task* is what one request asks of the model. Compatible tasks (compressions at one rate,
answers with the same generation options) are merged into a micro-batch, and
:func:`run_units` turns the micro-batch into a generator that does one *unit* of model work per
``next()``: one encoder batch of windows, the prefill of a batch of questions, one decode step
(all questions of the batch at once). The scheduler (:mod:`gmsa.serving.scheduler`) interleaves
the units of several micro-batches and stops one between units.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from ..api import GMSA
from ..compressed import Compressed
from ..decoding import answer_texts, greedy_steps
from ..model import pack

Units = Generator[str, None, list]  # yields the kind of each unit done; returns one value per task


class QueueFullError(RuntimeError):
    """The worker's queue is full."""


class RequestTooLargeError(ValueError):
    """A text has more tokens than the server accepts."""


def inputs() -> Any:
    """A task field holding its inputs: its length is how many items the task adds to a micro-batch."""
    return field(metadata={"inputs": True})


def shared() -> Any:
    """A task field that every task of one micro-batch has in common (part of :meth:`ModelTask.key`)."""
    return field(metadata={"shared": True})


class ModelTask:
    """What the scheduler reads of a task (a dataclass that marks its fields with :func:`inputs` and :func:`shared`)."""

    kind: ClassVar[str]

    def key(self) -> tuple:
        """Tasks with equal keys may share a micro-batch: the kind, then the values of the shared fields."""
        return (self.kind, *(getattr(self, f.name) for f in fields(self) if f.metadata.get("shared")))

    @property
    def items(self) -> int:
        return sum(len(getattr(self, f.name)) for f in fields(self) if f.metadata.get("inputs"))


@dataclass
class CompressTask(ModelTask):
    kind = "compress"
    texts: list[str] = inputs()
    rate: int = shared()
    max_tokens: int


@dataclass
class AnswerTask(ModelTask):
    kind = "answer"
    compressed: Compressed = inputs()
    questions: list[str]
    max_new_tokens: int = shared()
    repetition_penalty: float = shared()
    # called on the model thread with each question's token ids so far, after every decode step
    on_tokens: Callable[[list[list[int]]], None] | None = field(default=None, compare=False, repr=False)


@dataclass
class ReconstructTask(ModelTask):
    kind = "reconstruct"
    compressed: Compressed = inputs()


Task = CompressTask | AnswerTask | ReconstructTask


@dataclass
class TaskResult:
    """What a task produced and how long it took."""

    value: object
    queue_s: float  # from submission until its micro-batch first ran
    run_s: float  # its share of the micro-batch's model time
    batch_items: int


def run_units(gmsa: GMSA, tasks: list[Task], batch_size: int, unit_tokens: int) -> Units:
    """The unit generator of one micro-batch (every task of the same kind and key)."""
    if isinstance(tasks[0], CompressTask):
        return compress_units(gmsa, tasks, batch_size, unit_tokens)
    if isinstance(tasks[0], AnswerTask):
        return answer_units(gmsa, tasks, batch_size)
    return reconstruct_units(gmsa, tasks, batch_size)


def compress_units(gmsa: GMSA, tasks: list[CompressTask], batch_size: int, unit_tokens: int) -> Units:
    """One unit per encoder batch of windows, a batch holding at most ``unit_tokens`` tokens (one window at least)."""
    texts = [text for task in tasks for text in task.texts]
    lengths = [len(row) for row in gmsa.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]
    _check_lengths(tasks, lengths)
    longest_window = max(1, min(gmsa.config.window, max(lengths)))
    windows_per_unit = max(1, min(batch_size, unit_tokens // longest_window))
    compressed = yield from _tagged(
        gmsa.compress_steps(texts, rate=tasks[0].rate, batch_size=windows_per_unit), "encode"
    )
    return _split(compressed, [len(task.texts) for task in tasks])


def answer_units(gmsa: GMSA, tasks: list[AnswerTask], batch_size: int) -> Units:
    """One unit for each prefill and each decode step of each batch of ``batch_size`` questions.

    With an inference engine (``gmsa.engine``) the engine decodes the whole micro-batch in one unit.
    """
    merged = concat([task.compressed for task in tasks])
    questions = [question for task in tasks for question in task.questions]
    first = tasks[0]
    sizes = [len(task.questions) for task in tasks]
    if gmsa.engine is not None:
        yield "engine"
        answers = gmsa.generate(merged, questions, first.max_new_tokens, first.repetition_penalty, batch_size)
        return _split(answers, sizes)
    rows = gmsa.prompt_embeds(merged, questions)
    listeners = _row_listeners(tasks)
    answers: list[str] = []
    for start in range(0, len(rows), batch_size):
        packed = pack([[row] for row in rows[start : start + batch_size]], left_pad=True)
        steps = greedy_steps(
            gmsa.fast_decoder.of(gmsa.model.decoder),  # what GMSA.generate decodes with
            packed.inputs_embeds,
            packed.attention_mask,
            first.max_new_tokens,
            first.repetition_penalty,
            eos_token_id=gmsa.tokenizer.eos_token_id,
            pad_token_id=gmsa.tokenizer.pad_token_id,
        )
        while True:
            try:
                generated = next(steps)
            except StopIteration as done:
                output = done.value[0]
                break
            _notify(listeners, start, generated)
            yield "decode"
        _notify(listeners, start, output)
        answers += answer_texts(gmsa.tokenizer, output, [first.max_new_tokens] * output.shape[0])
    return _split(answers, sizes)


def reconstruct_units(gmsa: GMSA, tasks: list[ReconstructTask], batch_size: int) -> Units:
    """One unit for the whole micro-batch (``--max-reconstruct-tokens`` keeps it short)."""
    yield "reconstruct"
    texts = gmsa.reconstruct(concat([task.compressed for task in tasks]), batch_size=batch_size)
    return _split(texts, [len(task.compressed) for task in tasks])


def _tagged(steps: Generator, kind: str) -> Generator[str, None, object]:
    """Re-yield a model generator's steps as units of ``kind``; return what it returns."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        yield kind


def _row_listeners(tasks: list[AnswerTask]) -> list[tuple[int, int, Callable]]:
    """(first row, rows, callback) of every task that listens to its tokens."""
    listeners, row = [], 0
    for task in tasks:
        if task.on_tokens is not None:
            listeners.append((row, len(task.questions), task.on_tokens))
        row += len(task.questions)
    return listeners


def _notify(listeners: list[tuple[int, int, Callable]], offset: int, generated: torch.Tensor) -> None:
    """Give each listener its rows of ``generated`` (rows ``offset..`` of the micro-batch)."""
    for first, count, callback in listeners:
        rows = range(max(first, offset), min(first + count, offset + generated.shape[0]))
        if len(rows):
            callback([generated[row - offset].tolist() for row in rows])


def _check_lengths(tasks: list[CompressTask], lengths: list[int]) -> None:
    position = 0
    for task in tasks:
        for i in range(len(task.texts)):
            if lengths[position] > task.max_tokens:
                raise RequestTooLargeError(
                    f"text {i} has {lengths[position]} tokens, more than this server accepts ({task.max_tokens})"
                )
            position += 1


def _split(values, sizes: list[int]) -> list:
    """Cut a sequence (or a :class:`Compressed`) back into per-task parts."""
    parts, start = [], 0
    for size in sizes:
        parts.append(values[start : start + size])
        start += size
    return parts


def concat(parts: list[Compressed]) -> Compressed:
    """One :class:`Compressed` holding every text of ``parts`` (same backbone and checkpoint)."""
    first = parts[0]
    return Compressed(
        [tokens for part in parts for tokens in part.soft_tokens],
        [rate for part in parts for rate in part.rates],
        [n for part in parts for n in part.n_tokens],
        first.backbone_fingerprint,
        first.checkpoint_id,
        first.gmsa_version,
    )


def join_rows(compressed: Compressed) -> Compressed:
    """One text whose soft tokens are those of every text of ``compressed``, in order."""
    return Compressed(
        [torch.cat(compressed.soft_tokens)],
        [compressed.rates[0]],
        [sum(compressed.n_tokens)],
        compressed.backbone_fingerprint,
        compressed.checkpoint_id,
        compressed.gmsa_version,
    )
