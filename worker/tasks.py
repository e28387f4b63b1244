"""Celery tasks. Each message carries one id; the database row is the truth."""

from __future__ import annotations

import logging
import random
import secrets
import tempfile
import time
from pathlib import Path
from typing import Callable

from sqlalchemy import select, update

from jobspec import JobConfig
from jobstore.blobs import BlobStore
from jobstore.db import session_scope
from jobstore.jobs import add_event, claim_job, fresh_claim, update_job
from jobstore.models import Artifact, Dataset, Job, Model, utcnow
from jobstore.settings import TASK_RUN_JOB, TASK_VALIDATE_DATASET, TASK_VALIDATE_MODEL, Settings, get_settings
from masktune_core import JobCancelled, MaskTuneError, MaskTuneRun, ProgressEvent, create_model, load_weights
from masktune_core import runfolder as rf
from masktune_core.archive import ExtractionLimits, extract_archive
from masktune_core.data import LabelAttributeRequired, index_dataset, inspect_images, summarize
from masktune_core.decoded import decode_image
from masktune_core.errors import DatasetError
from masktune_core.metrics import headline
from masktune_core.models import resolve_input_size, saliency_target_name

from . import metrics as job_metrics  # not `metrics`: the run's results go by that name here
from .celery_app import app
from .dataset_cache import DatasetCache, prune
from .heartbeat import Heartbeat
from .sources import UrlListing, fetch_all, list_url, stand_in_tree
from .workspace import Workspace

log = logging.getLogger(__name__)

VALIDATION_SIZE = 32  # decoding at a small size proves an image is readable without the full cost
URL_SAMPLE_IMAGES = 64  # images of a URL dataset fetched and decoded by validation
STALE_CLAIM_MARGIN_S = 1.0  # a delivery that waits for a claim to go stale comes back this long after it did


def _blobs(settings: Settings) -> BlobStore:
    return BlobStore(settings.blob_url)


def _by_id(session, table, public_id: str):
    return session.scalar(select(table).where(table.id == public_id))


# ---------------------------------------------------------------- uploads


def _validate_upload(table, upload_id: str, check: Callable[[Path, dict], dict]) -> None:
    """``check(scratch folder, row fields)``: ready (plus the fields check returns) or invalid with the reason.

    While it runs, a heartbeat keeps the row's updated_at fresh: the reconciler re-sends only
    validations whose heartbeat stopped (a lost message or worker), however long a large one takes.
    """
    settings = get_settings()
    with session_scope(settings.database_url) as session:
        row = _by_id(session, table, upload_id)
        if row is None or row.status != "validating":
            return  # deleted meanwhile, or a duplicate delivery
        fields = {column.key: getattr(row, column.key) for column in table.__table__.columns}
    values: dict = {"status": "ready", "error": None}

    def beat() -> bool:
        with session_scope(settings.database_url) as session:
            return session.execute(update(table).where(table.id == upload_id, table.status == "validating")
                                   .values(updated_at=utcnow())).rowcount == 1

    with Heartbeat(f"{table.__tablename__} {upload_id}", settings.heartbeat_interval_s, beat), \
            tempfile.TemporaryDirectory(dir=_scratch(settings)) as tmp:
        try:
            values.update(check(Path(tmp), fields))
        except MaskTuneError as exc:
            values = {"status": "invalid", "error": str(exc)}
        except Exception as exc:  # a reader bug must not leave the upload validating forever
            log.exception("validating %s (%s) failed", upload_id, fields["filename"])
            values = {"status": "invalid", "error": f"the upload could not be read: {type(exc).__name__}"}
    with session_scope(settings.database_url) as session:
        session.execute(update(table).where(table.id == upload_id, table.status == "validating")
                        .values(updated_at=utcnow(), **values))


def _download_upload(settings: Settings, fields: dict, folder: Path) -> Path:
    local = folder / f"upload{Path(fields['filename']).suffix}"
    _blobs(settings).get_file(fields["blob_key"], local)
    return local


def _extraction_limits(settings: Settings) -> ExtractionLimits:
    return ExtractionLimits(max_members=settings.archive_max_members, max_total_bytes=settings.archive_max_bytes,
                            max_member_ratio=settings.archive_max_ratio)


