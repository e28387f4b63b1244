"""Uploads of datasets and models: ``accept_upload`` is the flow both routes share.

The file is streamed into blob storage (api.multipart) under the upload limit and what is left
of the tenant's storage quota; the request body is capped and timed out before that
(api.body_limit). A row exists, and validation is queued, only once the whole file is stored.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Iterator

import anyio
import anyio.from_thread
import anyio.to_thread
from sqlalchemy.orm import Session
from starlette.requests import ClientDisconnect, Request

from jobstore.blobs import BlobStore
from jobstore.settings import Settings

from .body_limit import JSON_BODY_LIMIT, MULTIPART_OVERHEAD, content_length
from .deps import lock_tenant, quota_exceeded, storage_used
from .errors import ProblemError, validation_problem
from .metrics import upload_accepted
from .multipart import Form, multipart_boundary, read_form
from .queue import send_task

log = logging.getLogger("api")

# Uploads hold a thread for their whole transfer: a pool of their own keeps them from
# starving the threads the other (sync) routes run in.
UPLOAD_THREADS = anyio.CapacityLimiter(16)


async def accept_upload(request: Request, *, session: Session, settings: Settings, blobs: BlobStore, tenant: str,
                        key: str, prefix: str, task: str, make_row: Callable[[Form], Any],
                        on_file: Callable[[str, dict[str, str]], None] | None = None) -> Any:
    """The whole upload flow shared by datasets and models.

    Refuse a body that is not multipart (415) or that cannot fit the tenant's storage quota
    (413 storage_quota_exceeded: at once when Content-Length shows it, else as soon as the
    stream passes what is left), stream the file to ``key``, build the row with
    ``make_row(form)``, check the quota again under the tenant lock (concurrent uploads) and
    commit the row, then queue ``task`` with the row's id (after the commit, so the worker
    always finds the row). If anything fails before the task is queued, nothing under ``prefix``
    (the upload's own) is left behind.
    """
    # An oversized Content-Length never gets here: BodyLimitMiddleware refuses it before the body is read.
    done = False
    quota = settings.tenant_storage_quota_bytes
    content_type = request.headers.get("content-type", "")
    declared = content_length(request.scope)

    def handle(body: Iterator[bytes]) -> Any:
        nonlocal done
        multipart_boundary(content_type)
        used = storage_used(session, tenant)
        session.commit()  # hold no connection or snapshot while the body streams in
        left = quota - used
        if left <= 0 or (declared is not None and declared - MULTIPART_OVERHEAD > left):
            raise quota_exceeded(used, quota)
        cap = min(settings.max_upload_bytes, left)
        over = (lambda: quota_exceeded(used, quota)) if cap < settings.max_upload_bytes else None
        form = read_form(body, content_type, blobs, key, cap, on_file, over)
        if form.file is None:
            raise validation_problem([{"loc": ["body", "file"], "msg": "Field required", "type": "missing"}])
        if form.file.size_bytes == 0:
            raise ProblemError(422, "empty_file", "The uploaded file is empty.")
        row = make_row(form)
        # Uploads of the same tenant running at once each saw the same room left: count again, serialised.
        lock_tenant(session, tenant)
        used = storage_used(session, tenant)
        if used + form.file.size_bytes > quota:
            raise quota_exceeded(used, quota, form.file.size_bytes)
        keep_and_queue(session, settings, row, task)
        done = True
        upload_accepted(type(row).__name__.lower(), form.file.size_bytes)
        return row

    def cleanup() -> None:
        session.rollback()  # releases the tenant lock if the check under it failed
        if not done:
            blobs.delete_prefix(prefix)

    return await run_upload(request, handle, cleanup)


def keep_and_queue(session: Session, settings: Settings, row, task: str) -> None:
    """Commit the new row, then queue its validation; if the queue is down, remove the row again (503)."""
    session.add(row)
    session.commit()
    try:
        send_task(settings, task, row.id)
    except Exception as exc:
        log.error("could not queue %s for %s: %r", task, row.id, exc)
        session.delete(row)
        session.commit()
        raise ProblemError(503, "queue_unavailable", "The task queue is unreachable; nothing was kept, try again.") from None


async def read_json_body(request: Request, limit: int = JSON_BODY_LIMIT) -> Any:
    """The request body parsed as JSON, read at most ``limit`` bytes far (upload routes allow more)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ProblemError(413, "payload_too_large", f"A JSON body may hold at most {limit} bytes.")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # not UTF-8 (a ValueError), not JSON, nested too deep
        raise validation_problem([{"loc": ["body"], "msg": "The body is not valid JSON.", "type": "json_invalid"}]) from None


def is_json(content_type: str) -> bool:
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def _body_in_thread(request: Request) -> Iterator[bytes]:
    """The request body as a blocking iterator, for code running in a worker thread."""
    stream = request.stream()

    async def next_chunk() -> bytes | None:
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            return None

    while (chunk := anyio.from_thread.run(next_chunk)) is not None:
        if chunk:
            yield chunk


async def run_upload(request: Request, handle: Callable[[Iterator[bytes]], Any], cleanup: Callable[[], None]) -> Any:
    """Run ``handle(body_chunks)`` in an upload thread; ``cleanup()`` if it fails.

    A client that goes away mid-upload gets its partial upload removed and a 400 (nobody reads it).
    """
    try:
        return await anyio.to_thread.run_sync(handle, _body_in_thread(request), limiter=UPLOAD_THREADS)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(cleanup)
        if isinstance(exc, ClientDisconnect):
            raise ProblemError(400, "client_disconnected", "The client closed the connection during the upload.") from None
        raise
