"""Datasets: archive uploads, or URLs of the tenant's own object storage, validated by a worker
before jobs may use them."""

from __future__ import annotations

from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from jobstore import models as tables
from jobstore.dataset_urls import BadDatasetUrl, check_dataset_url
from jobstore import blob_keys
from jobstore.ids import new_id
from jobstore.settings import TASK_VALIDATE_DATASET, Settings
from jobstore.statuses import ACTIVE, UploadStatus

from .. import schemas
from ..deps import BlobsDep, SessionDep, SettingsDep, TenantDep, get_owned, page_owned
from ..errors import ProblemError, problems
from ..multipart import Form
from ..uploads import accept_upload, is_json, keep_and_queue, read_json_body

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary",
                            "description": "A .zip or .tar(.gz) archive: ImageFolder (train/<class>/..., optional val/, test/) "
                                           "or a CSV manifest filename,label[,split][,group] at the root."}},
}}, "application/json": {"schema": schemas.DatasetFromUrl.model_json_schema()}}}}


@router.post("", status_code=201, response_model=schemas.Dataset, summary="Upload a dataset archive, or register one by URL",
             responses=problems(400, 401, 408, 413, 415, 422, 503), openapi_extra=UPLOAD_BODY)
async def create_dataset(request: Request, session: SessionDep, tenant: TenantDep, settings: SettingsDep,
                         blobs: BlobsDep) -> schemas.Dataset:
    """multipart/form-data: streams the archive to storage. application/json `{"url": "s3://..."}`:
    registers a dataset that stays where it is (an archive object or an unpacked prefix), allowed
    only under the prefixes `MASKTUNE_DATASET_URL_PREFIXES` gives the tenant and never inside the
    service's own storage (422 `dataset_url_not_allowed`). Either way a worker validates it: the
    dataset is `validating` until it is `ready` (with a summary) or `invalid` (with an error).

    413 `payload_too_large` past the upload limit, 413 `storage_quota_exceeded` past the tenant's
    storage quota, 408 `upload_timeout` when the body stalls, 415 unless multipart/form-data or JSON."""
    ds_id = new_id("ds")
    if is_json(request.headers.get("content-type", "")):
        try:
            body = schemas.DatasetFromUrl.model_validate(await read_json_body(request))
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
        row = await anyio.to_thread.run_sync(_register_url, session, settings, tenant, ds_id, body.url)
        return schemas.Dataset.of(row)

    def make_row(form: Form) -> tables.Dataset:
        return tables.Dataset(id=ds_id, tenant_id=tenant, filename=form.file.filename, size_bytes=form.file.size_bytes,
                              sha256=form.file.sha256, blob_key=blob_keys.dataset_upload(ds_id), status=UploadStatus.VALIDATING)

    row = await accept_upload(request, session=session, settings=settings, blobs=blobs, tenant=tenant,
                              key=blob_keys.dataset_upload(ds_id), prefix=blob_keys.dataset_prefix(ds_id),
                              task=TASK_VALIDATE_DATASET, make_row=make_row)
    return schemas.Dataset.of(row)


def _register_url(session: Session, settings: Settings, tenant: str, ds_id: str, url: str) -> tables.Dataset:
    """Check the URL against the tenant's prefixes and the blob store, keep the row, queue validation."""
    tenant_name = session.get(tables.Tenant, tenant).name
    try:
        url = check_dataset_url(url, tenant=tenant_name, prefixes=settings.dataset_url_prefixes, blob_url=settings.blob_url)
    except BadDatasetUrl as exc:
        raise ProblemError(422, "dataset_url_not_allowed", f"{exc}.") from None
    row = tables.Dataset(id=ds_id, tenant_id=tenant, filename=url.rsplit("/", 1)[-1], size_bytes=0, sha256="",
                         source_url=url, status=UploadStatus.VALIDATING)
    keep_and_queue(session, settings, row, TASK_VALIDATE_DATASET)
    return row


@router.get("", response_model=schemas.DatasetList, summary="List datasets, newest first", responses=problems(401, 422))
def list_datasets(session: SessionDep, tenant: TenantDep,
                  limit: Annotated[int, Query(ge=1, le=100)] = 20,
                  after: Annotated[str | None, Query(description="next_cursor of the previous page")] = None) -> schemas.DatasetList:
    rows, cursor = page_owned(session, tables.Dataset, tenant, limit=limit, after=after)
    return schemas.DatasetList(data=[schemas.Dataset.of(r) for r in rows], next_cursor=cursor)


@router.get("/{dataset_id}", response_model=schemas.Dataset, summary="Get a dataset", responses=problems(401, 404))
def get_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> schemas.Dataset:
    return schemas.Dataset.of(get_owned(session, tables.Dataset, dataset_id, tenant))


@router.delete("/{dataset_id}", status_code=204, response_class=Response, summary="Delete a dataset",
               responses=problems(401, 404, 409))
def delete_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep, blobs: BlobsDep) -> Response:
    """Removes the archive and everything derived from it from storage (a URL dataset's own data is
    never touched). Refused (409) while a queued or running job uses it. A dataset that finished
    jobs reference stays as a hidden record (status `deleted`, no data), so those jobs keep their
    history; it answers 404 like any unknown id."""
    # The row lock makes this wait for a job being created on the dataset right now (it
    # takes a share lock), so that job is seen as active below instead of losing its data.
    row = get_owned(session, tables.Dataset, dataset_id, tenant, lock="update")
    jobs = select(tables.Job.id).where(tables.Job.dataset_id == row.id)
    active = session.scalar(jobs.where(tables.Job.status.in_(ACTIVE)).limit(1))
    if active is not None:
        raise ProblemError(409, "dataset_in_use", f"Job {active} still uses this dataset; cancel it or let it finish first.")
    if session.scalar(jobs.limit(1)) is not None:
        row.status = UploadStatus.DELETED
    else:
        session.delete(row)
    session.commit()
    # After the commit: at worst a failed delete leaves unreachable bytes, never a ready dataset without data.
    blobs.delete_prefix(blob_keys.dataset_prefix(row.id))
    return Response(status_code=204)
