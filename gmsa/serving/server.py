"""``gmsa serve``: an HTTP API over one GMSA model and a persistent compressed-context store.

The model is loaded once; every model call runs on one worker thread that micro-batches
concurrent requests and interleaves their work (see :mod:`gmsa.serving.scheduler`). Build the app yourself with
:func:`create_app` (tests inject a tiny model) or start it with ``gmsa serve``.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from ..api import GMSA
from ..cli_options import add_options, from_args
from ..engines import add_engine_args, engine_from_args
from ..version import __version__
from .guards import GuardMiddleware, install_error_handlers, require_api_key
from .metrics import ObserveMiddleware, ServerMetrics
from .openai_api import add_openai_routes
from .schemas import (
    CONFLICT,
    ERROR_RESPONSES,
    NOT_FOUND,
    PROMETHEUS_TEXT,
    AnswerRequest,
    AnswerResponse,
    CompressRequest,
    CompressResponse,
    ContextInfo,
    Health,
    ReconstructRequest,
    ReconstructResponse,
    state_limits,
)
from .service import GMSAService
from .settings import ServeSettings
from .store import ContextStore, StoreError

API_KEY_ENV = "GMSA_API_KEY"
log = logging.getLogger(__name__)


def create_app(
    gmsa: GMSA,
    store: ContextStore | str | os.PathLike,
    settings: ServeSettings | None = None,
    close_store: bool | None = None,
) -> FastAPI:
    """The FastAPI app serving ``gmsa`` with contexts kept in ``store`` (a store or its directory).

    The store is closed when the app shuts down if ``close_store`` (default: if it was given as a path).
    """
    settings = settings or ServeSettings()
    owns_store = not isinstance(store, ContextStore) if close_store is None else close_store
    store = store if isinstance(store, ContextStore) else ContextStore(store)
    service = GMSAService(gmsa, store, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.worker.start()
        yield
        await run_in_threadpool(service.worker.stop)
        if owns_store:
            store.close()

    app = FastAPI(
        title="gmsa",
        version=__version__,
        description="Compress long contexts into soft tokens once, answer many questions from them (GMSA).",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    metrics = ServerMetrics(lambda: service.worker.queue_depth, service.store.stats, lambda: service.worker.running)
    service.worker.on_batch = metrics.observe_batch
    service.worker.on_unit = lambda kind: metrics.units.labels(kind).inc()
    service.worker.on_cancel = lambda reason: metrics.cancelled.labels(reason).inc()
    app.state.settings, app.state.service, app.state.metrics = settings, service, metrics
    app.add_middleware(GuardMiddleware, api_key=settings.api_key, max_bytes=settings.max_body_bytes)
    app.add_middleware(ObserveMiddleware, metrics=metrics)  # outermost: it also counts what the guards refuse
    install_error_handlers(app)
    auth = [Depends(require_api_key)] if settings.api_key else []  # so the schema says a key is needed
    _state_limits_in_schema(app, settings)
    _add_docs(app, auth)
    _add_routes(app, service, auth)
    add_openai_routes(app, service, auth)
    return app


def _state_limits_in_schema(app: FastAPI, settings: ServeSettings) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = state_limits(FastAPI.openapi(app), settings)
        return app.openapi_schema

    app.openapi = openapi


def _add_docs(app: FastAPI, auth: list) -> None:
    """The OpenAPI schema (no Swagger UI: it loads its code from a CDN; open the schema in any viewer)."""

    @app.get("/openapi.json", include_in_schema=False, dependencies=auth)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())


def _add_routes(app: FastAPI, service: GMSAService, auth: list) -> None:
    errors = ERROR_RESPONSES

    @app.get("/healthz", response_model=Health, tags=["service"])
    def healthz() -> JSONResponse:
        """Liveness: 200 while the model worker can take requests (no API key needed)."""
        alive = service.worker.healthy
        payload = {"status": "ok" if alive else "worker stopped", "worker_alive": alive}
        return JSONResponse(payload, 200 if alive else 503)

    @app.head("/healthz", include_in_schema=False)
    def healthz_head() -> Response:
        return Response(status_code=200 if service.worker.healthy else 503)

    @app.get("/metrics", tags=["service"], dependencies=auth, responses=errors | PROMETHEUS_TEXT)
    def metrics() -> Response:
        """Prometheus text format: requests and latency by route and status, batches, queue depth, store size."""
        return Response(app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/stats", tags=["service"], dependencies=auth, responses=errors)
    def stats() -> dict:
        """The same in JSON: request counts and latency percentiles per route, batching, store size."""
        worker = service.worker
        stats = worker.stats
        return app.state.metrics.json.snapshot() | {
            "worker": {
                "queue_depth": worker.queue_depth,
                "max_queue": service.settings.max_queue,
                "batches": stats.batches,
                "tasks": stats.tasks,
                "items": stats.items,
                "mean_batch_items": round(stats.items / max(1, stats.batches), 2),
                "max_batch_items": stats.max_batch_items,
                "busy_s": round(stats.busy_s, 3),
                "units": stats.units,
                "cancelled": stats.cancelled,
                "running": worker.running,
            },
            "store": service.store.stats(),
            "model": {
                "checkpoint_id": service.gmsa.checkpoint_id,
                "backbone": service.gmsa.config.backbone,
                "backbone_fingerprint": service.gmsa.config.backbone_fingerprint,
                "engine": getattr(service.gmsa.engine, "name", "hf"),
            },
        }

    contexts = {"tags": ["contexts"], "dependencies": auth}
    stored = contexts | {"responses": errors | NOT_FOUND}
    answers = {"tags": ["answers"], "dependencies": auth, "responses": errors | NOT_FOUND | CONFLICT}

    @app.post("/v1/contexts", response_model=CompressResponse, responses=errors, **contexts)
    async def create_contexts(body: CompressRequest) -> CompressResponse:
        """Compress and store texts; the same text, rate and model always get the same id."""
        summaries, timings = await service.compress(body)
        n_tokens = sum(s.n_tokens for s in summaries)
        n_soft = sum(s.n_soft_tokens for s in summaries)
        return CompressResponse(
            contexts=summaries,
            n_tokens=n_tokens,
            n_soft_tokens=n_soft,
            compression_ratio=round(n_tokens / max(1, n_soft), 4),
            timings=timings,
        )

    @app.get("/v1/contexts/{context_id}", response_model=ContextInfo, **stored)
    async def get_context(context_id: str) -> dict:
        """Metadata of a stored context."""
        return (await service.record(context_id)).to_dict()

    @app.delete("/v1/contexts/{context_id}", status_code=204, **stored)
    async def delete_context(context_id: str) -> Response:
        """Delete a stored context."""
        await service.delete(context_id)
        return Response(status_code=204)

    @app.post("/v1/answers", response_model=AnswerResponse, **answers)
    async def answer(body: AnswerRequest) -> AnswerResponse:
        """Answer questions from stored contexts or a raw text (greedy decoding)."""
        answers, ids, timings = await service.answer(body)
        return AnswerResponse(answers=answers, context_ids=ids, timings=timings)

    @app.post("/v1/reconstructions", response_model=ReconstructResponse, **answers)
    async def reconstruct(body: ReconstructRequest) -> ReconstructResponse:
        """Ask the decoder to restate a stored context from its soft tokens."""
        text, timings = await service.reconstruct(body.context_id)
        return ReconstructResponse(context_id=body.context_id, text=text, timings=timings)


# --------------------------------------------------------------------- command line
def register(subparsers) -> None:
    """Add ``gmsa serve`` to the CLI."""
    p = subparsers.add_parser("serve", help="serve the HTTP API (compress, store, answer)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--store", default="./gmsa-store", help="directory of the compressed-context store")
    p.add_argument("--model", default=None, help="GMSA checkpoint directory (default: the shipped one)")
    p.add_argument("--backbone", default=None, help="load the backbone from this local directory instead")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_engine_args(p, default="hf")  # in-process: batches requests together and streams tokens
    add_options(p, ServeSettings)
    p.set_defaults(func=cmd_serve)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """The server's settings from ``gmsa serve``'s options; the API key from the environment when not given."""
    return from_args(ServeSettings, args, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None)


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    if not settings.api_key and not _is_loopback(args.host):
        log.warning("serving on %s without an API key: anyone who can reach it can use it", args.host)
    try:
        store = ContextStore(Path(args.store))  # before the model: a store in use fails fast
    except StoreError as err:
        print(f"gmsa serve: error: {err}", file=sys.stderr)
        return 2
    try:
        gmsa = GMSA.from_pretrained(args.model, backbone=args.backbone)
        gmsa.engine = engine_from_args(args, gmsa)
        app = create_app(gmsa, store, settings, close_store=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    finally:
        store.close()  # uvicorn re-raises SIGTERM/SIGINT after its shutdown, so the app's lifespan closes it too
    return 0
