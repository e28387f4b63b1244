"""Prometheus metrics of the API: ``GET /metrics``, without authentication (for scrapers) and
outside the OpenAPI schema.

Counters and histograms live in each API process. ``python -m api`` with several processes sets
PROMETHEUS_MULTIPROC_DIR before they start; each process then writes its values to files there
and a scrape, whichever process answers it, sums them all (prometheus_client's multiprocess
mode). Jobs by status and the queues' depths are read when scraped: from the database and the
broker, so every process reports the same.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator

from fastapi import APIRouter, Response
from kombu.exceptions import ChannelError
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import func, select

from jobstore.db import session_scope
from jobstore.models import Job
from jobstore.settings import Settings, get_settings
from jobstore.statuses import JobStatus

from .queue import celery_app

log = logging.getLogger("api")
router = APIRouter()

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Upload routes (POST) and the kind of upload they take.
UPLOAD_ROUTES = {"/v1/datasets": "dataset", "/v1/models": "model"}
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
BROKER_TIMEOUT_S = 3

REQUEST_SECONDS = Histogram(
    "masktune_http_request_duration_seconds",
    "Seconds from a request's arrival to the start of its response (its headers), by route template: "
    "an event stream or a download counts until it starts.",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
UPLOADS = Counter("masktune_uploads", "Uploads accepted (stored and queued for validation), by kind.", ["kind"])
UPLOAD_BYTES = Counter("masktune_upload_bytes", "Bytes of the uploads accepted, by kind.", ["kind"])
UPLOAD_REJECTIONS = Counter("masktune_upload_rejections",
                            "Upload requests (POST /v1/datasets, /v1/models) answered with an error, by problem code.",
                            ["kind", "code"])


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


def upload_accepted(kind: str, size_bytes: int) -> None:
    UPLOADS.labels(kind).inc()
    UPLOAD_BYTES.labels(kind).inc(size_bytes)


def request_finished(method: str, route: str, status: int, seconds: float, problem: str | None) -> None:
    """Record one request: its latency, and a rejected upload's problem code."""
    method = method_label(method)
    REQUEST_SECONDS.labels(method, route, str(status)).observe(seconds)
    kind = UPLOAD_ROUTES.get(route)
    if kind is not None and method == "POST" and status >= 400:
        UPLOAD_REJECTIONS.labels(kind, problem or f"http_{status}").inc()


def queue_depths(settings: Settings) -> dict[str, int]:
    """Messages waiting in the jobs and validation queues (not those being worked on), as the broker
    counts them: kombu's passive declare answers for Redis (every priority list), the filesystem
    broker (its message files) and AMQP alike. A queue the broker does not know holds nothing."""
    depths = {}
    with celery_app(settings).connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=BROKER_TIMEOUT_S)
        for queue in (settings.jobs_queue, settings.validation_queue):
            with conn.channel() as channel:  # a failed passive declare closes an AMQP channel
                try:
                    depths[queue] = channel.queue_declare(queue, passive=True).message_count
                except ChannelError:
                    depths[queue] = 0
    return depths


def job_counts(settings: Settings) -> dict[str, int]:
    with session_scope(settings.database_url) as session:
        counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).tuples().all())
    return {status.value: counts.get(status, 0) for status in JobStatus}


class StateCollector:
    """Read when scraped: jobs by status (one GROUP BY) and queue depths. A source that cannot be
    read leaves its series out of that scrape (and says why in the log); the rest still answers."""

    SOURCES = (  # (metric, help, label, what is read, how it is read)
        ("masktune_jobs", "Jobs by status (database).", "status", "counting jobs", job_counts),
        ("masktune_queue_depth", "Messages waiting in a queue (broker).", "queue", "reading the queue depths", queue_depths),
    )

    def collect(self) -> Iterator[Metric]:
        settings = get_settings()
        for name, help_text, label, what, read in self.SOURCES:
            try:
                values = read(settings)
            except Exception as exc:
                log.warning("metrics: %s failed: %r", what, exc)
                continue
            gauge = GaugeMetricFamily(name, help_text, labels=[label])
            for key, value in values.items():
                gauge.add_metric([key], value)
            yield gauge


_STATE = CollectorRegistry()
_STATE.register(StateCollector())


def _process_registry() -> CollectorRegistry:
    """This process's metrics, or every API process's when they share a multiprocess folder."""
    if MULTIPROC_DIR_ENV not in os.environ:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    return Response(generate_latest(_process_registry()) + generate_latest(_STATE), media_type=CONTENT_TYPE_LATEST)
