"""Jobs: MaskTune runs. The database holds their state; the queue message carries only the id."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Annotated, AsyncIterator

import anyio
import anyio.to_thread
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sse_starlette import EventSourceResponse, ServerSentEvent

from jobspec import is_architecture_name
from jobstore import models as tables
from jobstore.db import autocommit, session_scope
from jobstore.ids import new_id
from jobstore import blob_keys
from jobstore.jobs import add_event, update_job
from jobstore.models import utcnow
from jobstore.settings import DEFAULT_MAX_RUNTIME_S, TASK_RUN_JOB, Settings
from jobstore.statuses import TERMINAL, JobStatus, UploadStatus
from jobstore.tenants import tenant_for_key

from .. import schemas
from ..deps import (RETRY_AFTER_S, ApiKeyDep, BlobsDep, SessionDep, SettingsDep, TenantDep, authenticate,
                    check_job_slots, find_owned, get_owned, lock_tenant, page_owned, read_in_thread)
from ..errors import ProblemError, problems, validation_problem
from .architectures import pretrained_reported_missing
from ..queue import send_task
from ..uploads import is_json
from .webhooks import check_webhook, delete_webhook_deliveries

log = logging.getLogger("api")
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _request_hash(body: schemas.JobCreate) -> str:
    # Of the validated body, defaults filled in: two bodies that mean the same job hash the same.
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(job: tables.Job, request_hash: str) -> schemas.Job:
    if job.request_hash != request_hash:
        raise ProblemError(422, "idempotency_key_reused",
                           f"This Idempotency-Key was used for job {job.id} with a different body.")
    return schemas.Job.of(job)


def _by_key(session: Session, tenant: str, key: str) -> tables.Job | None:
    return find_owned(session, tables.Job, tenant, tables.Job.idempotency_key == key)


def _usable(kind: str, status: str, object_id: str, error: str | None) -> None:
    if status == UploadStatus.VALIDATING:
        raise ProblemError(409, f"{kind}_not_ready", f"The {kind} {object_id} is still being validated; retry shortly.")
    if status != UploadStatus.READY:
        raise ProblemError(422, f"{kind}_invalid", f"The {kind} {object_id} is not usable: {error or status}.")


def _check_inputs(session: Session, tenant: str, body: schemas.JobCreate) -> None:
    """404/409/422 unless the dataset (and the starting model, if any) fit this job."""
    if not is_architecture_name(body.model.architecture):
        raise validation_problem([{"loc": ["body", "model", "architecture"], "type": "value_error",
                                   "msg": "Unknown architecture; see GET /v1/architectures (timm models: timm/<name>)."}])
    if body.model.pretrained and pretrained_reported_missing(session, body.model.architecture):
        raise ProblemError(422, "pretrained_weights_missing",
                           f"No worker has ImageNet weights for {body.model.architecture} in its cache; "
                           "GET /v1/architectures shows which are there (the README says how to add them).")
    if body.erm.epochs == 0 and body.model.weights_id is None:
        raise validation_problem([{"loc": ["body", "erm", "epochs"], "type": "value_error",
                                   "msg": "erm.epochs = 0 skips ERM and needs model.weights_id (an uploaded model)."}])
    # Share lock until the commit: a concurrent DELETE of the dataset waits and then sees this job.
    dataset = get_owned(session, tables.Dataset, body.dataset_id, tenant, lock="share")
    _usable("dataset", dataset.status, dataset.id, dataset.error)
    if "dfr" in body.methods and not _has_val_groups(dataset.summary or {}, body):
        raise ProblemError(422, "dfr_needs_val_groups",
                           f"methods includes dfr, which retrains the last layer on group-balanced validation images, "
                           f"but dataset {dataset.id} has no group labels (a group column in its manifest, or "
                           "data.group_attribute for the CelebA layout).")
    if body.model.weights_id is None:
        return
    model = get_owned(session, tables.Model, body.model.weights_id, tenant, lock="share")  # as for the dataset
    _usable("model", model.status, model.id, model.error)
    if model.architecture != body.model.architecture:
        raise ProblemError(422, "architecture_mismatch", f"Model {model.id} is a {model.architecture}, "
                                                         f"the job asks for {body.model.architecture}.")
    classes = (dataset.summary or {}).get("classes")
    if isinstance(classes, (list, dict)) and model.num_classes != len(classes) and body.model.head == "keep":
        raise ProblemError(422, "num_classes_mismatch", f"Model {model.id} has {model.num_classes} classes, "
                                                        f"dataset {dataset.id} has {len(classes)}; set model.head "
                                                        "to 'replace' to put a fresh head for the dataset's classes on it.")


def _has_val_groups(summary: dict, body: schemas.JobCreate) -> bool:
    """Whether the job's validation split will carry group labels, by the dataset's validation summary.
    A CelebA-layout dataset has groups when the job names data.group_attribute; any other has them when its
    summary lists groups (a validation split carved from training images keeps their groups)."""
    if summary.get("layout") == "celeba":
        return body.data.group_attribute is not None
    return bool(summary.get("groups"))


def _max_runtime_s(body: schemas.JobCreate, settings: Settings) -> int:
    """The job's limit: as asked (422 past MASKTUNE_MAX_RUNTIME_S_LIMIT), else 24 h or the limit if lower."""
    limit = settings.max_runtime_s_limit
    if body.max_runtime_s is None:
        return min(DEFAULT_MAX_RUNTIME_S, limit)
    if body.max_runtime_s > limit:
        raise validation_problem([{"loc": ["body", "max_runtime_s"], "type": "less_than_equal",
                                   "msg": f"max_runtime_s can be at most {limit} s here (MASKTUNE_MAX_RUNTIME_S_LIMIT)."}])
    return body.max_runtime_s


