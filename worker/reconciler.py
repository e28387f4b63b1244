"""The reconciler: puts the broker and the storage back in line with the database.

Celery beat sends it every ``reconcile_interval_s`` to the validation queue. Each
pass, with conditional updates only (two passes at once cannot double anything):

0. queued or running jobs past their deadline (first start + max_runtime_s) by more
   than ``heartbeat_timeout_s`` fail with ``timeout``: a live worker stops its job at
   the deadline itself, so such a job's worker is hung or gone.
1. running jobs whose heartbeat is older than ``heartbeat_timeout_s`` lost their
   worker: requeued and re-sent, or failed with too_many_attempts once they have
   used ``max_attempts``; a cancelling one is cancelled.
2. jobs queued for a while when the jobs queue holds fewer messages than there are
   queued jobs lost their message (a Redis restart, a crash between the API's commit
   and its send): the oldest are re-sent. A message waiting behind long jobs is not
   lost, and a duplicate is harmless anyway: only one delivery can claim the job.
3. uploads validating whose heartbeat is older than ``heartbeat_timeout_s`` (a lost
   message or worker): validation re-sent (validating twice gives the same answer).
4. jobs finished more than ``work_retention_s`` ago lose their work area
   ``jobs/{id}/work/`` (checkpoints, stage outputs); artifacts stay.
5. webhook messages due for longer than one reconcile interval lost their delivery
   task (a crash right after the commit, a lost broker message, a worker killed
   mid-attempt once its lease ran out): re-sent (only one delivery can take an attempt).
"""

from __future__ import annotations

import logging
import shutil
from datetime import timedelta

from sqlalchemy import func, select, update

from jobstore import blob_keys, webhooks
from jobstore.blobs import BlobStore
from jobstore.db import session_scope
from jobstore.jobs import heartbeat_stale, recover_lost, time_out
from jobstore.models import Dataset, Job, Model, utcnow
from jobstore.settings import Settings, get_settings
from jobstore.statuses import TERMINAL, JobStatus, UploadStatus

from .celery_app import TASK_RECONCILE, app
from .job_run import run_job
from .validation import validate_dataset, validate_model
from .webhooks import deliver_webhook

log = logging.getLogger(__name__)

BATCH = 200  # rows of each kind per pass; the next pass takes the rest


@app.task(name=TASK_RECONCILE)
def reconcile() -> dict[str, int]:
    settings = get_settings()
    counts = {
        "timed_out": _time_out_jobs(settings),
        "lost_workers": _recover_lost_jobs(settings),
        "resent_jobs": _resend_queued_jobs(settings),
        "resent_validations": _resend_validations(settings),
        "expired_work_areas": _expire_work_areas(settings),
        "resent_webhooks": _resend_webhooks(settings),
    }
    if any(counts.values()):
        log.info("reconciled: %s", counts)
    return counts


def _ids(settings: Settings, query) -> list:
    with session_scope(settings.database_url) as session:
        return list(session.execute(query.limit(BATCH)).all())


def _time_out_jobs(settings: Settings) -> int:
    cutoff = utcnow() - timedelta(seconds=settings.heartbeat_timeout_s)
    rows = _ids(settings, select(Job.id, Job.max_runtime_s).where(
        Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)), Job.deadline_at < cutoff))
    timed_out = 0
    for job_id, max_runtime_s in rows:
        with session_scope(settings.database_url) as session:
            if time_out(session, job_id, max_runtime_s, settings.heartbeat_timeout_s):
                log.warning("job %s: past its max_runtime_s (%s s) and its worker did not stop it; failed", job_id, max_runtime_s)
                timed_out += 1
    return timed_out


