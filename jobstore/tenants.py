"""Tenants and API keys. Only a key's sha256 is stored; the secret is shown once."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta, timezone

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from .ids import new_id
from .models import ApiKey, Tenant, utcnow


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, tenant_name: str, secret: str | None = None) -> tuple[str, str]:
    """(key id, secret) for a new key of the tenant, created if new; the secret is generated unless given."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(id=new_id("ten"), name=tenant_name)
        session.add(tenant)
        session.flush()
    secret = secret or f"mt_{secrets.token_urlsafe(32)}"
    key = ApiKey(id=new_id("key"), tenant_id=tenant.id, key_hash=hash_key(secret))
    session.add(key)
    return key.id, secret


# last_used_at is a coarse "is this key still in use" mark: writing it on every request would turn
# each authenticated read into a write (and serialise a key's requests on its row lock).
LAST_USED_RESOLUTION = timedelta(seconds=60)


def tenant_for_key(session: Session, secret: str) -> str | None:
    """The tenant id of a live key, else None: one indexed read, so a revoked key is refused at once.

    The key's use is recorded only when its ``last_used_at`` is older than LAST_USED_RESOLUTION,
    by a conditional UPDATE (concurrent requests of one key write it once), committed at once: it
    stands whatever the request does next, and the key's row lock is not held for the request.
    """
    key = session.execute(select(ApiKey.id, ApiKey.tenant_id, ApiKey.last_used_at).where(
        ApiKey.key_hash == hash_key(secret), ApiKey.revoked_at.is_(None))).first()
    if key is None:
        return None
    now = utcnow()
    used = key.last_used_at
    if used is not None and used.tzinfo is None:  # SQLite keeps no zone; it holds UTC
        used = used.replace(tzinfo=timezone.utc)
    if used is None or used < now - LAST_USED_RESOLUTION:
        stale = or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < now - LAST_USED_RESOLUTION)
        session.execute(update(ApiKey).where(ApiKey.id == key.id, stale).values(last_used_at=now))
        session.commit()
    return key.tenant_id


def bootstrap_key(session: Session, tenant_name: str, secret: str | None) -> tuple[str, str] | None:
    """A first key for a database that holds none: (key id, secret), else None (keys exist already)."""
    if session.scalar(select(ApiKey.id).limit(1)) is not None:
        return None
    return create_key(session, tenant_name, secret)


def revoke_key(session: Session, key_id: str) -> bool:
    key = session.get(ApiKey, key_id)
    if key is None or key.revoked_at is not None:
        return False
    key.revoked_at = utcnow()
    return True