async def json_body(request: Request) -> None:
    """415 unless the body is JSON: a Content-Type of application/json (or application/*+json).

    Without a Content-Type an empty body falls through to the 422 of a missing body.
    """
    content_type = request.headers.get("content-type")
    if content_type is None and not await request.body():
        return
    if is_json(content_type or ""):
        return
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    raise ProblemError(415, "unsupported_media_type",
                       f"Send the job as application/json, not {kind or 'a body without a Content-Type'}.")


TOO_MANY = {429: {"description": "Too Many Requests: the tenant's active-job limit is reached.",
                  "headers": {"Retry-After": {"description": "Seconds to wait before trying again.",
                                              "schema": {"type": "integer", "example": RETRY_AFTER_S}}}}}


@router.post("", status_code=201, response_model=schemas.Job, summary="Create a MaskTune job",
             responses={**problems(401, 404, 408, 409, 413, 415, 422, 503), **TOO_MANY})
def create_job(body: schemas.JobCreate, session: SessionDep, tenant: TenantDep, settings: SettingsDep,
               _json: Annotated[None, Depends(json_body)],
               idempotency_key: Annotated[str | None, Header(
                   max_length=200, description="Retry safely: the same key and body return the same job.")] = None,
               ) -> schemas.Job:
    """Queues the run at once (`status: queued`). Every config field has a default; the job stores
    the full resolved config.

    A tenant may have `MASKTUNE_MAX_ACTIVE_JOBS_PER_TENANT` jobs queued, running or cancelling at
    once; past that: 429 `too_many_active_jobs` with `Retry-After`. Replaying an existing job
    with its Idempotency-Key is never refused."""
    request_hash = _request_hash(body)
    if idempotency_key is not None:
        existing = _by_key(session, tenant, idempotency_key)
        if existing is not None:
            return _replay(existing, request_hash)
    check_webhook(session, tenant, body.webhook_url, settings)
    _check_inputs(session, tenant, body)
    max_runtime_s = _max_runtime_s(body, settings)
    # Count and insert under the tenant lock, so concurrent requests cannot all take the last slot.
    lock_tenant(session, tenant)
    if idempotency_key is not None:
        # A concurrent request with this key may have committed its job while we waited for the lock.
        existing = _by_key(session, tenant, idempotency_key)
        if existing is not None:
            return _replay(existing, request_hash)
    check_job_slots(session, tenant, settings.max_active_jobs_per_tenant)
    job = tables.Job(id=new_id("job"), tenant_id=tenant, dataset_id=body.dataset_id, model_id=body.model.weights_id,
                     config=body.config(), status=JobStatus.QUEUED, idempotency_key=idempotency_key, request_hash=request_hash,
                     job_metadata=body.metadata, max_runtime_s=max_runtime_s,
                     webhook_url=body.webhook_url, webhook_events_filter=list(body.webhook_events_filter))
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won the insert: answer with its job.
        session.rollback()
        existing = _by_key(session, tenant, idempotency_key) if idempotency_key is not None else None
        if existing is None:
            raise
        return _replay(existing, request_hash)
    try:
        send_task(settings, TASK_RUN_JOB, job.id)  # after the commit: the worker always finds the row
    except Exception as exc:
        log.error("could not queue job %s: %r", job.id, exc)
        session.delete(job)
        session.commit()
        raise ProblemError(503, "queue_unavailable", "The task queue is unreachable; no job was created, try again.") from None
    return schemas.Job.of(job)


