"""Tenants and API keys. Only a key's sha256 is stored; the secret is shown once."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from .ids import new_id
from .models import ApiKey, Tenant, utcnow


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, tenant_name: str) -> tuple[str, str]:
    """(key id, secret) for a new key of the tenant, created if new."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        tenant = Tenant(id=new_id("ten"), name=tenant_name)
        session.add(tenant)
        session.flush()
    secret = f"mt_{secrets.token_urlsafe(32)}"
    key = ApiKey(id=new_id("key"), tenant_id=tenant.id, key_hash=hash_key(secret))
    session.add(key)
    return key.id, secret


def tenant_for_key(session: Session, secret: str) -> str | None:
    """The tenant id of a live key (recording its use), else None."""
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(secret), ApiKey.revoked_at.is_(None)))
    if key is None:
        return None
    key.last_used_at = utcnow()
    return key.tenant_id


def revoke_key(session: Session, key_id: str) -> bool:
    key = session.get(ApiKey, key_id)
    if key is None or key.revoked_at is not None:
        return False
    key.revoked_at = utcnow()
    return True
