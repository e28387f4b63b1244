"""Models: uploaded weights (.safetensors preferred, or a state-dict .pt/.pth) to start jobs from.

The API checks the name, architecture and class count; a worker checks the tensors
(``torch.load(weights_only=True)`` or safetensors, never unpickling anything else).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from pydantic import ValidationError
from sqlalchemy import select

from jobstore import models as tables
from jobstore import blob_keys
from jobstore.ids import new_id
from jobstore.settings import TASK_VALIDATE_MODEL
from jobstore.statuses import ACTIVE, UploadStatus

from .. import schemas
from ..deps import BlobsDep, SessionDep, SettingsDep, TenantDep, get_owned, page_owned
from ..errors import ProblemError, problems, validation_problem
from ..multipart import Form
from ..uploads import accept_upload

router = APIRouter(prefix="/v1/models", tags=["models"])

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")

UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "architecture", "num_classes"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "Weights: .safetensors (preferred), .pt or .pth state dict."},
        "architecture": {"type": "string", "maxLength": 120,
                         "description": "A name from GET /v1/architectures, or timm/<name>."},
        "num_classes": {"type": "integer", "minimum": 2,
                        "description": "Outputs of the file's head (1000 for an ImageNet checkpoint)."},
    },
}}}}}


def _form_fields(fields: dict[str, str]) -> schemas.ModelForm:
    try:
        return schemas.ModelForm.model_validate(fields)
    except ValidationError as exc:
        raise validation_problem([{"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]}
                                  for e in exc.errors()]) from None


def _check_before_storing(filename: str, fields: dict[str, str]) -> None:
    if not filename.lower().endswith(WEIGHT_SUFFIXES):
        raise ProblemError(415, "unsupported_media_type",
                           f"Model weights must be a {', '.join(WEIGHT_SUFFIXES)} file, not {filename!r}.")
    if "architecture" in fields and "num_classes" in fields:  # sent before the file: refuse early
        _form_fields(fields)


@router.post("", status_code=201, response_model=schemas.Model, summary="Upload model weights",
             responses=problems(400, 401, 408, 413, 415, 422, 503), openapi_extra=UPLOAD_BODY)
async def create_model(request: Request, session: SessionDep, tenant: TenantDep, settings: SettingsDep,
                       blobs: BlobsDep) -> schemas.Model:
    """Streams the weights to storage and queues their validation (`validating` → `ready` | `invalid`).

    Limits and errors as for dataset uploads (413, 408, 415), and 415 for a file name that is not
    .safetensors, .pt or .pth."""
    mdl_id = new_id("mdl")

    def make_row(form: Form) -> tables.Model:
        fields = _form_fields(form.fields)
        return tables.Model(id=mdl_id, tenant_id=tenant, filename=form.file.filename, architecture=fields.architecture,
                            num_classes=fields.num_classes, size_bytes=form.file.size_bytes, sha256=form.file.sha256,
                            blob_key=blob_keys.model_upload(mdl_id), status=UploadStatus.VALIDATING)

    row = await accept_upload(request, session=session, settings=settings, blobs=blobs, tenant=tenant,
                              key=blob_keys.model_upload(mdl_id), prefix=blob_keys.model_prefix(mdl_id),
                              task=TASK_VALIDATE_MODEL, make_row=make_row, on_file=_check_before_storing)
    return schemas.Model.of(row)


@router.get("", response_model=schemas.ModelList, summary="List models, newest first", responses=problems(401, 422))
def list_models(session: SessionDep, tenant: TenantDep,
                limit: Annotated[int, Query(ge=1, le=100)] = 20,
                after: Annotated[str | None, Query(description="next_cursor of the previous page")] = None) -> schemas.ModelList:
    rows, cursor = page_owned(session, tables.Model, tenant, limit=limit, after=after)
    return schemas.ModelList(data=[schemas.Model.of(r) for r in rows], next_cursor=cursor)


@router.get("/{model_id}", response_model=schemas.Model, summary="Get a model", responses=problems(401, 404))
def get_model(model_id: str, session: SessionDep, tenant: TenantDep) -> schemas.Model:
    return schemas.Model.of(get_owned(session, tables.Model, model_id, tenant))


@router.delete("/{model_id}", status_code=204, response_class=Response, summary="Delete a model",
               responses=problems(401, 404, 409))
def delete_model(model_id: str, session: SessionDep, tenant: TenantDep, blobs: BlobsDep) -> Response:
    """Removes the weights from storage. Refused (409 `model_in_use`) while a queued or running job
    starts from them. A model that finished jobs reference stays as a hidden record (status
    `deleted`, no data) so those jobs keep their history; it answers 404 like any unknown id."""
    # The row lock makes this wait for a job being created from the model right now (it takes a share lock).
    row = get_owned(session, tables.Model, model_id, tenant, lock="update")
    jobs = select(tables.Job.id).where(tables.Job.model_id == row.id)
    active = session.scalar(jobs.where(tables.Job.status.in_(ACTIVE)).limit(1))
    if active is not None:
        raise ProblemError(409, "model_in_use", f"Job {active} still uses this model; cancel it or let it finish first.")
    if session.scalar(jobs.limit(1)) is not None:
        row.status = UploadStatus.DELETED
    else:
        session.delete(row)
    session.commit()
    blobs.delete_prefix(blob_keys.model_prefix(row.id))
    return Response(status_code=204)
