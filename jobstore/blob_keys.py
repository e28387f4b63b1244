"""Where each kind of object lives in the blob store: every key is built here.

A job or an upload owns everything under its prefix, which is what deleting it removes.
"""

from __future__ import annotations


def dataset_prefix(dataset_id: str) -> str:
    return f"datasets/{dataset_id}"


def dataset_upload(dataset_id: str) -> str:
    return f"{dataset_prefix(dataset_id)}/upload"


def dataset_decoded(dataset_id: str, entry: str) -> str:
    """A decoded copy of the dataset at one input size, shared by the jobs that use it."""
    return f"{dataset_prefix(dataset_id)}/decoded/{entry}"


def model_prefix(model_id: str) -> str:
    return f"models/{model_id}"


def model_upload(model_id: str) -> str:
    return f"{model_prefix(model_id)}/upload"


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}"


def job_work(job_id: str) -> str:
    """The mirrored work area (checkpoints, stage outputs) a later attempt resumes from."""
    return f"{job_prefix(job_id)}/work"


def job_artifact(job_id: str, name: str) -> str:
    return f"{job_prefix(job_id)}/artifacts/{name}"
