"""Every setting of the service, from MASKTUNE_* environment variables (documented in README)."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .dataset_urls import normalize_url

MIN_BEATS_PER_TIMEOUT = 3  # a job is presumed lost only after at least this many heartbeat intervals without one
DEFAULT_MAX_RUNTIME_S = 24 * 3600  # a job's max_runtime_s when its body names none (capped by max_runtime_s_limit)


class Settings(BaseSettings):
    # An empty variable means unset (compose's `${X:-}` hands empty strings): the default applies.
    model_config = SettingsConfigDict(env_prefix="MASKTUNE_", extra="ignore", env_ignore_empty=True)

    data_dir: Path = Field(Path("runs/service"), description="Root of the embedded defaults: SQLite file, blobs, broker folder, work areas.")
    database_url: str = Field("", description="SQLAlchemy URL; default: SQLite under data_dir. PostgreSQL: postgresql+psycopg://user@host/db.")
    blob_url: str = Field("", description="fsspec URL for blob storage; default: data_dir/blobs. S3-compatible: s3://bucket/prefix.")
    broker_url: str = Field("", description="Celery broker; default: kombu's filesystem transport under data_dir/broker. Production: redis://host:6379/0.")
    work_dir: Path | None = Field(None, description="Worker's local scratch space for running jobs; default: data_dir/work.")
    dataset_cache_dir: Path | None = Field(
        None, description="Worker's local copies of datasets (unpacked, and decoded once per input size), shared by its jobs; "
        "default: work_dir/datasets. Put it on a disk with room for the largest datasets: see README, Data at scale.")
    max_upload_bytes: int = Field(2 << 30, ge=1, description="Largest accepted upload; larger requests get 413.")
    archive_max_members: int = Field(1_000_000, ge=1, description="Files a dataset archive (or a dataset URL's listing) may hold; CelebA has 202,599 images.")
    archive_max_bytes: int = Field(64 << 30, ge=1, description="Bytes a dataset archive may unpack to (or a dataset URL's objects may total); counted while unpacking.")
    archive_max_ratio: float = Field(250.0, gt=1, description="Largest unpacked/packed size ratio of an archive and of each zip member; past it the archive is a bomb.")
    dataset_url_prefixes: dict[str, list[str]] = Field(
        default_factory=dict,
        description='JSON {"tenant name": ["s3://bucket/prefix/", ...], "*": [...]}: where each tenant (or every tenant, "*") may '
                    "register a dataset by URL; empty: nowhere. Never inside the service's own blob store.")
    max_attempts: int = Field(3, ge=1, description="Deliveries of one job before it fails for good (a worker that dies mid-job counts).")
    max_runtime_s_limit: int = Field(
        DEFAULT_MAX_RUNTIME_S, ge=1, description="The largest max_runtime_s a job may ask for; a job that names none gets "
        f"{DEFAULT_MAX_RUNTIME_S} s (24 h), or this limit if lower. Raise visibility_timeout_s with it (Redis "
        "redelivers a job still running past that).")
    visibility_timeout_s: int = Field(24 * 3600, ge=60, description="Redis redelivers an unacknowledged job after this long; must exceed the longest job.")
    progress_interval_s: float = Field(1.0, ge=0, description="Least time between two progress writes of a running job.")
    device: str | None = Field(None, description="Worker device (cpu, cuda, cuda:1); default: CUDA when present. A worker "
                               "that cannot have the device it is given refuses to start.")
    jobs_queue: str = Field("masktune.jobs", description="Queue of MaskTune runs (GPU workers).")
    validation_queue: str = Field("masktune.validation", description="Queue of upload validation (CPU is enough).")
    max_active_jobs_per_tenant: int = Field(4, ge=1, description="Queued + running jobs a tenant may have; past it POST /v1/jobs answers 429 with Retry-After.")
    tenant_storage_quota_bytes: int = Field(50 << 30, ge=1, description="Bytes of uploads and artifacts a tenant may keep; past it uploads are refused.")
    upload_idle_timeout_s: float = Field(60.0, gt=0, description="An upload that sends nothing for this long is dropped (408), freeing its worker thread.")
    heartbeat_interval_s: float = Field(5.0, gt=0, description="How often a running job (and an upload being validated) writes its heartbeat, from a thread of its own.")
    heartbeat_timeout_s: float = Field(
        30.0, gt=0, description="A running job whose heartbeat is older than this lost its worker: a redelivered message takes it over, "
        f"else the reconciler requeues it. At least {MIN_BEATS_PER_TIMEOUT} heartbeat intervals.")
    reconcile_interval_s: float = Field(30.0, gt=0, description="How often the reconciler requeues lost jobs and expires old work areas.")
    work_retention_s: float = Field(7 * 24 * 3600, gt=0, description="Work areas (checkpoints, stage outputs) of finished jobs are deleted after this long; artifacts stay.")
    report_catalog: bool = Field(True, description="Workers write their architectures and cached pretrained weights to the database when they start (GET /v1/architectures).")
    api_host: str = Field("127.0.0.1", description="Address the API binds (python -m api, the embedded start).")
    api_port: int = Field(8000, description="Port the API binds (python -m api, the embedded start).")
    migrate_on_start: bool = Field(
        True, description="The API applies the database migrations when it starts. Compose sets false: its one-shot "
        "`migrate` service applies them before the API starts, and the API only checks the schema is current.")
    bootstrap_tenant: str = Field("default", min_length=1, max_length=200,
                                  description="Tenant of the first API key `python -m api.manage migrate --bootstrap-key` creates.")
    bootstrap_api_key: str | None = Field(
        None, min_length=20, description="The secret of that first key (at least 20 characters); unset: one is generated "
        "and printed once. Used only while the database holds no API key.")
    api_workers: int = Field(1, ge=1, description="API processes python -m api runs (uvicorn workers): about one per core.")
    events_poll_interval_s: float = Field(1.0, gt=0, description="How often an event stream (GET /v1/jobs/{id}/events as text/event-stream) reads new events.")
    events_keepalive_s: float = Field(15.0, gt=0, description="An event stream sends a keep-alive comment this often, so proxies and clients keep it open.")
    # Webhooks (README, Webhooks).
    webhook_max_attempts: int = Field(8, ge=1, description="Attempts to deliver one webhook message before it is marked failed.")
    webhook_retry_base_s: float = Field(15.0, gt=0, description="Wait before the 2nd attempt of a webhook message; doubled before each later one.")
    webhook_timeout_s: float = Field(10.0, gt=0, description="Time one webhook attempt may take (connect, send, answer) before it counts as failed.")
    webhook_allowed_networks: list[str] = Field(
        default_factory=list, description='JSON list of CIDRs, e.g. ["10.1.0.0/16"]: webhook URLs may point there as well as at '
        "public addresses; loopback, private, link-local (the cloud metadata address), multicast and reserved ones are refused otherwise.")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines of the API and the workers: text, or one JSON object per line (timestamp, level, logger, "
        "message; request_id and tenant in the API, job_id and stage in a job's worker process).")
    worker_metrics_port: int = Field(0, ge=0, le=65535, description="Port of a worker's Prometheus exporter (GET /metrics on "
                                     "every interface); 0 (or unset): none. One port per worker process on a host.")

    @field_validator("dataset_url_prefixes")
    @classmethod
    def _normalised_prefixes(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        # A prefix the checker cannot read is a deployment error: refuse to start, not every request.
        return {tenant: [normalize_url(p) + "/" for p in prefixes] for tenant, prefixes in value.items()}

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return [str(ipaddress.ip_network(network.strip(), strict=False)) for network in value]

    @model_validator(mode="after")
    def _timeout_spans_beats(self) -> Settings:
        # One late beat (a slow database write, a busy GIL) must not make a live worker look dead.
        if self.heartbeat_timeout_s < MIN_BEATS_PER_TIMEOUT * self.heartbeat_interval_s:
            raise ValueError(f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must be at least {MIN_BEATS_PER_TIMEOUT} "
                             f"times heartbeat_interval_s ({self.heartbeat_interval_s})")
        return self

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        self.data_dir = self.data_dir.resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'masktune.db'}"
        if not self.blob_url:
            self.blob_url = str(self.data_dir / "blobs")
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if self.work_dir is None:
            self.work_dir = self.data_dir / "work"
        if self.dataset_cache_dir is None:
            self.dataset_cache_dir = self.work_dir / "datasets"
        return self

    @property
    def broker_folder(self) -> Path:
        """Where the filesystem broker keeps its messages (embedded mode only)."""
        return self.data_dir / "broker"

    def celery_config(self) -> dict:
        """The Celery settings both the API (producer) and the worker use: one place, no drift."""
        transport: dict = {"visibility_timeout": self.visibility_timeout_s}
        if self.broker_url.startswith("filesystem"):
            folder = self.broker_folder
            for sub in ("queue", "processed", "control"):
                (folder / sub).mkdir(parents=True, exist_ok=True)
            transport.update(data_folder_in=str(folder / "queue"), data_folder_out=str(folder / "queue"),
                             processed_folder=str(folder / "processed"), control_folder=str(folder / "control"),
                             store_processed=False)
        return {
            "broker_url": self.broker_url,
            "broker_transport_options": transport,
            # Redis result backends read it from here (we keep no results, but set it everywhere).
            "result_backend_transport_options": {"visibility_timeout": self.visibility_timeout_s},
            "task_ignore_result": True,
            "task_acks_late": True,
            "task_reject_on_worker_lost": True,
            "worker_prefetch_multiplier": 1,
            "broker_connection_retry_on_startup": True,
            "task_routes": {
                TASK_RUN_JOB: {"queue": self.jobs_queue},
                TASK_VALIDATE_DATASET: {"queue": self.validation_queue},
                TASK_VALIDATE_MODEL: {"queue": self.validation_queue},
                TASK_DELIVER_WEBHOOK: {"queue": self.validation_queue},  # short HTTP calls: CPU processes send them
            },
        }


# Celery task names: the API sends them by name, the worker registers them.
TASK_RUN_JOB = "masktune.run_job"
TASK_VALIDATE_DATASET = "masktune.validate_dataset"
TASK_VALIDATE_MODEL = "masktune.validate_model"
TASK_DELIVER_WEBHOOK = "masktune.deliver_webhook"
# The broadcast command each worker answers with its device and queues (GET /v1/workers).
COMMAND_REPORT_DEVICE = "masktune_report_device"


@lru_cache
def get_settings() -> Settings:
    return Settings()
