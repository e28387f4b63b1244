"""Webhooks: the tenant's signing secret, the checks of a job's webhook_url, and a job's delivery log.

Messages are written by jobstore (with the status or stage change they announce) and
sent by the worker; the API only reads them.
"""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from jobstore import models as tables
from jobstore import webhook_urls, webhooks
from jobstore.models import utcnow
from jobstore.settings import Settings

from .. import schemas
from ..deps import SessionDep, TenantDep, get_owned, lock_tenant
from ..errors import ProblemError, problems

router = APIRouter(prefix="/v1", tags=["webhooks"])


@router.post("/webhook-secret", status_code=201, response_model=schemas.WebhookSecretCreated,
             summary="Create or rotate the webhook signing secret", responses=problems(401))
def create_secret(session: SessionDep, tenant: TenantDep) -> schemas.WebhookSecretCreated:
    """A new Standard Webhooks secret (`whsec_` + base64 of 32 random bytes) for all the tenant's
    webhooks, replacing the previous one. It is shown in this answer only. Every attempt from now
    on is signed with it, including retries of messages created before."""
    lock_tenant(session, tenant)  # two rotations at once: one wins, neither fails
    row = webhooks.secret_of(session, tenant)
    if row is None:
        row = tables.WebhookSecret(tenant_id=tenant)
        session.add(row)
    row.secret, row.created_at = webhooks.new_secret(), utcnow()
    session.commit()
    return schemas.WebhookSecretCreated(secret=row.secret, created_at=row.created_at)


@router.get("/webhook-secret", response_model=schemas.WebhookSecretInfo, summary="Whether a webhook secret exists",
            responses=problems(401))
def get_secret(session: SessionDep, tenant: TenantDep) -> schemas.WebhookSecretInfo:
    row = webhooks.secret_of(session, tenant)
    return schemas.WebhookSecretInfo(exists=row is not None, created_at=row.created_at if row else None)


def check_webhook(session: Session, tenant: str, url: str | None, settings: Settings) -> None:
    """422 unless a job may send webhooks to ``url``: an allowed URL, and a tenant secret to sign with."""
    if url is None:
        return
    try:
        webhook_urls.check(url, settings.webhook_allowed_networks)
    except webhook_urls.WebhookUrlError as exc:
        raise ProblemError(422, "webhook_url_not_allowed", f"webhook_url is not allowed: {exc}.") from None
    if webhooks.secret_of(session, tenant) is None:
        raise ProblemError(422, "webhook_secret_missing", "Webhooks are signed with the tenant's secret, and it has "
                                                          "none yet: create it with POST /v1/webhook-secret, then retry.")


def delete_webhook_deliveries(session: Session, job_id: str) -> None:
    messages = select(tables.WebhookDelivery.id).where(tables.WebhookDelivery.job_id == job_id)
    session.execute(delete(tables.WebhookAttempt).where(tables.WebhookAttempt.delivery_id.in_(messages)))
    session.execute(delete(tables.WebhookDelivery).where(tables.WebhookDelivery.job_id == job_id))


@router.get("/jobs/{job_id}/webhook-deliveries", response_model=schemas.WebhookDeliveryList, tags=["jobs"],
            summary="A job's webhook messages and their attempts", responses=problems(401, 404))
def list_deliveries(job_id: str, session: SessionDep, tenant: TenantDep) -> schemas.WebhookDeliveryList:
    """Each message the job's events produced (oldest first): its type, body, status and every
    attempt with its time, duration, and HTTP status or error."""
    job = get_owned(session, tables.Job, job_id, tenant)
    messages = session.scalars(select(tables.WebhookDelivery).where(tables.WebhookDelivery.job_id == job.id)
                               .order_by(tables.WebhookDelivery.seq)).all()
    attempts: dict[str, list[tables.WebhookAttempt]] = {m.id: [] for m in messages}
    if messages:
        for row in session.scalars(select(tables.WebhookAttempt).where(tables.WebhookAttempt.delivery_id.in_(attempts))
                                   .order_by(tables.WebhookAttempt.seq)):
            attempts[row.delivery_id].append(row)
    return schemas.WebhookDeliveryList(data=[schemas.WebhookDelivery.of(m, attempts[m.id]) for m in messages])
