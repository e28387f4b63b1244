"""What a job or a validation reads: uploads from blob storage, datasets from the tenant's URL."""

from __future__ import annotations

from pathlib import Path

from jobstore.blobs import BlobStore
from jobstore.settings import Settings
from masktune_core import runfolder as rf
from masktune_core.archive import ExtractionLimits
from masktune_core.errors import DatasetError

from .sources import fetch_all, list_url


def extraction_limits(settings: Settings) -> ExtractionLimits:
    return ExtractionLimits(max_members=settings.archive_max_members, max_total_bytes=settings.archive_max_bytes,
                            max_member_ratio=settings.archive_max_ratio)


def download_upload(blobs: BlobStore, blob_key: str, filename: str, folder: Path) -> Path:
    local = folder / f"upload{Path(filename).suffix}"
    blobs.get_file(blob_key, local)
    return local


def fetch_dataset(settings: Settings, blobs: BlobStore, root: Path, blob_key: str | None, filename: str,
                  source_url: str | None, sha256: str) -> Path:
    """The job's dataset on local disk: the uploaded archive, or what lies at the URL (unchanged since validation)."""
    if source_url is None:
        data = root / rf.input_file("dataset", filename)
        blobs.get_file(blob_key, data)
        return data
    listing = list_url(source_url, settings.blob_url, extraction_limits(settings))
    if listing.sha256 != sha256:
        raise DatasetError(f"the data at {source_url} changed after it was validated (files, sizes or ETags); "
                           "register it again to use it")
    return fetch_all(listing, root / rf.input_file("dataset", None))
