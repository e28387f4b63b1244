"""multipart/form-data read as a stream: the part named ``file`` goes straight into blob storage in
chunks (never the whole file in memory or in a temp file); the few other fields are kept in
memory under tight caps."""

from __future__ import annotations

import os
import unicodedata
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from jobstore.blobs import BlobStore, TooLarge

from .body_limit import too_large
from .errors import ProblemError, validation_problem

MAX_FIELDS = 8
MAX_FIELD_BYTES = 1024
MAX_FILENAME = 200


def sanitize_filename(raw: str) -> str:
    """The basename only, printable, at most MAX_FILENAME characters (the extension kept)."""
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in unicodedata.normalize("NFC", name) if ch.isprintable()).strip()
    if name in ("", ".", ".."):
        return "upload"
    if len(name) > MAX_FILENAME:
        stem, ext = os.path.splitext(name)
        ext = ext if len(ext) <= 20 else ""
        name = stem[: MAX_FILENAME - len(ext)] + ext
    return name


@dataclass
class StoredFile:
    filename: str
    size_bytes: int
    sha256: str


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    file: StoredFile | None = None


class _Events:
    """A multipart body as a flat stream of ("part", headers) / ("data", bytes) / ("end", None)."""

    def __init__(self, body: Iterator[bytes], boundary: bytes):
        self.body = body
        self.queue: deque[tuple[str, Any]] = deque()
        self.headers: dict[str, str] = {}
        self.header_name = bytearray()
        self.header_value = bytearray()
        self.finished = False
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self.header_name.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self.header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": lambda: self.queue.append(("part", self.headers)),
            "on_part_data": lambda d, s, e: self.queue.append(("data", bytes(d[s:e]))),
            "on_part_end": lambda: self.queue.append(("end", None)),
            "on_end": self._end,
        }, max_header_count=8, max_header_size=4096)

    def _part_begin(self) -> None:
        self.headers = {}

    def _header_end(self) -> None:
        # latin-1 keeps the raw bytes (parse_options_header works on latin-1 text); the name and
        # filename parameters are decoded as UTF-8 where they are used.
        self.headers[self.header_name.decode("latin-1").strip().lower()] = self.header_value.decode("latin-1").strip()
        self.header_name.clear()
        self.header_value.clear()

    def _end(self) -> None:
        self.finished = True

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        try:
            for chunk in self.body:
                self.parser.write(chunk)
                while self.queue:
                    yield self.queue.popleft()
            self.parser.finalize()
        except MultipartParseError as exc:
            raise _malformed(str(exc)) from None
        while self.queue:
            yield self.queue.popleft()
        if not self.finished:
            raise _malformed("the body ended before the closing boundary")


def _malformed(why: str) -> ProblemError:
    return ProblemError(400, "malformed_multipart", f"The multipart body is malformed: {why}.")


def multipart_boundary(content_type: str) -> bytes:
    """The boundary of a multipart/form-data Content-Type, else 415 (JSON, urlencoded, none...)."""
    kind, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise ProblemError(415, "unsupported_media_type", "Send the upload as multipart/form-data with the file in the field 'file'.")
    return boundary


def read_form(body: Iterator[bytes], content_type: str, blobs: BlobStore, key: str, max_bytes: int,
              on_file: Callable[[str, dict[str, str]], None] | None = None,
              over_limit: Callable[[], ProblemError] | None = None) -> Form:
    """Parse a multipart/form-data body; the part named ``file`` is streamed to ``key``.

    ``on_file(filename, fields_so_far)`` runs before the file's bytes are read, so a bad
    name or bad earlier fields are refused without storing anything. A file longer than
    ``max_bytes`` raises ``over_limit()`` (default: 413 payload_too_large). Raises ProblemError.
    """
    boundary = multipart_boundary(content_type)
    events = iter(_Events(body, boundary))
    form = Form()

    def part_data() -> Iterator[bytes]:
        for kind_, payload in events:
            if kind_ == "data":
                yield payload
            elif kind_ == "end":
                return
        raise _malformed("a part was not closed")  # _Events raises first; kept for safety

    for kind_, headers in events:
        if kind_ != "part":
            continue
        _, disposition = parse_options_header(headers.get("content-disposition", ""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        raw_filename = disposition.get(b"filename")
        if name == "file":
            if form.file is not None:
                raise validation_problem([{"loc": ["body", "file"], "msg": "Send exactly one file.", "type": "value_error"}])
            filename = sanitize_filename(raw_filename.decode("utf-8", "replace") if raw_filename is not None else "")
            if on_file is not None:
                on_file(filename, dict(form.fields))
            try:
                size, sha256 = blobs.write_stream(key, part_data(), max_bytes=max_bytes)
            except TooLarge:
                raise (over_limit() if over_limit is not None else too_large(max_bytes)) from None
            form.file = StoredFile(filename, size, sha256)
        else:
            if raw_filename is not None:
                raise validation_problem([{"loc": ["body", name], "msg": "Only the field 'file' may hold a file.", "type": "value_error"}])
            if len(form.fields) >= MAX_FIELDS:
                raise validation_problem([{"loc": ["body"], "msg": "Too many form fields.", "type": "value_error"}])
            value = bytearray()
            for chunk in part_data():
                value += chunk
                if len(value) > MAX_FIELD_BYTES:
                    raise validation_problem([{"loc": ["body", name], "msg": f"Longer than {MAX_FIELD_BYTES} bytes.", "type": "value_error"}])
            try:
                form.fields[name] = value.decode("utf-8")
            except UnicodeDecodeError:
                raise validation_problem([{"loc": ["body", name], "msg": "Not UTF-8 text.", "type": "value_error"}]) from None
    return form
