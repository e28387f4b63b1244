"""Request and response bodies: the OpenAPI schema documents every one of them."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema, field_validator

from jobspec import JobConfig, is_architecture_name
from jobstore import models as tables
from jobstore import webhook_urls
from jobstore.statuses import DeliveryStatus, JobStatus, UploadStatus
from jobstore.webhooks import DEFAULT_EVENTS, WebhookEvent

# What a client can see of an upload (a deleted one is gone from every answer).
UploadState = Literal[UploadStatus.VALIDATING, UploadStatus.READY, UploadStatus.INVALID]



def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; every stored time is UTC.
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


Timestamp = Annotated[datetime, AfterValidator(_utc)]


class Dataset(BaseModel):
    id: str = Field(examples=["ds_0123456789abcdef0123"])
    object: Literal["dataset"] = "dataset"
    filename: str = Field(description="The upload's file name, or the last segment of source_url.")
    size_bytes: int = Field(description="Bytes of the upload, or of the objects at source_url (0 until validated).")
    sha256: str = Field(description="sha256 of the upload's bytes, or of source_url's listing (keys, sizes, ETags), "
                                    "set by validation: it changes when the data does.")
    source_url: str | None = Field(None, description="Where a dataset registered by URL lives (normalised); null for uploads.")
    status: UploadState = Field(
        description="validating: a worker is checking the archive; ready: usable by jobs; invalid: see error.")
    error: str | None = None
    summary: dict[str, Any] | None = Field(None, description="What validation found (classes, splits, counts, groups).")
    created_at: Timestamp
    updated_at: Timestamp

    @classmethod
    def of(cls, row: tables.Dataset) -> Dataset:
        return cls(id=row.id, filename=row.filename, size_bytes=row.size_bytes, sha256=row.sha256,
                   source_url=row.source_url, status=row.status, error=row.error, summary=row.summary,
                   created_at=row.created_at, updated_at=row.updated_at)


class DatasetFromUrl(BaseModel):
    """POST /v1/datasets as JSON: a dataset that stays in the tenant's own object storage."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"url": "s3://my-bucket/datasets/celeba/"}]})
    url: str = Field(min_length=6, max_length=1000,
                     description="s3:// URL of an archive object or of a prefix holding an unpacked dataset (any "
                                 "supported layout), under a prefix MASKTUNE_DATASET_URL_PREFIXES allows the tenant.")


class Model(BaseModel):
    id: str = Field(examples=["mdl_0123456789abcdef0123"])
    object: Literal["model"] = "model"
    filename: str
    architecture: str
    num_classes: int
    size_bytes: int
    sha256: str
    status: UploadState
    error: str | None = None
    created_at: Timestamp
    updated_at: Timestamp

    @classmethod
    def of(cls, row: tables.Model) -> Model:
        return cls(id=row.id, filename=row.filename, architecture=row.architecture, num_classes=row.num_classes,
                   size_bytes=row.size_bytes, sha256=row.sha256, status=row.status, error=row.error,
                   created_at=row.created_at, updated_at=row.updated_at)


class ModelForm(BaseModel):
    """The form fields of POST /v1/models (besides the file)."""

    model_config = ConfigDict(extra="ignore")
    architecture: str = Field(max_length=120, description="A registered architecture (GET /v1/architectures) or timm/<name>.")
    num_classes: int = Field(ge=2, le=100_000, description="Outputs of the classifier head (1000 for an ImageNet checkpoint).")

    @field_validator("architecture")
    @classmethod
    def _known(cls, value: str) -> str:
        if not is_architecture_name(value):
            raise ValueError("unknown architecture; see GET /v1/architectures (timm models: timm/<name>)")
        return value


# Job metadata, as OpenAI's: at most 16 pairs of strings. A key can always be named in a
# ?metadata[key]= filter, which the databases match against the stored JSON text of the key.
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512
METADATA_KEY_PATTERN = r'^[^\[\]"\\\x00-\x1f\x7f]+$'
_METADATA_KEY = re.compile(METADATA_KEY_PATTERN)


