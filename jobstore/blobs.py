"""Blob storage through fsspec: a local directory by default, any fsspec URL (s3://...) otherwise.

Writes go to a temporary key and are moved into place, so a reader sees the old
state or the whole new object, never half a file.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Iterable

from fsspec.core import url_to_fs


class TooLarge(Exception):
    """The stream went past the byte limit; nothing was kept."""


class BlobStore:
    def __init__(self, url: str):
        self.url = url
        self.fs, self.root = url_to_fs(url)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        if self.local:
            os.makedirs(self.root, exist_ok=True)

    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad blob key {key!r}")
        return f"{self.root.rstrip('/')}/{key}"

    def _tmp(self, key: str) -> str:
        return self._path(f"{key}.tmp-{secrets.token_hex(6)}")

    def _commit(self, tmp: str, key: str) -> None:
        final = self._path(key)
        if self.local:
            os.replace(tmp, final)  # atomic on one filesystem
        else:
            self.fs.mv(tmp, final)

    def write_stream(self, key: str, chunks: Iterable[bytes], max_bytes: int | None = None) -> tuple[int, str]:
        """Store the chunks under ``key``; returns (size, sha256). TooLarge past max_bytes."""
        tmp = self._tmp(key)
        self.fs.makedirs(tmp.rsplit("/", 1)[0], exist_ok=True)
        digest, size = hashlib.sha256(), 0
        try:
            with self.fs.open(tmp, "wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise TooLarge()
                    digest.update(chunk)
                    out.write(chunk)
            self._commit(tmp, key)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise
        return size, digest.hexdigest()

    def put_file(self, key: str, local_path: str | Path) -> tuple[int, str]:
        with open(local_path, "rb") as fh:
            return self.write_stream(key, iter(lambda: fh.read(1 << 20), b""))

    def get_file(self, key: str, local_path: str | Path) -> None:
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = local_path.with_name(local_path.name + ".part")
        self.fs.get_file(self._path(key), str(tmp))
        tmp.replace(local_path)

    def open(self, key: str) -> BinaryIO:
        return self.fs.open(self._path(key), "rb")

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def size(self, key: str) -> int:
        return self.fs.size(self._path(key))

    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (recursively), relative to the store root."""
        base = self._path(prefix).rstrip("/")
        if not self.fs.exists(base):
            return []
        root = self.root.rstrip("/") + "/"
        return sorted(p[len(root):] if p.startswith(root) else p for p in self.fs.find(base))

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def check(self) -> None:
        """Raise if the store cannot be reached (for /readyz)."""
        self.fs.ls(self.root)
