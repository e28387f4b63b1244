"""Decode once, in the service: the decode pool inside the Celery worker, the decoded images
shared through blob storage, and later jobs that decode nothing (real HTTP, worker, PostgreSQL, Redis)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from helpers import write_image
from jobstore.blobs import BlobStore
from stack import running
from worker.dataset_cache import DatasetCache, prune
from test_service_e2e import run_job, upload_dataset, zip_dir

JOB = {"erm": {"epochs": 1, "batch_size": 256}, "masking": {"batch_size": 256}, "preview_count": 2}
IMAGES = 600  # past the size from which decoding runs in worker processes


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running(tmp_path_factory.mktemp("cache-stack"), worker=True) as stack:
        yield stack


@pytest.fixture(scope="module")
def dataset(client, tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        label = i % 2
        colour = tuple(int(v) for v in rng.integers(0, 120, 3) + (120 if label else 0))
        write_image(root / ("val" if i % 10 == 0 else "train") / f"c{label}" / f"{i:05d}.png", colour, size=(12, 10))
    ready = upload_dataset(client, zip_dir(root))
    assert ready["status"] == "ready", ready
    return ready


def messages(client, job: dict) -> list[str]:
    events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 500}).json()["data"]
    return [e["message"] for e in events]


def test_jobs_on_one_dataset_decode_it_once_on_any_machine(stack, client, dataset):
    body = {"dataset_id": dataset["id"], **JOB}
    first = run_job(client, body)
    assert first["status"] == "succeeded", (first["error"], stack.log_tail("worker", 5000))
    assert f"dataset ready (decoded {IMAGES} images)" in messages(client, first)
    assert "daemonic" not in stack.log_tail("worker", 10**6)

    stored = stack.tmp / "data" / "blobs" / "datasets" / dataset["id"] / "decoded"
    (entry,) = stored.iterdir()
    assert entry.name.startswith("28px-") and {p.name for p in entry.iterdir()} == {"images.npy", "rows.json", "meta.json"}
    assert np.load(entry / "images.npy", mmap_mode="r").shape == (IMAGES, 28, 28, 3)

    # Same machine: the local copy is reused.
    second = run_job(client, body)
    assert second["status"] == "succeeded"
    assert "dataset ready (reused the decoded images)" in messages(client, second)
    assert "fetched the decoded dataset from storage" not in messages(client, second)

    # Another machine (no local copy): the stored copy is fetched, checked, and nothing is decoded.
    shutil.rmtree(stack.tmp / "data" / "work" / "datasets")
    third = run_job(client, body)
    assert third["status"] == "succeeded"
    assert {"fetched the decoded dataset from storage", "dataset ready (reused the decoded images)"} <= set(messages(client, third))
    assert first["metrics"] == second["metrics"] == third["metrics"]


def test_prune_removes_idle_datasets_but_never_one_a_job_holds(tmp_path):
    blobs = BlobStore(str(tmp_path / "blobs"))
    root = tmp_path / "datasets"
    held, idle = (DatasetCache(blobs, root, f"ds_{c}", c * 64) for c in "ab")
    for cache in (held, idle):
        (root / cache.sha256 / "files").mkdir(parents=True)
        with cache.in_use():
            pass
    with held.in_use():
        prune(root, max_idle_s=0)  # both are past the idle time; one is in use
        assert (root / held.sha256).exists() and not (root / idle.sha256).exists()
    prune(root, max_idle_s=3600)  # recently used: kept
    assert (root / held.sha256).exists()
    prune(root, max_idle_s=0)
    assert not (root / held.sha256).exists()