def metadata_key(key: str) -> str:
    if not _METADATA_KEY.match(key):
        raise ValueError('a metadata key cannot be empty or hold [, ], ", \\ or control characters')
    return key


def metadata_value(value: str) -> str:
    if "\x00" in value:  # PostgreSQL keeps no NUL in text
        raise ValueError("a metadata value cannot hold NUL characters")
    return value


Metadata = Annotated[
    dict[Annotated[str, StringConstraints(max_length=METADATA_KEY_CHARS), AfterValidator(metadata_key)],
         Annotated[str, StringConstraints(max_length=METADATA_VALUE_CHARS), AfterValidator(metadata_value)]],
    Field(max_length=METADATA_PAIRS),
    WithJsonSchema({"type": "object", "maxProperties": METADATA_PAIRS,
                    "propertyNames": {"maxLength": METADATA_KEY_CHARS, "pattern": METADATA_KEY_PATTERN},
                    "additionalProperties": {"type": "string", "maxLength": METADATA_VALUE_CHARS},
                    "examples": [{"team": "vision", "ticket": "ML-142"}]})]


class JobCreate(JobConfig):
    """A job: the dataset to run on plus the full MaskTune configuration (every field has a default)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "dataset_id": "ds_0123456789abcdef0123", "model": {"architecture": "small_cnn", "weights_id": None},
        "erm": {"epochs": 20, "lr": 0.01, "batch_size": 128}, "masking": {"method": "xgradcam", "threshold_std": 2.0},
        "finetune": {"epochs": 1}, "seed": 0}]})
    dataset_id: str = Field(min_length=1, max_length=64, description="A ready dataset (ds_...).")
    metadata: Metadata = Field(
        default_factory=dict, description=f"Up to {METADATA_PAIRS} string pairs of your own (keys up to {METADATA_KEY_CHARS} "
        f"characters, values up to {METADATA_VALUE_CHARS}), returned with the job; GET /v1/jobs?metadata[key]=value filters by them.")
    max_runtime_s: int | None = Field(
        None, ge=1, description="Fail the job (error code timeout) this many seconds after its first start; default 86400 "
                                "(24 h), at most MASKTUNE_MAX_RUNTIME_S_LIMIT (the README's Settings).")

    # Webhooks (README, Webhooks): stored with the job, not part of its config.
    webhook_url: str | None = Field(None, max_length=webhook_urls.MAX_URL_LENGTH, examples=["https://example.com/hooks/masktune"],
                                    description="http(s) URL to POST the job's events to, signed with the tenant's webhook "
                                                "secret (POST /v1/webhook-secret first); public addresses only.")
    webhook_events_filter: list[WebhookEvent] = Field(
        default_factory=lambda: list(DEFAULT_EVENTS), min_length=1, description="Which events to send: job.succeeded, "
        "job.failed, job.cancelled (the default: all three) and job.stage (each stage the job enters).")

    @field_validator("webhook_events_filter")
    @classmethod
    def _distinct(cls, value: list[WebhookEvent]) -> list[WebhookEvent]:
        return list(dict.fromkeys(value))

    def config(self) -> dict[str, Any]:
        """The resolved JobConfig, as stored with the job."""
        return self.model_dump(mode="json", exclude={"dataset_id", "metadata", "max_runtime_s", "webhook_url",
                                                      "webhook_events_filter"})


class JobError(BaseModel):
    code: str = Field(description="Stable code, e.g. dataset_invalid, attempts_exhausted, cancelled.")
    message: str


class Job(BaseModel):
    id: str = Field(examples=["job_0123456789abcdef0123"])
    object: Literal["job"] = "job"
    status: JobStatus
    stage: str | None = Field(None, description="While running: prepare, erm, saliency, finetune, jtt_identify, jtt, "
                                                "dfr, evaluate, export (those of the job's methods).")
    progress: float = Field(description="0..1 within the whole run.")
    dataset_id: str
    model_id: str | None = Field(None, description="The uploaded starting weights (config.model.weights_id), if any.")
    config: dict[str, Any] = Field(description="The full resolved JobConfig the run uses.")
    attempts: int = Field(description="Deliveries to a worker so far.")
    error: JobError | None = None
    metrics: dict[str, Any] | None = Field(None, description="Headline metrics once succeeded (metrics.json has them all).")
    metadata: dict[str, str] = Field(default_factory=dict, description="Your pairs from the job's creation.")
    max_runtime_s: int | None = Field(None, description="The job fails with error code timeout this long after its first start.")
    estimated_finish: Timestamp | None = Field(
        None, description="While running: when the worker expects it to finish, from the epoch times measured so far "
                          "(null when queued, before the first epoch, and once finished).")
    created_at: Timestamp
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    updated_at: Timestamp
    webhook_url: str | None = Field(None, description="Where the job's events are POSTed (null: nowhere).")
    webhook_events_filter: list[WebhookEvent] = Field(description="Which events are sent to webhook_url.")

    @classmethod
    def of(cls, row: tables.Job) -> Job:
        error = None
        if row.error_code or row.error_message:
            error = JobError(code=row.error_code or "error", message=row.error_message or "")
        return cls(id=row.id, status=row.status, stage=row.stage, progress=row.progress, dataset_id=row.dataset_id,
                   model_id=row.model_id, config=row.config, attempts=row.attempts, error=error,
                   metrics=row.metrics_summary, metadata=row.job_metadata or {}, max_runtime_s=row.max_runtime_s,
                   estimated_finish=row.estimated_finish_at if row.status == JobStatus.RUNNING else None,
                   created_at=row.created_at, started_at=row.started_at, finished_at=row.finished_at,
                   updated_at=row.updated_at,
                   webhook_url=row.webhook_url, webhook_events_filter=row.webhook_events_filter or list(DEFAULT_EVENTS))


class Event(BaseModel):
    id: int = Field(description="Ascending sequence number; pass as ?after= to continue.")
    kind: str = Field(description="stage | epoch | warning | status | info")
    stage: str | None = None
    message: str
    data: dict[str, Any] | None = None
    created_at: Timestamp

    @classmethod
    def of(cls, row: tables.JobEvent) -> Event:
        return cls(id=row.seq, kind=row.kind, stage=row.stage, message=row.message, data=row.data,
                   created_at=row.created_at)


class Artifact(BaseModel):
    name: str = Field(examples=["metrics.json"])
    size_bytes: int
    sha256: str
    content_type: str

    @classmethod
    def of(cls, row: tables.Artifact) -> Artifact:
        return cls(name=row.name, size_bytes=row.size_bytes, sha256=row.sha256, content_type=row.content_type)


class DatasetList(BaseModel):
    data: list[Dataset]
    next_cursor: str | None = Field(description="Pass as ?after= for the next (older) page; null on the last page.")


class ModelList(BaseModel):
    data: list[Model]
    next_cursor: str | None = Field(description="Pass as ?after= for the next (older) page; null on the last page.")


class JobList(BaseModel):
    data: list[Job]
    next_cursor: str | None = Field(description="Pass as ?after= for the next (older) page; null on the last page.")


class EventList(BaseModel):
    data: list[Event]
    next_cursor: int | None = Field(description="Id of the last event returned (pass as ?after= to continue or to poll); "
                                                "null when none was returned.")


class ArtifactList(BaseModel):
    data: list[Artifact]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class WorkerInfo(BaseModel):
    name: str = Field(description="The Celery worker's name (-n), e.g. gpu0@host.")
    device: str | None = Field(description="Where its jobs run: cpu, cuda, cuda:1 (MASKTUNE_DEVICE, checked when it started).")
    cuda_devices: int = Field(description="CUDA devices the worker sees.")
    queues: list[str] = Field(description="The queues it consumes: jobs, validation, or both.")


class Readiness(BaseModel):
    database: str = Field(description="ok, or error: <kind>")
    broker: str
    storage: str


class WorkerList(BaseModel):
    data: list[WorkerInfo] = Field(description="Workers that answered within a second. An API without workers still "
                                   "accepts jobs (they wait queued).")


class ArchitectureInfo(BaseModel):
    name: str = Field(description="The name to use in model.architecture and POST /v1/models.")
    library: str = Field(description="Whose module it is: masktune (small_cnn), torchvision or timm.")
    library_name: str = Field(description="Its name in that library (what to build it with in your own code).")
    default_input_size: int
    min_input_size: int
    target_layer: str | None = Field(description="The layer xGradCAM reads at the default input size (null: found when a job runs).")
    pretrained_available: bool | None = Field(description="ImageNet weights are in a worker's cache (null: the architecture has none).")
    description: str


class ArchitectureList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ArchitectureInfo]
    timm: str = Field(description="Any timm CNN is accepted as timm/<name>; the listed ones have cached weights.")
    reported_at: Timestamp | None = Field(description="When a worker last reported (null: none has yet; the list is then empty).")
    versions: dict[str, str] = Field(default_factory=dict, description="The reporting worker's torch, torchvision and timm.")


# ---------------------------------------------------------------- webhooks


class WebhookSecretCreated(BaseModel):
    object: Literal["webhook_secret"] = "webhook_secret"
    secret: str = Field(examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
                        description="Standard Webhooks signing secret. Shown in this answer only: store it now.")
    created_at: Timestamp


class WebhookSecretInfo(BaseModel):
    object: Literal["webhook_secret"] = "webhook_secret"
    exists: bool = Field(description="Whether the tenant has a secret (the secret itself is never shown again).")
    created_at: Timestamp | None = None


class WebhookAttempt(BaseModel):
    attempt: int = Field(description="1 for the first attempt.")
    started_at: Timestamp
    duration_ms: float
    http_status: int | None = Field(None, description="The receiver's answer; null when there was none (see error).")
    error: str | None = Field(None, description="Why there was no answer: refused address, connection, timeout.")

    @classmethod
    def of(cls, row: tables.WebhookAttempt) -> WebhookAttempt:
        return cls(attempt=row.attempt, started_at=row.started_at, duration_ms=row.duration_ms,
                   http_status=row.http_status, error=row.error)


class WebhookDelivery(BaseModel):
    id: str = Field(examples=["msg_0123456789abcdef0123"], description="The message id: its webhook-id header, the same on every attempt.")
    object: Literal["webhook_delivery"] = "webhook_delivery"
    type: WebhookEvent
    url: str
    status: DeliveryStatus = Field(description="pending (being tried, or waiting for its next attempt), delivered (a 2xx), "
                                               "failed (refused with a 4xx other than 408/429, or out of attempts).")
    payload: dict[str, Any] = Field(description="The body every attempt sends: {type, timestamp, data}.")
    next_attempt_at: Timestamp | None = Field(None, description="While pending: when the next attempt is due.")
    created_at: Timestamp
    finished_at: Timestamp | None = None
    attempts: list[WebhookAttempt]

    @classmethod
    def of(cls, row: tables.WebhookDelivery, attempts: list[tables.WebhookAttempt]) -> WebhookDelivery:
        pending = row.status == DeliveryStatus.PENDING
        return cls(id=row.id, type=row.event_type, url=row.url, status=row.status, payload=json.loads(row.body),
                   next_attempt_at=row.next_attempt_at if pending else None, created_at=row.created_at,
                   finished_at=row.finished_at, attempts=[WebhookAttempt.of(a) for a in attempts])


class WebhookDeliveryList(BaseModel):
    data: list[WebhookDelivery] = Field(description="The job's webhook messages, oldest first, each with its attempts.")
