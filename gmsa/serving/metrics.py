"""What ``gmsa serve`` counts: Prometheus metrics (``GET /metrics``) and a JSON summary (``GET /v1/stats``).

:class:`ObserveMiddleware` times every request (including those refused before routing, such as
401s) and answers an unexpected exception with a JSON 500 itself, so the connection stays usable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter as Tally
from collections import defaultdict, deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .asgi import HTTPMiddleware

log = logging.getLogger(__name__)
LATENCY_WINDOW = 2048
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class RequestMetrics:
    """Counts requests per route and status; keeps the latest latencies per route (the JSON view)."""

    def __init__(self, window: int = LATENCY_WINDOW):
        self.started = time.time()
        self._lock = threading.Lock()
        self._counts: Tally[tuple[str, int]] = Tally()
        self._latencies: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=window))

    def observe(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._counts[(route, status)] += 1
            self._latencies[route].append(seconds)

    def snapshot(self) -> dict:
        """Per route: requests by status and latency p50/p90/p99/max in ms over the latest window."""
        with self._lock:
            counts = dict(self._counts)
            latencies = {route: list(values) for route, values in self._latencies.items()}
        routes: dict[str, dict] = {}
        for (route, status), count in sorted(counts.items()):
            entry = routes.setdefault(route, {"requests": 0, "by_status": {}})
            entry["requests"] += count
            entry["by_status"][str(status)] = count
        for route, values in latencies.items():
            routes[route]["latency_ms"] = {
                "count": len(values),
                "p50": round(percentile(values, 50) * 1000, 2),
                "p90": round(percentile(values, 90) * 1000, 2),
                "p99": round(percentile(values, 99) * 1000, 2),
                "max": round(max(values) * 1000, 2),
            }
        return {
            "uptime_s": round(time.time() - self.started, 1),
            "requests": sum(counts.values()),
            "routes": routes,
        }


class _StoreCollector(Collector):
    """Store size, read when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self):
        stats = self.stats()
        yield GaugeMetricFamily("gmsa_store_contexts", "compressed contexts in the store", value=stats["contexts"])
        yield GaugeMetricFamily("gmsa_store_blob_bytes", "bytes of soft tokens on disk", value=stats["blob_bytes"])


class ServerMetrics:
    """The Prometheus registry of one app (one per app, so several apps can live in one process)."""

    def __init__(
        self,
        queue_depth: Callable[[], float],
        store_stats: Callable[[], dict],
        running: Callable[[], float] = lambda: 0,
    ):
        self.registry = registry = CollectorRegistry()
        self.json = RequestMetrics()
        labels = ["method", "route", "status"]
        self.requests = Counter("gmsa_http_requests", "HTTP requests answered", labels, registry=registry)
        self.latency = Histogram(
            "gmsa_http_request_duration_seconds",
            "HTTP request latency",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_items = Histogram(
            "gmsa_batch_items",
            "texts or questions per model micro-batch",
            ["kind"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "gmsa_batch_duration_seconds",
            "model time per micro-batch",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.units = Counter(
            "gmsa_work_units", "scheduled work units run (windows, decode steps)", ["kind"], registry=registry
        )
        self.cancelled = Counter(
            "gmsa_requests_cancelled", "requests stopped at a unit boundary", ["reason"], registry=registry
        )
        depth = Gauge("gmsa_queue_depth", "requests waiting for the model worker", registry=registry)
        depth.set_function(queue_depth)
        active = Gauge("gmsa_running_batches", "micro-batches started and not finished", registry=registry)
        active.set_function(running)
        registry.register(_StoreCollector(store_stats))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        labels = (method, route, str(status))
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)
        self.json.observe(f"{method} {route}", status, seconds)

    def observe_batch(self, kind: str, items: int, seconds: float) -> None:
        self.batch_items.labels(kind).observe(items)
        self.batch_seconds.labels(kind).observe(seconds)

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format."""
        return generate_latest(self.registry)


def route_name(scope: Scope) -> str:
    """The route template a request matched (bounded label values: never the raw path)."""
    route = scope.get("route")
    if route is None and "app" in scope:
        for candidate in scope["app"].router.routes:
            if candidate.matches(scope)[0] == Match.FULL:
                route = candidate
                break
    return getattr(route, "path", "unmatched")


class ObserveMiddleware(HTTPMiddleware):
    """Counts and times every request; an unexpected exception becomes a JSON 500 (no dropped connection)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        super().__init__(app)
        self.metrics = metrics

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 0

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except Exception as exc:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"], exc_info=exc)
            if status:  # the answer has begun: nothing else can be sent
                raise
            detail = f"internal server error ({type(exc).__name__}); see the server log"
            await JSONResponse({"detail": detail}, 500)(scope, receive, observed_send)
        finally:
            self.metrics.observe(scope["method"], route_name(scope), status or 500, time.perf_counter() - started)