def _summarize_archive(archive: Path, limits: ExtractionLimits) -> dict:
    root = extract_archive(archive, archive.parent / "unpacked", limits)
    try:
        index = index_dataset(root)
    except LabelAttributeRequired as exc:  # CelebA: which attribute is the label is the job's choice
        return exc.overview
    return summarize(index, inspect_images(index))


def _summarize_prefix(listing: UrlListing, root: Path) -> dict:
    """Index the prefix from its listing and decode a seeded sample of its images."""
    stand_in_tree(listing, root)
    try:
        summary = summarize(index_dataset(root))
    except LabelAttributeRequired as exc:
        summary = exc.overview
    images = listing.images()
    sample = random.Random(0).sample(images, min(URL_SAMPLE_IMAGES, len(images)))
    listing.fetch([(remote, root.joinpath(*rel.parts)) for remote, rel, _ in sample])
    unreadable = []
    for _, rel, _ in sample:
        try:
            decode_image(root.joinpath(*rel.parts), VALIDATION_SIZE)
        except (DatasetError, OSError, ValueError, SyntaxError) as exc:
            unreadable.append({"file": str(rel), "reason": f"unreadable image: {exc}"})
    if sample and len(unreadable) == len(sample):
        raise DatasetError(f"none of the {len(sample)} sampled images could be read, e.g. {unreadable[0]['file']}: "
                           f"{unreadable[0]['reason']}")
    summary["sample"] = {"images": len(sample), "unreadable": unreadable}
    return summary


@app.task(name=TASK_VALIDATE_DATASET)
def validate_dataset(dataset_id: str) -> None:
    """Index the dataset with masktune_core's reader; read every image's header and decode a sample
    (the job's decode pass reports any image that fails later). An upload is unpacked; a URL is
    listed (worker.sources): an archive object is fetched, a prefix only sampled."""
    settings = get_settings()
    limits = _extraction_limits(settings)

    def check(folder: Path, row: dict) -> dict:
        if row["source_url"] is None:
            return {"summary": _summarize_archive(_download_upload(settings, row, folder), limits)}
        listing = list_url(row["source_url"], settings.blob_url, limits)
        found = {"size_bytes": listing.size_bytes, "sha256": listing.sha256}
        if listing.archive:
            return {**found, "summary": _summarize_archive(fetch_all(listing, folder / "dataset"), limits)}
        return {**found, "summary": _summarize_prefix(listing, folder / "dataset")}

    _validate_upload(Dataset, dataset_id, check)


@app.task(name=TASK_VALIDATE_MODEL)
def validate_model(model_id: str) -> None:
    """Load the weights strict into the named architecture (library key layout, wrappers undone), never unpickling code."""
    def check(folder: Path, row: dict) -> dict:
        architecture = row["architecture"]
        model = create_model(architecture, row["num_classes"])
        saliency_target_name(model, architecture, resolve_input_size(architecture, None))  # refuses transformers
        load_weights(model, _download_upload(get_settings(), row, folder), architecture=architecture)
        return {}

    _validate_upload(Model, model_id, check)


def _scratch(settings: Settings) -> Path:
    path = settings.work_dir / "scratch"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- jobs


class Claim:
    """This attempt's hold on a job row (see jobstore.jobs.claim_job).

    Every write of the attempt goes through ``write``, which names the claim token; once
    a write finds the row claimed by another attempt (the reconciler presumed this one
    dead), finished or deleted, ``lost`` turns true and the attempt stops writing. A
    Heartbeat thread keeps the claim fresh however long a batch, a download or an upload takes.
    """

    def __init__(self, settings: Settings, job_id: str, token: str):
        self.settings = settings
        self.job_id = job_id
        self.token = token
        self.lost = False
        self._heartbeat = Heartbeat(f"job {job_id}", settings.heartbeat_interval_s, self.beat)

    def write(self, session, **fields) -> bool:
        """Update the job row (and the heartbeat) if this attempt still owns it; False once it does not."""
        if not self.lost and not update_job(session, self.job_id, self.token, heartbeat_at=utcnow(), **fields):
            log.warning("job %s: claim %s lost (requeued, finished or deleted elsewhere); stopping", self.job_id, self.token)
            self.lost = True
        return not self.lost

    def beat(self) -> bool:
        with session_scope(self.settings.database_url) as session:
            return self.write(session)

    def __enter__(self) -> Claim:
        self._heartbeat.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._heartbeat.__exit__(*exc)


