"""Validation of uploads: a dataset or a model is ``ready`` for jobs only once a worker could read it."""

from __future__ import annotations

import logging
import random
import tempfile
from pathlib import Path
from typing import Callable

from sqlalchemy import select, update

from jobstore.blobs import BlobStore
from jobstore.db import session_scope
from jobstore.models import Dataset, Model, utcnow
from jobstore.settings import TASK_VALIDATE_DATASET, TASK_VALIDATE_MODEL, Settings, get_settings
from jobstore.statuses import UploadStatus
from masktune_core import MaskTuneError, create_model, load_weights
from masktune_core.archive import ExtractionLimits, extract_archive
from masktune_core.data import LabelAttributeRequired, index_dataset, inspect_images, summarize
from masktune_core.decoded import decode_image
from masktune_core.errors import DatasetError
from masktune_core.models import resolve_input_size, saliency_target_name

from .celery_app import app
from .heartbeat import Heartbeat
from .inputs import download_upload, extraction_limits
from .sources import UrlListing, fetch_all, list_url, stand_in_tree

log = logging.getLogger(__name__)

VALIDATION_SIZE = 32  # decoding at a small size proves an image is readable without the full cost
URL_SAMPLE_IMAGES = 64  # images of a URL dataset fetched and decoded by validation


@app.task(name=TASK_VALIDATE_DATASET)
def validate_dataset(dataset_id: str) -> None:
    """Index the dataset with masktune_core's reader; read every image's header and decode a sample
    (the job's decode pass reports any image that fails later). An upload is unpacked; a URL is
    listed (worker.sources): an archive object is fetched, a prefix only sampled."""
    settings = get_settings()
    limits = extraction_limits(settings)

    def check(folder: Path, row: dict) -> dict:
        if row["source_url"] is None:
            upload = download_upload(BlobStore(settings.blob_url), row["blob_key"], row["filename"], folder)
            return {"summary": _summarize_archive(upload, limits)}
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
        upload = download_upload(BlobStore(get_settings().blob_url), row["blob_key"], row["filename"], folder)
        load_weights(model, upload, architecture=architecture)
        return {}

    _validate_upload(Model, model_id, check)


def _validate_upload(table, upload_id: str, check: Callable[[Path, dict], dict]) -> None:
    """``check(scratch folder, row fields)``: ready (plus the fields check returns) or invalid with the reason.

    While it runs, a heartbeat keeps the row's updated_at fresh: the reconciler re-sends only
    validations whose heartbeat stopped (a lost message or worker), however long a large one takes.
    """
    settings = get_settings()
    with session_scope(settings.database_url) as session:
        row = session.scalar(select(table).where(table.id == upload_id))
        if row is None or row.status != UploadStatus.VALIDATING:
            return  # deleted meanwhile, or a duplicate delivery
        fields = {column.key: getattr(row, column.key) for column in table.__table__.columns}
    values: dict = {"status": UploadStatus.READY, "error": None}
    validating = (table.id == upload_id, table.status == UploadStatus.VALIDATING)

    def beat() -> bool:
        with session_scope(settings.database_url) as session:
            return session.execute(update(table).where(*validating).values(updated_at=utcnow())).rowcount == 1

    with Heartbeat(f"{table.__tablename__} {upload_id}", settings.heartbeat_interval_s, beat), \
            tempfile.TemporaryDirectory(dir=_scratch(settings)) as tmp:
        try:
            values.update(check(Path(tmp), fields))
        except MaskTuneError as exc:
            values = {"status": UploadStatus.INVALID, "error": str(exc)}
        except Exception as exc:  # a reader bug must not leave the upload validating forever
            log.exception("validating %s (%s) failed", upload_id, fields["filename"])
            values = {"status": UploadStatus.INVALID, "error": f"the upload could not be read: {type(exc).__name__}"}
    with session_scope(settings.database_url) as session:
        session.execute(update(table).where(*validating).values(updated_at=utcnow(), **values))


def _scratch(settings: Settings) -> Path:
    path = settings.work_dir / "scratch"
    path.mkdir(parents=True, exist_ok=True)
    return path


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