_METADATA_FILTER = re.compile(r"metadata\[(.*)\]", re.DOTALL)
METADATA_QUERY = {"name": "metadata", "in": "query", "required": False, "style": "deepObject", "explode": True,
                  "description": "Only jobs whose metadata holds every pair given as `metadata[key]=value`.",
                  "schema": {"type": "object", "propertyNames": {"maxLength": schemas.METADATA_KEY_CHARS,
                                                                   "pattern": schemas.METADATA_KEY_PATTERN},
                             "additionalProperties": {"type": "string"}}}


def _metadata_filters(request: Request) -> list:
    """``?metadata[key]=value``, repeatable: jobs whose metadata holds every such pair."""
    where = []
    for name, value in request.query_params.multi_items():
        match = _METADATA_FILTER.fullmatch(name)
        if match is None:
            continue
        try:
            key = schemas.metadata_key(match.group(1))
            schemas.metadata_value(value)
        except ValueError as exc:
            raise validation_problem([{"loc": ["query", name], "type": "value_error", "msg": str(exc)}]) from None
        where.append(tables.Job.job_metadata[key].as_string() == value)
    return where


@router.get("", response_model=schemas.JobList, summary="List jobs, newest first", responses=problems(401, 422),
            openapi_extra={"parameters": [METADATA_QUERY]})
def list_jobs(request: Request, session: SessionDep, tenant: TenantDep,
              status: Annotated[JobStatus | None, Query(description="Only jobs in this state.")] = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20,
              after: Annotated[str | None, Query(description="next_cursor of the previous page")] = None) -> schemas.JobList:
    """Filters combine: `?status=running&metadata[team]=vision&metadata[stage]=prod` lists the
    tenant's running jobs created with both of those metadata pairs. Pages follow with `?after=`
    the `next_cursor` of the previous page (with the same filters)."""
    where = [tables.Job.status == status] if status is not None else []
    where += _metadata_filters(request)
    rows, cursor = page_owned(session, tables.Job, tenant, limit=limit, after=after, where=tuple(where))
    return schemas.JobList(data=[schemas.Job.of(r) for r in rows], next_cursor=cursor)


# The polling routes are async: authentication and their reads in one trip to a thread (deps.read_in_thread).
@router.get("/{job_id}", response_model=schemas.Job, summary="Get a job", responses=problems(401, 404))
async def get_job(job_id: str, session: SessionDep, key: ApiKeyDep) -> schemas.Job:
    def read() -> schemas.Job:
        return schemas.Job.of(get_owned(session, tables.Job, job_id, authenticate(session, key)))

    return await read_in_thread(session, read)


@router.delete("/{job_id}", status_code=204, response_class=Response, summary="Delete a finished job",
               responses=problems(401, 404, 409))
def delete_job(job_id: str, session: SessionDep, tenant: TenantDep, blobs: BlobsDep) -> Response:
    """Removes the job, its events and artifacts, and everything it stored (artifacts and work
    area under `jobs/{id}/`). Refused (409 `job_active`) unless the job is succeeded, failed or
    cancelled: cancel it first and wait for `cancelled`. Its Idempotency-Key is free again."""
    job = get_owned(session, tables.Job, job_id, tenant, lock="update")  # a worker's transition waits meanwhile
    if job.status not in TERMINAL:
        raise ProblemError(409, "job_active", f"Job {job.id} is {job.status}; cancel it and wait until it is "
                                              "cancelled before deleting it.")
    session.execute(delete(tables.Artifact).where(tables.Artifact.job_id == job.id))
    session.execute(delete(tables.JobEvent).where(tables.JobEvent.job_id == job.id))
    delete_webhook_deliveries(session, job.id)
    session.execute(delete(tables.Job).where(tables.Job.id == job.id))
    # A dataset or model deleted while this job referenced it was kept as a tombstone: drop it if this was the last.
    for table, object_id, column in ((tables.Dataset, job.dataset_id, tables.Job.dataset_id),
                                     (tables.Model, job.model_id, tables.Job.model_id)):
        if object_id is not None and session.scalar(select(tables.Job.id).where(column == object_id).limit(1)) is None:
            session.execute(delete(table).where(table.id == object_id, table.status == UploadStatus.DELETED))
    session.commit()
    # After the commit: at worst a failed delete leaves unreachable bytes, never a job without its files.
    blobs.delete_prefix(blob_keys.job_prefix(job.id))
    return Response(status_code=204)


