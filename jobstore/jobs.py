"""Job lifecycle rules shared by the API, the worker and the reconciler.

queued -> running -> succeeded | failed | cancelled, with a transient cancelling.
Terminal states never change: every transition is a conditional UPDATE that
cannot overwrite one, so a late worker write cannot resurrect a cancelled job.

A worker runs a job only after *claiming* its row: one conditional UPDATE moves it
from queued (or from running with a stale heartbeat: its worker vanished) to
running, counts the attempt and stores a fresh claim token. Every later write of
that attempt names the token, so a duplicate delivery never runs a job twice at
once and a worker presumed dead that comes back cannot overwrite its successor.
The claim stays fresh while the worker's heartbeat is younger than
heartbeat_timeout_s; fresh_claim says how long until it goes stale.
"""

from __future__ import annotations

from datetime import timedelta, timezone
from typing import Any, Literal, NamedTuple

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from . import webhooks
from .models import Job, JobEvent, utcnow
from .statuses import TERMINAL, JobStatus

ClaimResult = Literal["claimed", "exhausted", "busy"]


def update_job(session: Session, job_id: str, token: str | None = None, **fields: Any) -> bool:
    """Set fields on a job that is not terminal yet (and, given a token, still claimed by it); False otherwise."""
    where = [Job.id == job_id, Job.status.not_in(TERMINAL)]
    if token is not None:
        where.append(Job.claim_token == token)
    result = session.execute(update(Job).where(*where).values(updated_at=utcnow(), **fields))
    return result.rowcount == 1


def add_event(session: Session, job_id: str, kind: str, message: str = "", stage: str | None = None, data: dict | None = None) -> None:
    """Record a job event; a terminal status or a stage change also queues the job's webhook message, in
    this same transaction (write the row's change first: the message carries the row as it then is)."""
    session.add(JobEvent(job_id=job_id, kind=kind, stage=stage, message=message, data=data))
    webhook_event = webhooks.event_type(kind, data)
    if webhook_event is not None:
        webhooks.queue_message(session, job_id, webhook_event)


def heartbeat_stale(heartbeat_timeout_s: float):
    """A job whose worker has not written a heartbeat for heartbeat_timeout_s."""
    return or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < utcnow() - timedelta(seconds=heartbeat_timeout_s))


def _give_up(session: Session, job_id: str, where: list, max_attempts: int) -> bool:
    """Fail the job (if ``where`` still holds) because every allowed attempt was used up."""
    message = (f"The job was started {max_attempts} times and its worker vanished each time (e.g. killed for "
               f"running out of memory); giving up after MASKTUNE_MAX_ATTEMPTS={max_attempts}.")
    result = session.execute(update(Job).where(Job.id == job_id, *where, Job.attempts >= max_attempts).values(
        status=JobStatus.FAILED, error_code="too_many_attempts", error_message=message, claim_token=None,
        finished_at=utcnow(), updated_at=utcnow()))
    if result.rowcount == 1:
        add_event(session, job_id, "status", message, data={"status": JobStatus.FAILED, "code": "too_many_attempts"})
    return result.rowcount == 1


def claim_job(session: Session, job_id: str, token: str, *, heartbeat_timeout_s: float, max_attempts: int) -> ClaimResult:
    """Atomically make this attempt (``token``) the job's owner.

    claimed: run it. exhausted: it would have been attempt max_attempts + 1, so the job
    failed with too_many_attempts instead. busy: queued for nobody, terminal, deleted, or
    another worker holds a fresh claim; drop the message.
    """
    claimable = or_(Job.status == JobStatus.QUEUED, and_(Job.status == JobStatus.RUNNING, heartbeat_stale(heartbeat_timeout_s)))
    now = utcnow()
    result = session.execute(update(Job).where(Job.id == job_id, claimable, Job.attempts < max_attempts).values(
        status=JobStatus.RUNNING, attempts=Job.attempts + 1, claim_token=token, heartbeat_at=now, updated_at=now,
        started_at=func.coalesce(Job.started_at, now), estimated_finish_at=None))
    if result.rowcount == 1:
        attempt, started_at, max_runtime_s = session.execute(
            select(Job.attempts, Job.started_at, Job.max_runtime_s).where(Job.id == job_id)).one()
        if max_runtime_s is not None:  # counted from the first start: later attempts keep that deadline
            session.execute(update(Job).where(Job.id == job_id, Job.deadline_at.is_(None)).values(
                deadline_at=started_at + timedelta(seconds=max_runtime_s)))
        add_event(session, job_id, "status", f"attempt {attempt} started", data={"status": JobStatus.RUNNING, "attempt": attempt})
        return "claimed"
    return "exhausted" if _give_up(session, job_id, [claimable], max_attempts) else "busy"


