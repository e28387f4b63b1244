"""The job run, top to bottom: claim → inputs → run → artifacts → finish.

Each message carries one job id; the database row is the truth. An attempt runs the job only
while it holds the row's claim (worker.lease); every write names that claim.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

from sqlalchemy import select

from jobspec import JobConfig
from jobstore import blob_keys
from jobstore.blobs import BlobStore
from jobstore.db import session_scope
from jobstore.jobs import TIMEOUT, add_event, claim_job, fresh_claim, timeout_message
from jobstore.models import Artifact, Dataset, Job, Model, utcnow
from jobstore.settings import TASK_RUN_JOB, Settings, get_settings
from jobstore.statuses import JobStatus
from masktune_core import JobCancelled, MaskTuneError, MaskTuneRun, ProgressEvent
from masktune_core import runfolder as rf
from masktune_core.metrics import headline

from . import metrics as job_metrics  # not `metrics`: the run's results go by that name here
from .celery_app import app
from .dataset_cache import DatasetCache, prune
from .estimate import FinishEstimate
from .inputs import extraction_limits, fetch_dataset
from .lease import Claim
from .workspace import Workspace

log = logging.getLogger(__name__)

STALE_CLAIM_MARGIN_S = 1.0  # a delivery that waits for a claim to go stale comes back this long after it did


class RuntimeLimitExceeded(MaskTuneError):
    """The job reached its deadline (its first start + max_runtime_s): it fails, it is not cancelled."""

    code = TIMEOUT


# Retries are bounded by waited_for (one per attempt that holds the job), not by a count.
@app.task(name=TASK_RUN_JOB, bind=True, max_retries=None)
def run_job(self, job_id: str, waited_for: str | None = None) -> None:
    """Claim the job, then run it.

    A worker killed mid-job (the OOM killer) gets its message back at once, while its claim still
    looks fresh. So a delivery that finds another attempt holding a fresh claim comes back (a Celery
    retry) just after that claim goes stale unless it beats, naming the attempt it waited for
    (``waited_for``); finding that same attempt still beating then means it is alive, and the
    delivery is a duplicate. Duplicates and deliveries of finished or deleted jobs are dropped.
    """
    settings = get_settings()
    token = secrets.token_hex(16)
    with session_scope(settings.database_url) as session:
        outcome = claim_job(session, job_id, token, heartbeat_timeout_s=settings.heartbeat_timeout_s,
                            max_attempts=settings.max_attempts)
        holder = fresh_claim(session, job_id, settings.heartbeat_timeout_s) if outcome == "busy" else None
    if outcome == "exhausted":
        log.warning("job %s failed: too many attempts (max %d)", job_id, settings.max_attempts)
        job_metrics.job_finished(JobStatus.FAILED)
    elif holder is not None and holder.token != waited_for:
        countdown = holder.stale_in_s + STALE_CLAIM_MARGIN_S
        log.info("job %s: claim %s is fresh; this delivery comes back in %.1f s, when it is stale unless its worker lives",
                 job_id, holder.token, countdown)
        raise self.retry(kwargs={"waited_for": holder.token}, countdown=countdown)
    elif outcome == "busy":
        log.info("job %s is not claimable (finished, deleted, or another worker holds it); dropping this delivery", job_id)
    else:
        workspace = Workspace(BlobStore(settings.blob_url), settings.work_dir, job_id, token)
        try:
            with Claim(settings, job_id, token) as claim, job_metrics.job_run(job_id):
                _run_claimed(settings, claim, workspace)
        finally:
            workspace.remove()


def _run_claimed(settings: Settings, claim: Claim, workspace: Workspace) -> None:
    try:
        inputs = _gather_inputs(settings, claim, workspace)
        metrics = _run(settings, claim, workspace, inputs)
        if not claim.beat():
            return  # taken over meanwhile: the new owner uploads its own artifacts
        artifacts = _store_artifacts(workspace.blobs, claim.job_id, workspace.root / rf.OUT)
    except JobCancelled:
        if not claim.lost:
            _finish(settings, claim, JobStatus.CANCELLED, "cancelled by request")
        return
    except MaskTuneError as exc:
        _finish(settings, claim, JobStatus.FAILED, str(exc), error_code=exc.code, error_message=str(exc))
        return
    except Exception as exc:
        log.exception("job %s failed", claim.job_id)
        _finish(settings, claim, JobStatus.FAILED, "internal error", error_code="internal_error",
                error_message=f"{type(exc).__name__}: {str(exc)[:500]}")
        return
    _finish(settings, claim, JobStatus.SUCCEEDED, metrics["verdict"]["message"], artifacts, progress=1.0,
            metrics_summary=headline(metrics))


# ---------------------------------------------------------------- inputs


@dataclass
class JobInputs:
    config: JobConfig
    data: Path  # the dataset on local disk
    dataset_sha256: str
    cache: DatasetCache  # its decoded copy, shared with other jobs and machines
    initial_weights: Path | None
    max_runtime_s: int | None
    deadline: datetime | None  # the run stops between batches once it passes


def _gather_inputs(settings: Settings, claim: Claim, workspace: Workspace) -> JobInputs:
    """The job's config, dataset and starting weights on local disk, and the work of earlier attempts."""
    with session_scope(settings.database_url) as session:
        job = session.scalar(select(Job).where(Job.id == claim.job_id))
        dataset = session.scalar(select(Dataset).where(Dataset.id == job.dataset_id))
        model = session.scalar(select(Model).where(Model.id == job.model_id)) if job.model_id else None
        config = JobConfig.model_validate(job.config)
        source = (dataset.blob_key, dataset.filename, dataset.source_url, dataset.sha256)
        cache = DatasetCache(workspace.blobs, settings.dataset_cache_dir, dataset.id, dataset.sha256)
        weights = (model.blob_key, model.filename) if model else None
        max_runtime_s, deadline = job.max_runtime_s, job.deadline_at
    if deadline is not None and deadline.tzinfo is None:
        deadline = deadline.replace(tzinfo=timezone.utc)  # SQLite: naive UTC
    restored = workspace.restore()  # the work of earlier attempts, from any machine
    if restored:
        _note(settings, claim, f"resuming from {restored} stored work files", data={"restored_files": restored})
    data = fetch_dataset(settings, workspace.blobs, workspace.root, *source)
    initial = None
    if weights:
        initial = workspace.root / rf.input_file("weights", weights[1])
        workspace.blobs.get_file(weights[0], initial)
    return JobInputs(config, data, source[3], cache, initial, max_runtime_s, deadline)


