"""Request dependencies as ``Annotated`` aliases, and the one place object queries are scoped by tenant.

Every route that touches a tenant's objects goes through :func:`get_owned` or
:func:`page_owned`: an id of another tenant answers exactly like an unknown id (404).
The tenant's limits are counted here too: :func:`check_job_slots` (active jobs) and
:func:`storage_used` (the storage quota), under :func:`lock_tenant`.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Annotated, Any, AsyncIterator, Callable, TypeVar

import anyio
import anyio.to_thread
from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from jobstore.blobs import BlobStore
from jobstore.db import autocommit, new_session
from jobstore.logs import annotate
from jobstore.models import Artifact, Dataset, Job, Model, Tenant
from jobstore.settings import Settings, get_settings
from jobstore.statuses import ACTIVE, UploadStatus
from jobstore.tenants import tenant_for_key

from .errors import ProblemError

T = TypeVar("T")


# Dependencies that do no I/O are async: FastAPI calls a sync dependency in a worker thread, and
# on the polling routes those trips cost more CPU than the database reads.
async def current_settings() -> Settings:
    return get_settings()


SettingsDep = Annotated[Settings, Depends(current_settings)]


def _end_session(session: Session, commit: bool) -> None:
    try:
        if commit:
            session.commit()
        else:
            session.rollback()
    finally:
        session.close()


# Sessions end on threads of their own: a request holding a connection must not wait for a
# thread behind requests whose threads wait for a connection (a deadlock until the pool's timeout).
_SESSION_END_THREADS = anyio.CapacityLimiter(16)


async def get_session(settings: SettingsDep) -> AsyncIterator[Session]:
    """One session per request, committed when the route returns (rolled back if it raises).

    Opening it does no I/O (it connects on its first query, in the route's thread). Ending it
    takes a trip to a thread unless the route already ended its transaction (:func:`read_in_thread`).
    """
    session = new_session(settings.database_url)
    try:
        yield session
    except BaseException:
        with anyio.CancelScope(shield=True):  # a cancelled request still returns its connection
            await anyio.to_thread.run_sync(_end_session, session, False, limiter=_SESSION_END_THREADS)
        raise
    if session.in_transaction() or session.new or session.dirty or session.deleted:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_end_session, session, True, limiter=_SESSION_END_THREADS)
    else:
        session.close()  # holds no connection: nothing to send


# scope="function": commit before the response is sent, so a client that got 201 can read its object.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


async def read_in_thread(session: Session, read: Callable[[], T]) -> T:
    """``read()``, a route's queries, in one trip to a worker thread, each statement committing on
    its own (db.autocommit: reads need no transaction; a recorded key use commits at once anyway).

    For the async polling routes: authentication and the reads in one thread, and the connection
    is back in the pool before the response is serialised on the event loop. (A sync route's
    response is serialised in yet another thread, while its session still holds the connection.)
    """
    def run() -> T:
        autocommit(session)
        try:
            result = read()
        except BaseException:
            session.rollback()
            raise
        session.commit()  # nothing to send: it returns the connection
        return result

    return await anyio.to_thread.run_sync(run)


@lru_cache
def _blob_store(url: str) -> BlobStore:
    return BlobStore(url)


async def get_blobs(settings: SettingsDep) -> BlobStore:
    return _blob_store(settings.blob_url)


BlobsDep = Annotated[BlobStore, Depends(get_blobs)]

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer mt_...` "
                                                   "(created with `python -m api.manage create-key --tenant NAME`).")


def unauthorized(detail: str) -> ProblemError:
    return ProblemError(401, "unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})


ApiKeyDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def authenticate(session: Session, credentials: HTTPAuthorizationCredentials | None) -> str:
    """The id of the tenant whose live API key authenticates the request, else 401."""
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise unauthorized("Send an API key as 'Authorization: Bearer <key>'.")
    tenant = tenant_for_key(session, credentials.credentials)
    if tenant is None:
        raise unauthorized("The API key is invalid or revoked.")
    annotate(tenant=tenant)  # on the request's log lines from here on
    return tenant


def current_tenant(session: SessionDep, credentials: ApiKeyDep) -> str:
    """:func:`authenticate` as a dependency (in its own thread). The polling routes authenticate in
    their one trip to a thread instead (:func:`read_in_thread`): ApiKeyDep, then ``authenticate``."""
    tenant = authenticate(session, credentials)
    # End the read here, in this dependency's thread: it returns the connection, so a request
    # never holds one while it waits for a thread (see get_session).
    session.commit()
    return tenant


TenantDep = Annotated[str, Depends(current_tenant)]

Owned = TypeVar("Owned", Dataset, Model, Job)

# Rows a tenant no longer sees (a deleted dataset or model is kept as a tombstone while jobs reference it).
_HIDDEN = {Dataset: (Dataset.status != UploadStatus.DELETED,), Model: (Model.status != UploadStatus.DELETED,)}
_NAMES = {Dataset: "dataset", Model: "model", Job: "job"}
# Every public id is prefix_hex: anything else (a NUL byte, 10 kB of text) is unknown without asking
# the database, which may refuse such a string outright (PostgreSQL rejects NUL in text).
_ID = re.compile(r"[A-Za-z0-9_]{1,64}")

RETRY_AFTER_S = 30


def plausible_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None


def get_owned(session: Session, table: type[Owned], object_id: str, tenant: str, *, lock: str | None = None) -> Owned:
    """The tenant's row with this public id, else a 404 problem (also for other tenants' ids).

    lock="update" or "share" takes a row lock (PostgreSQL) until the transaction ends.
    """
    row = None
    if plausible_id(object_id):
        query = select(table).where(table.id == object_id, table.tenant_id == tenant, *_HIDDEN.get(table, ()))
        if lock:
            query = query.with_for_update(read=lock == "share")
        row = session.scalar(query)
    if row is None:
        raise ProblemError(404, "not_found", f"No {_NAMES[table]} with id {object_id!r}.")
    return row


def find_owned(session: Session, table: type[Owned], tenant: str, *where: Any) -> Owned | None:
    """The tenant's (visible) row matching ``where``, or None: lookups by other keys than the id."""
    return session.scalar(select(table).where(table.tenant_id == tenant, *_HIDDEN.get(table, ()), *where))