class JobReporter:
    """Turns pipeline events into job rows and events: stages and epochs always, progress throttled."""

    def __init__(self, settings: Settings, claim: Claim, workspace: Workspace, after_prepare: Callable[[], None]):
        self.settings = settings
        self.claim = claim
        self.job_id = claim.job_id
        self.workspace = workspace
        self.after_prepare = after_prepare
        self._last_write = 0.0
        self._last_cancel_check = 0.0
        self._cancel = False

    def __call__(self, event: ProgressEvent) -> None:
        if self.claim.lost:
            return
        job_metrics.on_event(event)
        now = time.monotonic()
        # A resumed ERM reports where it picked up: kept as an event, so clients (and tests) see it.
        keep = event.kind in ("stage", "info", "epoch", "warning") or "resumed_from_epoch" in event.data
        if not keep and now - self._last_write < self.settings.progress_interval_s:
            return
        self._last_write = now
        if event.kind in ("stage", "epoch") and self.claim.beat():
            self.workspace.sync()  # what finished before this event survives a crash
            if event.kind == "stage" and event.stage != "prepare":
                self.after_prepare()
        with session_scope(self.settings.database_url) as session:
            if self.claim.write(session, stage=event.stage, progress=round(event.progress, 4)) and keep:
                kind = "info" if event.kind == "progress" else event.kind
                add_event(session, self.job_id, kind, event.message, event.stage, event.data or None)

    def should_cancel(self) -> bool:
        """True once a cancel was asked for, or once this attempt lost its claim."""
        now = time.monotonic()
        if not self._cancel and now - self._last_cancel_check >= min(self.settings.progress_interval_s, 0.5):
            self._last_cancel_check = now
            with session_scope(self.settings.database_url) as session:
                self._cancel = bool(session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))
        return self._cancel or self.claim.lost


def _finish(settings: Settings, claim: Claim, status: str, message: str, artifacts: list[Artifact] = (), **fields) -> None:
    """The terminal write, with the artifact rows, in one transaction: only while the claim holds."""
    with session_scope(settings.database_url) as session:
        if claim.write(session, status=status, finished_at=utcnow(), **fields):
            job_metrics.job_finished(status)
            for artifact in artifacts:
                session.merge(artifact)
            add_event(session, claim.job_id, "status", message, data={"status": status})


# Retries are bounded by waited_for (one per attempt that holds the job), not by a count.
@app.task(name=TASK_RUN_JOB, bind=True, max_retries=None)
def run_job(self, job_id: str, waited_for: str | None = None) -> None:
    """Claim the job, then run it.

    A worker killed mid-job (the OOM killer) gets its message back at once, while its claim still
    looks fresh. So a delivery that finds another attempt holding a fresh claim comes back (a Celery
    retry) just after that claim goes stale unless it beats, naming the attempt it waited for
    (``waited_for``); finding that same attempt still beating then means it is alive, and the
    delivery is a duplicate. Duplicates and deliveries of finished or deleted jobs are dropped.
    """
    settings = get_settings()
    token = secrets.token_hex(16)
    with session_scope(settings.database_url) as session:
        outcome = claim_job(session, job_id, token, heartbeat_timeout_s=settings.heartbeat_timeout_s,
                            max_attempts=settings.max_attempts)
        holder = fresh_claim(session, job_id, settings.heartbeat_timeout_s) if outcome == "busy" else None
    if outcome == "exhausted":
        log.warning("job %s failed: too many attempts (max %d)", job_id, settings.max_attempts)
        job_metrics.job_finished("failed")
    elif holder is not None and holder.token != waited_for:
        countdown = holder.stale_in_s + STALE_CLAIM_MARGIN_S
        log.info("job %s: claim %s is fresh; this delivery comes back in %.1f s, when it is stale unless its worker lives",
                 job_id, holder.token, countdown)
        raise self.retry(kwargs={"waited_for": holder.token}, countdown=countdown)
    elif outcome == "busy":
        log.info("job %s is not claimable (finished, deleted, or another worker holds it); dropping this delivery", job_id)
    else:
        workspace = Workspace(_blobs(settings), settings.work_dir, job_id, token)
        try:
            with Claim(settings, job_id, token) as claim, job_metrics.job_run(job_id):
                _run_claimed(settings, claim, workspace)
        finally:
            workspace.remove()


