"""Job lifecycle rules shared by the API and the worker.

queued -> running -> succeeded | failed | cancelled, with a transient cancelling.
Terminal states never change: every transition is a conditional UPDATE that
cannot overwrite one, so a late worker write cannot resurrect a cancelled job.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from .models import Job, JobEvent, utcnow

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
STATUSES = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")


def update_job(session: Session, job_id: str, **fields: Any) -> bool:
    """Set fields on a job that is not terminal yet; False if it already was."""
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.status.not_in(TERMINAL)).values(updated_at=utcnow(), **fields)
    )
    return result.rowcount == 1


def add_event(session: Session, job_id: str, kind: str, message: str = "", stage: str | None = None, data: dict | None = None) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, stage=stage, message=message, data=data))
