"""Liveness and readiness probes (no auth)."""

from __future__ import annotations

import logging
from typing import Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from jobstore.db import get_engine

from .. import schemas
from ..deps import BlobsDep, SettingsDep
from ..queue import check_broker

log = logging.getLogger("api")
router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=schemas.Health, summary="The process is up")
def healthz() -> schemas.Health:
    return schemas.Health()


def _probe(name: str, check: Callable[[], object]) -> str:
    try:
        check()
        return "ok"
    except Exception as exc:
        # Unauthenticated endpoint: the kind of failure only; the details go to the log.
        log.warning("readiness check %s failed: %r", name, exc)
        return f"error: {type(exc).__name__}"


def _database(url: str) -> None:
    with get_engine(url).connect() as conn:
        conn.execute(text("SELECT 1"))


@router.get("/readyz", response_model=schemas.Readiness,
            summary="Database, broker and storage are reachable (the live workers: GET /v1/workers)",
            responses={503: {"model": schemas.Readiness, "description": "Some dependency is unreachable"}})
def readyz(settings: SettingsDep, blobs: BlobsDep) -> JSONResponse:
    checks = {
        "database": _probe("database", lambda: _database(settings.database_url)),
        "broker": _probe("broker", lambda: check_broker(settings)),
        "storage": _probe("storage", blobs.check),
    }
    ok = all(v == "ok" for v in checks.values())
    result = schemas.Readiness(**checks)
    return JSONResponse(result.model_dump(), status_code=200 if ok else 503)
