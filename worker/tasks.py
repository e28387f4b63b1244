"""Celery tasks. Each message carries one id; the database row is the truth."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from celery.exceptions import Ignore
from sqlalchemy import select, update

from jobspec import JobConfig
from jobstore.blobs import BlobStore
from jobstore.db import session_scope
from jobstore.jobs import TERMINAL, add_event, update_job
from jobstore.models import Artifact, Dataset, Job, Model, utcnow
from jobstore.settings import TASK_RUN_JOB, TASK_VALIDATE_DATASET, TASK_VALIDATE_MODEL, Settings, get_settings
from masktune_core import ARTIFACTS, JobCancelled, MaskTuneError, MaskTuneRun, ProgressEvent, create_model, load_weights
from masktune_core.archive import extract_archive
from masktune_core.data import decode_dataset, index_dataset, summarize

from .celery_app import app
from .workspace import Workspace

log = logging.getLogger(__name__)

CONTENT_TYPES = {".json": "application/json", ".png": "image/png", ".safetensors": "application/octet-stream"}
VALIDATION_SIZE = 32  # decoding at a small size proves an image is readable without the full cost


def _blobs(settings: Settings) -> BlobStore:
    return BlobStore(settings.blob_url)


def _by_id(session, table, public_id: str):
    return session.scalar(select(table).where(table.id == public_id))


# ---------------------------------------------------------------- uploads


def _validate_upload(table, upload_id: str, check: Callable[[Path, dict], dict]) -> None:
    """Download an upload and ``check`` it: ready (plus the fields check returns) or invalid with the reason."""
    settings = get_settings()
    with session_scope(settings.database_url) as session:
        row = _by_id(session, table, upload_id)
        if row is None or row.status != "validating":
            return  # deleted meanwhile, or a duplicate delivery
        fields = {column.key: getattr(row, column.key) for column in table.__table__.columns}
    values: dict = {"status": "ready", "error": None}
    with tempfile.TemporaryDirectory(dir=_scratch(settings)) as tmp:
        local = Path(tmp) / f"upload{Path(fields['filename']).suffix}"
        try:
            _blobs(settings).get_file(fields["blob_key"], local)
            values.update(check(local, fields))
        except MaskTuneError as exc:
            values = {"status": "invalid", "error": str(exc)}
        except Exception as exc:  # a reader bug must not leave the upload validating forever
            log.exception("validating %s (%s) failed", upload_id, fields["filename"])
            values = {"status": "invalid", "error": f"the upload could not be read: {type(exc).__name__}"}
    with session_scope(settings.database_url) as session:
        session.execute(update(table).where(table.id == upload_id, table.status == "validating")
                        .values(updated_at=utcnow(), **values))


@app.task(name=TASK_VALIDATE_DATASET)
def validate_dataset(dataset_id: str) -> None:
    """Unpack, index and decode the archive with masktune_core's reader."""
    def check(archive: Path, _: dict) -> dict:
        index = index_dataset(extract_archive(archive, archive.parent / "unpacked"))
        return {"summary": summarize(index, decode_dataset(index, VALIDATION_SIZE))}

    _validate_upload(Dataset, dataset_id, check)


@app.task(name=TASK_VALIDATE_MODEL)
def validate_model(model_id: str) -> None:
    """Load the weights into the named architecture, never unpickling code."""
    def check(weights: Path, row: dict) -> dict:
        load_weights(create_model(row["architecture"], row["num_classes"]), weights)
        return {}

    _validate_upload(Model, model_id, check)


def _scratch(settings: Settings) -> Path:
    path = settings.work_dir / "scratch"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- jobs


class JobReporter:
    """Turns pipeline events into job rows and events: stages and epochs always, progress throttled."""

    def __init__(self, settings: Settings, job_id: str, workspace: Workspace):
        self.settings = settings
        self.job_id = job_id
        self.workspace = workspace
        self._last_write = 0.0
        self._last_cancel_check = 0.0
        self._cancel = False

    def __call__(self, event: ProgressEvent) -> None:
        now = time.monotonic()
        if event.kind == "progress" and now - self._last_write < self.settings.progress_interval_s:
            return
        if event.kind in ("stage", "epoch"):
            self.workspace.sync()  # what finished before this event survives a crash
        self._last_write = now
        with session_scope(self.settings.database_url) as session:
            update_job(session, self.job_id, stage=event.stage, progress=round(event.progress, 4), heartbeat_at=utcnow())
            if event.kind in ("stage", "epoch", "warning"):
                add_event(session, self.job_id, event.kind, event.message, event.stage, event.data or None)

    def should_cancel(self) -> bool:
        now = time.monotonic()
        if not self._cancel and now - self._last_cancel_check >= min(self.settings.progress_interval_s, 0.5):
            self._last_cancel_check = now
            with session_scope(self.settings.database_url) as session:
                self._cancel = bool(session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))
        return self._cancel


