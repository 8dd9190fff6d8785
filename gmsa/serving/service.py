"""What the routes do: limits, the store and the model worker, without HTTP plumbing.

Refusals and failures are :mod:`gmsa.serving.errors`; the HTTP layer gives them their status codes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from starlette.concurrency import run_in_threadpool

from ..api import GMSA
from ..compressed import Compressed
from .batcher import (
    AnswerTask,
    CompressTask,
    QueueFullError,
    ReconstructTask,
    RequestTooLargeError,
    Task,
    TaskResult,
    concat,
    join_rows,
)
from .errors import (
    BusyError,
    ClientGoneError,
    ConflictError,
    DamagedContextError,
    InvalidRequestError,
    NotFoundError,
    TimedOutError,
    TooLargeError,
    shorten,
)
from .guards import CLIENT_RECEIVE
from .limits import Limits
from .scheduler import JobFuture, ModelWorker, WorkCancelledError
from .schemas import AnswerRequest, CompressRequest, ContextSummary, Timings
from .settings import ServeSettings
from .store import ContextRecord, ContextStore, StoreError, content_sha256, context_id

log = logging.getLogger(__name__)


class Deadline:
    """The time left of one request's budget."""

    def __init__(self, seconds: float):
        self.started = time.perf_counter()
        self.seconds = seconds
        self.at = self.started + seconds  # on the time.perf_counter() clock

    def left(self) -> float:
        return max(0.0, self.at - time.perf_counter())

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


