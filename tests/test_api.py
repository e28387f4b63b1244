"""The HTTP API against the real thing: a uvicorn process, PostgreSQL, Redis (tests/stack.py).

No Celery worker runs here: where a test needs a validated dataset or model it marks the
row ready in PostgreSQL directly. The worker's own validation is covered by the
end-to-end tests (tests/test_service_e2e.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
from PIL import Image

from tests.stack import REDIS_URL, ROOT, Stack

PROBLEM = "application/problem+json"


# ---------------------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("api"))
    try:
        s.start_api()
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def keys(stack):
    return {tenant: stack.create_key(tenant) for tenant in ("tenant-a", "tenant-b", "tenant-c")}


@pytest.fixture
def a(stack, keys):
    with stack.client(keys["tenant-a"]) as client:
        yield client


@pytest.fixture
def b(stack, keys):
    with stack.client(keys["tenant-b"]) as client:
        yield client


@pytest.fixture
def c(stack, keys):
    """A tenant whose listings no other test touches."""
    with stack.client(keys["tenant-c"]) as client:
        yield client


@pytest.fixture(scope="module")
def queues():
    return redis.Redis.from_url(REDIS_URL)


def sql(stack: Stack, query: str, *params):
    url = stack.env["MASKTUNE_DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else None


def queue_len(stack: Stack, queues, name: str) -> int:
    return queues.llen(stack.env[name])


def tiny_zip() -> bytes:
    """A real ImageFolder archive: train/ and val/ with two classes of 8x8 PNGs."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for split in ("train", "val"):
            for ci, cls in enumerate(("cat", "dog")):
                for i in range(3):
                    png = io.BytesIO()
                    Image.new("RGB", (8, 8), (200 * ci, 40 * i, 90)).save(png, "PNG")
                    zf.writestr(f"{split}/{cls}/{i}.png", png.getvalue())
    return buf.getvalue()


ZIP = tiny_zip()


def upload_dataset(client: httpx.Client, data: bytes = ZIP, filename: str = "tiny.zip") -> httpx.Response:
    return client.post("/v1/datasets", files={"file": (filename, data, "application/zip")})


def ready_dataset(stack: Stack, client: httpx.Client, classes=("cat", "dog")) -> str:
    """Upload the tiny archive and mark it validated, as a worker would."""
    r = upload_dataset(client)
    assert r.status_code == 201, r.text
    summary = {"classes": list(classes), "splits": {"train": 6, "val": 6}}
    sql(stack, "UPDATE datasets SET status='ready', summary=%s::json WHERE id=%s", json.dumps(summary), r.json()["id"])
    return r.json()["id"]


