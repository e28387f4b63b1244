"""The FastAPI application: ``uvicorn api.app:app``."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import anyio.to_thread
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from jobstore.db import check_schema, migrate
from jobstore.settings import get_settings
from jobstore.webhooks import send_after_commit

from . import __version__, metrics
from .body_limit import BodyLimitMiddleware
from .errors import PROBLEM_MEDIA_TYPE, install
from .observability import ObservabilityMiddleware, configure_logging
from .queue import send_webhooks
from .routes import architectures, datasets, health, jobs, models, webhooks, workers

DESCRIPTION = """MaskTune (Asgari Taghanaki et al., NeurIPS 2022) as a service: upload a dataset (and
optionally starting weights), create a job, follow its events, download metrics and weights.

Every route but the health probes needs `Authorization: Bearer <key>`. Errors are
`application/problem+json` (RFC 7807) with a stable `code`."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    configure_logging(settings.log_format)  # again for a bare `uvicorn api.app:app`; python -m api sets it first
    await anyio.to_thread.run_sync(migrate if settings.migrate_on_start else check_schema, settings.database_url)
    yield


app = FastAPI(title="MaskTune Service", version=__version__, description=DESCRIPTION, lifespan=lifespan)
install(app)
app.add_middleware(BodyLimitMiddleware, max_upload_bytes=get_settings().max_upload_bytes,
                   upload_paths=("/v1/datasets", "/v1/models"), idle_timeout_s=get_settings().upload_idle_timeout_s)
app.add_middleware(ObservabilityMiddleware)  # added last: outermost, it sees the body limit's refusals too
for module in (health, datasets, models, jobs, architectures, workers, metrics, webhooks):
    app.include_router(module.router)
# A job cancelled while queued announces it: its webhook message is queued after the commit.
send_after_commit(send_webhooks)

# The dashboard: static files that call the API above from the browser (outside the OpenAPI schema).
DASHBOARD_DIR = Path(__file__).parent / "dashboard"
app.mount("/dashboard", StaticFiles(directory=DASHBOARD_DIR, html=True), name="dashboard")


@app.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("/dashboard/")


def _openapi() -> dict[str, Any]:
    """The generated schema, with every error response documented as a Problem in problem+json."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for route, path in schema["paths"].items():
        for operation in path.values():
            for status, response in operation.get("responses", {}).items():
                if status.isdigit() and int(status) >= 400 and route != "/readyz":
                    response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    components = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    app.openapi_schema = schema
    return schema


app.openapi = _openapi  # type: ignore[method-assign]
