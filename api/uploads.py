"""Uploads: a request-body cap and an idle timeout for every route, and multipart parsing that
streams the file straight into blob storage in chunks (never the whole file in memory or in a
temp file).

The file part is written with ``BlobStore.write_stream(max_bytes=...)``, capped by both the
upload limit and what is left of the tenant's storage quota; the other form fields are small
and kept in memory under tight caps.
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import anyio
import anyio.from_thread
import anyio.to_thread
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy.orm import Session
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobstore.blobs import BlobStore, TooLarge
from jobstore.settings import Settings

from .deps import lock_tenant, quota_exceeded, storage_used
from .errors import ProblemError, problem_response, validation_problem
from .metrics import upload_accepted
from .queue import send_task

log = logging.getLogger("api")

# Multipart framing and the small fields around the file: allowed on top of max_upload_bytes.
MULTIPART_OVERHEAD = 16 * 1024
# Bodies of routes that take no upload (JSON) are small.
JSON_BODY_LIMIT = 1 << 20
MAX_FIELDS = 8
MAX_FIELD_BYTES = 1024
MAX_FILENAME = 200
# Uploads hold a thread for their whole transfer: a pool of their own keeps them from
# starving the threads the other (sync) routes run in.
UPLOAD_THREADS = anyio.CapacityLimiter(16)


def too_large(limit: int) -> ProblemError:
    return ProblemError(413, "payload_too_large", f"The upload exceeds the limit of {limit} bytes.")


def upload_timeout(seconds: float) -> ProblemError:
    return ProblemError(408, "upload_timeout", f"No part of the request body arrived for {seconds:g} s; "
                                               "the request was dropped and nothing was kept.",
                        headers={"Connection": "close"})


class BodyLimitMiddleware:
    """Pure ASGI: cap every request body, with or without Content-Length, and drop stalled ones.

    Upload routes may send ``max_upload_bytes`` plus multipart overhead; every other route
    JSON_BODY_LIMIT. A declared Content-Length over the cap is refused before the body is
    read; a chunked body fails with 413 as soon as it passes the cap.

    While the body is incomplete, a read that waits more than ``idle_timeout_s`` for the next
    chunk fails with 408 ``upload_timeout``: the route (and the upload thread reading for it)
    gets the error at once, cleans up, and the thread is free again. Reads after the body or
    after the response has started (Starlette listening for a disconnect during a long
    download) are not timed.
    """

    def __init__(self, app: ASGIApp, max_upload_bytes: int, upload_paths: tuple[str, ...],
                 idle_timeout_s: float | None = None):
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.upload_paths = upload_paths
        self.idle_timeout_s = idle_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope["path"].rstrip("/") in self.upload_paths
        cap = self.max_upload_bytes + MULTIPART_OVERHEAD if upload else JSON_BODY_LIMIT
        reported = self.max_upload_bytes if upload else cap
        length = _content_length(scope)
        if length is not None and length > cap:
            await problem_response(413, "payload_too_large",
                                   f"The request body exceeds the limit of {reported} bytes.")(scope, receive, send)
            return
        received = 0
        body_done = False
        timeout = self.idle_timeout_s

        async def watched_send(message: Message) -> None:
            nonlocal body_done
            if message["type"] == "http.response.start":
                body_done = True  # answered: later reads only listen for a disconnect
            await send(message)

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                with anyio.fail_after(timeout):  # None: no timeout
                    message = await receive()
            except TimeoutError:
                # An HTTPException: the route's error handling turns it into a 408 problem.
                raise upload_timeout(timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise too_large(reported)
                body_done = not message.get("more_body", False)
            else:
                body_done = True  # http.disconnect
            return message

        await self.app(scope, limited_receive, watched_send)


def keep_and_queue(session: Session, settings: Settings, row, task: str) -> None:
    """Commit the new row, then queue its validation; if the queue is down, remove the row again (503)."""
    session.add(row)
    session.commit()
    try:
        send_task(settings, task, row.id)
    except Exception as exc:
        log.error("could not queue %s for %s: %r", task, row.id, exc)
        session.delete(row)
        session.commit()
        raise ProblemError(503, "queue_unavailable", "The task queue is unreachable; nothing was kept, try again.") from None


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


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


async def read_json_body(request: Request, limit: int = JSON_BODY_LIMIT) -> Any:
    """The request body parsed as JSON, read at most ``limit`` bytes far (upload routes allow more)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ProblemError(413, "payload_too_large", f"A JSON body may hold at most {limit} bytes.")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # not UTF-8 (a ValueError), not JSON, nested too deep
        raise validation_problem([{"loc": ["body"], "msg": "The body is not valid JSON.", "type": "json_invalid"}]) from None


