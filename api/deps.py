"""Request dependencies as ``Annotated`` aliases, and the one place object queries are scoped by tenant.

Every route that touches a tenant's objects goes through :func:`get_owned` or
:func:`page_owned`: an id of another tenant answers exactly like an unknown id (404).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, Iterator, TypeVar

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from jobstore.blobs import BlobStore
from jobstore.db import session_scope
from jobstore.models import Dataset, Job, Model
from jobstore.settings import Settings, get_settings
from jobstore.tenants import tenant_for_key

from .errors import ProblemError

SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """One session per request, committed when the route returns (rolled back if it raises)."""
    with session_scope(settings.database_url) as session:
        yield session


# scope="function": commit before the response is sent, so a client that got 201 can read its object.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


@lru_cache
def _blob_store(url: str) -> BlobStore:
    return BlobStore(url)


def get_blobs(settings: SettingsDep) -> BlobStore:
    return _blob_store(settings.blob_url)


BlobsDep = Annotated[BlobStore, Depends(get_blobs)]

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer mt_...` "
                                                   "(created with `python -m api.manage create-key --tenant NAME`).")


def unauthorized(detail: str) -> ProblemError:
    return ProblemError(401, "unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})


def current_tenant(session: SessionDep,
                   credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """The id of the tenant whose live API key authenticates the request, else 401."""
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise unauthorized("Send an API key as 'Authorization: Bearer <key>'.")
    tenant = tenant_for_key(session, credentials.credentials)
    if tenant is None:
        raise unauthorized("The API key is invalid or revoked.")
    # Commit last_used_at now: holding that row lock for the whole request (a long upload)
    # would serialise every other request made with the same key.
    session.commit()
    return tenant


TenantDep = Annotated[str, Depends(current_tenant)]

Owned = TypeVar("Owned", Dataset, Model, Job)

# Rows a tenant no longer sees (a deleted dataset is kept as a tombstone while jobs reference it).
_HIDDEN = {Dataset: (Dataset.status != "deleted",)}
_NAMES = {Dataset: "dataset", Model: "model", Job: "job"}


def get_owned(session: Session, table: type[Owned], object_id: str, tenant: str, *, lock: str | None = None) -> Owned:
    """The tenant's row with this public id, else a 404 problem (also for other tenants' ids).

    lock="update" or "share" takes a row lock (PostgreSQL) until the transaction ends.
    """
    query = select(table).where(table.id == object_id, table.tenant_id == tenant, *_HIDDEN.get(table, ()))
    if lock:
        query = query.with_for_update(read=lock == "share")
    row = session.scalar(query)
    if row is None:
        raise ProblemError(404, "not_found", f"No {_NAMES[table]} with id {object_id!r}.")
    return row


def page_owned(session: Session, table: type[Owned], tenant: str, *, limit: int, after: str | None,
               where: tuple[Any, ...] = ()) -> tuple[list[Owned], str | None]:
    """One page of the tenant's rows, newest first; the cursor is the last row's id when more follow."""
    query = select(table).where(table.tenant_id == tenant, *_HIDDEN.get(table, ()), *where)
    if after is not None:
        # The cursor row itself may have been deleted since (tombstones keep their seq).
        seq = session.scalar(select(table.seq).where(table.id == after, table.tenant_id == tenant))
        if seq is None:
            raise ProblemError(422, "invalid_cursor", f"Unknown cursor {after!r}: pass a next_cursor from a previous page.")
        query = query.where(table.seq < seq)
    rows = list(session.scalars(query.order_by(table.seq.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].id if more and rows else None)