def _recover_lost_jobs(settings: Settings) -> int:
    rows = _ids(settings, select(Job.id).where(Job.status.in_((JobStatus.RUNNING, JobStatus.CANCELLING)),
                                               heartbeat_stale(settings.heartbeat_timeout_s)))
    for (job_id,) in rows:
        with session_scope(settings.database_url) as session:
            outcome = recover_lost(session, job_id, heartbeat_timeout_s=settings.heartbeat_timeout_s,
                                   max_attempts=settings.max_attempts)
        if outcome:
            log.warning("job %s: worker lost (no heartbeat for %ss): %s", job_id, settings.heartbeat_timeout_s, outcome)
        if outcome == "requeued":
            run_job.delay(job_id)
    return len(rows)


def _waiting(queue: str) -> int:
    """Messages the broker holds in ``queue`` (not those already delivered to a worker)."""
    with app.connection_for_read() as conn:
        try:
            return conn.default_channel.queue_declare(queue=queue, passive=True).message_count
        except conn.channel_errors:  # Redis drops the key of an empty queue: nothing waits
            return 0


def _resend_queued_jobs(settings: Settings) -> int:
    """Re-send as many of the oldest queued jobs as the jobs queue is short of messages.

    With nothing lost, every queued job has its message waiting (or being delivered) and
    nothing is re-sent, however long the queue. A wrong guess (re-sending a job whose
    message was there) only delays the lost one until the queue drains: the duplicate
    cannot run the job twice.
    """
    cutoff = utcnow() - timedelta(seconds=2 * settings.reconcile_interval_s)
    with session_scope(settings.database_url) as session:
        queued = session.scalar(select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED))
    missing = queued - _waiting(settings.jobs_queue)
    if missing <= 0:
        return 0
    rows = _ids(settings, select(Job.id).where(Job.status == JobStatus.QUEUED, Job.sent_at < cutoff).order_by(Job.sent_at))
    resent = 0
    for (job_id,) in rows[:missing]:
        with session_scope(settings.database_url) as session:
            claimed = session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.sent_at < cutoff)
                                      .values(sent_at=utcnow())).rowcount
        if claimed:
            log.warning("job %s: queued, but the broker holds %d fewer messages than there are queued jobs; re-sent",
                        job_id, missing)
            run_job.delay(job_id)
            resent += 1
    return resent


def _resend_validations(settings: Settings) -> int:
    cutoff = utcnow() - timedelta(seconds=settings.heartbeat_timeout_s)
    resent = 0
    for table, task in ((Dataset, validate_dataset), (Model, validate_model)):
        for (upload_id,) in _ids(settings, select(table.id).where(table.status == UploadStatus.VALIDATING, table.updated_at < cutoff)):
            with session_scope(settings.database_url) as session:
                claimed = session.execute(update(table).where(table.id == upload_id, table.status == UploadStatus.VALIDATING,
                                                              table.updated_at < cutoff).values(updated_at=utcnow())).rowcount
            if claimed:
                log.warning("%s %s: validating since before %s; validation re-sent", table.__tablename__, upload_id, cutoff)
                task.delay(upload_id)
                resent += 1
    return resent


def _expire_work_areas(settings: Settings) -> int:
    cutoff = utcnow() - timedelta(seconds=settings.work_retention_s)
    rows = _ids(settings, select(Job.id).where(Job.status.in_(TERMINAL), Job.finished_at < cutoff,
                                               Job.work_expired_at.is_(None)))
    blobs = BlobStore(settings.blob_url) if rows else None
    for (job_id,) in rows:
        blobs.delete_prefix(blob_keys.job_work(job_id))
        shutil.rmtree(settings.work_dir / job_id, ignore_errors=True)  # a killed attempt's leftovers, if on this machine
        with session_scope(settings.database_url) as session:
            session.execute(update(Job).where(Job.id == job_id).values(work_expired_at=utcnow()))
    return len(rows)


def _resend_webhooks(settings: Settings) -> int:
    with session_scope(settings.database_url) as session:
        ids = webhooks.due_messages(session, settings.reconcile_interval_s, BATCH)
    for delivery_id in ids:
        log.warning("webhook message %s: due for over %ss without an attempt; re-sent", delivery_id,
                    settings.reconcile_interval_s)
        deliver_webhook.delay(delivery_id)
    return len(ids)
