"""Request counters and latency percentiles for ``GET /metrics`` (in memory, since start)."""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict, deque

LATENCY_WINDOW = 2048


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
    """Counts requests per route and status; keeps the latest latencies per route."""

    def __init__(self, window: int = LATENCY_WINDOW):
        self.started = time.time()
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, int]] = Counter()
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
