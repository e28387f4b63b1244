"""Request ids, the access log and request metrics (one ASGI middleware), and the API's logging.

Every request gets an id: the client's ``X-Request-ID`` when it is a plausible one, else a new
one; it is sent back in the response's ``X-Request-ID`` and is on every log line written for
the request, with the tenant once the API key is checked (``annotate`` in api.deps).
"""

from __future__ import annotations

import logging
import logging.config
import re
import time
import uuid
from typing import Any

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobstore.logs import log_context

from . import metrics

REQUEST_ID_HEADER = "X-Request-ID"
# Ids of tracing systems and load balancers fit this; anything else is replaced, not logged.
_PLAUSIBLE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
UNMATCHED_ROUTE = "unmatched"

access_log = logging.getLogger("api.access")


def logging_config(log_format: str) -> dict[str, Any]:
    """One handler (stderr) in ``log_format`` for the API's and uvicorn's lines; the API's access
    line (with the request id) replaces uvicorn's. For ``uvicorn.run(log_config=...)``."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"masktune": {"()": "jobstore.logs.formatter", "log_format": log_format}},
        "filters": {"context": {"()": "jobstore.logs.ContextFilter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "masktune", "filters": ["context"]}},
        "root": {"handlers": ["stderr"], "level": "WARNING"},
        "loggers": {
            "api": {"level": "INFO"},
            "uvicorn": {"handlers": [], "level": "INFO", "propagate": True},
            "uvicorn.error": {"handlers": [], "level": "INFO", "propagate": True},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }


def configure_logging(log_format: str) -> None:
    logging.config.dictConfig(logging_config(log_format))


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            sent = value.decode("latin-1")
            if _PLAUSIBLE_REQUEST_ID.fullmatch(sent):
                return sent
            break
    return uuid.uuid4().hex


def route_template(scope: Scope) -> str:
    """The path template of the route that answered (``/v1/jobs/{job_id}``), never the raw path, so
    the metric's series stay few. A request refused before routing (an oversized upload) is matched here."""
    route = scope.get("route")
    if route is None and "app" in scope:
        route = next((r for r in scope["app"].routes if r.matches(scope)[0] != Match.NONE), None)
    return getattr(route, "path", None) or UNMATCHED_ROUTE


class ObservabilityMiddleware:
    """Pure ASGI, outermost: it sees every response, the body-limit middleware's refusals included."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        start = time.perf_counter()
        status, latency = 500, None  # what an exception out of the app becomes

        async def send_with_id(message: Message) -> None:
            nonlocal status, latency
            if message["type"] == "http.response.start":
                status, latency = message["status"], time.perf_counter() - start
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (REQUEST_ID_HEADER.lower().encode(), request_id.encode())]}
            await send(message)

        with log_context(request_id=request_id) as fields:
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                elapsed = time.perf_counter() - start
                route = route_template(scope)
                metrics.request_finished(scope["method"], route, status, elapsed if latency is None else latency,
                                         fields.get("problem"))
                access_log.info("%s %s %d %.1f ms", scope["method"], scope["path"], status, elapsed * 1000,
                                extra={"method": scope["method"], "path": scope["path"], "route": route,
                                       "status": status, "duration_s": round(elapsed, 6)})
