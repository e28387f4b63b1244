"""The states of jobs and uploads: the one definition the API, the worker and the store share.

Members are strings, so they go into columns, JSON event data and API bodies as their values.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """queued -> running -> succeeded | failed | cancelled, with a transient cancelling."""

    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE = tuple(s for s in JobStatus if s not in TERMINAL)


class UploadStatus(StrEnum):
    """A dataset or model upload: validated in the background before a job may use it."""

    VALIDATING = "validating"
    READY = "ready"
    INVALID = "invalid"
    DELETED = "deleted"  # hidden at once; its rows and blobs go when no job refers to it


class DeliveryStatus(StrEnum):
    """A webhook message: pending (being tried, or waiting for its next attempt) -> delivered | failed."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