@router.post("/{job_id}/cancel", response_model=schemas.Job, summary="Cancel a job", responses=problems(401, 404))
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> schemas.Job:
    """A queued job is cancelled at once; a running one becomes `cancelling` and the worker stops at
    its next batch. Cancelling a cancelling or finished job changes nothing. Returns the job."""
    job = get_owned(session, tables.Job, job_id, tenant, lock="update")  # the worker's writes wait meanwhile
    if job.status == JobStatus.QUEUED:
        if update_job(session, job.id, status=JobStatus.CANCELLED, cancel_requested=True, finished_at=utcnow()):
            add_event(session, job.id, "status", "Cancelled before it started.", data={"status": JobStatus.CANCELLED})
    elif job.status == JobStatus.RUNNING:
        if update_job(session, job.id, status=JobStatus.CANCELLING, cancel_requested=True):
            add_event(session, job.id, "status", "Cancellation requested; stopping at the next batch.",
                      data={"status": JobStatus.CANCELLING})
    session.commit()
    session.refresh(job)
    return schemas.Job.of(job)


EVENT_STREAM = "text/event-stream"
_STREAM_BATCH = 500


def _events_after(session: Session, job_id: str, after: int | None, limit: int) -> list[schemas.Event]:
    query = select(tables.JobEvent).where(tables.JobEvent.job_id == job_id)
    if after is not None:
        query = query.where(tables.JobEvent.seq > after)
    return [schemas.Event.of(r) for r in session.scalars(query.order_by(tables.JobEvent.seq).limit(limit))]


def _stream_start(request: Request, after: int | None) -> int:
    """Where a stream starts: after the Last-Event-ID a reconnecting client sends, else after ?after=."""
    last = request.headers.get("last-event-id")
    if last is None:
        return after or 0
    if not last.isdigit() or int(last) > 2**63 - 1:
        raise validation_problem([{"loc": ["header", "Last-Event-ID"], "type": "int_parsing",
                                   "msg": "Last-Event-ID must be the id of an event (a non-negative integer)."}])
    return int(last)


def _stream_poll(database_url: str, key: str, tenant: str, job_id: str, after: int) -> tuple[str | None, list[schemas.Event]]:
    """One short session: the job's status (None: gone, or the key no longer lives), then the events after ``after``.

    The status is read first: a terminal status is committed with its status event, so when the
    status read is terminal, the events read after it include the last one.
    """
    with session_scope(database_url) as session:
        autocommit(session)
        if tenant_for_key(session, key) != tenant:
            return None, []
        status = session.scalar(select(tables.Job.status).where(tables.Job.id == job_id))
        return status, _events_after(session, job_id, after, _STREAM_BATCH) if status is not None else []


async def _event_stream(settings: Settings, key: str, tenant: str, job_id: str, after: int) -> AsyncIterator[ServerSentEvent]:
    """The job's events from ``after`` on, read every MASKTUNE_EVENTS_POLL_INTERVAL_S with a fresh
    short session (no connection is held between reads), until the job is terminal and every event is sent."""
    while True:
        status, events = await anyio.to_thread.run_sync(_stream_poll, settings.database_url, key, tenant, job_id, after)
        for event in events:
            yield ServerSentEvent(data=event.model_dump_json(), event=event.kind, id=str(event.id))
            after = event.id
        if len(events) == _STREAM_BATCH:
            continue  # more are waiting
        if status is None or status in TERMINAL:
            return
        await anyio.sleep(settings.events_poll_interval_s)


