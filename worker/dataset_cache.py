"""The worker's dataset cache: decoded images shared by every job on a dataset, on any machine.

masktune_core decodes a dataset once per input size into a local cache folder
(``work_dir/datasets``). This module mirrors complete entries to blob storage, next
to the upload (``datasets/<id>/decoded/<entry>/``, deleted with the dataset), so a
job on another machine downloads the decoded images instead of decoding again, and
removes local datasets that no job has used for a while.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from jobstore import blob_keys
from jobstore.blobs import BlobStore
from masktune_core.decoded import entry_dir, entry_files, entry_name, locked

log = logging.getLogger(__name__)


class DatasetCache:
    def __init__(self, blobs: BlobStore, root: Path, dataset_id: str, dataset_sha256: str):
        self.blobs = blobs
        self.root = root
        self.dataset_id = dataset_id
        self.sha256 = dataset_sha256

    @contextmanager
    def in_use(self) -> Iterator[None]:
        """Hold the dataset's local copy for a job: ``prune`` leaves it alone meanwhile."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(_in_use_file(self.root, self.sha256), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            os.utime(lock.name)
            yield

    def _prefix(self, size: int) -> str:
        return blob_keys.dataset_decoded(self.dataset_id, entry_name(size))

    def fetch(self, size: int) -> bool:
        """Bring the stored entry for ``size`` here unless this machine has one; True if downloaded.

        The download is checked against its chunk checksums when the job opens it; a damaged
        copy is decoded again (and published again).
        """
        folder = entry_dir(self.root, self.sha256, size)
        meta = entry_files()[-1]
        with locked(folder):
            if (folder / meta).exists() or not self.blobs.exists(f"{self._prefix(size)}/{meta}"):
                return False
            partial = folder.with_name(folder.name + ".download")
            shutil.rmtree(partial, ignore_errors=True)
            for name in entry_files():  # meta.json last: its presence marks the entry complete
                self.blobs.get_file(f"{self._prefix(size)}/{name}", partial / name)
            shutil.rmtree(folder, ignore_errors=True)
            partial.rename(folder)
        return True

    def publish(self, size: int) -> None:
        """Store this machine's complete entry for ``size`` unless storage has it already."""
        folder = entry_dir(self.root, self.sha256, size)
        meta = entry_files()[-1]
        if not (folder / meta).exists() or self.blobs.exists(f"{self._prefix(size)}/{meta}"):
            return
        for name in entry_files():
            self.blobs.put_file(f"{self._prefix(size)}/{name}", folder / name)


def _in_use_file(root: Path, dataset_sha256: str) -> Path:
    return root / f"{dataset_sha256}.in-use"


def prune(root: Path, max_idle_s: float) -> None:
    """Remove local datasets (unpacked files and decoded entries) no job has started on for
    ``max_idle_s``, skipping any that a running job holds (``DatasetCache.in_use``)."""
    cutoff = time.time() - max_idle_s
    for lock_path in root.glob("*.in-use") if root.exists() else []:
        folder = root / lock_path.stem
        if not folder.exists():
            continue  # the lock file stays: a job waiting on it holds this very inode
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a job on this machine uses it
            if lock_path.stat().st_mtime < cutoff:
                log.info("removing the local copy of dataset %s (unused)", folder.name)
                shutil.rmtree(folder, ignore_errors=True)