async def _client_gone(receive) -> None:
    """Returns once the client has disconnected (called after the request body was read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class GMSAService:
    """Compress, store, answer and reconstruct, within the server's limits."""

    def __init__(self, gmsa: GMSA, store: ContextStore, settings: ServeSettings):
        self.gmsa = gmsa
        self.store = store
        self.settings = settings
        self.limits = Limits(gmsa, settings)
        self.worker = ModelWorker(gmsa, settings)

    # ----------------------------------------------------------------- model calls
    async def run(self, task: Task, deadline: Deadline, cost: int = 0) -> TaskResult:
        """Run a task on the model worker; ``BusyError`` if its queue is full, ``TimedOutError`` past the deadline.

        ``cost`` is the task's tokens (see :class:`Limits`): the worker's micro-batches stay under
        ``max_batch_tokens``.
        """
        future = self.submit(task, deadline, cost)
        waiter = asyncio.wrap_future(future)
        receive = CLIENT_RECEIVE.get(None)
        gone = asyncio.ensure_future(_client_gone(receive)) if receive is not None else None
        try:
            done, _ = await asyncio.wait(
                [w for w in (waiter, gone) if w is not None], timeout=deadline.left(), return_when="FIRST_COMPLETED"
            )
        except asyncio.CancelledError:
            future.abandon("cancelled")
            raise
        finally:
            if gone is not None:
                gone.cancel()
        if waiter not in done:
            future.abandon("client gone" if gone in done else "deadline")
            waiter.cancel()
            if gone in done:
                raise ClientGoneError("the client closed the connection")
            raise TimedOutError(f"timed out after {deadline.seconds:g} s waiting for the model")
        return self.result(waiter, deadline)

    def submit(self, task: Task, deadline: Deadline, cost: int = 0) -> JobFuture:
        """Queue a task on the model worker (``BusyError`` if its queue is full)."""
        try:
            return self.worker.submit(task, cost, deadline.at)
        except QueueFullError as err:
            raise BusyError(f"{err}: retry later") from err

    @staticmethod
    def result(waiter: asyncio.Future, deadline: Deadline) -> TaskResult:
        """A finished task's result, or its error as a service error."""
        try:
            return waiter.result()
        except WorkCancelledError as err:
            raise TimedOutError(f"timed out after {deadline.seconds:g} s waiting for the model") from err
        except RequestTooLargeError as err:
            raise TooLargeError(str(err)) from err
        except (ValueError, TypeError) as err:
            raise InvalidRequestError(str(err)) from err

    # ----------------------------------------------------------------- routes
    async def compress(self, body: CompressRequest) -> tuple[list[ContextSummary], Timings]:
        deadline = Deadline(self.settings.request_timeout_s)
        texts = body.items()
        self.limits.check_texts(texts, "texts")
        self.limits.check_metadata(body.metadata)
        rate = body.rate or self.gmsa.config.default_rate
        shas = [content_sha256(text) for text in texts]
        ids = [context_id(sha, rate, self.gmsa.config.backbone_fingerprint, self.gmsa.checkpoint_id) for sha in shas]
        records = await run_in_threadpool(lambda: {i: self.store.get(i) for i in set(ids)})
        damaged = await run_in_threadpool(lambda: {i for i, r in records.items() if r and not self.store.is_intact(i)})
        todo = {i: (sha, text) for i, sha, text in zip(ids, shas, texts) if records[i] is None or i in damaged}
        result = None
        created: set[str] = set()
        if todo:
            todo_texts = [text for _, text in todo.values()]
            counts = await run_in_threadpool(self.limits.texts_to_compress, todo_texts)
            task = CompressTask(todo_texts, rate, self.settings.max_text_tokens)
            result = await self.run(task, deadline, sum(counts))
            for (new_id, (sha, _)), compressed in zip(todo.items(), result.value):
                records[new_id], was_new = await run_in_threadpool(self._keep, new_id in damaged, sha, compressed, body)
                created.update([new_id] if was_new else [])
        summaries = []
        for i in ids:
            summaries.append(_summary(records[i], i in created, i in damaged))
            created.discard(i)  # a text given twice is created (or repaired) once
            damaged.discard(i)
        return summaries, _timings(deadline, result, compress=True)

    def _keep(
        self, repair: bool, sha: str, compressed: Compressed, body: CompressRequest
    ) -> tuple[ContextRecord, bool]:
        """Store a new context, or rewrite the damaged blob of a stored one."""
        if repair:
            return self.store.repair(sha, compressed, self.gmsa.config.backbone), False
        return self.store.put(sha, compressed, self.gmsa.config.backbone, body.metadata)

    async def record(self, context_id_: str) -> ContextRecord:
        """The record of a stored context (``NotFoundError`` if there is none)."""
        record = await run_in_threadpool(self.store.get, context_id_)
        if record is None:
            raise NotFoundError(f"no context with id {shorten(context_id_)!r}")
        return record

    async def delete(self, context_id_: str) -> None:
        """Delete a stored context (``NotFoundError`` if there is none)."""
        if not await run_in_threadpool(self.store.delete, context_id_):
            raise NotFoundError(f"no context with id {shorten(context_id_)!r}")

    async def stored(self, ids: list[str]) -> dict[str, Compressed]:
        """Soft tokens of stored contexts (``NotFoundError``: an unknown id, ``ConflictError``: another model's)."""
        found = {}
        for i in dict.fromkeys(ids):
            self.check_same_model(await self.record(i))
            try:
                found[i] = await run_in_threadpool(self.store.load, i)
            except KeyError as err:  # deleted meanwhile
                raise NotFoundError(f"no context with id {shorten(i)!r}") from err
            except StoreError as err:
                log.error("stored context %s is damaged: %s", i, err)
                raise DamagedContextError(
                    f"stored context {i} is damaged (its file does not match what was written): "
                    "POST its text again to repair it"
                ) from err
        return found

    async def prompt_context(
        self, ids: list[str], texts: list[str], rate: int | None, deadline: Deadline
    ) -> tuple[Compressed, TaskResult | None]:
        """Stored contexts ``ids`` then ``texts`` compressed at ``rate`` (not stored), as one row of soft tokens."""
        parts = []
        if ids:
            stored = await self.stored(ids)
            parts += [stored[i] for i in ids]
        result = None
        if texts:
            self.limits.check_texts(texts, "context_texts")
            counts = await run_in_threadpool(self.limits.texts_to_compress, texts, "context_texts")
            task = CompressTask(texts, rate or self.gmsa.config.default_rate, self.settings.max_text_tokens)
            result = await self.run(task, deadline, sum(counts))
            parts.append(result.value)
        return join_rows(concat(parts)), result

    def check_same_model(self, record: ContextRecord) -> None:
        config = self.gmsa.config
        ours = (config.backbone_fingerprint, self.gmsa.checkpoint_id)
        if (record.backbone_fingerprint, record.checkpoint_id) != ours:
            raise ConflictError(
                f"context {record.id} was made by checkpoint {record.checkpoint_id} on backbone "
                f"{record.backbone_fingerprint}; this server runs {self.gmsa.checkpoint_id} on "
                f"{config.backbone_fingerprint}: compress the text again",
            )

    async def answer(self, body: AnswerRequest) -> tuple[list[str], list[str | None], Timings]:
        deadline = Deadline(self.settings.request_timeout_s)
        questions = body.question_list()
        self.limits.check_texts(questions, "questions")
        limit = self.settings.max_new_tokens
        if body.max_new_tokens > limit and "max_new_tokens" in body.model_fields_set:
            raise InvalidRequestError(f"max_new_tokens {body.max_new_tokens} is over this server's limit of {limit}")
        max_new_tokens = min(body.max_new_tokens, limit)
        compressed_result = None
        if body.text is not None:
            self.limits.check_texts([body.text], "text")
            rate = body.rate or self.gmsa.config.default_rate
            (n_text,) = await run_in_threadpool(self.limits.texts_to_compress, [body.text], "text")
            await run_in_threadpool(
                self.limits.questions, questions, [math.ceil(n_text / rate)] * len(questions), max_new_tokens
            )
            task = CompressTask([body.text], rate, self.settings.max_text_tokens)
            compressed_result = await self.run(task, deadline, n_text)
            contexts, ids = [compressed_result.value[0]], [None]
        else:
            ids = body.context_ids or [body.context_id]
            stored = await self.stored(ids)
            contexts = [stored[i] for i in ids]
        if len(contexts) == 1:
            contexts, ids = contexts * len(questions), ids * len(questions)
        n_soft = [part.n_soft_tokens[0] for part in contexts]
        cost = await run_in_threadpool(self.limits.questions, questions, n_soft, max_new_tokens)
        task = AnswerTask(concat(contexts), questions, max_new_tokens, body.repetition_penalty)
        result = await self.run(task, deadline, cost)
        timings = _timings(deadline, result)
        if compressed_result is not None:
            timings.compress_ms = round(compressed_result.run_s * 1000, 2)
            timings.queue_ms = round((compressed_result.queue_s + result.queue_s) * 1000, 2)
            timings.batch_items = max(timings.batch_items, compressed_result.batch_items)
        return result.value, ids, timings

    async def reconstruct(self, context_id_: str) -> tuple[str, Timings]:
        deadline = Deadline(self.settings.request_timeout_s)
        record = await self.record(context_id_)
        if record.n_tokens > self.settings.max_reconstruct_tokens:
            raise TooLargeError(
                f"context has {record.n_tokens} tokens; this server reconstructs at most "
                f"{self.settings.max_reconstruct_tokens}"
            )
        cost = self.limits.reconstruction(record.n_soft_tokens, record.n_tokens)
        compressed = (await self.stored([context_id_]))[context_id_]
        result = await self.run(ReconstructTask(compressed), deadline, cost)
        return result.value[0], _timings(deadline, result)


def _summary(record: ContextRecord, created: bool, repaired: bool = False) -> ContextSummary:
    return ContextSummary(
        id=record.id,
        rate=record.rate,
        n_tokens=record.n_tokens,
        n_soft_tokens=record.n_soft_tokens,
        compression_ratio=round(record.compression_ratio, 4),
        created=created,
        repaired=repaired,
    )


def _timings(deadline: Deadline, result: TaskResult | None, compress: bool = False) -> Timings:
    run_ms = round(result.run_s * 1000, 2) if result else 0.0
    return Timings(
        queue_ms=round(result.queue_s * 1000, 2) if result else 0.0,
        compress_ms=run_ms if compress else 0.0,
        generate_ms=0.0 if compress else run_ms,
        total_ms=round(deadline.elapsed_ms(), 2),
        batch_items=result.batch_items if result else 0,
    )
