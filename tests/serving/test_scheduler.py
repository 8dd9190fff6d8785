"""The model worker interleaves requests unit by unit and stops the work of requests that gave up."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

import pytest

from gmsa.serving.batcher import AnswerTask, CompressTask
from gmsa.serving.scheduler import ModelWorker, WorkCancelledError
from gmsa.serving.settings import WorkerSettings

LONG = " ".join(f"word{i % 50}" for i in range(1200))  # many windows of the tiny model (64 tokens each)
FOX = "The quick brown fox jumps over the lazy dog."


@pytest.fixture
def slow_units(model, monkeypatch):
    """Each encoder unit takes at least 20 ms more; returns the list of units run, as they finish."""
    done: list[str] = []
    compress_steps = model.compress_steps

    def slow_steps(*args, **kwargs):
        steps = compress_steps(*args, **kwargs)
        while True:
            try:
                windows = next(steps)
            except StopIteration as finished:
                return finished.value
            time.sleep(0.02)
            done.append("encode")
            yield windows

    monkeypatch.setattr(model, "compress_steps", slow_steps)
    return done


@pytest.fixture
def worker(model):
    worker = ModelWorker(model, WorkerSettings(unit_tokens=64, scheduler_aging=0.0))
    worker.start()
    yield worker
    worker.stop()


def wait_for(predicate, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_long_compression_is_split_into_window_units(worker, model, slow_units):
    result = worker.submit(CompressTask([LONG], 4, 100_000)).result(60)
    n_windows = -(-len(model.tokenizer(LONG, add_special_tokens=False)["input_ids"]) // model.config.window)
    assert len(slow_units) == n_windows > 10 and worker.stats.units == n_windows + 1  # + the unit that returns
    assert result.value[0].n_tokens == model.compress([LONG], rate=4).n_tokens


def test_a_short_request_runs_ahead_of_a_long_one(worker, model, slow_units):
    long = worker.submit(CompressTask([LONG], 4, 100_000))
    wait_for(lambda: len(slow_units) >= 3)
    context = model.compress([FOX])
    short = worker.submit(AnswerTask(context, ["What jumps?"], 4, 1.0))
    answer = short.result(60)
    assert not long.done() and len(slow_units) < 8  # the long one waited for the short one to finish
    assert answer.value == model.generate(context, ["What jumps?"], max_new_tokens=4, repetition_penalty=1.0)
    long.result(60)


def test_an_abandoned_request_stops_at_the_next_unit(worker, slow_units):
    future = worker.submit(CompressTask([LONG], 4, 100_000))
    wait_for(lambda: len(slow_units) >= 2)
    future.abandon("client gone")
    with pytest.raises(WorkCancelledError, match="client gone"):
        future.result(10)
    stopped_at = len(slow_units)
    wait_for(lambda: worker.running == 0)
    assert len(slow_units) <= stopped_at + 1 and worker.stats.cancelled == 1


def test_a_request_past_its_deadline_stops(worker, slow_units):
    future = worker.submit(CompressTask([LONG], 4, 100_000), deadline=time.perf_counter() + 0.15)
    with pytest.raises(WorkCancelledError, match="deadline"):
        future.result(20)
    wait_for(lambda: worker.running == 0)
    assert 1 <= len(slow_units) < 15


def test_streaming_listeners_get_tokens_after_every_step(worker, model):
    seen: list[list[list[int]]] = []
    task = AnswerTask(model.compress([FOX, FOX]), ["a?", "b?"], 5, 1.0, on_tokens=seen.append)
    worker.submit(task).result(30)
    assert [len(rows) for rows in seen] == [2] * len(seen) and len(seen) >= 2
    assert [len(row) for row in seen[0]] == [1, 1] and len(seen[-1][0]) == len(seen[-2][0]) + 1


def test_a_client_that_disconnects_stops_its_work(live_server, slow_units):
    url, app = live_server()
    parts = urlparse(url)
    body = ('{"text": "' + LONG + '"}').encode()
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        head = "POST /v1/contexts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for(lambda: len(slow_units) >= 2)
    worker = app.state.service.worker
    wait_for(lambda: worker.stats.cancelled == 1 and worker.running == 0)
    assert len(slow_units) < 15
    assert "gmsa_requests_cancelled_total" in app.state.metrics.exposition().decode()


def test_interleaved_answer_batches_of_different_shapes_both_finish(worker, model):
    """Two answer micro-batches in flight at once (different options, different context lengths)."""
    long, short = model.compress([FOX + " " + FOX + " It was quick."]), model.compress([FOX])
    first = worker.submit(AnswerTask(long, ["a?"], 12, 1.0))  # formed first, finishes last
    second = worker.submit(AnswerTask(short, ["b?"], 2, 1.0))
    assert second.result(30).value == model.generate(short, ["b?"], max_new_tokens=2, repetition_penalty=1.0)
    assert first.result(30).value == model.generate(long, ["a?"], max_new_tokens=12, repetition_penalty=1.0)
    assert worker.healthy and worker.running == 0
