"""The device a worker's jobs run on: decided once when the worker starts, and reported to the API.

``MASKTUNE_DEVICE=cuda`` (or ``cuda:N``) is a promise: a worker that cannot keep it refuses
to start, instead of running GPU jobs on the CPU for hours. Unset, jobs use CUDA when it is
present and the CPU otherwise. The check asks NVML, not the CUDA runtime, so the prefork
parent never initialises CUDA (a child forked after that could not use the GPU).

``GET /readyz`` asks every worker for its device through Celery's broadcast (the inspect
command below), so only live workers are listed.
"""

from __future__ import annotations

import logging
import os

import torch
from celery.signals import worker_init
from celery.worker.control import inspect_command

from jobstore.settings import COMMAND_REPORT_DEVICE, get_settings

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

log = logging.getLogger(__name__)
_chosen: dict[str, str] = {}


class DeviceUnavailable(RuntimeError):
    pass


def worker_device(requested: str | None) -> str:
    """The device jobs will use for MASKTUNE_DEVICE=``requested``; raises DeviceUnavailable when it cannot be had."""
    if not requested:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise DeviceUnavailable(f"MASKTUNE_DEVICE={requested} is not a device name (cpu, cuda, cuda:1)") from exc
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        raise DeviceUnavailable(f"MASKTUNE_DEVICE={requested}: only cpu and cuda devices are supported")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise DeviceUnavailable(
            f"MASKTUNE_DEVICE={requested} but this worker sees no CUDA device (driver missing, CUDA_VISIBLE_DEVICES "
            "empty, or the container was started without its GPU reservation); refusing to start rather than "
            "run GPU jobs on the CPU. Unset MASKTUNE_DEVICE or set it to cpu for a CPU worker.")
    if device.index is not None and device.index >= count:
        raise DeviceUnavailable(f"MASKTUNE_DEVICE={requested} but this worker sees {count} CUDA device(s) "
                                f"(cuda:0..cuda:{count - 1})")
    return str(device)


@worker_init.connect
def _choose_device(**_) -> None:
    try:
        _chosen["device"] = worker_device(get_settings().device)
    except DeviceUnavailable as exc:
        log.critical("%s", exc)
        raise SystemExit(f"worker refused to start: {exc}") from None  # not caught by Celery's signal dispatch
    log.info("jobs on this worker run on %s", _chosen["device"])


@inspect_command(name=COMMAND_REPORT_DEVICE)
def report_device(state) -> dict:
    """This worker's device and the queues it consumes (for GET /readyz)."""
    return {"device": _chosen.get("device"), "cuda_devices": torch.cuda.device_count(),
            "queues": sorted(q.name for q in state.consumer.task_consumer.queues)}
