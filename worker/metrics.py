"""Prometheus metrics of a Celery worker, and the log fields of a job's run (job_id, stage).

With MASKTUNE_WORKER_METRICS_PORT set, the worker's parent process serves them (any path, e.g.
``/metrics``). Tasks run in child processes, a fresh one per task, so the metrics use
prometheus_client's multiprocess mode: each child writes its values to files in a folder of
this worker's own, and the parent's exporter sums them when scraped. prometheus_client reads
that folder's name when it is imported, so the folder is made here, on import: the worker
imports this module before it forks any child.

The job run (worker.tasks) calls three hooks: :func:`job_run` around a claimed attempt,
:func:`on_event` with each pipeline event, :func:`job_finished` with the final status.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

from celery import signals

from jobstore.logs import annotate, log_context
from jobstore.settings import get_settings

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
PORT = get_settings().worker_metrics_port
# This worker's folder, not one under the data dir: workers on one host may share that.
OWN_DIR = None
if PORT and MULTIPROC_DIR_ENV not in os.environ:
    OWN_DIR = os.environ[MULTIPROC_DIR_ENV] = tempfile.mkdtemp(prefix="masktune-worker-metrics-")

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server  # noqa: E402

log = logging.getLogger(__name__)

STAGE_SECONDS = Histogram(
    "masktune_stage_duration_seconds",
    "Seconds a job's stage ran (prepare, erm, saliency, finetune, evaluate, export), observed when the next "
    "one starts or the job succeeds; the stage a job fails or is cancelled in is left out.",
    ["stage"], buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400))
JOBS_FINISHED = Counter("masktune_jobs_finished", "Jobs this worker finished, by final status.", ["status"])
EPOCHS = Counter("masktune_epochs", "Training epochs completed, by phase (erm, finetune).", ["phase"])
JOBS_RUNNING = Gauge("masktune_worker_jobs_running", "Jobs running in this worker's processes.", multiprocess_mode="livesum")


@dataclass
class _StageClock:
    stage: str | None = None
    since: float = 0.0

    def switch(self, stage: str | None) -> None:
        """End the running stage (observing its time) and start ``stage`` (None: none)."""
        now = time.monotonic()
        if self.stage is not None:
            STAGE_SECONDS.labels(self.stage).observe(now - self.since)
        self.stage, self.since = stage, now


_clock: ContextVar[_StageClock | None] = ContextVar("masktune_stage_clock", default=None)


@contextmanager
def job_run(job_id: str) -> Iterator[None]:
    """Around one claimed attempt: its log lines carry job_id (and the stage), it counts as running,
    its stages are timed."""
    token = _clock.set(_StageClock())
    try:
        with log_context(job_id=job_id), JOBS_RUNNING.track_inprogress():
            yield
    finally:
        _clock.reset(token)


def on_event(event) -> None:
    """A pipeline event (masktune_core.ProgressEvent) of the running job."""
    clock = _clock.get()
    if event.kind == "stage" and clock is not None:
        clock.switch(event.stage)
        annotate(stage=event.stage)
        log.info("stage %s started", event.stage)
    elif event.kind == "epoch":
        EPOCHS.labels(event.data.get("phase", event.stage)).inc()


def job_finished(status: str) -> None:
    clock = _clock.get()
    if clock is not None and status == "succeeded":
        clock.switch(None)
    JOBS_FINISHED.labels(status).inc()
    log.info("job finished: %s", status)


class _DeadChildren:
    """Before each scrape, drop the running-jobs gauge of children that died without exiting
    (SIGKILL, the OOM killer); children that exit drop theirs themselves."""

    def collect(self) -> list:
        for path in glob.glob(os.path.join(os.environ[MULTIPROC_DIR_ENV], "gauge_live*_*.db")):
            pid = int(path[:-len(".db")].rsplit("_", 1)[1])
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                multiprocess.mark_process_dead(pid)
            except PermissionError:
                pass  # alive, someone else's (a reused pid)
        return []


@signals.worker_ready.connect
def _start_exporter(**_) -> None:
    if not PORT:
        return
    registry = CollectorRegistry()
    registry.register(_DeadChildren())  # registered first: it runs before the files are read
    multiprocess.MultiProcessCollector(registry)
    try:
        start_http_server(PORT, registry=registry)
    except OSError as exc:  # the port is taken (another worker on this host): run without
        log.warning("worker metrics: cannot serve on port %d (%s); this worker exports no metrics", PORT, exc)
    else:
        log.info("worker metrics on port %d", PORT)


@signals.worker_process_shutdown.connect
def _child_exits(pid: int, **_) -> None:
    if MULTIPROC_DIR_ENV in os.environ:
        multiprocess.mark_process_dead(pid)


@signals.worker_shutdown.connect
def _remove_own_dir(**_) -> None:
    if OWN_DIR:
        shutil.rmtree(OWN_DIR, ignore_errors=True)