def is_json(content_type: str) -> bool:
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def _body_in_thread(request: Request) -> Iterator[bytes]:
    """The request body as a blocking iterator, for code running in a worker thread."""
    stream = request.stream()

    async def next_chunk() -> bytes | None:
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            return None

    while (chunk := anyio.from_thread.run(next_chunk)) is not None:
        if chunk:
            yield chunk


async def run_upload(request: Request, handle: Callable[[Iterator[bytes]], Any], cleanup: Callable[[], None]) -> Any:
    """Run ``handle(body_chunks)`` in an upload thread; ``cleanup()`` if it fails.

    A client that goes away mid-upload gets its partial upload removed and a 400 (nobody reads it).
    """
    try:
        return await anyio.to_thread.run_sync(handle, _body_in_thread(request), limiter=UPLOAD_THREADS)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(cleanup)
        if isinstance(exc, ClientDisconnect):
            raise ProblemError(400, "client_disconnected", "The client closed the connection during the upload.") from None
        raise


async def accept_upload(request: Request, *, session: Session, settings: Settings, blobs: BlobStore, tenant: str,
                        prefix: str, task: str, make_row: Callable[[Form], Any],
                        on_file: Callable[[str, dict[str, str]], None] | None = None) -> Any:
    """The whole upload flow shared by datasets and models.

    Refuse a body that is not multipart (415) or that cannot fit the tenant's storage quota
    (413 storage_quota_exceeded: at once when Content-Length shows it, else as soon as the
    stream passes what is left), stream the file to ``{prefix}/upload``, build the row with
    ``make_row(form)``, check the quota again under the tenant lock (concurrent uploads) and
    commit the row, then queue ``task`` with the row's id (after the commit, so the worker
    always finds the row). If anything fails before the task is queued, nothing is left behind.
    """
    # An oversized Content-Length never gets here: BodyLimitMiddleware refuses it before the body is read.
    done = False
    quota = settings.tenant_storage_quota_bytes
    content_type = request.headers.get("content-type", "")
    declared = _content_length(request.scope)

    def handle(body: Iterator[bytes]) -> Any:
        nonlocal done
        multipart_boundary(content_type)
        used = storage_used(session, tenant)
        session.commit()  # hold no connection or snapshot while the body streams in
        left = quota - used
        if left <= 0 or (declared is not None and declared - MULTIPART_OVERHEAD > left):
            raise quota_exceeded(used, quota)
        cap = min(settings.max_upload_bytes, left)
        over = (lambda: quota_exceeded(used, quota)) if cap < settings.max_upload_bytes else None
        form = read_form(body, content_type, blobs, f"{prefix}/upload", cap, on_file, over)
        if form.file is None:
            raise validation_problem([{"loc": ["body", "file"], "msg": "Field required", "type": "missing"}])
        if form.file.size_bytes == 0:
            raise ProblemError(422, "empty_file", "The uploaded file is empty.")
        row = make_row(form)
        # Uploads of the same tenant running at once each saw the same room left: count again, serialised.
        lock_tenant(session, tenant)
        used = storage_used(session, tenant)
        if used + form.file.size_bytes > quota:
            raise quota_exceeded(used, quota, form.file.size_bytes)
        keep_and_queue(session, settings, row, task)
        done = True
        upload_accepted(type(row).__name__.lower(), form.file.size_bytes)
        return row

    def cleanup() -> None:
        session.rollback()  # releases the tenant lock if the check under it failed
        if not done:
            blobs.delete_prefix(prefix)

    return await run_upload(request, handle, cleanup)
