"""Unpack a user's dataset archive without trusting it.

Only regular files are written, under names that stay inside the destination;
sizes are counted while bytes are written (headers can lie), so a zip bomb stops
at the limit instead of filling the disk.
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .errors import DatasetError

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ExtractionLimits:
    """What one archive may unpack to. The defaults admit CelebA (202,599 images, 1.4 GB); the
    service passes its own from MASKTUNE_ARCHIVE_* settings."""

    max_members: int = 1_000_000
    max_total_bytes: int = 64 << 30
    # Images are already compressed; a member that inflates far more is a bomb.
    max_member_ratio: float = 250.0


def safe_member_path(name: str) -> PurePosixPath:
    """The member's relative path, or DatasetError if it could land outside the destination."""
    if "\x00" in name or "\\" in name:
        raise DatasetError(f"archive member {name!r} has an illegal character in its name")
    path = PurePosixPath(name)
    if path.is_absolute() or (path.parts and ":" in path.parts[0]):
        raise DatasetError(f"archive member {name!r} has an absolute path")
    if ".." in path.parts:
        raise DatasetError(f"archive member {name!r} points outside the archive ('..')")
    parts = [p for p in path.parts if p not in ("", ".")]
    return PurePosixPath(*parts) if parts else PurePosixPath()


class _Budget:
    def __init__(self, limits: ExtractionLimits, archive_bytes: int):
        self.limits = limits
        self.archive_bytes = archive_bytes
        self.members = 0
        self.total_bytes = 0
        self.seen: set[PurePosixPath] = set()

    def admit(self, rel: PurePosixPath) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise DatasetError(f"archive has more than {self.limits.max_members} members")
        if rel in self.seen:
            raise DatasetError(f"archive contains {str(rel)!r} twice")
        self.seen.add(rel)

    def copy(self, src: BinaryIO, dst: BinaryIO, name: str, compressed_size: int) -> None:
        written = 0
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            self.total_bytes += len(chunk)
            if self.total_bytes > self.limits.max_total_bytes:
                raise DatasetError(
                    f"archive unpacks to more than {self.limits.max_total_bytes} bytes"
                )
            if written > _CHUNK and written > self.limits.max_member_ratio * max(compressed_size, 1):
                raise DatasetError(
                    f"archive member {name!r} inflates more than {self.limits.max_member_ratio:g}x"
                )
            if self.total_bytes > _CHUNK and self.total_bytes > self.limits.max_member_ratio * self.archive_bytes:
                raise DatasetError(f"archive inflates more than {self.limits.max_member_ratio:g}x its size")
            dst.write(chunk)


def _write_member(dest: Path, rel: PurePosixPath, src: BinaryIO, budget: _Budget, compressed: int) -> None:
    target = dest.joinpath(*rel.parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        budget.copy(src, out, str(rel), compressed)


def _extract_zip(archive: Path, dest: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            rel = safe_member_path(info.filename)
            mode = info.external_attr >> 16
            if info.is_dir() or not rel.parts:
                continue
            if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                continue  # symlinks and other special entries are never written
            budget.admit(rel)
            with zf.open(info) as src:
                _write_member(dest, rel, src, budget, info.compress_size)


def _extract_tar(archive: Path, dest: Path, budget: _Budget) -> None:
    with tarfile.open(archive, mode="r:*") as tf:
        for member in tf:
            rel = safe_member_path(member.name)
            if not member.isreg() or not rel.parts:
                continue  # directories are implied; links and devices are never written
            budget.admit(rel)
            src = tf.extractfile(member)
            if src is None:
                continue
            with src:
                # tar members are not compressed one by one: only the whole-archive ratio applies
                _write_member(dest, rel, src, budget, member.size)


def extract_archive(archive: str | Path, dest: str | Path, limits: ExtractionLimits = ExtractionLimits()) -> Path:
    """Unpack a .zip, .tar or .tar.gz into ``dest`` (created, must be empty) and return it."""
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file() or archive.stat().st_size == 0:
        raise DatasetError("the dataset file is empty")
    if dest.exists() and any(dest.iterdir()):
        raise ValueError(f"{dest} is not empty")
    dest.mkdir(parents=True, exist_ok=True)
    budget = _Budget(limits, archive.stat().st_size)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, dest, budget)
        elif _is_tar(archive):
            _extract_tar(archive, dest, budget)
        else:
            raise DatasetError("the dataset is not a .zip, .tar or .tar.gz archive")
    # zlib.error: corrupt deflate data; RuntimeError: encrypted member;
    # NotImplementedError: a compression method zipfile lacks (Deflate64).
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error, RuntimeError, NotImplementedError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise DatasetError(f"the archive is damaged: {exc}") from exc
    except DatasetError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, tarfile.TarError):
        return False
