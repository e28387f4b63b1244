"""A Python client and the ``masktune`` command for the MaskTune Service API.

httpx, pydantic and tqdm; none of the service's own code, so it installs and runs alone.
"""

from .client import DEFAULT_URL, MaskTuneClient
from .errors import ApiError, TransferError
from .models import (
    ArchitectureInfo, ArchitectureList, Artifact, Dataset, DatasetList, Event, EventList, Health, Job, JobError, JobList,
    Model, ModelList, Readiness, WorkerInfo, WorkerList,
)

__all__ = [
    "DEFAULT_URL", "MaskTuneClient", "ApiError", "TransferError", "ArchitectureInfo", "ArchitectureList", "Artifact",
    "Dataset", "DatasetList", "Event", "EventList", "Health", "Job", "JobError", "JobList", "Model", "ModelList",
    "Readiness", "WorkerInfo", "WorkerList",
]
