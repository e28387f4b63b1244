"""A job's local work area, mirrored to blob storage so another worker can resume it.

The pipeline persists every finished stage and ERM epoch in its work directory;
``sync`` uploads what changed since the last call and ``restore`` brings it back
on a machine that has never seen the job. Each attempt works in its own local
folder (``work_dir/<job>/<claim token>``), so a worker presumed dead that comes
back never writes into its successor's files on the same machine.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from jobstore import blob_keys
from jobstore.blobs import BlobStore
from masktune_core.runfolder import STATE, WORK, is_temporary


class Workspace:
    def __init__(self, blobs: BlobStore, work_dir: Path, job_id: str, attempt: str):
        self.blobs = blobs
        self.job_dir = work_dir / job_id
        self.root = self.job_dir / attempt
        self.workdir = self.root / WORK
        self.prefix = blob_keys.job_work(job_id)
        self._synced: dict[str, tuple[int, int]] = {}

    def _files(self) -> dict[str, Path]:
        if not self.workdir.exists():
            return {}
        files = {}
        for path in self.workdir.rglob("*"):
            rel = path.relative_to(self.workdir).as_posix()
            if path.is_file() and not is_temporary(path.name):
                files[rel] = path
        return files

    def restore(self) -> int:
        """Start this attempt's folder from the stored work area; returns files fetched.

        Folders of earlier attempts of the job on this machine go first: their worker is gone
        (this attempt holds the claim) and the stored copy is the one every machine shares.
        """
        shutil.rmtree(self.job_dir, ignore_errors=True)
        keys = [key for key in self.blobs.list(self.prefix) if not is_temporary(key.rsplit("/", 1)[-1])]
        for key in keys:
            self.blobs.get_file(key, self.workdir / key[len(self.prefix) + 1:])
        self._synced = {rel: (p.stat().st_size, p.stat().st_mtime_ns) for rel, p in self._files().items()}
        return len(keys)

    def sync(self) -> None:
        """Upload files changed since the last sync. state.json goes last: it names finished stages."""
        changed = [
            (rel, path) for rel, path in self._files().items()
            if self._synced.get(rel) != (path.stat().st_size, path.stat().st_mtime_ns)
        ]
        changed.sort(key=lambda item: item[0] == STATE)
        for rel, path in changed:
            stat = path.stat()
            self.blobs.put_file(f"{self.prefix}/{rel}", path)
            self._synced[rel] = (stat.st_size, stat.st_mtime_ns)

    def remove(self) -> None:
        """Delete this attempt's local folder (the stored work area stays until retention expires it)."""
        shutil.rmtree(self.root, ignore_errors=True)
        try:
            self.job_dir.rmdir()
        except OSError:
            pass
