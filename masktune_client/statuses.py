"""The status values of the API's job and upload objects, as the client sees them.

They are the API's contract (the ``status`` enums of /openapi.json), kept here so the client
installs and runs without the service's code; tests/test_client.py checks they equal the
service's own definition.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class UploadStatus(StrEnum):
    VALIDATING = "validating"
    READY = "ready"
    INVALID = "invalid"