def _run_claimed(settings: Settings, claim: Claim, workspace: Workspace) -> None:
    job_id = claim.job_id
    blobs = workspace.blobs
    try:
        with session_scope(settings.database_url) as session:
            job = _by_id(session, Job, job_id)
            config = JobConfig.model_validate(job.config)
            dataset = _by_id(session, Dataset, job.dataset_id)
            model = _by_id(session, Model, job.model_id) if job.model_id else None
            source = (dataset.blob_key, dataset.filename, dataset.source_url, dataset.sha256)
            cache = DatasetCache(blobs, settings.dataset_cache_dir, dataset.id, dataset.sha256)
            weights = (model.blob_key, model.filename) if model else None
        restored = workspace.restore()  # the work of earlier attempts, from any machine
        if restored:
            with session_scope(settings.database_url) as session:
                if claim.write(session):
                    add_event(session, job_id, "info", f"resuming from {restored} stored work files", data={"restored_files": restored})
        data = _fetch_dataset(settings, blobs, workspace.root, *source)
        initial = None
        if weights:
            initial = workspace.root / rf.input_file("weights", weights[1])
            blobs.get_file(weights[0], initial)
        with cache.in_use():
            prune(settings.dataset_cache_dir, settings.work_retention_s)
            reporter = JobReporter(settings, claim, workspace, after_prepare=lambda: cache.publish(run.input_size))
            run = MaskTuneRun(data, workspace.root / rf.OUT, config, workdir=workspace.workdir, initial_weights=initial,
                              device=settings.device, on_event=reporter, should_cancel=reporter.should_cancel,
                              cache_dir=settings.dataset_cache_dir, dataset_sha256=source[3],
                              extraction_limits=_extraction_limits(settings))
            if cache.fetch(run.input_size):
                with session_scope(settings.database_url) as session:
                    if claim.write(session):
                        add_event(session, job_id, "info", "fetched the decoded dataset from storage", stage="prepare")
            metrics = run.run()
        if not claim.beat():
            return  # taken over meanwhile: the new owner uploads its own artifacts
        artifacts = _store_artifacts(blobs, job_id, workspace.root / rf.OUT)
    except JobCancelled:
        if not claim.lost:
            _finish(settings, claim, "cancelled", "cancelled by request")
        return
    except MaskTuneError as exc:
        _finish(settings, claim, "failed", str(exc), error_code=exc.code, error_message=str(exc))
        return
    except Exception as exc:
        log.exception("job %s failed", job_id)
        _finish(settings, claim, "failed", "internal error", error_code="internal_error",
                error_message=f"{type(exc).__name__}: {str(exc)[:500]}")
        return
    _finish(settings, claim, "succeeded", metrics["verdict"]["message"], artifacts, progress=1.0,
            metrics_summary=headline(metrics))


def _fetch_dataset(settings: Settings, blobs: BlobStore, root: Path, blob_key: str | None, filename: str,
                   source_url: str | None, sha256: str) -> Path:
    """The job's dataset on local disk: the uploaded archive, or what lies at the URL (unchanged since validation)."""
    if source_url is None:
        data = root / rf.input_file("dataset", filename)
        blobs.get_file(blob_key, data)
        return data
    listing = list_url(source_url, settings.blob_url, _extraction_limits(settings))
    if listing.sha256 != sha256:
        raise DatasetError(f"the data at {source_url} changed after it was validated (files, sizes or ETags); "
                           "register it again to use it")
    return fetch_all(listing, root / rf.input_file("dataset", None))


def _store_artifacts(blobs: BlobStore, job_id: str, out_dir: Path) -> list[Artifact]:
    """Upload each artifact (atomically); returns the rows, which the terminal write records."""
    rows = []
    for name, content_type in rf.ARTIFACTS.items():
        path = out_dir / name
        if not path.exists():
            continue
        key = f"jobs/{job_id}/artifacts/{name}"
        size, sha256 = blobs.put_file(key, path)
        rows.append(Artifact(job_id=job_id, name=name, blob_key=key, size_bytes=size, sha256=sha256, content_type=content_type))
    return rows
