"""Prometheus collectors computing metrics at scrape time: job metrics from the job
service, engine states from a serving replica's pool.

Nothing is counted in this process: with several API replicas every one reports
the same job numbers, read from the shared job records.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from app.jobs.models import JobStatus
from app.jobs.service import JobService

if TYPE_CHECKING:
    from app.serving.service import ServingService

DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0)


def histogram_buckets(values: Sequence[float], bounds: Sequence[float]) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs, ending with ``+Inf``."""
    buckets = [(f"{b:g}", float(sum(1 for v in values if v <= b))) for b in bounds]
    return [*buckets, ("+Inf", float(len(values)))]


class JobMetricsCollector(Collector):
    def __init__(self, service: JobService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        snapshot: dict[str, Any] = self.service.metrics()
        by_status: dict[str, int] = snapshot.get("jobs_by_status", {})
        jobs = GaugeMetricFamily("realign_jobs", "Jobs by status.", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], float(by_status.get(status.value, 0)))
        yield jobs

        durations = [float(d) for d in snapshot.get("durations_s", []) if math.isfinite(d)]
        yield HistogramMetricFamily(
            "realign_job_duration_seconds",
            "Wall time of recently finished jobs, from start to finish.",
            buckets=histogram_buckets(durations, DURATION_BUCKETS),
            sum_value=sum(durations),
        )
        yield CounterMetricFamily(
            "realign_merged_bytes",
            "Bytes of merged model weights written.",
            value=float(snapshot.get("bytes_merged", 0)),
        )
        depth = GaugeMetricFamily("realign_queue_depth", "Messages waiting.", labels=["queue"])
        for queue, n in sorted(snapshot.get("queue_depths", {}).items()):
            depth.add_metric([queue], float(n))
        yield depth
        yield GaugeMetricFamily(
            "realign_workers_alive",
            "Workers whose heartbeat is fresh (jobs queue while there are none).",
            value=float(snapshot.get("workers_alive", 0)),
        )
        yield CounterMetricFamily(
            "realign_store_quarantined",
            "Stored artifacts found corrupt when read and moved to .quarantine/.",
            value=float(self.service.store.quarantine_count()),
        )


class ServingMetricsCollector(Collector):
    """Models of this replica's engine pool, by state."""

    def __init__(self, serving: ServingService) -> None:
        self.serving = serving

    def collect(self) -> Iterator[Metric]:
        states = self.serving.pool.loaded()
        models = GaugeMetricFamily(
            "realign_served_models", "Models in this replica's engines, by state.", labels=["state"]
        )
        for state in ("loading", "ready", "failed"):
            models.add_metric([state], float(sum(1 for s in states.values() if s == state)))
        yield models


def metrics_registry(
    service: JobService | None, serving: ServingService | None = None
) -> CollectorRegistry:
    """A registry of this app only (not the process-global one), so apps never clash."""
    registry = CollectorRegistry(auto_describe=False)
    if service is not None:
        registry.register(JobMetricsCollector(service))
    if serving is not None:
        registry.register(ServingMetricsCollector(serving))
    return registry
