"""A ``.npy`` array on disk, read and written by rows with pread/pwrite.

Not ``np.memmap`` on purpose: pages of a mapping count in the process's resident
memory until the kernel reclaims them, so an epoch over a 30 GB array would look
(to ``ps``, cgroups and the OOM killer) like 30 GB of RAM. Reads by row leave the
pages in the page cache, which the kernel shares and drops freely. The files are
plain ``.npy``: ``np.load(path, mmap_mode="r")`` opens them for inspection.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class RowFile:
    def __init__(self, path: str | Path, *, writable: bool = False):
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            major, _ = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(fh)
            self.offset = fh.tell()
        if fortran or not shape:
            raise ValueError(f"{self.path.name}: not a C-ordered array of rows")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        expected = self.offset + self.shape[0] * self.row_bytes
        if self.path.stat().st_size != expected:
            raise ValueError(f"{self.path.name} holds {self.path.stat().st_size} bytes, its header says {expected}")
        self._fd = os.open(self.path, os.O_RDWR if writable else os.O_RDONLY)

    @classmethod
    def create(cls, path: str | Path, shape: tuple[int, ...], dtype) -> RowFile:
        """A zero-filled file of ``shape`` (sparse: no disk used until rows are written)."""
        path = Path(path)
        with open(path, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": tuple(shape)})
            header = fh.tell()
            fh.truncate(header + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
        return cls(path, writable=True)

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, rows) -> np.ndarray:
        """The given rows, in the given order, as a new array [len(rows), *row_shape]."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), *self.row_shape), dtype=self.dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8)
        for i, row in enumerate(rows.tolist()):
            if not 0 <= row < self.shape[0]:
                raise IndexError(f"row {row} of {self.shape[0]}")
            if os.preadv(self._fd, [flat[i]], self.offset + row * self.row_bytes) != self.row_bytes:
                raise OSError(f"{self.path.name}: short read at row {row}")
        return out

    def write(self, first_row: int, array: np.ndarray) -> None:
        """Rows ``first_row ..`` from ``array`` (shape [k, *row_shape])."""
        data = np.ascontiguousarray(array, dtype=self.dtype)
        if data.shape[1:] != self.row_shape or first_row + len(data) > self.shape[0]:
            raise ValueError(f"cannot write {data.shape} at row {first_row} into {self.shape}")
        os.pwrite(self._fd, data.view(np.uint8).reshape(-1).data, self.offset + first_row * self.row_bytes)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()

    def __enter__(self) -> RowFile:
        return self

    def __exit__(self, *_) -> None:
        self.close()
