"""One model worker thread that interleaves the work of many requests, unit by unit.

Requests submit tasks into a bounded queue. Whatever is queued when the worker looks (after
waiting ``batch_wait_ms`` for more when it was idle) is grouped into micro-batches of compatible
tasks (see :mod:`gmsa.serving.batcher`), each one a *run* that does one unit of model work per
step: an encoder batch of windows, a prefill, or one decode step.

Between two units the worker takes in new requests and picks the run that has had the least
model time, less ``scheduler_aging`` times the time it has spent waiting ("least attained service", with
aging: under a steady stream of short requests a long run still gets ``aging / (1 + aging)`` of
the model time, a third at the default 0.5). A short
request that arrives while a long one runs therefore waits for at most the unit in progress,
then runs ahead of it. Before each unit the worker drops the requests that gave up (their
deadline passed, or their client went away): a run none of whose requests still waits stops
there. If a run fails, its requests are run again one by one, so that one bad request does not
fail the others.
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

from ..api import GMSA
from .batcher import QueueFullError, Task, TaskResult, Units, run_units
from .settings import WorkerSettings

log = logging.getLogger(__name__)


class WorkCancelledError(RuntimeError):
    """A request gave up (deadline passed or client gone) and its share of the work stopped."""


class JobFuture(Future):
    """A task's future; :meth:`abandon` tells the worker to stop its work at the next unit."""

    def __init__(self):
        super().__init__()
        self.abandoned: str | None = None

    def abandon(self, reason: str) -> None:
        self.abandoned = reason


@dataclass(eq=False)  # compared by identity (tasks hold tensors)
class _Job:
    task: Task
    cost: int = 0  # tokens (texts to compress, or prompts + new tokens)
    deadline: float | None = None  # time.perf_counter() after which nobody waits for the answer
    future: JobFuture = field(default_factory=JobFuture)
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def items(self) -> int:
        return self.task.items

    def gave_up(self) -> str | None:
        if self.future.abandoned:
            return self.future.abandoned
        if self.deadline is not None and time.perf_counter() > self.deadline:
            return "deadline"
        return None


@dataclass(eq=False)
class _Run:
    jobs: list[_Job]
    units: Units
    kind: str
    served_s: float = 0.0
    first_unit: float | None = None
    created: float = field(default_factory=time.perf_counter)

    def priority(self, now: float, aging: float) -> float:
        """Model time had, less ``aging`` x time spent waiting since the run was formed (lowest runs next)."""
        waited = now - self.created - self.served_s
        return self.served_s - aging * waited


@dataclass
class WorkerStats:
    batches: int = 0
    tasks: int = 0
    items: int = 0
    max_batch_items: int = 0
    busy_s: float = 0.0
    units: int = 0
    cancelled: int = 0


