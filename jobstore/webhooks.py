"""Webhook messages of jobs: written with the event that causes them, then delivered and retried.

Outbox: ``jobs.add_event`` calls :func:`queue_message` for every terminal status and stage
event, so a job's webhook message is a row (``webhook_deliveries``) committed in the very
transaction of its status or stage change: no change without its message, no message without
its change. The process that commits sends each new message's id to the delivery task right
after the commit (:func:`send_after_commit`); a send that was lost is made up for by the
reconciler, which re-sends pending messages past due.

Attempts (``webhook_attempts``): :func:`start_attempt` takes the next attempt of a due
message with one conditional UPDATE (two deliveries of one message cannot both attempt it)
and leases it; :func:`record_attempt` stores the outcome and says when to try again.
A 2xx delivers; 4xx other than 408 and 429 fails at once (the receiver refuses it);
anything else (another status, no answer) is retried after webhook_retry_base_s,
doubled each time, up to webhook_max_attempts.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from typing import Callable, Iterable

from sqlalchemy import event, select, update
from sqlalchemy.orm import Session

from .ids import new_id
from .models import Job, WebhookAttempt, WebhookDelivery, WebhookSecret, utcnow
from .statuses import TERMINAL, DeliveryStatus

log = logging.getLogger(__name__)


class WebhookEvent(StrEnum):
    SUCCEEDED = "job.succeeded"
    FAILED = "job.failed"
    CANCELLED = "job.cancelled"
    STAGE = "job.stage"  # the job entered a stage (prepare, erm, saliency, ...)


DEFAULT_EVENTS = (WebhookEvent.SUCCEEDED, WebhookEvent.FAILED, WebhookEvent.CANCELLED)
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # Standard Webhooks: between 24 and 64 bytes


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def event_type(kind: str, data: dict | None) -> WebhookEvent | None:
    """The webhook event of a job event, if it has one: terminal status events and stage changes."""
    if kind == "stage":
        return WebhookEvent.STAGE
    status = (data or {}).get("status")
    if kind == "status" and status in TERMINAL:
        return WebhookEvent(f"job.{status}")
    return None


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    value = value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    return value.isoformat().replace("+00:00", "Z")


# The job as a message carries it: the fields of GET /v1/jobs/{id} but the config and the estimates (GET the job for them).
_JOB_COLUMNS = (Job.id, Job.status, Job.stage, Job.progress, Job.dataset_id, Job.model_id, Job.attempts, Job.error_code,
                Job.error_message, Job.metrics_summary, Job.job_metadata, Job.created_at, Job.started_at, Job.finished_at)


def job_data(row) -> dict:
    error = {"code": row.error_code or "error", "message": row.error_message or ""} \
        if row.error_code or row.error_message else None
    return {"id": row.id, "object": "job", "status": row.status, "stage": row.stage, "progress": row.progress,
            "dataset_id": row.dataset_id, "model_id": row.model_id, "attempts": row.attempts, "error": error,
            "metrics": row.metrics_summary, "metadata": row.job_metadata or {}, "created_at": _iso(row.created_at), "started_at": _iso(row.started_at),
            "finished_at": _iso(row.finished_at)}


_UNSENT = "webhook_deliveries_unsent"


def queue_message(session: Session, job_id: str, event: WebhookEvent) -> str | None:
    """Add the job's message for ``event`` to the session's transaction, if the job has a webhook that wants it.

    Reads the job's row as this transaction sees it (columns, not the ORM object, which may be
    stale), so the message carries the change it announces. Returns the message id.
    """
    row = session.execute(select(Job.tenant_id, Job.webhook_url, Job.webhook_events_filter, *_JOB_COLUMNS)
                          .where(Job.id == job_id)).one_or_none()
    if row is None or not row.webhook_url or event not in (row.webhook_events_filter or DEFAULT_EVENTS):
        return None
    now = utcnow()
    body = json.dumps({"type": event.value, "timestamp": _iso(now), "data": job_data(row)}, separators=(",", ":"))
    message = WebhookDelivery(id=new_id("msg"), job_id=job_id, tenant_id=row.tenant_id, event_type=event.value,
                              url=row.webhook_url, body=body, status=DeliveryStatus.PENDING, attempts=0,
                              next_attempt_at=now, created_at=now)
    session.add(message)
    session.info.setdefault(_UNSENT, []).append(message.id)
    return message.id


_sender: Callable[[list[str]], None] | None = None


def send_after_commit(sender: Callable[[list[str]], None]) -> None:
    """Have this process hand the ids of the messages each commit adds to ``sender`` (which queues
    the delivery task), right after that commit. Without a sender the reconciler sends them."""
    global _sender
    _sender = sender


@event.listens_for(Session, "after_commit")
def _send_committed(session: Session) -> None:
    ids = session.info.pop(_UNSENT, None)
    if ids and _sender is not None:
        try:
            _sender(ids)
        except Exception as exc:  # the transaction stands; the reconciler sends them later
            log.warning("could not queue webhook messages %s (the reconciler re-sends them): %r", ids, exc)


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    session.info.pop(_UNSENT, None)


def secret_of(session: Session, tenant_id: str) -> WebhookSecret | None:
    return session.get(WebhookSecret, tenant_id)


# ---------------------------------------------------------------- attempts


@dataclass(frozen=True)
class Attempt:
    delivery_id: str
    number: int  # 1 for the first attempt
    url: str
    body: str
    secret: str | None
    started_at: datetime


@dataclass(frozen=True)
class Outcome:
    http_status: int | None
    error: str | None
    duration_ms: float
    final: bool = False  # no point in trying again (the URL is no longer allowed, no secret)

    @property
    def delivered(self) -> bool:
        return self.http_status is not None and 200 <= self.http_status < 300

    @property
    def refused(self) -> bool:
        """The receiver turned the message down for good: a 4xx that is not a timeout or rate limit."""
        return self.http_status is not None and 400 <= self.http_status < 500 and self.http_status not in (408, 429)


def start_attempt(session: Session, delivery_id: str, lease_s: float) -> Attempt | None:
    """Take the next attempt of a due pending message; None when it is not due, taken, or finished.

    The message stays leased for ``lease_s``: if its attempt never records an outcome (the
    process died), the reconciler finds it due again after that.
    """
    now = utcnow()
    taken = session.execute(update(WebhookDelivery).where(
        WebhookDelivery.id == delivery_id, WebhookDelivery.status == DeliveryStatus.PENDING,
        WebhookDelivery.next_attempt_at <= now).values(
        attempts=WebhookDelivery.attempts + 1, next_attempt_at=now + timedelta(seconds=lease_s))).rowcount
    if not taken:
        return None
    message = session.scalar(select(WebhookDelivery).where(WebhookDelivery.id == delivery_id))
    secret = secret_of(session, message.tenant_id)
    return Attempt(message.id, message.attempts, message.url, message.body, secret.secret if secret else None, now)


def retry_delay(number: int, base_s: float) -> float:
    """Wait after failed attempt ``number``: base, 2·base, 4·base, ..."""
    return base_s * 2 ** (number - 1)


def record_attempt(session: Session, attempt: Attempt, outcome: Outcome, *, max_attempts: int,
                   retry_base_s: float) -> float | None:
    """Store the attempt and its message's new state; the seconds until the next attempt, or None when done."""
    session.add(WebhookAttempt(delivery_id=attempt.delivery_id, attempt=attempt.number, started_at=attempt.started_at,
                               duration_ms=round(outcome.duration_ms, 1), http_status=outcome.http_status,
                               error=outcome.error))
    now = utcnow()
    retry_in = None
    if outcome.delivered:
        values = {"status": DeliveryStatus.DELIVERED, "finished_at": now, "next_attempt_at": None}
    elif outcome.final or outcome.refused or attempt.number >= max_attempts:
        values = {"status": DeliveryStatus.FAILED, "finished_at": now, "next_attempt_at": None}
    else:
        retry_in = retry_delay(attempt.number, retry_base_s)
        values = {"next_attempt_at": now + timedelta(seconds=retry_in)}
    # Only the attempt that holds the message writes it (a message deleted with its job is gone).
    session.execute(update(WebhookDelivery).where(WebhookDelivery.id == attempt.delivery_id,
                                                  WebhookDelivery.attempts == attempt.number,
                                                  WebhookDelivery.status == DeliveryStatus.PENDING).values(**values))
    return retry_in


def due_messages(session: Session, overdue_s: float, limit: int) -> Iterable[str]:
    """Pending messages due for more than ``overdue_s``: their send, or their attempt, was lost.
    Each is marked as re-sent now, so the next pass re-sends it only if it is lost again."""
    now = utcnow()
    cutoff = now - timedelta(seconds=overdue_s)
    ids = session.scalars(select(WebhookDelivery.id).where(
        WebhookDelivery.status == DeliveryStatus.PENDING, WebhookDelivery.next_attempt_at < cutoff)
        .order_by(WebhookDelivery.next_attempt_at).limit(limit)).all()
    resent = []
    for delivery_id in ids:
        if session.execute(update(WebhookDelivery).where(
                WebhookDelivery.id == delivery_id, WebhookDelivery.status == DeliveryStatus.PENDING,
                WebhookDelivery.next_attempt_at < cutoff).values(next_attempt_at=now)).rowcount:
            resent.append(delivery_id)
    return resent