def _finish(settings: Settings, job_id: str, status: str, message: str, **fields) -> None:
    with session_scope(settings.database_url) as session:
        if update_job(session, job_id, status=status, finished_at=utcnow(), **fields):
            add_event(session, job_id, "status", message, data={"status": status})


def _summary(metrics: dict) -> dict:
    """The few numbers a job listing shows; metrics.json has everything."""
    def pick(m: dict) -> dict:
        keys = ("overall_accuracy", "worst_group_accuracy", "worst_group", "worst_class_accuracy", "worst_class")
        return {k: m[k] for k in keys if k in m}

    return {
        "verdict": metrics["verdict"],
        "erm": {split: pick(m) for split, m in metrics["erm"].items()},
        "masktune": {split: pick(m) for split, m in metrics["masktune"].items()},
    }


@app.task(name=TASK_RUN_JOB, bind=True)
def run_job(self, job_id: str) -> None:
    settings = get_settings()
    with session_scope(settings.database_url) as session:
        job = _by_id(session, Job, job_id)
        if job is None or job.status in TERMINAL:
            raise Ignore()  # deleted, or a duplicate delivery of a finished job
        job_cancelled = job.cancel_requested
        if not job_cancelled:
            attempts = job.attempts + 1
            update_job(session, job_id, status="running", attempts=attempts, heartbeat_at=utcnow(),
                       started_at=job.started_at or utcnow())
            add_event(session, job_id, "status", f"attempt {attempts} started", data={"status": "running", "attempt": attempts})
        config = JobConfig.model_validate(job.config)
        dataset = _by_id(session, Dataset, job.dataset_id)
        model = _by_id(session, Model, job.model_id) if job.model_id else None
        dataset_key, dataset_name = dataset.blob_key, dataset.filename
        weights = (model.blob_key, Path(model.filename).suffix) if model else None
    if job_cancelled:
        _finish(settings, job_id, "cancelled", "cancelled before it started")
        return
    if attempts > settings.max_attempts:
        _finish(settings, job_id, "failed", "too many attempts", error_code="too_many_attempts",
                error_message=f"the job was started {attempts - 1} times and never finished "
                              f"(its worker died, e.g. out of memory); giving up after MASKTUNE_MAX_ATTEMPTS={settings.max_attempts}")
        return

    blobs = _blobs(settings)
    workspace = Workspace(blobs, settings.work_dir, job_id)
    restored = workspace.restore()
    reporter = JobReporter(settings, job_id, workspace)
    if restored:
        with session_scope(settings.database_url) as session:
            add_event(session, job_id, "info", f"resuming from {restored} stored work files")
    try:
        data = workspace.root / "input" / f"dataset{''.join(Path(dataset_name).suffixes[-2:]) or '.bin'}"
        if not data.exists():
            blobs.get_file(dataset_key, data)
        initial = None
        if weights:
            initial = workspace.root / "input" / f"weights{weights[1]}"
            if not initial.exists():
                blobs.get_file(weights[0], initial)
        run = MaskTuneRun(data, workspace.root / "out", config, workdir=workspace.workdir, initial_weights=initial,
                          device=settings.device, on_event=reporter, should_cancel=reporter.should_cancel)
        metrics = run.run()
        _store_artifacts(settings, blobs, job_id, workspace.root / "out")
    except JobCancelled:
        _finish(settings, job_id, "cancelled", "cancelled by request")
        return
    except MaskTuneError as exc:
        _finish(settings, job_id, "failed", str(exc), error_code=exc.code, error_message=str(exc))
        return
    except Exception as exc:
        log.exception("job %s failed", job_id)
        _finish(settings, job_id, "failed", "internal error", error_code="internal_error",
                error_message=f"{type(exc).__name__}: {str(exc)[:500]}")
        return
    _finish(settings, job_id, "succeeded", metrics["verdict"]["message"], progress=1.0, metrics_summary=_summary(metrics))
    shutil.rmtree(workspace.root, ignore_errors=True)


def _store_artifacts(settings: Settings, blobs: BlobStore, job_id: str, out_dir: Path) -> None:
    """Upload each artifact (atomically) and record it; a re-run overwrites the same names."""
    for name in ARTIFACTS:
        path = out_dir / name
        if not path.exists():
            continue
        key = f"jobs/{job_id}/artifacts/{name}"
        size, sha256 = blobs.put_file(key, path)
        with session_scope(settings.database_url) as session:
            session.merge(Artifact(job_id=job_id, name=name, blob_key=key, size_bytes=size, sha256=sha256,
                                   content_type=CONTENT_TYPES.get(path.suffix, "application/octet-stream")))
