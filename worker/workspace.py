"""A job's local work area, mirrored to blob storage so another worker can resume it.

The pipeline persists every finished stage and ERM epoch in its work directory;
``sync`` uploads what changed since the last call and ``restore`` brings it back
on a machine that has never seen the job.
"""

from __future__ import annotations

from pathlib import Path

from jobstore.blobs import BlobStore

_LOCAL_ONLY = ("dataset/",)  # the unpacked upload: re-created from the archive when needed


class Workspace:
    def __init__(self, blobs: BlobStore, root: Path, job_id: str):
        self.blobs = blobs
        self.root = root / job_id
        self.workdir = self.root / "work"
        self.prefix = f"jobs/{job_id}/work"
        self._synced: dict[str, tuple[int, int]] = {}

    def _files(self) -> dict[str, Path]:
        if not self.workdir.exists():
            return {}
        files = {}
        for path in self.workdir.rglob("*"):
            rel = path.relative_to(self.workdir).as_posix()
            if path.is_file() and ".tmp" not in path.name and not rel.startswith(_LOCAL_ONLY):
                files[rel] = path
        return files

    def restore(self) -> int:
        """Download the stored work area when this machine has none; returns files fetched."""
        if (self.workdir / "state.json").exists():
            return 0
        keys = self.blobs.list(self.prefix)
        for key in keys:
            rel = key[len(self.prefix) + 1:]
            self.blobs.get_file(key, self.workdir / rel)
        self._remember()
        return len(keys)

    def sync(self) -> None:
        """Upload files changed since the last sync. state.json goes last: it names finished stages."""
        changed = [
            (rel, path) for rel, path in self._files().items()
            if self._synced.get(rel) != (path.stat().st_size, path.stat().st_mtime_ns)
        ]
        changed.sort(key=lambda item: item[0] == "state.json")
        for rel, path in changed:
            stat = path.stat()
            self.blobs.put_file(f"{self.prefix}/{rel}", path)
            self._synced[rel] = (stat.st_size, stat.st_mtime_ns)

    def _remember(self) -> None:
        self._synced = {rel: (p.stat().st_size, p.stat().st_mtime_ns) for rel, p in self._files().items()}
