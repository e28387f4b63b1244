"""A worker told to use a GPU it does not have refuses to start, instead of running jobs on the CPU.

CI has no GPU, which is exactly the case under test: MASKTUNE_DEVICE=cuda on a host without CUDA.
"""

import pytest

from stack import Stack
from worker.device import DeviceUnavailable, worker_device


def test_a_worker_told_to_use_cuda_without_one_refuses_to_start(tmp_path):
    stack = Stack(tmp_path, embedded=True, MASKTUNE_DEVICE="cuda")
    try:
        worker = stack.start_worker()
        assert worker.wait(120) != 0
        log = stack.log_tail("worker")
        assert "worker refused to start: MASKTUNE_DEVICE=cuda but this worker sees no CUDA device" in log
    finally:
        stack.close()


@pytest.mark.parametrize("requested,reason", [
    ("cuda:1", "sees no CUDA device"), ("tpu", "is not a device name"), ("meta", "only cpu and cuda"),
])
def test_device_names_a_worker_cannot_use_are_refused_with_the_reason(requested, reason):
    with pytest.raises(DeviceUnavailable, match=reason):
        worker_device(requested)

