"""One model worker thread with a bounded queue that micro-batches concurrent requests.

Requests submit *tasks*; the worker takes the oldest one, gathers whatever else is queued
(waiting at most ``batch_wait_s`` for more, up to ``max_batch_items`` texts/questions), groups
compatible tasks (compressions at one rate, answers with the same generation options) and
runs each group as one call of :class:`gmsa.GMSA`. If a group fails, its tasks are retried one
by one so that one bad request cannot fail the others.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..api import GMSA
from ..compressed import Compressed

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The worker's queue is full."""


class RequestTooLargeError(ValueError):
    """A text has more tokens than the server accepts."""


@dataclass
class CompressTask:
    texts: list[str]
    rate: int
    max_tokens: int

    def key(self) -> tuple:
        return ("compress", self.rate)


@dataclass
class AnswerTask:
    compressed: Compressed
    questions: list[str]
    max_new_tokens: int
    repetition_penalty: float

    def key(self) -> tuple:
        return ("answer", self.max_new_tokens, self.repetition_penalty)


@dataclass
class ReconstructTask:
    compressed: Compressed

    def key(self) -> tuple:
        return ("reconstruct",)


Task = CompressTask | AnswerTask | ReconstructTask


@dataclass
class TaskResult:
    """What a task produced and how long it took."""

    value: object
    queue_s: float
    run_s: float
    batch_items: int


@dataclass
class _Job:
    task: Task
    cost: int = 0  # tokens (texts to compress, or prompts + new tokens)
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def items(self) -> int:
        task = self.task
        return len(task.texts) if isinstance(task, CompressTask) else len(task.compressed)


@dataclass
class WorkerStats:
    batches: int = 0
    tasks: int = 0
    items: int = 0
    max_batch_items: int = 0
    busy_s: float = 0.0


