"""DuckLM's Prometheus metrics, on a registry of their own per runtime.

One `Metrics` per runtime (not prometheus-client's global registry), so two
services in one test process never mix their numbers. The places where
something happens call one method each (`model_called`, `tool_ran`, …);
`/metrics` (bot/health.py) first awaits `refresh()`, which reads the
store-backed gauges (tasks by status, pending approvals) in two queries, then
renders `exposition()`.

prometheus-client costs tens of milliseconds to import, so only the serving
commands (`ducklm run`, `ducklm console`) import this module; everything that
observes holds an optional `Metrics` and does nothing without one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from runtime.store.stats import StatsStore

logger = logging.getLogger("ducklm.metrics")

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds. Decisions are people: from seconds to the approval TTL (a day).
DECISION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)
# Model calls: a local model answers in 100 ms, a thinking model in minutes.
MODEL_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
# Tool runs: a file read in milliseconds, a shell command up to its timeout.
TOOL_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _StoreCollector:
    """The store-backed gauges, from the snapshot `Metrics.refresh` took just
    before the scrape (prometheus-client collects synchronously; the store is
    async)."""

    def __init__(self) -> None:
        self.tasks: dict[str, int] | None = None
        self.pending: int | None = None
        self.up = 0.0

    def describe(self) -> list[Metric]:
        return []  # nothing to check against other collectors' names at registration

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "ducklm_store_up", "Whether the last scrape could read the store (1) or not (0)."
        )
        up.add_metric([], self.up)
        yield up
        if self.tasks is not None:
            tasks = GaugeMetricFamily("ducklm_tasks", "Tasks by status.", labels=["status"])
            for status, count in sorted(self.tasks.items()):
                tasks.add_metric([status], count)
            yield tasks
        if self.pending is not None:
            pending = GaugeMetricFamily(
                "ducklm_pending_approvals", "Approvals waiting for a decision."
            )
            pending.add_metric([], self.pending)
            yield pending


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.decision_latency = Histogram(
            "ducklm_decision_latency_seconds",
            "Time from an approval's request to its decision, by decision.",
            ["decision"],
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.model_latency = Histogram(
            "ducklm_model_latency_seconds",
            "Model calls that answered (retries included), by role and model.",
            ["role", "model"],
            buckets=MODEL_BUCKETS,
            registry=r,
        )
        self.model_errors = Counter(
            "ducklm_model_errors",
            "Model calls that failed for good, by role, model and kind of error.",
            ["role", "model", "error"],
            registry=r,
        )
        self.tool_duration = Histogram(
            "ducklm_tool_duration_seconds",
            "Tool runs (not refused ones), by tool.",
            ["tool"],
            buckets=TOOL_BUCKETS,
            registry=r,
        )
        self.api_errors = Counter(
            "ducklm_platform_api_errors",
            "Chat platform API calls that failed, by platform, method and error.",
            ["platform", "method", "error"],
            registry=r,
        )
        self.rate_limited = Counter(
            "ducklm_platform_rate_limited",
            "Chat platform API answers that were rate limits (HTTP 429), by platform.",
            ["platform"],
            registry=r,
        )
        self.deduplicated = Counter(
            "ducklm_deliveries_deduplicated",
            "Deliveries already claimed (a platform's retry, a second copy, another "
            "replica's), by platform.",
            ["platform"],
            registry=r,
        )
        self.replica: Info | None = None  # set_replica: only a process with an identity
        self._store = _StoreCollector()
        r.register(self._store)
        self._stats: StatsStore | None = None

    # -- wiring ------------------------------------------------------------

    def watch_store(self, db: Any) -> None:
        """Read tasks by status and pending approvals from `db` at every scrape."""
        self._stats = StatsStore(db)

    def set_replica(self, replica_id: str, name: str) -> None:
        """ducklm_replica_info{replica_id, name}: which replica this scrape came from."""
        if self.replica is None:
            self.replica = Info(
                "ducklm_replica", "This process as a replica.", registry=self.registry
            )
        self.replica.info({"replica_id": replica_id, "name": name})

    # -- observations (one call where each thing happens) --------------------

    def decided(self, decision: str, seconds: float) -> None:
        self.decision_latency.labels(decision).observe(max(0.0, seconds))

    def model_called(self, role: str, model: str, seconds: float) -> None:
        self.model_latency.labels(role, model).observe(seconds)

    def model_failed(self, role: str, model: str, error: BaseException) -> None:
        self.model_errors.labels(role, model, error_kind(error)).inc()

    def tool_ran(self, tool: str, seconds: float) -> None:
        self.tool_duration.labels(tool).observe(seconds)

    def api_error(self, platform: str, method: str, error: str) -> None:
        self.api_errors.labels(platform, method, error).inc()

    def rate_limit(self, platform: str) -> None:
        self.rate_limited.labels(platform).inc()

    def duplicate(self, platform: str) -> None:
        self.deduplicated.labels(platform).inc()

    # -- the scrape ----------------------------------------------------------

    async def refresh(self, within: float | None = None) -> None:
        """Read the store-backed gauges (within `within` seconds). A store that
        fails leaves them out of this scrape and sets ducklm_store_up 0 (the
        rest still renders)."""
        store = self._store
        if self._stats is None:
            return
        stats = self._stats
        try:
            async with asyncio.timeout(within):
                tasks = await stats.tasks_by_status()
                pending = await stats.pending_approvals()
        except Exception as exc:  # an unreachable store must not break /metrics
            logger.warning("metrics: could not read the store: %s", exc)
            store.tasks, store.pending, store.up = None, None, 0.0
            return
        store.tasks, store.pending, store.up = tasks, pending, 1.0

    def exposition(self) -> bytes:
        """The Prometheus text format of everything in this registry."""
        return generate_latest(self.registry)

    def sample(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """One sample's current value (tests and the console read it this way)."""
        return self.registry.get_sample_value(name, dict(labels or {}))


def error_kind(error: BaseException) -> str:
    """A short, bounded label for an exception: `ModelTimeoutError` -> `timeout`."""
    name = type(error).__name__.removeprefix("Model").removesuffix("Error")
    return name.lower() or "error"
