"""Fixtures of the serving tests: a tiny random GMSA, started apps, a paused model worker, a real uvicorn server."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import ExitStack, contextmanager

import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from gmsa import GMSA
from gmsa.serving.batcher import CompressTask
from gmsa.serving.server import create_app
from gmsa.serving.settings import ServeSettings
from tests.conftest import make_gmsa

BLOCKER = "Group merging averages the hidden states of consecutive tokens."


@pytest.fixture(scope="module")
def model(backbone_dir) -> GMSA:
    """A tiny random GMSA in fp32, single-threaded (fast and steady on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make_gmsa(backbone_dir)
    torch.set_num_threads(threads)


@pytest.fixture
def serve(model, tmp_path):
    """``serve(store=None, **settings)`` -> a started TestClient; every one is shut down after the test."""
    with ExitStack() as stack:

        def start(store=None, raise_server_exceptions=True, **overrides) -> TestClient:
            app = create_app(model, store or tmp_path / "store", ServeSettings(**overrides))
            return stack.enter_context(TestClient(app, raise_server_exceptions=raise_server_exceptions))

        yield start


@pytest.fixture
def busy_worker(model, monkeypatch):
    """``with busy_worker(client) as task:`` the model worker is inside a compression (``task``, a future)
    that waits until the block exits; the block's own requests queue behind it."""

    @contextmanager
    def occupied(client: TestClient):
        gate, entered = threading.Event(), threading.Event()
        compress_steps = model.compress_steps

        def waiting_compress_steps(*args, **kwargs):  # what the worker calls, one unit per step
            entered.set()
            gate.wait(20)
            return (yield from compress_steps(*args, **kwargs))

        monkeypatch.setattr(model, "compress_steps", waiting_compress_steps)
        task = client.app.state.service.worker.submit(CompressTask([BLOCKER], 4, 64))
        assert entered.wait(10)
        try:
            yield task
        finally:
            gate.set()
            task.result(10)

    return occupied


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def live_server(model, tmp_path):
    """``live_server(**settings)`` -> (base URL, app) of a real uvicorn server on loopback (stopped after the test)."""
    servers = []

    def start(**overrides):
        app = create_app(model, tmp_path / "live-store", ServeSettings(**overrides))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{server.config.port}", app

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(20)
