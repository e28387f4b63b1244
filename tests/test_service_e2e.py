"""End to end over real HTTP: uvicorn, a Celery worker process, PostgreSQL and Redis
(and once with the embedded defaults: SQLite, filesystem broker, local blobs)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import torch

from masktune_core import create_model, load_weights
from masktune_core.data import decode_dataset, index_dataset
from masktune_core.training import LoopSettings, accuracy, predict_logits
from stack import ROOT, free_port, running

SMALL_JOB = {"erm": {"epochs": 3, "batch_size": 64}, "masking": {"batch_size": 64}, "preview_count": 2}
STAGES = ["prepare", "erm", "saliency", "finetune", "evaluate", "export"]


def zip_dir(directory: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(directory))
    return buf.getvalue()


def wait_for(client: httpx.Client, url: str, done, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(url).json()
        if done(body):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting on {url}: {body}")
        time.sleep(0.3)


def upload_dataset(client: httpx.Client, payload: bytes, name: str = "digits.zip") -> dict:
    response = client.post("/v1/datasets", files={"file": (name, payload, "application/zip")})
    assert response.status_code == 201, response.text
    return wait_for(client, f"/v1/datasets/{response.json()['id']}", lambda d: d["status"] != "validating", 60)


def run_job(client: httpx.Client, body: dict, status: set[str] = frozenset({"succeeded", "failed", "cancelled"})) -> dict:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "queued"
    return wait_for(client, f"/v1/jobs/{response.json()['id']}", lambda j: j["status"] in status)


def follow_events(client: httpx.Client, job_id: str, last_event_id: int | None = None) -> tuple[list[dict], int]:
    """A job's event stream (Server-Sent Events) read to its end: the events as
    {id, event, data} and the number of comment (keep-alive) lines."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    events, comments, fields = [], 0, {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=180) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(":"):
                comments += 1
            elif line:
                name, _, value = line.partition(": ")
                fields[name] = value
            elif fields:  # a blank line ends an event
                events.append({"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])})
                fields = {}
    return events, comments


def accuracy_of_weights(weights: bytes, dataset_dir: Path, tmp_path: Path) -> float:
    path = tmp_path / "model.safetensors"
    path.write_bytes(weights)
    model = create_model("small_cnn", 2)
    load_weights(model, path)
    split = decode_dataset(index_dataset(dataset_dir), 28, tmp_path / "cache").splits["test"]
    return accuracy(predict_logits(model, split, 64, LoopSettings(device=torch.device("cpu"))), split.labels)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # Event streams read every 0.2 s and send a keep-alive each second, so a short job shows both.
    with running(tmp_path_factory.mktemp("stack"), worker=True, MASKTUNE_EVENTS_POLL_INTERVAL_S="0.2",
                 MASKTUNE_EVENTS_KEEPALIVE_S="1") as stack:
        yield stack


def test_upload_job_follow_events_download(stack, client, dataset, tiny_digits, tmp_path):
    summary = dataset["summary"]
    assert summary["classes"] == ["0", "1"] and len(summary["groups"]) == 4
    assert summary["splits"]["train"]["images"] == 300

    created = client.post("/v1/jobs", json={"dataset_id": dataset["id"], **SMALL_JOB}).json()
    assert created["status"] == "queued"
    streamed, keepalives = follow_events(client, created["id"])  # from queued until the stream ends
    job = client.get(f"/v1/jobs/{created['id']}").json()
    assert job["status"] == "succeeded", (job, stack.log_tail("worker"))
    assert job["progress"] == 1.0 and job["attempts"] == 1 and job["error"] is None
    assert job["config"]["erm"]["epochs"] == 3 and job["config"]["erm"]["lr"] == 0.01

    events = client.get(f"/v1/jobs/{job['id']}/events", params={"limit": 500}).json()["data"]
    ids = [e["id"] for e in events]
    assert ids == sorted(ids)
    assert [e["stage"] for e in events if e["kind"] == "stage"] == STAGES
    epochs = [e["data"] for e in events if e["kind"] == "epoch"]
    assert [(e["phase"], e["epoch"]) for e in epochs] == [("erm", 1), ("erm", 2), ("erm", 3), ("finetune", 1)]
    assert all(0 <= e["val_accuracy"] <= 1 and e["train_loss"] > 0 for e in epochs)
    later = client.get(f"/v1/jobs/{job['id']}/events", params={"after": ids[2]}).json()["data"]
    assert [e["id"] for e in later][:3] == ids[3:6]
    # The event stream had every event once, in order, as listed, and ended after the final status event.
    assert [e["data"] for e in streamed] == events
    assert [(e["id"], e["event"]) for e in streamed] == [(e["id"], e["kind"]) for e in events]
    assert streamed[-1]["event"] == "status" and streamed[-1]["data"]["data"]["status"] == "succeeded"
    assert keepalives >= 1  # the job ran for seconds; MASKTUNE_EVENTS_KEEPALIVE_S is 1 here
    # A reconnecting client sends the last id it saw (Last-Event-ID) and gets only the later events.
    assert follow_events(client, job["id"], last_event_id=ids[4])[0] == streamed[5:]
    assert follow_events(client, job["id"], last_event_id=ids[-1])[0] == []

    listed = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
    assert {a["name"] for a in listed} == {"metrics.json", "model.safetensors", "erm.safetensors", "report.png", "previews.png",
                                          "config.json", "model_card.json"}
    downloads = {}
    for artifact in listed:
        response = client.get(f"/v1/jobs/{job['id']}/artifacts/{artifact['name']}")
        assert response.status_code == 200
        assert int(response.headers["content-length"]) == len(response.content) == artifact["size_bytes"]
        assert response.headers["etag"].strip('"') == hashlib.sha256(response.content).hexdigest() == artifact["sha256"]
        downloads[artifact["name"]] = response.content
    assert downloads["previews.png"][:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads(downloads["metrics.json"])
    assert job["metrics"]["verdict"] == metrics["verdict"]
    # The verdict is the job's last word, and a warning event unless MaskTune improved.
    verdict = metrics["verdict"]
    assert events[-1]["kind"] == "status" and events[-1]["message"] == verdict["message"]
    assert [e["message"] for e in events if e["kind"] == "warning"] == ([] if verdict["call"] == "improved" else [verdict["message"]])
    # The downloaded finetuned model reproduces the reported test accuracy.
    got = accuracy_of_weights(downloads["model.safetensors"], tiny_digits, tmp_path)
    assert got == pytest.approx(metrics["masktune"]["test"]["overall_accuracy"])

    # The ERM weights, uploaded back as a model, start a job that skips ERM.
    response = client.post("/v1/models", files={"file": ("erm.safetensors", downloads["erm.safetensors"])},
                         data={"architecture": "small_cnn", "num_classes": "2"})
    assert response.status_code == 201, response.text
    model = wait_for(client, f"/v1/models/{response.json()['id']}", lambda m: m["status"] != "validating", 60)
    assert model["status"] == "ready", model
    again = run_job(client, {"dataset_id": dataset["id"], **SMALL_JOB, "erm": {"epochs": 0},
                           "model": {"architecture": "small_cnn", "weights_id": model["id"]}})
    assert again["status"] == "succeeded", again
    assert again["metrics"]["erm"]["test"] == job["metrics"]["erm"]["test"]


def test_cancel_a_running_job_then_the_worker_takes_the_next(client, dataset):
    long = client.post("/v1/jobs", json={"dataset_id": dataset["id"], **SMALL_JOB, "erm": {"epochs": 500, "batch_size": 16}}).json()
    wait_for(client, f"/v1/jobs/{long['id']}", lambda j: j["status"] == "running" and j["stage"] == "erm", 60)
    asked = time.monotonic()
    response = client.post(f"/v1/jobs/{long['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] in {"cancelling", "cancelled"}
    cancelled = wait_for(client, f"/v1/jobs/{long['id']}", lambda j: j["status"] == "cancelled", 30)
    assert time.monotonic() - asked < 10
    assert cancelled["finished_at"] is not None
    assert client.post(f"/v1/jobs/{long['id']}/cancel").json()["status"] == "cancelled"
    assert run_job(client, {"dataset_id": dataset["id"], **SMALL_JOB})["status"] == "succeeded"


def test_invalid_dataset_gets_a_reason(client, tmp_path):
    one_class = tmp_path / "one"
    (one_class / "train/cat").mkdir(parents=True)
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(one_class / f"train/cat/{i}.png")
    dataset = upload_dataset(client, zip_dir(one_class))
    assert dataset["status"] == "invalid" and "one class" in dataset["error"]
    response = client.post("/v1/jobs", json={"dataset_id": dataset["id"]})
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    not_zip = upload_dataset(client, b"definitely not an archive", name="data.zip")
    assert not_zip["status"] == "invalid" and "archive" in not_zip["error"]


def test_other_tenants_see_nothing(stack, client, dataset):
    job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], **SMALL_JOB}).json()
    with stack.client(stack.create_key("globex")) as globex:
        for url in (f"/v1/datasets/{dataset['id']}", f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/events",
                    f"/v1/jobs/{job['id']}/artifacts", f"/v1/jobs/{job['id']}/artifacts/metrics.json"):
            response = globex.get(url)
            assert response.status_code == 404, url
            assert response.json()["code"] == "not_found"
        streamed = globex.get(f"/v1/jobs/{job['id']}/events", headers={"Accept": "text/event-stream"})
        assert streamed.status_code == 404 and streamed.json()["code"] == "not_found"
        assert globex.post("/v1/jobs", json={"dataset_id": dataset["id"]}).status_code == 404
        assert globex.get("/v1/jobs").json()["data"] == []
    wait_for(client, f"/v1/jobs/{job['id']}", lambda j: j["status"] == "succeeded")


def test_embedded_defaults_run_the_same_flow(tiny_digits, tmp_path):
    """scripts/serve.py: SQLite, a local blob folder and kombu's filesystem broker; no servers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASKTUNE_")}
    env.update(MASKTUNE_DATA_DIR=str(tmp_path / "svc"), MASKTUNE_API_PORT=str(port), MASKTUNE_PROGRESS_INTERVAL_S="0.2")
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "scripts/serve.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        key_file = tmp_path / "svc/local-api-key.json"
        deadline = time.monotonic() + 60
        while True:
            try:
                if key_file.exists() and httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.3)
        secret = json.loads(key_file.read_text())["secret"]
        assert secret in (tmp_path / "serve.log").read_text()  # the start prints the local key
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {secret}"}, timeout=30) as client:
            dataset = upload_dataset(client, zip_dir(tiny_digits))
            assert dataset["status"] == "ready", dataset
            # Followed by its event stream (on SQLite here) instead of polling.
            job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], **SMALL_JOB}).json()
            streamed, _ = follow_events(client, job["id"])
            assert [e["id"] for e in streamed] == sorted({e["id"] for e in streamed})
            assert streamed[-1]["event"] == "status" and streamed[-1]["data"]["data"]["status"] == "succeeded"
            job = client.get(f"/v1/jobs/{job['id']}").json()
            assert job["status"] == "succeeded", (job, (tmp_path / "svc/worker.log").read_text()[-3000:])
            ready = client.get("/readyz").json()
            assert {k: ready[k] for k in ("database", "broker", "storage")} == {"database": "ok", "broker": "ok", "storage": "ok"}
            # Both embedded workers answer, each with the device its jobs run on (no GPU here).
            workers = client.get("/v1/workers").json()["data"]
            assert {w["name"].split("@")[0]: (w["device"], w["queues"]) for w in workers} == {
                "jobs": ("cpu", ["masktune.jobs"]), "validation": ("cpu", ["masktune.validation"])}
            weights = client.get(f"/v1/jobs/{job['id']}/artifacts/model.safetensors").content
        assert (tmp_path / "svc/masktune.db").exists()
        assert list((tmp_path / "svc/blobs/jobs").glob("*/artifacts/model.safetensors"))[0].read_bytes() == weights
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
