"""Fixtures of the serving tests: a tiny random GMSA, started apps, and a real uvicorn server."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import ExitStack

import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from gmsa import GMSA, GMSAConfig
from gmsa.serving.server import create_app
from gmsa.serving.settings import ServeSettings


@pytest.fixture(scope="module")
def model(backbone_dir) -> GMSA:
    """A tiny random GMSA, single-threaded (fast and steady on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = GMSAConfig(k_enc=2, k_lsa=1, lora_r=4, lora_alpha=8, lora_dropout=0.0, max_context_tokens=64)
    yield GMSA.from_backbone(backbone_dir, config)
    torch.set_num_threads(threads)


@pytest.fixture
def serve(model, tmp_path):
    """``serve(**settings)`` -> a started TestClient; every one is shut down after the test."""
    with ExitStack() as stack:

        def start(store=None, **overrides) -> TestClient:
            app = create_app(model, store or tmp_path / "store", ServeSettings(**overrides))
            return stack.enter_context(TestClient(app))

        yield start


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
