"""MaskTuneClient: every route of the MaskTune Service API over httpx, with retries.

Retries: an answer of 429 or 503 is retried after the Retry-After it carries (else after an
exponential backoff with jitter); a connection that could not be opened is retried for every
call; a connection that broke after the request went out only for calls that are safe to repeat
(GET, DELETE, cancel, and job creation, which sends one Idempotency-Key for all its attempts).
Uploads are retried on 429/503 because the API keeps nothing when it answers them.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, TypeVar

import httpx
from pydantic import BaseModel


from .errors import ApiError, TransferError, retry_after
from .models import (
    ArchitectureList, Artifact, ArtifactList, Dataset, DatasetList, Event, EventList, Health, Job, JobList, Model,
    ModelList, Readiness, WebhookDeliveryList, WebhookSecret, WorkerList,
)
from .statuses import UploadStatus

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = frozenset({429, 503})
# Failures where the request never reached the server: safe to repeat for any call.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)

ProgressCallback = Callable[[int, int], None]
T = TypeVar("T", bound=BaseModel)


class _CountingReader(io.RawIOBase):
    """A binary file that reports how far it has been read: httpx streams multipart uploads from it."""

    def __init__(self, file: BinaryIO, total: int, on_progress: ProgressCallback):
        self._file = file
        self._total = total
        self._on_progress = on_progress
        self._sent = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:  # httpx reads the size from it for Content-Length
        return self._file.fileno()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:  # a retried upload starts again at 0
        self._sent = self._file.seek(offset, whence)
        return self._sent

    def tell(self) -> int:
        return self._file.tell()

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        self._sent += len(chunk)
        self._on_progress(self._sent, self._total)
        return chunk

    def readinto(self, buffer) -> int:
        chunk = self.read(len(buffer))
        buffer[:len(chunk)] = chunk
        return len(chunk)


class MaskTuneClient:
    """A client of one MaskTune Service.

    ``base_url`` defaults to ``$MASKTUNE_URL`` (else http://127.0.0.1:8000), ``api_key`` to
    ``$MASKTUNE_API_KEY``. ``max_retries`` bounds the retries of one call; ``timeout`` is
    httpx's per-request timeout in seconds. Use it as a context manager, or call ``close()``.

    Error answers raise :class:`ApiError`; an API that cannot be reached raises httpx's
    ``TransportError`` once the retries are spent.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0,
                 max_retries: int = 4, backoff_s: float = 0.5, max_backoff_s: float = 60.0,
                 transport: httpx.BaseTransport | None = None):
        self.base_url = (base_url or os.environ.get("MASKTUNE_URL") or DEFAULT_URL).rstrip("/")
        api_key = api_key if api_key is not None else os.environ.get("MASKTUNE_API_KEY")
        headers = {"User-Agent": "masktune-client"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MaskTuneClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ transport

    def _delay(self, attempt: int, response: httpx.Response | None = None) -> float:
        asked = retry_after(response) if response is not None else None
        if asked is not None:
            return min(asked, self.max_backoff_s)
        return min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)

    def _send(self, method: str, path: str, *, repeatable: bool, stream: bool = False, **kwargs: Any) -> httpx.Response:
        """One call, retried as the module says; ``repeatable``: safe to send twice."""
        attempt = 0
        while True:
            try:
                response = self._http.send(self._http.build_request(method, path, **kwargs), stream=stream)
            except httpx.TransportError as exc:
                if attempt >= self.max_retries or not (repeatable or isinstance(exc, _NOT_SENT)):
                    raise
                delay = self._delay(attempt)
            else:
                if response.status_code not in RETRY_STATUSES or attempt >= self.max_retries:
                    return response
                delay = self._delay(attempt, response)
                response.close()
            time.sleep(delay)
            attempt += 1

    def _call(self, method: str, path: str, *, repeatable: bool = True, **kwargs: Any) -> httpx.Response:
        response = self._send(method, path, repeatable=repeatable, **kwargs)
        if response.is_error:
            raise ApiError.from_response(response)
        return response

    def _get(self, path: str, into: type[T], **params: Any) -> T:
        params = {k: v for k, v in params.items() if v is not None}
        return into.model_validate(self._call("GET", path, params=params).json())

    @contextmanager
    def _stream(self, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        response = self._send("GET", path, repeatable=True, stream=True, **kwargs)
        try:
            if response.is_error:
                response.read()
                raise ApiError.from_response(response)
            yield response
        finally:
            response.close()

    def _upload(self, path: str, file: str | os.PathLike, fields: dict[str, str],
                on_progress: ProgressCallback | None, into: type[T]) -> T:
        file = Path(file)
        with open(file, "rb") as handle:
            body: BinaryIO = handle
            if on_progress is not None:
                body = _CountingReader(handle, os.fstat(handle.fileno()).st_size, on_progress)  # type: ignore[assignment]
            # Streamed from the file in chunks (httpx multipart), never read into memory whole.
            response = self._call("POST", path, repeatable=False, data=fields,
                                  files={"file": (file.name, body, "application/octet-stream")})
        return into.model_validate(response.json())

    # ------------------------------------------------------------------ health

    def healthz(self) -> Health:
        return self._get("/healthz", Health)

    def readyz(self) -> Readiness:
        """Database, broker and storage checks; see ``Readiness.ready``.

        A 503 here is an answer (some dependency is down), returned rather than retried."""
        response = self._http.get("/readyz")
        if response.status_code not in (200, 503):
            raise ApiError.from_response(response)
        return Readiness.model_validate(response.json())

    def workers(self) -> WorkerList:
        """The live workers, each with its device and queues (they answer within a second)."""
        return self._get("/v1/workers", WorkerList)

    def architectures(self) -> ArchitectureList:
        return self._get("/v1/architectures", ArchitectureList)

    # ------------------------------------------------------------------ datasets

    def upload_dataset(self, file: str | os.PathLike, *, on_progress: ProgressCallback | None = None) -> Dataset:
        """Upload a .zip/.tar/.tar.gz archive; it comes back ``validating`` (see :meth:`wait_dataset`).

        ``on_progress(bytes_sent, total_bytes)`` is called as the file streams out."""
        return self._upload("/v1/datasets", file, {}, on_progress, Dataset)

    def register_dataset(self, url: str) -> Dataset:
        """Register a dataset that stays in the tenant's own object storage (an ``s3://`` URL)."""
        return Dataset.model_validate(self._call("POST", "/v1/datasets", repeatable=False, json={"url": url}).json())

    def list_datasets(self, *, limit: int = 20, after: str | None = None) -> DatasetList:
        return self._get("/v1/datasets", DatasetList, limit=limit, after=after)

    def get_dataset(self, dataset_id: str) -> Dataset:
        return self._get(f"/v1/datasets/{dataset_id}", Dataset)

    def delete_dataset(self, dataset_id: str) -> None:
        self._call("DELETE", f"/v1/datasets/{dataset_id}")

    def wait_dataset(self, dataset_id: str, *, timeout: float | None = None, poll_s: float = 0.5) -> Dataset:
        """Poll until the dataset is no longer ``validating``; returns it (``ready`` or ``invalid``)."""
        return self._poll(lambda: self.get_dataset(dataset_id), timeout, poll_s, f"dataset {dataset_id}")

    # ------------------------------------------------------------------ models

    def upload_model(self, file: str | os.PathLike, *, architecture: str, num_classes: int,
                     on_progress: ProgressCallback | None = None) -> Model:
        """Upload weights (.safetensors, or a state-dict .pt/.pth) to start jobs from."""
        fields = {"architecture": architecture, "num_classes": str(num_classes)}
        return self._upload("/v1/models", file, fields, on_progress, Model)

    def list_models(self, *, limit: int = 20, after: str | None = None) -> ModelList:
        return self._get("/v1/models", ModelList, limit=limit, after=after)

    def get_model(self, model_id: str) -> Model:
        return self._get(f"/v1/models/{model_id}", Model)

    def delete_model(self, model_id: str) -> None:
        self._call("DELETE", f"/v1/models/{model_id}")

    def wait_model(self, model_id: str, *, timeout: float | None = None, poll_s: float = 0.5) -> Model:
        return self._poll(lambda: self.get_model(model_id), timeout, poll_s, f"model {model_id}")

    def _poll(self, read: Callable[[], T], timeout: float | None, poll_s: float, what: str) -> T:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            current = read()
            if current.status != UploadStatus.VALIDATING:  # type: ignore[attr-defined]
                return current
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{what} is still validating after {timeout} s")
            time.sleep(poll_s)

    # ------------------------------------------------------------------ jobs

    def create_job(self, dataset_id: str, config: dict[str, Any] | None = None, *,
                   idempotency_key: str | None = None, metadata: dict[str, str] | None = None,
                   max_runtime_s: int | None = None, webhook_url: str | None = None,
                   webhook_events_filter: list[str] | None = None) -> Job:
        """Queue a job on a ready dataset; ``config`` is the job configuration (every field has a default).
        ``metadata``: up to 16 string pairs to find it by (list_jobs(metadata=...)); ``max_runtime_s``: it fails
        with ``timeout`` past it; ``webhook_url``: its events are POSTed there, signed (create_webhook_secret first).

        All attempts of this call send one Idempotency-Key (``idempotency_key``, else a fresh
        one), so a retry after a lost answer returns the job the first attempt created."""
        key = idempotency_key or f"masktune-client-{uuid.uuid4()}"
        fields = {"metadata": metadata, "max_runtime_s": max_runtime_s, "webhook_url": webhook_url,
                  "webhook_events_filter": webhook_events_filter}
        body = {**(config or {}), **{k: v for k, v in fields.items() if v is not None}, "dataset_id": dataset_id}
        response = self._call("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key})
        return Job.model_validate(response.json())

    def list_jobs(self, *, status: str | None = None, limit: int = 20, after: str | None = None,
                  metadata: dict[str, str] | None = None) -> JobList:
        """Newest first; ``metadata``: only jobs carrying every one of these pairs."""
        pairs = {f"metadata[{k}]": v for k, v in (metadata or {}).items()}
        return self._get("/v1/jobs", JobList, status=status, limit=limit, after=after, **pairs)

    def get_job(self, job_id: str) -> Job:
        return self._get(f"/v1/jobs/{job_id}", Job)

    def cancel_job(self, job_id: str) -> Job:
        """Queued: cancelled at once; running: ``cancelling`` until the worker stops. Returns the job."""
        return Job.model_validate(self._call("POST", f"/v1/jobs/{job_id}/cancel").json())

    def delete_job(self, job_id: str) -> None:
        """Delete a finished job with its events and artifacts (409 ``job_active`` otherwise)."""
        self._call("DELETE", f"/v1/jobs/{job_id}")

    def list_webhook_deliveries(self, job_id: str) -> WebhookDeliveryList:
        """The job's webhook messages, each with its attempts (time, HTTP status or error)."""
        return self._get(f"/v1/jobs/{job_id}/webhook-deliveries", WebhookDeliveryList)

    def create_webhook_secret(self) -> WebhookSecret:
        """Create or rotate the tenant's webhook signing secret (``whsec_...``): shown in this answer only."""
        return WebhookSecret.model_validate(self._call("POST", "/v1/webhook-secret", repeatable=False).json())

    def get_webhook_secret(self) -> WebhookSecret:
        """Whether the tenant has a webhook secret, and since when (never the secret itself)."""
        return self._get("/v1/webhook-secret", WebhookSecret)

    def list_events(self, job_id: str, *, after: int | None = None, limit: int = 100) -> EventList:
        return self._get(f"/v1/jobs/{job_id}/events", EventList, after=after, limit=limit)

    def follow_events(self, job_id: str, *, after: int | None = None, timeout: float | None = None) -> Iterator[Event]:
        """The job's events as they happen (Server-Sent Events), from after ``after`` (default: the
        first), until the job is succeeded, failed or cancelled.

        A dropped stream is reopened with ``Last-Event-ID``: no event is repeated or missed.
        ``timeout``: seconds in all, then ``TimeoutError``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        read_timeout = self._http.timeout.read
        drops = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if after is not None:
                headers["Last-Event-ID"] = str(after)
            limit = read_timeout if deadline is None else max(0.1, min(read_timeout or 1e9, deadline - time.monotonic()))
            try:
                with self._stream(f"/v1/jobs/{job_id}/events", headers=headers,
                                  timeout=httpx.Timeout(self._http.timeout.connect, read=limit)) as response:
                    for event in _server_sent_events(response.iter_lines()):
                        if event is not None:
                            after, drops = event.id, 0
                            yield event
                        _check_deadline(deadline, job_id)
            except httpx.TransportError:
                _check_deadline(deadline, job_id)
                drops += 1
                if drops > self.max_retries:
                    raise
                time.sleep(self._delay(drops - 1))
                continue
            # The API ends the stream once the job is finished and every event is sent; a stream
            # cut short looks the same to a client, so the events left are asked for.
            if self.get_job(job_id).finished and not self.list_events(job_id, after=after, limit=1).data:
                return
            _check_deadline(deadline, job_id)
            drops += 1
            if drops > self.max_retries:
                raise httpx.RemoteProtocolError(f"the event stream of {job_id} keeps ending before the job does")
            time.sleep(self._delay(drops - 1))

    def wait(self, job_id: str, on_event: Callable[[Event], None] | None = None, timeout: float | None = None) -> Job:
        """Follow the job's events until it is succeeded, failed or cancelled; returns the final job.

        ``on_event`` sees every event once, oldest first (from the job's first event)."""
        for event in self.follow_events(job_id, timeout=timeout):
            if on_event is not None:
                on_event(event)
        return self.get_job(job_id)

    # ------------------------------------------------------------------ artifacts

    def list_artifacts(self, job_id: str) -> list[Artifact]:
        return self._get(f"/v1/jobs/{job_id}/artifacts", ArtifactList).data

    def download_artifact(self, job_id: str, name: str, to: str | os.PathLike = ".") -> Path:
        """Stream one artifact to ``to`` (a directory: the artifact's name in it) and check its sha256.

        The file appears complete or not at all (written beside it, then renamed)."""
        to = Path(to)
        target = to / name if to.is_dir() else to
        partial = target.with_name(target.name + ".part")
        digest = hashlib.sha256()
        try:
            with self._stream(f"/v1/jobs/{job_id}/artifacts/{name}") as response, open(partial, "wb") as out:
                for chunk in response.iter_bytes(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                expected = response.headers.get("etag", "").strip('"')
            if expected and expected != digest.hexdigest():
                raise TransferError(f"{name} of {job_id} arrived with sha256 {digest.hexdigest()}, the API has {expected}")
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target

    def download_artifacts(self, job_id: str, to: str | os.PathLike,
                           on_file: Callable[[Artifact], None] | None = None) -> list[Path]:
        """Every artifact of the job into the directory ``to`` (created if missing)."""
        to = Path(to)
        to.mkdir(parents=True, exist_ok=True)
        paths = []
        for artifact in self.list_artifacts(job_id):
            if on_file is not None:
                on_file(artifact)
            paths.append(self.download_artifact(job_id, artifact.name, to))
        return paths


def _check_deadline(deadline: float | None, job_id: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise TimeoutError(f"job {job_id} did not finish in time")


def _server_sent_events(lines: Iterable[str]) -> Iterator[Event | None]:
    """Events of a text/event-stream (the WHATWG format), and None for each comment (keep-alive)."""
    data: list[str] = []
    for line in lines:
        if not line:  # a blank line dispatches the event
            if data:
                yield Event.model_validate_json("\n".join(data))
            data = []
        elif line.startswith(":"):
            yield None
        else:
            name, _, value = line.partition(":")
            if name == "data":
                data.append(value[1:] if value.startswith(" ") else value)
            # id: is the event's own id, event: its kind; both are in the JSON too.
