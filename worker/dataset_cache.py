"""The worker's dataset cache: decoded images shared by every job on a dataset, on any machine.

masktune_core decodes a dataset once per input size into a local cache folder
(``work_dir/datasets``). This module mirrors complete entries to blob storage, next
to the upload (``datasets/<id>/decoded/<entry>/``, deleted with the dataset), so a
job on another machine downloads the decoded images instead of decoding again, and
removes local datasets that no job has used for a while.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from jobstore.blobs import BlobStore
from masktune_core.decoded import entry_dir, entry_files, entry_name, locked

log = logging.getLogger(__name__)


class DatasetCache:
    def __init__(self, blobs: BlobStore, root: Path, dataset_id: str, dataset_sha256: str):
        self.blobs = blobs
        self.root = root
        self.dataset_id = dataset_id
        self.sha256 = dataset_sha256

    def _prefix(self, size: int) -> str:
        return f"datasets/{self.dataset_id}/decoded/{entry_name(size)}"

    def fetch(self, size: int) -> bool:
        """Bring the stored entry for ``size`` here unless this machine has one; True if downloaded.

        The download is checked against its chunk checksums when the job opens it; a damaged
        copy is decoded again (and published again).
        """
        folder = entry_dir(self.root, self.sha256, size)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.utime(folder.parent)  # in use: see prune
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


def prune(root: Path, max_idle_s: float) -> None:
    """Remove local datasets (unpacked files and decoded entries) unused for ``max_idle_s``.

    A dataset folder's mtime is refreshed whenever a job starts on it (``fetch``), so a
    dataset goes only when no job has started on it for ``max_idle_s``.
    """
    if not root.exists():
        return
    cutoff = time.time() - max_idle_s
    for folder in root.iterdir():
        if folder.is_dir() and folder.stat().st_mtime < cutoff:
            log.info("removing the local copy of dataset %s (unused)", folder.name)
            shutil.rmtree(folder, ignore_errors=True)
