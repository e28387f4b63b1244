"""Metrics and logs of a live stack: the API as deployed (``python -m api``, two processes), a
Celery worker with its metrics exporter, JSON log lines, PostgreSQL and Redis.

One tiny job, one accepted and one rejected upload, then: the API's /metrics (summed over both
processes), the worker's exporter, and the log lines of both.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stack import Stack, free_port
from test_api import sql
from test_service_e2e import SMALL_JOB, zip_dir

TINY_JOB = {**SMALL_JOB, "erm": {**SMALL_JOB["erm"], "epochs": 1}}

API_PROCESSES = 2


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a Prometheus text page, by (sample name, labels)."""
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("observed"), MASKTUNE_LOG_FORMAT="json",
                  MASKTUNE_WORKER_METRICS_PORT=str(free_port()), MASKTUNE_API_WORKERS=str(API_PROCESSES))
    stack.env.update(MASKTUNE_API_HOST="127.0.0.1", MASKTUNE_API_PORT=str(stack.port))
    try:
        stack.start_worker()  # it starts while the API does
        api = stack._spawn("api", [sys.executable, "-m", "api"])
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{stack.base_url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert api.poll() is None and time.monotonic() < deadline, stack.log_tail("api")
            time.sleep(0.2)
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def observed(stack, tiny_digits):
    """A tenant's upload, rejected upload and tiny job, every request on a connection of its own
    (so both API processes serve some) with an X-Request-ID; the GETs of the job counted."""
    secret = stack.create_key("observer")
    tenant = sql(stack, "SELECT id FROM tenants WHERE name = 'observer'")[0][0]
    polls = {"n": 0}

    def count(response: httpx.Response) -> None:
        if response.request.method == "GET" and response.request.url.path.startswith("/v1/jobs/job_"):
            polls["n"] += response.status_code == 200 and response.request.url.path.count("/") == 3

    headers = {"Authorization": f"Bearer {secret}", "Connection": "close"}
    with httpx.Client(base_url=stack.base_url, headers=headers, timeout=30, event_hooks={"response": [count]}) as client:
        payload = zip_dir(tiny_digits)
        created = client.post("/v1/datasets", files={"file": ("digits.zip", payload)}, headers={"X-Request-ID": "obs-upload"})
        assert created.status_code == 201 and created.headers["X-Request-ID"] == "obs-upload"
        empty = client.post("/v1/datasets", files={"file": ("empty.zip", b"")}, headers={"X-Request-ID": "obs-empty"})
        assert empty.status_code == 422 and empty.json()["code"] == "empty_file"
        dataset = created.json()["id"]
        while client.get(f"/v1/datasets/{dataset}").json()["status"] == "validating":
            time.sleep(0.3)
        job = client.post("/v1/jobs", json={"dataset_id": dataset, **TINY_JOB}, headers={"X-Request-ID": "obs-create-job"})
        assert job.status_code == 201, job.text
        deadline = time.monotonic() + 120
        while (status := client.get(f"/v1/jobs/{job.json()['id']}").json()["status"]) not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, stack.log_tail("worker")
            time.sleep(0.3)
        assert status == "succeeded", stack.log_tail("worker")
        generated = client.get("/healthz").headers["X-Request-ID"]
    return {"tenant": tenant, "job": job.json()["id"], "upload_bytes": len(payload), "polls": polls["n"],
            "generated_request_id": generated}


def test_api_metrics_summed_over_processes(stack, observed):
    samples = scrape(f"{stack.base_url}/metrics")
    assert value(samples, "masktune_jobs", status="succeeded") == 1
    assert value(samples, "masktune_jobs", status="queued") == value(samples, "masktune_jobs", status="running") == 0
    for queue in stack.queues:
        assert value(samples, "masktune_queue_depth", queue=queue) == 0
    assert value(samples, "masktune_uploads_total", kind="dataset") == 1
    assert value(samples, "masktune_upload_bytes_total", kind="dataset") == observed["upload_bytes"]
    assert value(samples, "masktune_upload_rejections_total", kind="dataset", code="empty_file") == 1
    # Every GET of the job, whichever process served it, counted once under the route's template.
    route = {"method": "GET", "route": "/v1/jobs/{job_id}", "status": "200"}
    assert observed["polls"] >= 3
    assert value(samples, "masktune_http_request_duration_seconds_count", **route) == observed["polls"]
    assert value(samples, "masktune_http_request_duration_seconds_bucket", **route, le="+Inf") == observed["polls"]
    routes = {dict(labels)["route"] for name, labels in samples if name.startswith("masktune_http_request")}
    assert routes == {"/healthz", "/v1/datasets", "/v1/datasets/{dataset_id}", "/v1/jobs", "/v1/jobs/{job_id}"}
    # /metrics needs no key and is no API operation.
    assert "/metrics" not in httpx.get(f"{stack.base_url}/openapi.json").json()["paths"]


def test_worker_exporter_times_each_stage(stack, observed):
    samples = scrape(f"http://127.0.0.1:{stack.env['MASKTUNE_WORKER_METRICS_PORT']}/metrics")
    for stage in ("prepare", "erm", "saliency", "finetune", "evaluate", "export"):
        assert value(samples, "masktune_stage_duration_seconds_count", stage=stage) == 1, stage
        assert value(samples, "masktune_stage_duration_seconds_sum", stage=stage) > 0
    assert value(samples, "masktune_jobs_finished_total", status="succeeded") == 1
    assert value(samples, "masktune_epochs_total", phase="erm") == 1
    assert value(samples, "masktune_epochs_total", phase="finetune") == 1
    assert value(samples, "masktune_worker_jobs_running") == 0  # the job's process is gone


def test_log_lines_are_json_with_request_tenant_and_job(stack, observed):
    api = [json.loads(line) for line in stack.logs["api"].read_text().splitlines() if line.strip()]  # every line JSON
    assert all({"timestamp", "level", "logger", "message", "pid"} <= set(line) for line in api)
    by_request = {line["request_id"]: line for line in api if line.get("logger") == "api.access"}
    create = by_request["obs-create-job"]
    assert create["tenant"] == observed["tenant"] and create["status"] == 201 and create["route"] == "/v1/jobs"
    assert by_request["obs-empty"]["problem"] == "empty_file" and by_request["obs-empty"]["tenant"] == observed["tenant"]
    assert len(observed["generated_request_id"]) == 32 and observed["generated_request_id"] in by_request
    assert "tenant" not in by_request[observed["generated_request_id"]]  # /healthz takes no key
    # Both processes served: the sums above are over both.
    assert len({line["pid"] for line in api if line.get("logger") == "api.access"}) == API_PROCESSES

    job_lines = [line for line in json_lines(stack.logs["worker"]) if line.get("job_id") == observed["job"]]
    started = [line["stage"] for line in job_lines if line["message"].startswith("stage ")]
    assert started == ["prepare", "erm", "saliency", "finetune", "evaluate", "export"]
    assert job_lines[-1]["message"] == "job finished: succeeded" and job_lines[-1]["stage"] == "export"
