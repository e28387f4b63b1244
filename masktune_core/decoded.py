"""Decode once per (dataset, input size): every image resized whole to S x S, kept as uint8 on disk.

The cache root holds per dataset ``<cache root>/<dataset sha256>/``: ``files/``, the unpacked
archive (renamed into place once complete), and per input size an entry ``<S>px-<RESIZE_RULE>/``:

    images.npy     uint8 [N, S, S, 3], one row per image file, in sorted name order
    rows.json      the names in row order; per row the original width, height and mode, or why it is unreadable
    meta.json      written last, so its presence means complete: size, rule, rows per chunk, sha256 per chunk
    progress.json  only while building: the chunks done so far, so a killed build resumes where it stopped
    verified.json  the images.npy (size, mtime) whose chunk checksums were last found right

Decoding runs on every core in worker processes, each writing its chunk of rows
straight into images.npy.
Labels, groups and splits are not in the entry: they come from the job's index, so
every job on the same files and size shares one entry.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from .archive import ExtractionLimits, extract_archive
from .errors import DatasetError, JobCancelled
from .rowfile import RowFile
from .runfolder import write_json

MAX_IMAGE_PIXELS = 64_000_000  # checked from the header, before any pixel is decoded
RESIZE_RULE = "whole-bilinear-v1"  # resize the whole image (no crop), bilinear, after JPEG draft scaling
_CHUNK_BYTES = 8 << 20
_MAX_CHUNK_ROWS = 1024
_PROCESS_POOL_MIN_ROWS = 2048  # below this, starting worker processes costs more than it saves
_PROGRESS_EVERY_S = 5.0
_IMAGES, _ROWS, _META, _PROGRESS, _VERIFIED = "images.npy", "rows.json", "meta.json", "progress.json", "verified.json"


def entry_name(size: int) -> str:
    return f"{size}px-{RESIZE_RULE}"


def entry_dir(cache_root: str | Path, dataset_sha256: str, size: int) -> Path:
    return Path(cache_root) / dataset_sha256 / entry_name(size)


def unpack_once(archive: Path, cache_root: str | Path, dataset_sha256: str, limits: ExtractionLimits) -> Path:
    """The archive's files, unpacked into the cache on first use."""
    folder = Path(cache_root) / dataset_sha256 / "files"
    with locked(folder):
        if not folder.is_dir():
            partial = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(partial, ignore_errors=True)
            extract_archive(archive, partial, limits)
            partial.rename(folder)
    return folder


def entry_files() -> tuple[str, ...]:
    """The files of a complete entry, meta.json last (what a copy to and from blob storage moves)."""
    return _IMAGES, _ROWS, _META


# ---------------------------------------------------------------- one image


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img) * (255.0 if np.asarray(img).max() <= 1 else 1), 0, 255).astype(np.uint8), "L")
    elif img.mode == "P":
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(path: Path, size: int) -> tuple[np.ndarray, tuple[int, int], str]:
    """(uint8 HxWx3 at size x size, original (width, height), original mode)."""
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as exc:  # PIL's own guard fires on the header, before ours
        raise DatasetError(f"the image is over the limit of {MAX_IMAGE_PIXELS} pixels ({exc})") from exc
    with img:
        width, height = img.size
        if width * height > MAX_IMAGE_PIXELS:
            raise DatasetError(f"{width}x{height} pixels is over the limit of {MAX_IMAGE_PIXELS}")
        mode = img.mode
        img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when it can
        rgb = _to_rgb(img)
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8), (width, height), mode