class ModelWorker:
    """Runs every model call of the server on one thread, in micro-batches."""

    def __init__(
        self,
        gmsa: GMSA,
        max_queue: int = 64,
        max_batch_items: int = 32,
        batch_wait_s: float = 0.005,
        model_batch_size: int = 8,
    ):
        self.gmsa = gmsa
        self.max_batch_items = max_batch_items
        self.batch_wait_s = batch_wait_s
        self.model_batch_size = model_batch_size
        self.stats = WorkerStats()
        self.max_batch_tokens: int | None = None  # tokens per micro-batch (the first job always runs)
        self.on_batch: Callable[[str, int, float], None] | None = None  # (kind, items, seconds) per micro-batch
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._carry: deque[_Job] = deque()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="gmsa-model-worker", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running batch, fail what is still queued, and stop the thread."""
        thread = self._thread
        if thread is None:
            return
        while True:
            try:
                self._queue.put(None, timeout=0.1)
                break
            except queue.Full:
                self._fail_queued(RuntimeError("the server is shutting down"))
        thread.join(timeout)
        self._fail_queued(RuntimeError("the server is shutting down"))
        self._thread = None

    @property
    def healthy(self) -> bool:
        """False only if the worker thread was started and has died (it starts on demand)."""
        return self._thread is None or self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() + len(self._carry)

    def submit(self, task: Task, cost: int = 0) -> Future:
        """Queue a task that costs ``cost`` tokens; its future gets a :class:`TaskResult`.

        Raises :class:`QueueFullError`.
        """
        self.start()
        job = _Job(task, cost)
        try:
            self._queue.put_nowait(job)
        except queue.Full as err:
            raise QueueFullError(f"the model queue is full ({self._queue.maxsize} requests waiting)") from err
        return job.future

    # ----------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while True:
            jobs = self._collect()
            if jobs is None:
                return
            for group in _group_by_key(jobs):
                self._run_group(group)

    def _collect(self) -> list[_Job] | None:
        """The next micro-batch: the oldest job plus what arrives within ``batch_wait_s``."""
        first = self._carry.popleft() if self._carry else self._queue.get()
        if first is None:
            return None
        jobs, items, cost = [first], first.items, first.cost
        deadline = time.perf_counter() + self.batch_wait_s
        token_budget = self.max_batch_tokens or float("inf")
        while items < self.max_batch_items:
            job = self._next_waiting(deadline)
            if job is None:
                break
            if items + job.items > self.max_batch_items or cost + job.cost > token_budget:
                self._carry.append(job)
                break
            jobs.append(job)
            items, cost = items + job.items, cost + job.cost
        return [job for job in jobs if job.future.set_running_or_notify_cancel()]

    def _next_waiting(self, deadline: float) -> _Job | None:
        if self._carry:
            return self._carry.popleft()
        try:
            job = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
        except queue.Empty:
            return None
        if job is None:  # stop requested: finish this batch first
            self._queue.put(None)
        return job

    def _run_group(self, jobs: list[_Job]) -> None:
        started = time.perf_counter()
        try:
            values = _RUNNERS[type(jobs[0].task)](self, [job.task for job in jobs])
        except Exception as err:  # noqa: BLE001 - every request must get an answer
            if len(jobs) > 1:  # find the request that failed: run them one by one
                for job in jobs:
                    self._run_group([job])
                return
            self._record(jobs, jobs[0].items, time.perf_counter() - started)
            jobs[0].future.set_exception(err)
            return
        run_s = time.perf_counter() - started
        items = sum(job.items for job in jobs)
        self._record(jobs, items, run_s)
        for job, value in zip(jobs, values):
            job.future.set_result(TaskResult(value, started - job.enqueued, run_s * job.items / items, items))

    def _record(self, jobs: list[_Job], items: int, run_s: float) -> None:
        stats = self.stats
        stats.batches += 1
        stats.tasks += len(jobs)
        stats.items += items
        stats.max_batch_items = max(stats.max_batch_items, items)
        stats.busy_s += run_s
        if self.on_batch is not None:
            self.on_batch(jobs[0].task.key()[0], items, run_s)

    def _fail_queued(self, error: Exception) -> None:
        pending = list(self._carry)
        self._carry.clear()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                pending.append(job)
        for job in pending:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)

    # ----------------------------------------------------------------- model calls
    def _compress(self, tasks: list[CompressTask]) -> list[Compressed]:
        texts = [text for task in tasks for text in task.texts]
        lengths = [len(row) for row in self.gmsa.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        _check_lengths(tasks, lengths)
        compressed = self.gmsa.compress(texts, rate=tasks[0].rate, batch_size=self.model_batch_size)
        return _split(compressed, [len(task.texts) for task in tasks])

    def _answer(self, tasks: list[AnswerTask]) -> list[list[str]]:
        merged = concat([task.compressed for task in tasks])
        questions = [question for task in tasks for question in task.questions]
        first = tasks[0]
        answers = self.gmsa.generate(
            merged,
            questions,
            max_new_tokens=first.max_new_tokens,
            repetition_penalty=first.repetition_penalty,
            batch_size=self.model_batch_size,
        )
        return _split(answers, [len(task.questions) for task in tasks])

    def _reconstruct(self, tasks: list[ReconstructTask]) -> list[list[str]]:
        texts = self.gmsa.reconstruct(concat([task.compressed for task in tasks]), batch_size=self.model_batch_size)
        return _split(texts, [len(task.compressed) for task in tasks])


_RUNNERS: dict[type, Callable] = {
    CompressTask: ModelWorker._compress,
    AnswerTask: ModelWorker._answer,
    ReconstructTask: ModelWorker._reconstruct,
}


def _group_by_key(jobs: list[_Job]) -> list[list[_Job]]:
    """Jobs with the same task key, in order of their first arrival."""
    groups: dict[tuple, list[_Job]] = {}
    for job in jobs:
        groups.setdefault(job.task.key(), []).append(job)
    return list(groups.values())


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
