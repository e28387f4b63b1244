"""Job fields platforms have elsewhere: metadata (and the list filter on it, PostgreSQL and SQLite),
estimated_finish while running, and max_runtime_s (failed with code timeout past it)."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from stack import Stack, running
from test_api import upload_dataset as upload_tiny_archive
from test_service_e2e import SMALL_JOB, wait_for

LIMIT_S = 3600  # the stack's MASKTUNE_MAX_RUNTIME_S_LIMIT: below the 24 h default, which it then caps
TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running(tmp_path_factory.mktemp("job-fields"), worker=True, MASKTUNE_MAX_RUNTIME_S_LIMIT=str(LIMIT_S)) as stack:
        yield stack


def when(value: str) -> datetime:
    return datetime.fromisoformat(value)


def create(client: httpx.Client, body: dict, **headers: str) -> httpx.Response:
    return client.post("/v1/jobs", json=body, headers=headers)


def listed(client: httpx.Client, query: str) -> list[str]:
    response = client.get(f"/v1/jobs?{query}")
    assert response.status_code == 200, response.text
    return [job["id"] for job in response.json()["data"]]


def check_metadata_filters(client: httpx.Client, dataset_id: str, key: str = "team") -> None:
    """Two jobs with metadata, one without; each filter lists exactly the jobs holding all its pairs."""
    vision = create(client, {"dataset_id": dataset_id, "metadata": {key: "vision", "ticket": "ML-1"}}).json()
    audio = create(client, {"dataset_id": dataset_id, "metadata": {key: "audio"}}).json()
    plain = create(client, {"dataset_id": dataset_id}).json()
    assert vision["metadata"] == {key: "vision", "ticket": "ML-1"} and plain["metadata"] == {}
    assert client.get(f"/v1/jobs/{audio['id']}").json()["metadata"] == {key: "audio"}
    assert listed(client, f"metadata[{key}]=vision") == [vision["id"]]
    assert listed(client, f"metadata[{key}]=audio") == [audio["id"]]
    assert listed(client, f"metadata[{key}]=vision&metadata[ticket]=ML-1") == [vision["id"]]  # all must match
    assert listed(client, f"metadata[{key}]=audio&metadata[ticket]=ML-1") == []
    assert listed(client, "metadata[ticket]=ML-2") == [] and listed(client, "metadata[nobody]=vision") == []
    bad = client.get("/v1/jobs", params={"metadata[a[b]]": "x"})
    assert bad.status_code == 422 and bad.json()["code"] == "validation_error", bad.text
    for job in (vision, audio, plain):
        client.post(f"/v1/jobs/{job['id']}/cancel")


def test_metadata_round_trip_validation_and_filter(client, dataset):
    check_metadata_filters(client, dataset["id"])
    for job in client.get("/v1/jobs").json()["data"]:
        wait_for(client, f"/v1/jobs/{job['id']}", lambda j: j["status"] in TERMINAL, 60)  # the worker is free again

    bodies = {
        "17 pairs": {f"k{i}": "v" for i in range(17)},
        "a 65-character key": {"k" * 65: "v"},
        "a non-string value": {"team": 3},
        "a 513-character value": {"team": "v" * 513},
        "a key with brackets": {"a[b]": "v"},
    }
    for what, metadata in bodies.items():
        response = create(client, {"dataset_id": dataset["id"], "metadata": metadata})
        assert response.status_code == 422 and response.json()["code"] == "validation_error", (what, response.text)
        assert response.json()["errors"][0]["loc"][:2] == ["body", "metadata"], what
    # 16 pairs at the sizes' limits pass; what is refused then is erm.epochs 0 without weights.
    full = create(client, {"dataset_id": dataset["id"], "metadata": {f"{i:064d}": "v" * 512 for i in range(16)},
                           "erm": {"epochs": 0}})
    assert full.status_code == 422 and full.json()["errors"][0]["loc"] == ["body", "erm", "epochs"], full.text

    # The metadata is part of the body an Idempotency-Key stands for.
    first = create(client, {"dataset_id": dataset["id"], "metadata": {"run": "a"}}, **{"Idempotency-Key": "meta-1"})
    assert first.status_code == 201
    again = create(client, {"dataset_id": dataset["id"], "metadata": {"run": "b"}}, **{"Idempotency-Key": "meta-1"})
    assert again.status_code == 422 and again.json()["code"] == "idempotency_key_reused"
    client.post(f"/v1/jobs/{first.json()['id']}/cancel")
    wait_for(client, f"/v1/jobs/{first.json()['id']}", lambda j: j["status"] in TERMINAL, 60)


def test_metadata_filter_on_sqlite(tmp_path):
    """The embedded start's database: an API alone (SQLite, filesystem broker), a dataset marked ready by hand."""
    stack = Stack(tmp_path, embedded=True)
    try:
        stack.start_api()
        with stack.client(stack.create_key("acme")) as client:
            upload = upload_tiny_archive(client)
            assert upload.status_code == 201, upload.text
            with sqlite3.connect(tmp_path / "data" / "masktune.db") as db:
                db.execute("UPDATE datasets SET status='ready', summary=? WHERE id=?",
                           (json.dumps({"classes": ["cat", "dog"]}), upload.json()["id"]))
            check_metadata_filters(client, upload.json()["id"], key="équipe")  # a key SQLite stores unescaped
    finally:
        stack.close()


