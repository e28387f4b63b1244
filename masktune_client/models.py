"""What the API returns, as typed objects: the field names of its JSON bodies (see /openapi.json).

Unknown fields are kept (``extra="allow"``), so a newer server's additions survive a round trip
through ``model_dump()``; statuses are plain strings for the same reason (compare them with
``masktune_client.statuses``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from .statuses import TERMINAL



class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class Dataset(_Body):
    id: str
    object: str = "dataset"
    filename: str
    size_bytes: int
    sha256: str
    source_url: str | None = None
    status: str  # validating | ready | invalid
    error: str | None = None
    summary: dict[str, Any] | None = None
    created_at: datetime
    updated_at: datetime


class Model(_Body):
    id: str
    object: str = "model"
    filename: str
    architecture: str
    num_classes: int
    size_bytes: int
    sha256: str
    status: str  # validating | ready | invalid
    error: str | None = None
    created_at: datetime
    updated_at: datetime


class JobError(_Body):
    code: str
    message: str


class Job(_Body):
    id: str
    object: str = "job"
    status: str  # queued | running | cancelling | succeeded | failed | cancelled
    stage: str | None = None
    progress: float
    dataset_id: str
    model_id: str | None = None
    config: dict[str, Any]
    attempts: int
    error: JobError | None = None
    metrics: dict[str, Any] | None = None
    metadata: dict[str, str] = {}
    max_runtime_s: int | None = None
    estimated_finish: datetime | None = None  # while running, from the epochs measured so far
    webhook_url: str | None = None
    webhook_events_filter: list[str] = []
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


class Event(_Body):
    id: int
    kind: str  # stage | epoch | warning | status | info
    stage: str | None = None
    message: str
    data: dict[str, Any] | None = None
    created_at: datetime


class Artifact(_Body):
    name: str
    size_bytes: int
    sha256: str
    content_type: str


class DatasetList(_Body):
    data: list[Dataset]
    next_cursor: str | None = None


class ModelList(_Body):
    data: list[Model]
    next_cursor: str | None = None


class JobList(_Body):
    data: list[Job]
    next_cursor: str | None = None


class EventList(_Body):
    data: list[Event]
    next_cursor: int | None = None


class ArtifactList(_Body):
    data: list[Artifact]


class Health(_Body):
    status: str


class WorkerInfo(_Body):
    name: str
    device: str | None = None
    cuda_devices: int
    queues: list[str]


class WorkerList(_Body):
    data: list[WorkerInfo]


class Readiness(_Body):
    database: str
    broker: str
    storage: str

    @property
    def ready(self) -> bool:
        """Database, broker and storage all answered (what makes /readyz 200 rather than 503)."""
        return self.database == self.broker == self.storage == "ok"


class ArchitectureInfo(_Body):
    name: str
    library: str
    library_name: str
    default_input_size: int
    min_input_size: int
    target_layer: str | None = None
    pretrained_available: bool | None = None
    description: str


class ArchitectureList(_Body):
    data: list[ArchitectureInfo]
    timm: str
    reported_at: datetime | None = None
    versions: dict[str, str] = {}


class WebhookSecret(_Body):
    object: str = "webhook_secret"
    secret: str | None = None  # only in the answer that created it
    exists: bool = True
    created_at: datetime | None = None


class WebhookAttempt(_Body):
    attempt: int
    started_at: datetime
    duration_ms: float
    http_status: int | None = None
    error: str | None = None


class WebhookDelivery(_Body):
    id: str  # the webhook-id header, the same on every attempt
    object: str = "webhook_delivery"
    type: str  # job.succeeded | job.failed | job.cancelled | job.stage
    url: str
    status: str  # pending | delivered | failed
    payload: dict[str, Any]
    next_attempt_at: datetime | None = None
    created_at: datetime
    finished_at: datetime | None = None
    attempts: list[WebhookAttempt]


class WebhookDeliveryList(_Body):
    object: str = "list"
    data: list[WebhookDelivery]