def page_owned(session: Session, table: type[Owned], tenant: str, *, limit: int, after: str | None,
               where: tuple[Any, ...] = ()) -> tuple[list[Owned], str | None]:
    """One page of the tenant's rows, newest first; the cursor is the last row's id when more follow."""
    query = select(table).where(table.tenant_id == tenant, *_HIDDEN.get(table, ()), *where)
    if after is not None:
        # The cursor row itself may have been deleted since (tombstones keep their seq).
        seq = None
        if plausible_id(after):
            seq = session.scalar(select(table.seq).where(table.id == after, table.tenant_id == tenant))
        if seq is None:
            raise ProblemError(422, "invalid_cursor", f"Unknown cursor {after!r}: pass a next_cursor from a previous page.")
        query = query.where(table.seq < seq)
    rows = list(session.scalars(query.order_by(table.seq.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].id if more and rows else None)


# ---------------------------------------------------------------------------- tenant limits

def lock_tenant(session: Session, tenant: str) -> None:
    """Serialise the tenant's limit checks until the transaction ends.

    PostgreSQL: the tenant row FOR UPDATE. SQLite ignores FOR UPDATE, so there a no-op UPDATE
    takes the database's write lock (SQLite has one writer at a time) before the count.
    """
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(Tenant).where(Tenant.id == tenant).values(name=Tenant.name))
    else:
        session.execute(select(Tenant.id).where(Tenant.id == tenant).with_for_update())


def active_jobs(session: Session, tenant: str) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant, Job.status.in_(ACTIVE)))


def check_job_slots(session: Session, tenant: str, limit: int) -> None:
    """429 too_many_active_jobs (with Retry-After) when the tenant already has ``limit`` active jobs.

    Call under :func:`lock_tenant`, and insert the new job in the same transaction.
    """
    active = active_jobs(session, tenant)
    if active >= limit:
        raise ProblemError(429, "too_many_active_jobs",
                           f"{active} of your jobs are queued or running, the most allowed at once is {limit}; "
                           f"retry when one has finished (or cancel one).",
                           headers={"Retry-After": str(RETRY_AFTER_S)})


def storage_used(session: Session, tenant: str) -> int:
    """Bytes the tenant keeps: its uploaded datasets and models (not deleted) and its jobs' artifacts
    (datasets registered by URL stay in the tenant's own storage)."""
    datasets = select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(
        Dataset.tenant_id == tenant, Dataset.status != UploadStatus.DELETED, Dataset.source_url.is_(None))
    models = select(func.coalesce(func.sum(Model.size_bytes), 0)).where(Model.tenant_id == tenant, Model.status != UploadStatus.DELETED)
    artifacts = select(func.coalesce(func.sum(Artifact.size_bytes), 0)).join(Job, Job.id == Artifact.job_id).where(
        Job.tenant_id == tenant)
    return sum(int(session.scalar(q) or 0) for q in (datasets, models, artifacts))


def quota_exceeded(used: int, quota: int, adding: int | None = None) -> ProblemError:
    what = f"{adding} more bytes" if adding is not None else "this upload"
    return ProblemError(413, "storage_quota_exceeded",
                        f"Storing {what} would exceed your storage quota: {used} of {quota} bytes are in use "
                        f"(datasets, models and job artifacts). Delete some to make room.")
