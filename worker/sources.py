"""Datasets registered by URL (the tenant's own object storage), read through fsspec.

A URL names an archive object or a prefix holding an unpacked dataset. Validation lists
the prefix, fetches the small list and manifest files, stands empty placeholders in for
the images (indexing needs only their names) and decodes a sample: a dataset of tens of
GB is never downloaded to be validated. A job fetches the whole dataset into its work
area. The dataset's sha256 hashes the listing (keys, sizes, ETags), so it changes when
the data does; a job refuses data that changed after validation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fsspec.core import url_to_fs

from jobstore.dataset_urls import inside_blob_store
from masktune_core.archive import ExtractionLimits, safe_member_path
from masktune_core.data import IMAGE_SUFFIXES
from masktune_core.errors import DatasetError

METADATA_SUFFIXES = {".csv", ".txt"}
MAX_METADATA_BYTES = 256 << 20  # CelebA's attribute list is 26 MB; anything larger is not a list file


@dataclass
class UrlListing:
    url: str
    fs: object
    archive: bool  # one archive object, else a prefix of files
    files: list[tuple[str, PurePosixPath, int]]  # (remote path, path relative to the URL, size)
    sha256: str

    @property
    def size_bytes(self) -> int:
        return sum(size for _, _, size in self.files)

    def images(self) -> list[tuple[str, PurePosixPath, int]]:
        return [f for f in self.files if f[1].suffix.lower() in IMAGE_SUFFIXES]

    def fetch(self, pairs: list[tuple[str, Path]]) -> None:
        """Download (remote path, local path) pairs, concurrently where the filesystem can."""
        for _, local in pairs:
            local.parent.mkdir(parents=True, exist_ok=True)
        if pairs:
            _guard(self.url, lambda: self.fs.get([r for r, _ in pairs], [str(p) for _, p in pairs]))


def _guard(url: str, action):
    """Run ``action``; any storage error becomes a DatasetError naming the URL (botocore's are not OSErrors)."""
    try:
        return action()
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(f"could not read {url}: {type(exc).__name__}: {str(exc)[:300]}") from exc


def _tag(info: dict) -> str:
    return str(info.get("ETag") or info.get("LastModified") or info.get("mtime") or "")


def list_url(url: str, blob_url: str, limits: ExtractionLimits) -> UrlListing:
    """List what lies at ``url`` within ``limits`` (files and bytes, as for an archive's members)."""
    if inside_blob_store(url, blob_url):  # the API refused it already; a changed setting must not open it
        raise DatasetError("the dataset URL points into the service's own storage")
    fs, root = url_to_fs(url)
    fs.invalidate_cache()  # a long-lived worker's cached listing would hide changed data
    root = root.rstrip("/")
    if _guard(url, lambda: fs.isfile(root)):
        info = _guard(url, lambda: fs.info(root))
        files = [(root, PurePosixPath(root.rsplit("/", 1)[-1]), int(info["size"]))]
        tags = [_tag(info)]
        archive = True
    else:
        found = _guard(url, lambda: fs.find(root, detail=True))
        files, tags, archive = [], [], False
        for path, info in sorted(found.items()):
            try:
                rel = safe_member_path(path[len(root) + 1:]) if path.startswith(root + "/") else None
            except DatasetError as exc:  # S3 keys may hold '..' or backslashes; no local path may
                raise DatasetError(f"{url} holds a key that is not a safe relative path: {exc}") from None
            if rel is None or not rel.parts or info.get("type") == "directory":
                continue
            files.append((path, rel, int(info.get("size") or 0)))
            tags.append(_tag(info))
            if len(files) > limits.max_members:
                raise DatasetError(f"{url} holds more than {limits.max_members} files")
        if not files:
            raise DatasetError(f"nothing found at {url}")
    total = sum(size for _, _, size in files)
    if total > limits.max_total_bytes:
        raise DatasetError(f"{url} holds {total} bytes, more than the limit of {limits.max_total_bytes}")
    digest = hashlib.sha256(b"archive\n" if archive else b"prefix\n")
    for (_, rel, size), tag in zip(files, tags):
        # Keys hold no NUL: every (key, size, tag) line reads back one way only.
        digest.update(f"{rel}\0{size}\0{tag}\n".encode())
    return UrlListing(url, fs, archive, files, digest.hexdigest())


def stand_in_tree(listing: UrlListing, dest: Path) -> None:
    """The prefix as a local tree that indexing can read: list and manifest files fetched,
    every other file an empty placeholder under its own name."""
    metadata = [(r, dest.joinpath(*rel.parts)) for r, rel, size in listing.files
                if rel.suffix.lower() in METADATA_SUFFIXES and size <= MAX_METADATA_BYTES]
    listing.fetch(metadata)
    fetched = {local for _, local in metadata}
    made: set[Path] = set()
    for _, rel, _ in listing.files:
        local = dest.joinpath(*rel.parts)
        if local not in fetched:
            if local.parent not in made:
                local.parent.mkdir(parents=True, exist_ok=True)
                made.add(local.parent)
            local.touch()


def fetch_all(listing: UrlListing, dest: Path) -> Path:
    """The whole dataset under ``dest``: the archive file, or the prefix's tree. Returns what to run on."""
    if listing.archive:
        remote, rel, _ = listing.files[0]
        target = dest.with_name(dest.name + "".join(rel.suffixes[-2:]))
        listing.fetch([(remote, target)])
        return target
    listing.fetch([(r, dest.joinpath(*rel.parts)) for r, rel, _ in listing.files])
    return dest