TIMEOUT = "timeout"  # the error code of a job stopped at its deadline


def timeout_message(max_runtime_s: int) -> str:
    return (f"The job ran past its max_runtime_s of {max_runtime_s} s, counted from its first start, "
            "and was stopped; ask for a longer max_runtime_s (or fewer epochs).")


def time_out(session: Session, job_id: str, max_runtime_s: int, grace_s: float) -> bool:
    """Fail a queued or running job whose deadline passed more than ``grace_s`` ago (a running job's
    worker stops it itself between batches; past the grace its worker is hung or gone)."""
    now = utcnow()
    result = session.execute(update(Job).where(
        Job.id == job_id, Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)),
        Job.deadline_at < now - timedelta(seconds=grace_s)).values(
        status=JobStatus.FAILED, error_code=TIMEOUT, error_message=timeout_message(max_runtime_s), claim_token=None,
        finished_at=now, updated_at=now))
    if result.rowcount == 1:
        add_event(session, job_id, "status", timeout_message(max_runtime_s), data={"status": JobStatus.FAILED, "code": TIMEOUT})
    return result.rowcount == 1


class FreshClaim(NamedTuple):
    token: str
    stale_in_s: float  # unless its worker beats again


def fresh_claim(session: Session, job_id: str, heartbeat_timeout_s: float) -> FreshClaim | None:
    """The claim of the attempt running the job with a fresh heartbeat; None when no attempt does."""
    row = session.execute(select(Job.claim_token, Job.heartbeat_at).where(
        Job.id == job_id, Job.status == JobStatus.RUNNING, ~heartbeat_stale(heartbeat_timeout_s))).one_or_none()
    if row is None:
        return None
    beat = row.heartbeat_at if row.heartbeat_at.tzinfo else row.heartbeat_at.replace(tzinfo=timezone.utc)  # SQLite: naive UTC
    return FreshClaim(row.claim_token, max(0.0, heartbeat_timeout_s - (utcnow() - beat).total_seconds()))


def recover_lost(session: Session, job_id: str, *, heartbeat_timeout_s: float, max_attempts: int) -> str | None:
    """A running or cancelling job whose worker vanished: requeue it (the caller re-sends the task), cancel it
    if that was asked for, or fail it once it used all its attempts. None when its heartbeat came back meanwhile."""
    lost = [Job.id == job_id, heartbeat_stale(heartbeat_timeout_s)]
    if session.execute(update(Job).where(*lost, Job.status == JobStatus.CANCELLING).values(
            status=JobStatus.CANCELLED, claim_token=None, finished_at=utcnow(), updated_at=utcnow())).rowcount:
        add_event(session, job_id, "status", "worker lost while cancelling; cancelled", data={"status": JobStatus.CANCELLED})
        return "cancelled"
    if _give_up(session, job_id, [*lost, Job.status == JobStatus.RUNNING], max_attempts):
        return "failed"
    if session.execute(update(Job).where(*lost, Job.status == JobStatus.RUNNING).values(
            status=JobStatus.QUEUED, claim_token=None, sent_at=utcnow(), updated_at=utcnow())).rowcount:
        add_event(session, job_id, "status", "worker lost; requeued", data={"status": JobStatus.QUEUED})
        return "requeued"
    return None