def test_max_runtime_limit_and_default(client, dataset):
    too_long = create(client, {"dataset_id": dataset["id"], "max_runtime_s": LIMIT_S + 1})
    assert too_long.status_code == 422 and too_long.json()["errors"][0]["loc"] == ["body", "max_runtime_s"], too_long.text
    assert "MASKTUNE_MAX_RUNTIME_S_LIMIT" in too_long.json()["detail"]
    assert create(client, {"dataset_id": dataset["id"], "max_runtime_s": 0}).status_code == 422
    job = create(client, {"dataset_id": dataset["id"]}).json()
    assert job["max_runtime_s"] == LIMIT_S  # 24 h by default, capped by the limit
    client.post(f"/v1/jobs/{job['id']}/cancel")
    wait_for(client, f"/v1/jobs/{job['id']}", lambda j: j["status"] in TERMINAL, 60)


def test_estimated_finish_while_running(client, dataset):
    body = {"dataset_id": dataset["id"], **SMALL_JOB}  # 3 ERM epochs, then 1 of finetuning
    job = create(client, body).json()
    assert job["status"] == "queued" and job["estimated_finish"] is None
    seen = []  # (when asked, the estimate) while running
    while job["status"] not in TERMINAL:
        asked = datetime.now(timezone.utc)
        job = client.get(f"/v1/jobs/{job['id']}").json()
        if job["status"] == "running" and job["estimated_finish"] is not None:
            seen.append((asked, when(job["estimated_finish"])))
        time.sleep(0.1)
    assert job["status"] == "succeeded" and job["estimated_finish"] is None, job
    events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 500}).json()["data"]
    first_epoch = min(when(e["created_at"]) for e in events if e["kind"] == "epoch")
    assert seen, "no estimate while running"
    finished = when(job["finished_at"])
    assert all(first_epoch < estimate < finished + timedelta(seconds=60) for _, estimate in seen), (seen, finished)
    assert any(estimate > asked for asked, estimate in seen), seen  # ahead of the clock when it was read


def test_max_runtime_fails_with_timeout(client, dataset):
    body = {"dataset_id": dataset["id"], "erm": {"epochs": 200, "batch_size": 16}, "max_runtime_s": 2}
    job = create(client, body).json()
    assert job["max_runtime_s"] == 2
    job = wait_for(client, f"/v1/jobs/{job['id']}", lambda j: j["status"] in TERMINAL, 60)
    assert job["status"] == "failed" and job["error"]["code"] == "timeout", job
    assert "max_runtime_s of 2 s" in job["error"]["message"]
    ran = (when(job["finished_at"]) - when(job["started_at"])).total_seconds()
    assert 2 <= ran < 10, ran  # stopped between batches soon after the deadline
    last = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"][-1]
    assert last["kind"] == "status" and last["data"] == {"status": "failed", "code": "timeout"}, last
    assert "max_runtime_s" in last["message"]