class ModelWorker:
    """Runs every model call of the server on one thread, interleaving micro-batches unit by unit."""

    def __init__(self, gmsa: GMSA, settings: WorkerSettings | None = None):
        self.gmsa = gmsa
        self.settings = settings = settings or WorkerSettings()
        self.stats = WorkerStats()
        self.on_batch: Callable[[str, int, float], None] | None = None  # (kind, items, seconds) per micro-batch
        self.on_unit: Callable[[str], None] | None = None
        self.on_cancel: Callable[[str], None] | None = None  # (reason) per request stopped
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=settings.max_queue)
        self._carry: deque[_Job] = deque()
        self._runs: list[_Run] = []
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
        """Stop after the unit in progress; fail what is running or queued."""
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

    @property
    def running(self) -> int:
        """Micro-batches started and not finished."""
        return len(self._runs)

    def submit(self, task: Task, cost: int = 0, deadline: float | None = None) -> JobFuture:
        """Queue a task that costs ``cost`` tokens, wanted until ``deadline`` (``time.perf_counter()``).

        Its future gets a :class:`TaskResult`. Raises :class:`QueueFullError`.
        """
        self.start()
        job = _Job(task, cost, deadline)
        try:
            self._queue.put_nowait(job)
        except queue.Full as err:
            raise QueueFullError(f"the model queue is full ({self._queue.maxsize} requests waiting)") from err
        return job.future

    # ----------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while True:
            jobs = self._collect(block=not self._runs)
            if jobs is None:
                break
            for group in _group_by_key(jobs):
                self._runs.append(self._new_run(group))
            if self._runs:
                now = time.perf_counter()
                run = min(self._runs, key=lambda run: run.priority(now, self.settings.scheduler_aging))
                try:
                    self._step(run)
                except Exception as err:  # noqa: BLE001 - a bookkeeping bug must not stop the worker
                    log.exception("the model worker failed on a %s micro-batch", run.kind)
                    self._runs = [other for other in self._runs if other is not run]
                    self._finish_cancelled(run, f"internal error ({type(err).__name__})", RuntimeError)
        for run in self._runs:
            self._finish_cancelled(run, "the server is shutting down", RuntimeError)
        self._runs.clear()

    def _new_run(self, jobs: list[_Job]) -> _Run:
        units = run_units(
            self.gmsa, [job.task for job in jobs], self.settings.model_batch_size, self.settings.unit_tokens
        )
        return _Run(jobs, units, jobs[0].task.kind)

    def _collect(self, block: bool) -> list[_Job] | None:
        """Newly queued jobs (``None`` once stop was requested); waits for the first one if ``block``."""
        if self._carry:
            first = self._carry.popleft()
        else:
            try:
                first = self._queue.get() if block else self._queue.get_nowait()
            except queue.Empty:
                return []
        if first is None:
            return None
        jobs, items, cost = [first], first.items, first.cost
        deadline = time.perf_counter() + (self.settings.batch_wait_ms / 1000 if block else 0.0)
        token_budget = self.settings.max_batch_tokens or float("inf")  # the first job always runs
        while items < self.settings.max_batch_items:
            job = self._next_waiting(deadline)
            if job is None:
                break
            if items + job.items > self.settings.max_batch_items or cost + job.cost > token_budget:
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
        if job is None:  # stop requested: seen by the next _collect
            self._queue.put(None)
        return job

    def _step(self, run: _Run) -> None:
        """Run one unit of ``run`` (after dropping the requests that gave up); finish it if it is done."""
        for job in run.jobs:
            reason = job.gave_up()
            if reason and not job.future.done():
                self._cancel(job, reason)
        if all(job.future.done() for job in run.jobs):
            run.units.close()
            self._runs.remove(run)
            return
        started = time.perf_counter()
        run.first_unit = run.first_unit or started
        try:
            kind = next(run.units)
        except StopIteration as done:
            self._account(run, started, "finish")
            self._runs.remove(run)
            self._deliver(run, done.value)
            return
        except Exception as err:  # noqa: BLE001 - every request must get an answer
            self._account(run, started, "failed")
            self._runs.remove(run)
            self._failed(run, err)
            return
        self._account(run, started, kind)

    def _account(self, run: _Run, started: float, kind: str) -> None:
        now = time.perf_counter()
        log.debug("unit %s of a %s run (%d requests): %.3f s", kind, run.kind, len(run.jobs), now - started)
        run.served_s += now - started
        self.stats.units += 1
        self.stats.busy_s += now - started
        if self.on_unit is not None:
            self.on_unit(kind)

    def _deliver(self, run: _Run, values: list) -> None:
        items = sum(job.items for job in run.jobs)
        self._record(run, items)
        for job, value in zip(run.jobs, values):
            if not job.future.done():
                share = run.served_s * job.items / items
                job.future.set_result(TaskResult(value, run.first_unit - job.enqueued, share, items))

    def _failed(self, run: _Run, err: Exception) -> None:
        waiting = [job for job in run.jobs if not job.future.done()]
        if len(waiting) > 1:  # find the request that failed: run them one by one
            self._runs.extend(self._new_run([job]) for job in waiting)
            return
        self._record(run, sum(job.items for job in run.jobs))
        for job in waiting:
            job.future.set_exception(err)

    def _record(self, run: _Run, items: int) -> None:
        stats = self.stats
        stats.batches += 1
        stats.tasks += len(run.jobs)
        stats.items += items
        stats.max_batch_items = max(stats.max_batch_items, items)
        if self.on_batch is not None:
            self.on_batch(run.kind, items, run.served_s)

    def _cancel(self, job: _Job, reason: str) -> None:
        self.stats.cancelled += 1
        if self.on_cancel is not None:
            self.on_cancel(reason)
        job.future.set_exception(WorkCancelledError(f"stopped: {reason}"))

    def _finish_cancelled(self, run: _Run, reason: str, error: type[Exception]) -> None:
        run.units.close()
        for job in run.jobs:
            if not job.future.done():
                job.future.set_exception(error(reason))

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


def _group_by_key(jobs: list[_Job]) -> list[list[_Job]]:
    """Jobs with the same task key, in order of their first arrival."""
    groups: dict[tuple, list[_Job]] = {}
    for job in jobs:
        groups.setdefault(job.task.key(), []).append(job)
    return list(groups.values())
