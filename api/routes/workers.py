"""Workers: the live Celery workers of this deployment, each with its device and queues.

Asked by a broadcast that waits up to a second for answers, so it is a route of its own and
never part of the readiness probe (which must answer well within a probe's 1 s timeout).
"""

from __future__ import annotations

import logging

from fastapi import APIRouter

from .. import schemas
from ..deps import SettingsDep, TenantDep
from ..errors import ProblemError, problems
from ..queue import live_workers

log = logging.getLogger("api")
WORKER_REPLY_S = 1.0  # how long to listen for the workers' answers
router = APIRouter(prefix="/v1/workers", tags=["workers"])


@router.get("", response_model=schemas.WorkerList, summary="The live workers and their devices",
            responses=problems(401, 503))
def list_workers(settings: SettingsDep, tenant: TenantDep) -> schemas.WorkerList:
    """Every worker that answers within a second, with the device its jobs run on and the queues it
    consumes. An empty list means none answered: jobs still queue and wait for one."""
    try:
        return schemas.WorkerList(data=live_workers(settings, WORKER_REPLY_S))
    except Exception as exc:
        log.warning("asking the workers for their devices failed: %r", exc)
        raise ProblemError(503, "broker_unavailable", "The broker did not answer; retry shortly.",
                           headers={"Retry-After": "5"}) from exc