# ---------------------------------------------------------------- run


def _run(settings: Settings, claim: Claim, workspace: Workspace, inputs: JobInputs) -> dict:
    """MaskTune on the inputs, its events written to the job; returns the metrics."""
    cache = inputs.cache
    with cache.in_use():
        prune(settings.dataset_cache_dir, settings.work_retention_s)
        reporter = JobReporter(settings, claim, workspace, after_prepare=lambda: cache.publish(run.input_size),
                               estimate=FinishEstimate(inputs.config), deadline=inputs.deadline)
        run = MaskTuneRun(inputs.data, workspace.root / rf.OUT, inputs.config, workdir=workspace.workdir,
                          initial_weights=inputs.initial_weights, device=settings.device, on_event=reporter,
                          should_cancel=reporter.should_cancel, cache_dir=settings.dataset_cache_dir,
                          dataset_sha256=inputs.dataset_sha256, extraction_limits=extraction_limits(settings))
        if cache.fetch(run.input_size):
            _note(settings, claim, "fetched the decoded dataset from storage", stage="prepare")
        try:
            return run.run()
        except JobCancelled:
            if reporter.timed_out:
                raise RuntimeLimitExceeded(timeout_message(inputs.max_runtime_s)) from None
            raise


class JobReporter:
    """Turns pipeline events into job rows and events: stages and epochs always, progress throttled;
    at each epoch, the estimated finish."""

    def __init__(self, settings: Settings, claim: Claim, workspace: Workspace, after_prepare: Callable[[], None],
                 estimate: FinishEstimate, deadline: datetime | None):
        self.settings = settings
        self.claim = claim
        self.job_id = claim.job_id
        self.workspace = workspace
        self.after_prepare = after_prepare
        self.estimate = estimate
        self.deadline = deadline
        self.timed_out = False
        self._last_write = 0.0
        self._last_cancel_check = 0.0
        self._cancel = False

    def __call__(self, event: ProgressEvent) -> None:
        if self.claim.lost:
            return
        job_metrics.on_event(event)
        now = time.monotonic()
        seconds_left = self.estimate.seconds_left(event, now)
        finish = {} if seconds_left is None else {"estimated_finish_at": utcnow() + timedelta(seconds=seconds_left)}
        # A resumed ERM reports where it picked up: kept as an event, so clients (and tests) see it.
        keep = event.kind in ("stage", "info", "epoch", "warning") or "resumed_from_epoch" in event.data
        if not keep and now - self._last_write < self.settings.progress_interval_s:
            return
        self._last_write = now
        if event.kind in ("stage", "epoch") and self.claim.beat():
            self.workspace.sync()  # what finished before this event survives a crash
            if event.kind == "stage" and event.stage != "prepare":
                self.after_prepare()
        with session_scope(self.settings.database_url) as session:
            if self.claim.write(session, stage=event.stage, progress=round(event.progress, 4), **finish) and keep:
                kind = "info" if event.kind == "progress" else event.kind
                add_event(session, self.job_id, kind, event.message, event.stage, event.data or None)

    def should_cancel(self) -> bool:
        """True once a cancel was asked for, once the job's deadline passed (``timed_out``), or once
        this attempt lost its claim."""
        now = time.monotonic()
        if not self._cancel and now - self._last_cancel_check >= min(self.settings.progress_interval_s, 0.5):
            self._last_cancel_check = now
            with session_scope(self.settings.database_url) as session:
                self._cancel = bool(session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))
        if not self._cancel and self.deadline is not None and utcnow() >= self.deadline:
            self.timed_out = True
        return self._cancel or self.timed_out or self.claim.lost