def test_deadline_rules_on_sqlite(tmp_path):
    """The rules under the reconciler's timeout: the deadline is set by the first claim and kept by later
    ones; a job past it (plus the grace its worker has to stop it itself) fails, a finished one stays."""
    from sqlalchemy import select, update

    from jobstore.db import migrate, session_scope
    from jobstore.jobs import claim_job, recover_lost, time_out
    from jobstore.models import Dataset, Job, Tenant, utcnow

    url = f"sqlite:///{tmp_path / 'deadline.db'}"
    migrate(url)
    rules = {"heartbeat_timeout_s": 30, "max_attempts": 3}
    with session_scope(url) as s:
        s.add(Tenant(id="ten_a", name="a"))
        s.flush()
        s.add(Dataset(id="ds_a", tenant_id="ten_a", filename="d.zip", size_bytes=1, sha256="0" * 64, blob_key="k", status="ready"))
        s.flush()
        s.add_all([Job(id="job_a", tenant_id="ten_a", dataset_id="ds_a", config={}, max_runtime_s=60),
                   Job(id="job_old", tenant_id="ten_a", dataset_id="ds_a", config={})])  # a row from before the limit
    with session_scope(url) as s:
        assert claim_job(s, "job_a", "first", **rules) == "claimed"
        assert claim_job(s, "job_old", "first", **rules) == "claimed"
        deadline, started_at = s.execute(select(Job.deadline_at, Job.started_at).where(Job.id == "job_a")).one()
        assert deadline == started_at + timedelta(seconds=60)
        assert s.scalar(select(Job.deadline_at).where(Job.id == "job_old")) is None
        assert not time_out(s, "job_a", 60, grace_s=30)
        # The worker vanished 70 s into the run: requeued, and claimed again with the first deadline.
        started = utcnow() - timedelta(seconds=70)
        s.execute(update(Job).where(Job.id == "job_a").values(started_at=started, deadline_at=started + timedelta(seconds=60),
                                                              heartbeat_at=started))
        assert recover_lost(s, "job_a", **rules) == "requeued"
        assert not time_out(s, "job_a", 60, grace_s=30)  # 10 s past: within the grace
        assert claim_job(s, "job_a", "second", **rules) == "claimed"
        assert s.scalar(select(Job.deadline_at).where(Job.id == "job_a")).replace(tzinfo=None) == \
            (started + timedelta(seconds=60)).replace(tzinfo=None)
        assert time_out(s, "job_a", 60, grace_s=5)
        assert s.execute(select(Job.status, Job.error_code, Job.claim_token).where(Job.id == "job_a")).one() == \
            ("failed", "timeout", None)
        assert not time_out(s, "job_a", 60, grace_s=5)  # terminal stays terminal


def test_finish_estimate_counts_the_epochs_left():
    """The worker's estimate: the mean epoch time of the current stage times the epochs left, saliency
    passes and evaluate counted as one epoch each."""
    from masktune_core import JobConfig, ProgressEvent
    from worker.estimate import FinishEstimate

    def event(kind, stage, **data):
        return ProgressEvent(kind, stage, 0.5, 0.5, data=data)

    config = JobConfig.model_validate({"erm": {"epochs": 4}, "finetune": {"epochs": 2}, "masktune_iterations": 2})
    estimate = FinishEstimate(config)
    assert estimate.seconds_left(event("stage", "prepare"), 0.0) is None
    assert estimate.seconds_left(event("stage", "erm"), 100.0) is None
    # ERM epoch 1 of 4 took 10 s: 3 ERM epochs + 2 rounds x (saliency + 2 finetune epochs) + evaluate.
    assert estimate.seconds_left(event("epoch", "erm", epoch=1, epochs=4), 110.0) == pytest.approx(10 * (3 + 2 * 3 + 1))
    assert estimate.seconds_left(event("progress", "erm"), 115.0) is None
    estimate.seconds_left(event("stage", "finetune", iteration=1), 200.0)
    # Finetune round 1, epoch 1 of 2 took 8 s: 1 epoch + round 2 (saliency + 2 epochs) + evaluate.
    assert estimate.seconds_left(event("epoch", "finetune", epoch=1, epochs=2, iteration=1), 208.0) == pytest.approx(8 * 5)

    resumed = FinishEstimate(config)  # a new attempt resumes ERM after epoch 2: only its own epochs are timed
    resumed.seconds_left(event("stage", "erm"), 0.0)
    resumed.seconds_left(event("progress", "erm", resumed_from_epoch=2), 1.0)
    assert resumed.seconds_left(event("epoch", "erm", epoch=3, epochs=4), 6.0) == pytest.approx(6 * (1 + 6 + 1))