def upload_model(client: httpx.Client, filename="w.safetensors", architecture="small_cnn", num_classes="2") -> httpx.Response:
    return client.post("/v1/models", data={"architecture": architecture, "num_classes": num_classes},
                       files={"file": (filename, b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ", "application/octet-stream")})


def assert_problem(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["code"] == code and body["status"] == status and body["title"] and body["detail"]
    assert body["type"] == "about:blank"
    return body


@pytest.fixture(scope="module")
def dataset_a(stack, keys):
    with stack.client(keys["tenant-a"]) as client:
        return ready_dataset(stack, client)


# ---------------------------------------------------------------------------- health, auth, schema

def test_health_and_readiness_need_no_key(stack):
    with stack.client(None) as anon:
        assert anon.get("/healthz").json() == {"status": "ok"}
        r = anon.get("/readyz")
        assert r.status_code == 200 and r.json() == {"database": "ok", "broker": "ok", "storage": "ok"}


def test_requests_without_a_live_key_get_401(stack, keys):
    with stack.client(None) as anon:
        body = assert_problem(anon.get("/v1/datasets"), 401, "unauthorized")
        assert "Bearer" in body["detail"]
        assert anon.get("/v1/jobs", headers={"Authorization": "Basic dXNlcjpwdw=="}).status_code == 401
    with stack.client("mt_not-a-key") as bad:
        r = bad.post("/v1/jobs", json={"dataset_id": "ds_x"})
        assert_problem(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"

    def manage(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "api.manage", *args], cwd=ROOT, env=stack.env,
                              capture_output=True, text=True)

    created = json.loads(manage("create-key", "--tenant", "tenant-a").stdout.strip().splitlines()[-1])
    assert created["tenant"] == "tenant-a" and created["key_id"].startswith("key_")
    with stack.client(created["secret"]) as client:
        assert client.get("/v1/datasets").status_code == 200
        assert manage("revoke-key", created["key_id"]).returncode == 0
        assert_problem(client.get("/v1/datasets"), 401, "unauthorized")
    assert manage("revoke-key", created["key_id"]).returncode == 1  # already revoked
    with stack.client(keys["tenant-a"]) as still_good:  # the tenant's other keys live on
        assert still_good.get("/v1/datasets").status_code == 200


def test_openapi_documents_the_v1_api(stack):
    with stack.client(None) as anon:
        schema = anon.get("/openapi.json").json()
        assert anon.get("/docs").status_code == 200
    assert schema["info"]["title"] == "MaskTune Service"
    for path in ("/v1/datasets", "/v1/datasets/{dataset_id}", "/v1/models", "/v1/jobs", "/v1/jobs/{job_id}",
                 "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/artifacts",
                 "/v1/jobs/{job_id}/artifacts/{name}"):
        assert path in schema["paths"], path
    create_job = schema["paths"]["/v1/jobs"]["post"]
    assert create_job["responses"]["422"]["content"][PROBLEM]["schema"]["$ref"] == "#/components/schemas/Problem"
    assert "multipart/form-data" in schema["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]
    assert {"Problem", "Dataset", "Model", "Job", "JobCreate"} <= set(schema["components"]["schemas"])


def test_api_imports_no_torch_masktune_core_or_worker():
    code = ("import sys, api.app, api.manage; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'masktune_core', 'worker')]; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_unexpected_errors_are_problems_without_internals():
    import asyncio

    from fastapi import FastAPI

    from api.errors import install

    app = FastAPI()
    install(app)

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret internals /etc/passwd")

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/boom")

    r = asyncio.run(call())
    assert_problem(r, 500, "internal_error")
    assert "secret" not in r.text and "Traceback" not in r.text


# ---------------------------------------------------------------------------- datasets

def test_dataset_upload_streams_to_storage_and_queues_validation(stack, a, b, queues):
    before = queue_len(stack, queues, "MASKTUNE_VALIDATION_QUEUE")
    r = upload_dataset(a, filename="../../etc/evil dir/tiny.zip")
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["id"].startswith("ds_") and ds["object"] == "dataset" and ds["status"] == "validating"
    assert ds["filename"] == "tiny.zip"
    assert ds["size_bytes"] == len(ZIP) and ds["sha256"] == hashlib.sha256(ZIP).hexdigest()
    assert ds["error"] is None and ds["summary"] is None
    assert queue_len(stack, queues, "MASKTUNE_VALIDATION_QUEUE") == before + 1
    blob = Path(stack.env["MASKTUNE_DATA_DIR"]) / "blobs" / "datasets" / ds["id"] / "upload"
    assert blob.read_bytes() == ZIP
    assert a.get(f"/v1/datasets/{ds['id']}").json() == ds
    # Another tenant cannot see or delete it: exactly like an unknown id.
    assert_problem(b.get(f"/v1/datasets/{ds['id']}"), 404, "not_found")
    assert_problem(b.delete(f"/v1/datasets/{ds['id']}"), 404, "not_found")
    assert ds["id"] not in [d["id"] for d in b.get("/v1/datasets").json()["data"]]
    assert_problem(a.get("/v1/datasets/ds_doesnotexist"), 404, "not_found")


def test_dataset_list_paginates_newest_first(c):
    ids = [upload_dataset(c).json()["id"] for _ in range(3)]
    first = c.get("/v1/datasets", params={"limit": 2}).json()
    assert [d["id"] for d in first["data"]] == [ids[2], ids[1]] and first["next_cursor"] == ids[1]
    second = c.get("/v1/datasets", params={"limit": 2, "after": first["next_cursor"]}).json()
    assert [d["id"] for d in second["data"]] == [ids[0]] and second["next_cursor"] is None
    assert [d["id"] for d in c.get("/v1/datasets").json()["data"]][:3] == ids[::-1]
    assert_problem(c.get("/v1/datasets", params={"limit": 0}), 422, "validation_error")
    assert_problem(c.get("/v1/datasets", params={"limit": 101}), 422, "validation_error")
    assert_problem(c.get("/v1/datasets", params={"after": "ds_unknown"}), 422, "invalid_cursor")


def test_bad_dataset_uploads(a):
    assert_problem(upload_dataset(a, data=b""), 422, "empty_file")
    body = assert_problem(a.post("/v1/datasets", data={"other": "x"}, files={"notfile": ("x.zip", b"x")}), 422,
                          "validation_error")
    assert body["errors"]
    body = assert_problem(a.post("/v1/datasets", files={"name": (None, b"x")}), 422, "validation_error")
    assert body["errors"][0]["loc"] == ["body", "file"]
    assert_problem(a.post("/v1/datasets", json={"file": "x"}), 415, "unsupported_media_type")
    truncated = b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="t.zip"\r\n\r\nPK partial'
    r = a.post("/v1/datasets", content=truncated, headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
    assert_problem(r, 400, "malformed_multipart")


def test_dataset_delete(stack, a):
    ds = upload_dataset(a).json()
    folder = Path(stack.env["MASKTUNE_DATA_DIR"]) / "blobs" / "datasets" / ds["id"]
    assert folder.exists()
    assert a.delete(f"/v1/datasets/{ds['id']}").status_code == 204
    assert not folder.exists()
    assert_problem(a.get(f"/v1/datasets/{ds['id']}"), 404, "not_found")
    assert_problem(a.delete(f"/v1/datasets/{ds['id']}"), 404, "not_found")

    # In use by a queued job: refused. Once the job is over: deleted, the job keeps its history.
    used = ready_dataset(stack, a)
    job = a.post("/v1/jobs", json={"dataset_id": used}).json()
    assert_problem(a.delete(f"/v1/datasets/{used}"), 409, "dataset_in_use")
    assert a.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    assert a.delete(f"/v1/datasets/{used}").status_code == 204
    assert_problem(a.get(f"/v1/datasets/{used}"), 404, "not_found")
    assert used not in [d["id"] for d in a.get("/v1/datasets", params={"limit": 100}).json()["data"]]
    assert a.get(f"/v1/jobs/{job['id']}").json()["dataset_id"] == used
    assert not (Path(stack.env["MASKTUNE_DATA_DIR"]) / "blobs" / "datasets" / used).exists()
    assert_problem(a.post("/v1/jobs", json={"dataset_id": used}), 404, "not_found")


# ---------------------------------------------------------------------------- models

def test_model_uploads(stack, a, b, queues):
    assert_problem(upload_model(a, filename="weights.pkl"), 415, "unsupported_media_type")
    body = assert_problem(upload_model(a, architecture="vgg16"), 422, "validation_error")
    assert body["errors"][0]["loc"] == ["body", "architecture"]
    body = assert_problem(upload_model(a, num_classes="1"), 422, "validation_error")
    assert body["errors"][0]["loc"] == ["body", "num_classes"]
    assert_problem(upload_model(a, num_classes="two"), 422, "validation_error")

    before = queue_len(stack, queues, "MASKTUNE_VALIDATION_QUEUE")
    r = upload_model(a, filename="C:\\models\\w.pt", architecture="resnet18_small", num_classes="10")
    assert r.status_code == 201, r.text
    model = r.json()
    assert model["id"].startswith("mdl_") and model["object"] == "model" and model["status"] == "validating"
    assert (model["filename"], model["architecture"], model["num_classes"]) == ("w.pt", "resnet18_small", 10)
    assert queue_len(stack, queues, "MASKTUNE_VALIDATION_QUEUE") == before + 1
    assert (Path(stack.env["MASKTUNE_DATA_DIR"]) / "blobs" / "models" / model["id"] / "upload").exists()
    assert a.get(f"/v1/models/{model['id']}").json() == model
    assert model["id"] in [m["id"] for m in a.get("/v1/models").json()["data"]]
    assert_problem(b.get(f"/v1/models/{model['id']}"), 404, "not_found")


# ---------------------------------------------------------------------------- jobs

def test_invalid_job_bodies_are_problems(a, b, dataset_a):
    cases = [
        ({"dataset_id": dataset_a, "learning_rate": 0.1}, 422, "validation_error"),
        ({"dataset_id": dataset_a, "erm": {"lr": 100}}, 422, "validation_error"),
        ({"dataset_id": dataset_a, "erm": {"lr": 0.1, "unknown": 1}}, 422, "validation_error"),
        ({"dataset_id": dataset_a, "model": {"architecture": "vgg16"}}, 422, "validation_error"),
        ({"dataset_id": dataset_a, "erm": {"epochs": 0}}, 422, "validation_error"),
        ({"erm": {"lr": 0.1}}, 422, "validation_error"),
        ({"dataset_id": "ds_unknown"}, 404, "not_found"),
    ]
    for body, status, code in cases:
        problem = assert_problem(a.post("/v1/jobs", json=body), status, code)
        if code == "validation_error":
            assert problem["errors"] and all({"loc", "msg", "type"} <= set(e) for e in problem["errors"])
    assert_problem(a.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}), 422,
                   "validation_error")
    # Another tenant's dataset is as unknown as a made-up id.
    assert_problem(b.post("/v1/jobs", json={"dataset_id": dataset_a}), 404, "not_found")


def test_jobs_need_a_ready_dataset(stack, a):
    validating = upload_dataset(a).json()["id"]
    assert_problem(a.post("/v1/jobs", json={"dataset_id": validating}), 409, "dataset_not_ready")
    sql(stack, "UPDATE datasets SET status='invalid', error='no images' WHERE id=%s", validating)
    body = assert_problem(a.post("/v1/jobs", json={"dataset_id": validating}), 422, "dataset_invalid")
    assert "no images" in body["detail"]


def test_create_job_queues_it_with_the_resolved_config(stack, a, b, dataset_a, queues):
    before = queue_len(stack, queues, "MASKTUNE_JOBS_QUEUE")
    r = a.post("/v1/jobs", json={"dataset_id": dataset_a, "erm": {"epochs": 2}})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["id"].startswith("job_") and job["object"] == "job"
    assert (job["status"], job["stage"], job["progress"], job["attempts"]) == ("queued", None, 0.0, 0)
    assert job["dataset_id"] == dataset_a and job["model_id"] is None and job["error"] is None and job["metrics"] is None
    cfg = job["config"]
    assert cfg["erm"] == {"epochs": 2, "lr": 0.01, "batch_size": 128, "momentum": 0.9, "weight_decay": 0.0001}
    assert cfg["masking"]["method"] == "xgradcam" and cfg["masking"]["threshold_std"] == 2.0
    assert cfg["finetune"]["epochs"] == 1 and cfg["model"]["architecture"] == "small_cnn" and cfg["seed"] == 0
    assert "dataset_id" not in cfg
    assert queue_len(stack, queues, "MASKTUNE_JOBS_QUEUE") == before + 1
    message = json.loads(queues.lindex(stack.env["MASKTUNE_JOBS_QUEUE"], 0))
    assert message["headers"]["task"] == "masktune.run_job" and message["headers"]["argsrepr"] == repr([job["id"]])
    assert a.get(f"/v1/jobs/{job['id']}").json() == job
    assert_problem(b.get(f"/v1/jobs/{job['id']}"), 404, "not_found")
    assert_problem(b.post(f"/v1/jobs/{job['id']}/cancel"), 404, "not_found")
    assert_problem(b.get(f"/v1/jobs/{job['id']}/events"), 404, "not_found")
    assert_problem(b.get(f"/v1/jobs/{job['id']}/artifacts"), 404, "not_found")


def test_jobs_starting_from_uploaded_weights(stack, a, b, dataset_a):
    model = upload_model(a, architecture="small_cnn", num_classes="2").json()["id"]
    body = {"dataset_id": dataset_a, "model": {"architecture": "small_cnn", "weights_id": model}, "erm": {"epochs": 0}}
    assert_problem(a.post("/v1/jobs", json=body), 409, "model_not_ready")
    sql(stack, "UPDATE models SET status='ready' WHERE id=%s", model)
    assert_problem(a.post("/v1/jobs", json={**body, "model": {"architecture": "resnet18", "weights_id": model}}),
                   422, "architecture_mismatch")
    assert_problem(b.post("/v1/jobs", json=body), 404, "not_found")
    r = a.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["model_id"] == model and r.json()["config"]["model"]["weights_id"] == model

    three = upload_model(a, architecture="small_cnn", num_classes="3").json()["id"]
    sql(stack, "UPDATE models SET status='ready' WHERE id=%s", three)
    assert_problem(a.post("/v1/jobs", json={**body, "model": {"architecture": "small_cnn", "weights_id": three}}),
                   422, "num_classes_mismatch")
    sql(stack, "UPDATE models SET status='invalid', error='not a state dict' WHERE id=%s", three)
    assert_problem(a.post("/v1/jobs", json={**body, "model": {"architecture": "small_cnn", "weights_id": three}}),
                   422, "model_invalid")


def test_idempotency_key_replays_the_same_job(stack, a, dataset_a, queues):
    headers = {"Idempotency-Key": "replay-1"}
    first = a.post("/v1/jobs", json={"dataset_id": dataset_a}, headers=headers)
    assert first.status_code == 201
    length = queue_len(stack, queues, "MASKTUNE_JOBS_QUEUE")
    again = a.post("/v1/jobs", json={"dataset_id": dataset_a}, headers=headers)
    assert again.status_code == 201 and again.json()["id"] == first.json()["id"]
    # The same job spelled out with its defaults is the same body.
    spelled = a.post("/v1/jobs", json={"dataset_id": dataset_a, "seed": 0, "erm": {"lr": 0.01}}, headers=headers)
    assert spelled.status_code == 201 and spelled.json()["id"] == first.json()["id"]
    assert queue_len(stack, queues, "MASKTUNE_JOBS_QUEUE") == length
    assert_problem(a.post("/v1/jobs", json={"dataset_id": dataset_a, "seed": 1}, headers=headers), 422,
                   "idempotency_key_reused")
    other = a.post("/v1/jobs", json={"dataset_id": dataset_a}, headers={"Idempotency-Key": "replay-2"})
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    assert_problem(a.post("/v1/jobs", json={"dataset_id": dataset_a}, headers={"Idempotency-Key": "k" * 201}), 422,
                   "validation_error")


def test_concurrent_requests_with_one_idempotency_key_make_one_job(stack, keys, dataset_a, queues):
    before = queue_len(stack, queues, "MASKTUNE_JOBS_QUEUE")
    results: list[httpx.Response] = []
    barrier = threading.Barrier(10)

    def post():
        with stack.client(keys["tenant-a"]) as client:
            barrier.wait()
            results.append(client.post("/v1/jobs", json={"dataset_id": dataset_a, "seed": 7},
                                       headers={"Idempotency-Key": "concurrent-1"}))

    threads = [threading.Thread(target=post) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [201] * 10, [r.text for r in results if r.status_code != 201]
    assert len({r.json()["id"] for r in results}) == 1
    assert queue_len(stack, queues, "MASKTUNE_JOBS_QUEUE") == before + 1


def test_job_list_filters_by_status_and_paginates(stack, c):
    dataset = ready_dataset(stack, c)
    ids = [c.post("/v1/jobs", json={"dataset_id": dataset, "seed": i}).json()["id"] for i in range(3)]
    c.post(f"/v1/jobs/{ids[1]}/cancel")
    page = c.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == [ids[2], ids[1]]
    rest = c.get("/v1/jobs", params={"limit": 2, "after": page["next_cursor"]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and rest["next_cursor"] is None
    queued = c.get("/v1/jobs", params={"status": "queued", "limit": 1}).json()
    assert [j["id"] for j in queued["data"]] == [ids[2]] and queued["next_cursor"] == ids[2]
    queued = c.get("/v1/jobs", params={"status": "queued", "limit": 1, "after": queued["next_cursor"]}).json()
    assert [j["id"] for j in queued["data"]] == [ids[0]] and queued["next_cursor"] is None
    assert [j["id"] for j in c.get("/v1/jobs", params={"status": "cancelled"}).json()["data"]] == [ids[1]]
    assert c.get("/v1/jobs", params={"status": "running"}).json() == {"data": [], "next_cursor": None}
    assert_problem(c.get("/v1/jobs", params={"status": "done"}), 422, "validation_error")


def test_cancel(stack, a, dataset_a):
    job = a.post("/v1/jobs", json={"dataset_id": dataset_a}).json()
    cancelled = a.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["finished_at"] is not None
    events = a.get(f"/v1/jobs/{job['id']}/events").json()
    assert [e["kind"] for e in events["data"]] == ["status"] and events["data"][0]["data"] == {"status": "cancelled"}
    again = a.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert again["status"] == "cancelled" and again["finished_at"] == cancelled.json()["finished_at"]
    assert len(a.get(f"/v1/jobs/{job['id']}/events").json()["data"]) == 1

    # Running: the worker is asked to stop at its next batch.
    running = a.post("/v1/jobs", json={"dataset_id": dataset_a}).json()["id"]
    sql(stack, "UPDATE jobs SET status='running', stage='erm', started_at=now() WHERE id=%s", running)
    assert a.post(f"/v1/jobs/{running}/cancel").json()["status"] == "cancelling"
    assert sql(stack, "SELECT cancel_requested FROM jobs WHERE id=%s", running) == [(True,)]
    assert a.post(f"/v1/jobs/{running}/cancel").json()["status"] == "cancelling"

    # Terminal states never change.
    done = a.post("/v1/jobs", json={"dataset_id": dataset_a}).json()["id"]
    sql(stack, "UPDATE jobs SET status='succeeded', finished_at=now() WHERE id=%s", done)
    assert a.post(f"/v1/jobs/{done}/cancel").json()["status"] == "succeeded"
    assert_problem(a.post("/v1/jobs/job_unknown/cancel"), 404, "not_found")


def test_events_are_ordered_and_paginated(stack, a, dataset_a):
    job = a.post("/v1/jobs", json={"dataset_id": dataset_a}).json()["id"]
    for i in range(5):
        sql(stack, "INSERT INTO job_events (job_id, kind, stage, message, data, created_at) "
                   "VALUES (%s, 'epoch', 'erm', %s, %s::json, now())", job, f"epoch {i}", json.dumps({"epoch": i}))
    everything = a.get(f"/v1/jobs/{job}/events").json()
    assert [e["message"] for e in everything["data"]] == [f"epoch {i}" for i in range(5)]
    assert everything["next_cursor"] == everything["data"][-1]["id"]
    first = a.get(f"/v1/jobs/{job}/events", params={"limit": 2}).json()
    assert [e["data"]["epoch"] for e in first["data"]] == [0, 1]
    rest = a.get(f"/v1/jobs/{job}/events", params={"after": first["next_cursor"]}).json()
    assert [e["data"]["epoch"] for e in rest["data"]] == [2, 3, 4]
    assert {"id", "kind", "stage", "message", "data", "created_at"} == set(rest["data"][0])
    assert a.get(f"/v1/jobs/{job}/events", params={"after": rest["next_cursor"]}).json() == {"data": [], "next_cursor": None}


def test_artifacts(stack, a, dataset_a):
    job = a.post("/v1/jobs", json={"dataset_id": dataset_a}).json()["id"]
    assert a.get(f"/v1/jobs/{job}/artifacts").json() == {"data": []}
    assert_problem(a.get(f"/v1/jobs/{job}/artifacts/metrics.json"), 404, "not_found")
    # What the worker does when a job succeeds: the blob under the job's prefix, then its row.
    payload = json.dumps({"erm": {}, "masktune": {}}).encode() * 1000
    key = f"jobs/{job}/artifacts/metrics.json"
    path = Path(stack.env["MASKTUNE_DATA_DIR"]) / "blobs" / key
    path.parent.mkdir(parents=True)
    path.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    sql(stack, "INSERT INTO artifacts (job_id, name, blob_key, size_bytes, sha256, content_type, created_at) "
               "VALUES (%s, 'metrics.json', %s, %s, %s, 'application/json', now())", job, key, len(payload), digest)
    listed = a.get(f"/v1/jobs/{job}/artifacts").json()["data"]
    assert listed == [{"name": "metrics.json", "size_bytes": len(payload), "sha256": digest,
                       "content_type": "application/json"}]
    r = a.get(f"/v1/jobs/{job}/artifacts/metrics.json")
    assert r.status_code == 200 and r.content == payload
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["content-length"] == str(len(payload)) and r.headers["etag"] == f'"{digest}"'
    assert r.headers["content-disposition"] == 'attachment; filename="metrics.json"'


# ---------------------------------------------------------------------------- size limits

@pytest.fixture(scope="module")
def small_stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("api-small"), MASKTUNE_MAX_UPLOAD_BYTES="10000")
    try:
        s.start_api()
        yield s
    finally:
        s.close()


def _multipart_chunks(size: int, boundary: str = "b0undary"):
    yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.zip"\r\n' \
          f"Content-Type: application/zip\r\n\r\n".encode()
    sent = 0
    while sent < size:
        n = min(4096, size - sent)
        yield b"z" * n
        sent += n
    yield f"\r\n--{boundary}--\r\n".encode()


def test_uploads_over_the_limit_get_413(small_stack, queues):
    key = small_stack.create_key("small")
    blobs = Path(small_stack.env["MASKTUNE_DATA_DIR"]) / "blobs"
    with small_stack.client(key) as client:
        # Content-Length says it is too big: refused before the body is read.
        assert_problem(upload_dataset(client, data=b"x" * 50_000), 413, "payload_too_large")
        # No Content-Length (chunked): refused once the stream passes the limit.
        for size in (10_001, 50_000, 500_000):
            r = client.post("/v1/datasets", content=_multipart_chunks(size),
                            headers={"Content-Type": "multipart/form-data; boundary=b0undary"})
            assert_problem(r, 413, "payload_too_large")
        assert not any(p.is_file() for p in blobs.rglob("*")), "partial uploads must be removed"
        assert queues.llen(small_stack.env["MASKTUNE_VALIDATION_QUEUE"]) == 0
        # Exactly at the limit is fine, streamed or not.
        assert upload_dataset(client, data=b"y" * 10_000).status_code == 201
        r = client.post("/v1/datasets", content=_multipart_chunks(10_000),
                        headers={"Content-Type": "multipart/form-data; boundary=b0undary"})
        assert r.status_code == 201 and r.json()["size_bytes"] == 10_000
        # JSON bodies have a small cap of their own, with or without Content-Length.
        huge = b'{"dataset_id": "' + b"x" * (2 << 20) + b'"}'
        assert_problem(client.post("/v1/jobs", content=huge, headers={"Content-Type": "application/json"}), 413,
                       "payload_too_large")
        r = client.post("/v1/jobs", content=(huge[i:i + 65536] for i in range(0, len(huge), 65536)),
                        headers={"Content-Type": "application/json"})
        assert_problem(r, 413, "payload_too_large")


def test_declared_oversize_is_refused_before_the_body_is_sent(small_stack):
    # Headers only, no body: an answer proves the server did not wait to read it.
    key = small_stack.create_key("small-raw")
    head = (f"POST /v1/datasets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: multipart/form-data; boundary=b0undary\r\nContent-Length: 60000\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", small_stack.port), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        while b"payload_too_large" not in answer and (chunk := sock.recv(65536)):
            answer += chunk  # headers and body may come in separate segments
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 413") and PROBLEM in answer and "payload_too_large" in answer


def test_broker_down_means_503_and_nothing_kept(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("api-nobroker"), MASKTUNE_BROKER_URL="redis://127.0.0.1:1/0")
    try:
        s.start_api()
        key = s.create_key("nobroker")
        with s.client(key) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["broker"].startswith("error")
            assert ready.json()["database"] == "ok" and ready.json()["storage"] == "ok"
            assert_problem(upload_dataset(client), 503, "queue_unavailable")
            assert client.get("/v1/datasets").json()["data"] == []
            blobs = Path(s.env["MASKTUNE_DATA_DIR"]) / "blobs"
            assert not any(p.is_file() for p in blobs.rglob("*"))
            dataset = f"ds_{secrets.token_hex(10)}"  # a ready dataset, inserted as the worker would leave it
            sql(s, "INSERT INTO datasets (id, tenant_id, filename, size_bytes, sha256, blob_key, status, summary, "
                   "created_at, updated_at) SELECT %s, id, 'd.zip', 1, 'x', 'datasets/x/upload', 'ready', "
                   "'{\"classes\": [\"a\", \"b\"]}', now(), now() FROM tenants WHERE name = 'nobroker'", dataset)
            assert_problem(client.post("/v1/jobs", json={"dataset_id": dataset}, headers={"Idempotency-Key": "k"}), 503,
                           "queue_unavailable")
            assert client.get("/v1/jobs").json()["data"] == []
    finally:
        s.close()