def _note(settings: Settings, claim: Claim, message: str, **fields) -> None:
    """An info event, while the claim holds."""
    with session_scope(settings.database_url) as session:
        if claim.write(session):
            add_event(session, claim.job_id, "info", message, **fields)


# ---------------------------------------------------------------- artifacts and finish


def _store_artifacts(blobs: BlobStore, job_id: str, out_dir: Path) -> list[Artifact]:
    """Upload each artifact (atomically); returns the rows, which the terminal write records."""
    rows = []
    for name, content_type in rf.ARTIFACTS.items():
        path = out_dir / name
        if not path.exists():
            continue
        key = blob_keys.job_artifact(job_id, name)
        size, sha256 = blobs.put_file(key, path)
        rows.append(Artifact(job_id=job_id, name=name, blob_key=key, size_bytes=size, sha256=sha256, content_type=content_type))
    return rows


def _finish(settings: Settings, claim: Claim, status: JobStatus, message: str, artifacts: list[Artifact] = (),
            **fields) -> None:
    """The terminal write, with the artifact rows, in one transaction: only while the claim holds."""
    with session_scope(settings.database_url) as session:
        if claim.write(session, status=status, finished_at=utcnow(), **fields):
            job_metrics.job_finished(status)
            for artifact in artifacts:
                session.merge(artifact)
            code = {"code": fields["error_code"]} if "error_code" in fields else {}
            add_event(session, claim.job_id, "status", message, data={"status": status, **code})