def read_header(path: Path) -> tuple[int, int, str]:
    """(width, height, mode) from the file header alone; DatasetError when it is no image we accept."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            mode = img.mode
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"the image is over the limit of {MAX_IMAGE_PIXELS} pixels ({exc})") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"unreadable image: {exc}") from exc
    if width * height > MAX_IMAGE_PIXELS:
        raise DatasetError(f"{width}x{height} pixels is over the limit of {MAX_IMAGE_PIXELS}")
    return width, height, mode


def _decode_or_reason(path: Path, size: int) -> tuple[np.ndarray | None, list]:
    """(pixels or None, [width, height, mode, reason or None])."""
    try:
        pixels, (width, height), mode = decode_image(path, size)
        return pixels, [width, height, mode, None]
    except DatasetError as exc:
        return None, [0, 0, "", str(exc)]
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return None, [0, 0, "", f"unreadable image: {exc}"]


def _decode_chunk(images_path: str, size: int, first_row: int, paths: list[str]) -> tuple[str, list[list]]:
    """Decode one chunk of rows into images.npy; returns (sha256 of the chunk's bytes, per-row info)."""
    pixels = np.zeros((len(paths), size, size, 3), dtype=np.uint8)  # unreadable rows stay black
    info = []
    for i, path in enumerate(paths):
        decoded, row_info = _decode_or_reason(Path(path), size)
        if decoded is not None:
            pixels[i] = decoded
        info.append(row_info)
    with RowFile(images_path, writable=True) as rows:
        rows.write(first_row, pixels)
    return hashlib.sha256(pixels.data).hexdigest(), info


# ---------------------------------------------------------------- the entry


class DecodedImages:
    """A complete cache entry, read by rows."""

    def __init__(self, folder: Path):
        self.folder = folder
        meta = json.loads((folder / _META).read_text())
        rows = json.loads((folder / _ROWS).read_text())
        self.size: int = meta["size"]
        self.names: list[str] = rows["names"]
        self.widths, self.heights, self.modes = rows["width"], rows["height"], rows["mode"]
        self.errors: dict[int, str] = {int(row): reason for row, reason in rows["errors"].items()}
        self._row_of = {name: row for row, name in enumerate(self.names)}
        self.file = RowFile(folder / _IMAGES)

    def __len__(self) -> int:
        return len(self.names)

    def row_of(self, name: str) -> int | None:
        return self._row_of.get(name)

    def read(self, rows) -> np.ndarray:
        """uint8 [len(rows), S, S, 3]."""
        return self.file.read(rows)


def _chunk_rows(size: int) -> int:
    return max(1, min(_MAX_CHUNK_ROWS, _CHUNK_BYTES // (size * size * 3)))


def _chunks(count: int, per_chunk: int) -> list[tuple[int, int]]:
    return [(first, min(first + per_chunk, count)) for first in range(0, count, per_chunk)]


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def bad_chunks(folder: Path) -> list[int]:
    """Chunks of a complete entry whose bytes no longer match their checksum (empty: all good).

    A full read is done once per (size, mtime) of images.npy: after a build, a copy from blob
    storage, or any change of the file; later jobs on the same machine trust the stamp.
    """
    meta = json.loads((folder / _META).read_text())
    images = folder / _IMAGES
    verified = folder / _VERIFIED
    if verified.exists() and json.loads(verified.read_text()) == _stamp(images):
        return []
    bad = []
    with RowFile(images) as rows:
        if len(rows) != meta["count"] or rows.row_shape != (meta["size"], meta["size"], 3):
            return list(range(len(meta["chunk_sha256"])))
        for chunk, (first, last) in enumerate(_chunks(meta["count"], meta["chunk_rows"])):
            if hashlib.sha256(rows.read(range(first, last)).data).hexdigest() != meta["chunk_sha256"][chunk]:
                bad.append(chunk)
    if not bad:
        verified.write_text(json.dumps(_stamp(images)))
    return bad


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """One builder per entry on a machine (two workers may start jobs on one dataset at once)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def _children_allowed() -> Iterator[None]:
    """Let a daemonic process (a Celery prefork child) start the decode pool.

    multiprocessing refuses children of daemonic processes so that none is orphaned when the
    parent exits; the pool is joined before this context ends, so that cannot happen here.
    """
    process = multiprocessing.current_process()
    was_daemon = process._config.get("daemon", False)
    process._config["daemon"] = False
    try:
        yield
    finally:
        process._config["daemon"] = was_daemon


def _executor(workers: int, rows: int) -> Executor:
    if workers > 1 and rows >= _PROCESS_POOL_MIN_ROWS:
        # fork: the children run only PIL and numpy (no torch, no CUDA), and CPython re-creates the
        # import and logging locks in a forked child, so the parent's threads cannot block them.
        # (forkserver and spawn pickle the parent's authkey, which a Celery child's billiard refuses.)
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    return ThreadPoolExecutor(max(1, workers))  # PIL releases the GIL while it decodes and resizes


def decode_once(
    files: dict[str, Path],
    folder: Path,
    size: int,
    *,
    workers: int | None = None,
    should_cancel: Callable[[], bool] = lambda: False,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
) -> tuple[DecodedImages, int]:
    """The entry for these files (name -> path) at ``size``: reused when complete and intact, else built.

    Returns (entry, number of images decoded by this call). A build interrupted by a kill or a
    cancel continues from its finished chunks; chunks whose checksum fails are decoded again.
    """
    names = sorted(files)
    workers = workers or os.cpu_count() or 1
    with locked(folder):
        redo: list[int] = []
        if (folder / _META).exists():
            try:
                entry = DecodedImages(folder)
                if all(entry.row_of(n) is not None for n in names):
                    redo = bad_chunks(folder)
                    if not redo:
                        return entry, 0
                    if entry.names != names:
                        redo = []  # another file set: start over below
                entry.file.close()
            except (ValueError, OSError, KeyError, json.JSONDecodeError):
                redo = []
        return _build(names, files, folder, size, workers, redo, should_cancel, on_progress)


def _build(names, files, folder, size, workers, redo, should_cancel, on_progress) -> tuple[DecodedImages, int]:
    per_chunk = _chunk_rows(size)
    chunks = _chunks(len(names), per_chunk)
    names_sha = hashlib.sha256("\n".join(names).encode()).hexdigest()
    progress_path, images_path = folder / _PROGRESS, folder / _IMAGES
    progress = None
    if redo:  # an intact entry but for a few chunks: keep the rest
        meta = json.loads((folder / _META).read_text())
        rows = json.loads((folder / _ROWS).read_text())
        done = {
            str(c): {"sha256": meta["chunk_sha256"][c],
                     "info": [[rows["width"][r], rows["height"][r], rows["mode"][r], rows["errors"].get(str(r))]
                              for r in range(first, last)]}
            for c, (first, last) in enumerate(chunks) if c not in redo
        }
        progress = {"names_sha256": names_sha, "size": size, "chunk_rows": per_chunk, "done": done}
        for name in (_META, _VERIFIED):
            (folder / name).unlink(missing_ok=True)
    elif progress_path.exists():
        try:
            progress = json.loads(progress_path.read_text())
            RowFile(images_path).close()  # the right size for its header, or ValueError
        except (ValueError, OSError, json.JSONDecodeError):
            progress = None
        if progress and (progress["names_sha256"], progress["size"], progress["chunk_rows"]) != (names_sha, size, per_chunk):
            progress = None
    if progress is None:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        RowFile.create(images_path, (len(names), size, size, 3), np.uint8).close()
        progress = {"names_sha256": names_sha, "size": size, "chunk_rows": per_chunk, "done": {}}
    write_json(progress_path, progress, compact=True)

    todo = [c for c in range(len(chunks)) if str(c) not in progress["done"]]
    decoded = 0
    last_save = time.monotonic()
    on_progress(len(chunks) - len(todo), len(chunks))
    with _children_allowed(), _executor(workers, sum(chunks[c][1] - chunks[c][0] for c in todo)) as pool:
        futures = {
            pool.submit(_decode_chunk, str(images_path), size, chunks[c][0], [str(files[n]) for n in names[slice(*chunks[c])]]): c
            for c in todo
        }
        try:
            for future in as_completed(futures):
                chunk = futures[future]
                sha256, info = future.result()
                progress["done"][str(chunk)] = {"sha256": sha256, "info": info}
                decoded += len(info)
                on_progress(len(progress["done"]), len(chunks))
                if time.monotonic() - last_save >= _PROGRESS_EVERY_S:
                    write_json(progress_path, progress, compact=True)
                    last_save = time.monotonic()
                if should_cancel():
                    raise JobCancelled()
        except BaseException:
            for future in futures:
                future.cancel()
            write_json(progress_path, progress, compact=True)
            raise

    info = [row for c in range(len(chunks)) for row in progress["done"][str(c)]["info"]]
    write_json(folder / _ROWS, compact=True, obj={
        "names": names,
        "width": [r[0] for r in info], "height": [r[1] for r in info], "mode": [r[2] for r in info],
        "errors": {str(row): r[3] for row, r in enumerate(info) if r[3]},
    })
    write_json(folder / _META, {
        "size": size, "resize_rule": RESIZE_RULE, "count": len(names), "chunk_rows": per_chunk,
        "chunk_sha256": [progress["done"][str(c)]["sha256"] for c in range(len(chunks))],
    })
    progress_path.unlink()
    (folder / _VERIFIED).write_text(json.dumps(_stamp(images_path)))
    return DecodedImages(folder), decoded