@router.get("/{job_id}/events", response_model=schemas.EventList, summary="A job's events, oldest first",
            responses={200: {"description": "A page of events (JSON), or with `Accept: text/event-stream` the events "
                                            "as they happen (Server-Sent Events).",
                             "content": {EVENT_STREAM: {"schema": {"type": "string"}}}},
                       **problems(401, 404, 422)})
async def list_events(job_id: str, request: Request, session: SessionDep, key: ApiKeyDep, settings: SettingsDep,
                      after: Annotated[int | None, Query(ge=0, le=2**63 - 1,
                                                         description="Only events after this id (a next_cursor).")] = None,
                      limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> schemas.EventList | EventSourceResponse:
    """Events: status changes, stage changes, per-epoch metrics, warnings. Poll with `?after=` the
    `next_cursor` of the previous page.

    With `Accept: text/event-stream` the answer is a stream of Server-Sent Events instead: each
    event's `id:` is its id, `event:` its kind and `data:` its JSON as in the page above; a
    comment line every `MASKTUNE_EVENTS_KEEPALIVE_S` keeps the connection open, and the stream
    ends once the job is succeeded, failed or cancelled and its last event is sent. It starts
    after `?after=`, or after the `Last-Event-ID` header that a reconnecting EventSource sends,
    so a resumed stream repeats and misses nothing (`limit` does not apply). The stream of a key
    revoked meanwhile ends at its next read."""
    def check() -> str:
        tenant = authenticate(session, key)
        get_owned(session, tables.Job, job_id, tenant)
        return tenant

    if EVENT_STREAM in request.headers.get("accept", ""):
        tenant = await read_in_thread(session, check)
        start = _stream_start(request, after)
        return EventSourceResponse(_event_stream(settings, key.credentials, tenant, job_id, start),
                                   ping=settings.events_keepalive_s)

    def page() -> schemas.EventList:
        check()
        rows = _events_after(session, job_id, after, limit)
        return schemas.EventList(data=rows, next_cursor=rows[-1].id if rows else None)

    return await read_in_thread(session, page)


@router.get("/{job_id}/artifacts", response_model=schemas.ArtifactList, summary="A job's artifacts",
            responses=problems(401, 404))
def list_artifacts(job_id: str, session: SessionDep, tenant: TenantDep) -> schemas.ArtifactList:
    job = get_owned(session, tables.Job, job_id, tenant)
    rows = session.scalars(select(tables.Artifact).where(tables.Artifact.job_id == job.id).order_by(tables.Artifact.name))
    return schemas.ArtifactList(data=[schemas.Artifact.of(r) for r in rows])


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
_ARTIFACT_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")  # what the worker names them; anything else is unknown
_CHUNK = 1 << 20


@router.get("/{job_id}/artifacts/{name}", response_class=StreamingResponse, summary="Download an artifact",
            responses={200: {"description": "The artifact's bytes, with its own content type (application/json, "
                                            "image/png, application/octet-stream).",
                             "content": {"application/octet-stream": {}, "application/json": {}, "image/png": {}}},
                       **problems(401, 404)})
def download_artifact(job_id: str, name: str, session: SessionDep, tenant: TenantDep, blobs: BlobsDep) -> StreamingResponse:
    job = get_owned(session, tables.Job, job_id, tenant)
    artifact = session.get(tables.Artifact, (job.id, name)) if _ARTIFACT_NAME.fullmatch(name) else None
    if artifact is None:
        raise ProblemError(404, "not_found", f"Job {job.id} has no artifact named {name!r}.")
    try:
        handle = blobs.open(artifact.blob_key)
    except FileNotFoundError:
        log.error("artifact %s of %s has a row but no blob %s", name, job.id, artifact.blob_key)
        raise ProblemError(404, "not_found", f"The artifact {name!r} is no longer stored.") from None

    def chunks():
        with handle:
            while chunk := handle.read(_CHUNK):
                yield chunk

    headers = {"Content-Length": str(artifact.size_bytes), "ETag": f'"{artifact.sha256}"',
               "Content-Disposition": f'attachment; filename="{_SAFE_NAME.sub("_", artifact.name)}"'}
    return StreamingResponse(chunks(), media_type=artifact.content_type, headers=headers)
