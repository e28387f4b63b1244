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

from stack import REDIS_URL, ROOT, Stack, running

PROBLEM = "application/problem+json"


# ---------------------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # Tests here create many jobs per tenant; the active-job limit has its own stack (limits_stack).
    with running(tmp_path_factory.mktemp("api"), MASKTUNE_MAX_ACTIVE_JOBS_PER_TENANT="1000") as s:
        yield s


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
        # This stack runs no worker: the API is ready all the same (jobs wait queued), and says so.
        assert r.status_code == 200 and r.json() == {"database": "ok", "broker": "ok", "storage": "ok"}
        assert anon.get("/v1/workers").status_code == 401  # who runs where is for key holders


def test_workers_lists_none_when_none_answers(stack, keys):
    with stack.client(keys["tenant-a"]) as client:
        assert client.get("/v1/workers").json() == {"data": []}


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
                 "/v1/jobs/{job_id}/artifacts/{name}", "/v1/architectures"):
        assert path in schema["paths"], path
    create_job = schema["paths"]["/v1/jobs"]["post"]
    assert create_job["responses"]["422"]["content"][PROBLEM]["schema"]["$ref"] == "#/components/schemas/Problem"
    assert "multipart/form-data" in schema["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]
    assert {"Problem", "Dataset", "Model", "Job", "JobCreate"} <= set(schema["components"]["schemas"])


def test_api_imports_no_torch_masktune_core_or_worker():
    code = ("import sys, api.app, api.manage; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'timm', 'masktune_core', 'worker')]; "
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
    # JSON registers a dataset by URL: a file field is not part of that body
    body = assert_problem(a.post("/v1/datasets", json={"file": "x"}), 422, "validation_error")
    assert ["body", "url"] in [e["loc"] for e in body["errors"]]
    assert_problem(a.post("/v1/datasets", content=b"x", headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type")
    # no MASKTUNE_DATASET_URL_PREFIXES here: no tenant may register a URL
    assert_problem(a.post("/v1/datasets", json={"url": "s3://bucket/data/"}), 422, "dataset_url_not_allowed")
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
    body = assert_problem(upload_model(a, architecture="vgg_nonexistent"), 422, "validation_error")
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
        ({"dataset_id": dataset_a, "model": {"architecture": "vgg_nonexistent"}}, 422, "validation_error"),
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


def test_dfr_jobs_need_group_labels_in_the_dataset_summary(stack, a, dataset_a):
    body = {"dataset_id": dataset_a, "methods": ["masktune", "jtt", "dfr"]}
    problem = assert_problem(a.post("/v1/jobs", json=body), 422, "dfr_needs_val_groups")
    assert dataset_a in problem["detail"] and "group" in problem["detail"]
    assert a.post("/v1/jobs", json={**body, "methods": ["masktune", "jtt"]}).status_code == 201  # JTT needs no groups
    grouped = ready_dataset(stack, a)
    summary = {"classes": ["cat", "dog"], "groups": ["cat/indoor", "cat/outdoor", "dog/indoor", "dog/outdoor"],
               "splits": {"train": {"images": 6}, "val": {"images": 6}}, "split_origin": {"val": "carved (seeded)"}}
    sql(stack, "UPDATE datasets SET summary=%s::json WHERE id=%s", json.dumps(summary), grouped)
    created = a.post("/v1/jobs", json={**body, "dataset_id": grouped})
    assert created.status_code == 201, created.text
    assert created.json()["config"]["methods"] == ["masktune", "jtt", "dfr"]
    # CelebA: the groups are the job's data.group_attribute.
    celeba = ready_dataset(stack, a)
    sql(stack, "UPDATE datasets SET summary=%s::json WHERE id=%s", json.dumps({"layout": "celeba", "images": 6}), celeba)
    celeba_body = {**body, "dataset_id": celeba, "data": {"label_attribute": "Blond_Hair"}}
    assert_problem(a.post("/v1/jobs", json=celeba_body), 422, "dfr_needs_val_groups")
    celeba_body["data"]["group_attribute"] = "Male"
    assert a.post("/v1/jobs", json=celeba_body).status_code == 201


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
    with running(tmp_path_factory.mktemp("api-small"), MASKTUNE_MAX_UPLOAD_BYTES="10000") as s:
        yield s


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


def _declare_upload_without_body(port: int, key: str, length: int, until: bytes) -> bytes:
    """Send only the headers of a dataset upload declaring ``length`` bytes; read the answer until ``until``.
    An answer at all proves the server decided without waiting for the body."""
    head = (f"POST /v1/datasets HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: multipart/form-data; boundary=b0undary\r\nContent-Length: {length}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        while until not in answer and (chunk := sock.recv(65536)):
            answer += chunk  # headers and body may come in separate segments
    return answer


def test_declared_oversize_is_refused_before_the_body_is_sent(small_stack):
    # Headers only, no body: an answer proves the server did not wait to read it.
    key = small_stack.create_key("small-raw")
    answer = _declare_upload_without_body(small_stack.port, key, 60000, until=b"payload_too_large").decode()
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


# ---------------------------------------------------------------------------- content types

def test_wrong_content_types_get_415(a, dataset_a):
    # Uploads take multipart/form-data only (datasets also JSON: a dataset by URL, tested with the other bad bodies).
    assert_problem(a.post("/v1/models", json={"file": "x", "architecture": "small_cnn", "num_classes": 2}), 415,
                   "unsupported_media_type")
    for path in ("/v1/datasets", "/v1/models"):
        assert_problem(a.post(path, data={"file": "x", "architecture": "small_cnn", "num_classes": "2"}), 415,
                       "unsupported_media_type")
        assert_problem(a.post(path, content=b"PK\x03\x04", headers={"Content-Type": "application/zip"}), 415,
                       "unsupported_media_type")
    # Jobs take JSON only (application/json or application/*+json).
    body = json.dumps({"dataset_id": dataset_a}).encode()
    assert_problem(a.post("/v1/jobs", files={"file": ("job.json", body, "application/json")}), 415,
                   "unsupported_media_type")
    assert_problem(a.post("/v1/jobs", content=body, headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type")
    assert_problem(a.post("/v1/jobs", data={"dataset_id": dataset_a}), 415, "unsupported_media_type")
    assert_problem(a.post("/v1/jobs", content=body), 415, "unsupported_media_type")  # a body without a Content-Type
    assert_problem(a.post("/v1/jobs"), 422, "validation_error")  # no body at all: the body is missing
    r = a.post("/v1/jobs", content=body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 201, r.text
    a.post(f"/v1/jobs/{r.json()['id']}/cancel")


# ---------------------------------------------------------------------------- DELETE models and jobs

def blob_dir(stack: Stack, *parts: str) -> Path:
    return Path(stack.env["MASKTUNE_DATA_DIR"]).joinpath("blobs", *parts)


def test_model_delete(stack, a, b, dataset_a):
    model = upload_model(a).json()["id"]
    assert blob_dir(stack, "models", model, "upload").is_file()
    assert_problem(b.delete(f"/v1/models/{model}"), 404, "not_found")
    assert a.delete(f"/v1/models/{model}").status_code == 204
    assert not blob_dir(stack, "models", model).exists()
    assert_problem(a.get(f"/v1/models/{model}"), 404, "not_found")
    assert_problem(a.delete(f"/v1/models/{model}"), 404, "not_found")
    assert sql(stack, "SELECT count(*) FROM models WHERE id=%s", model) == [(0,)]  # no job used it: gone

    # In use by a queued job: refused. Once the job is over: deleted, the job keeps its history.
    used = upload_model(a).json()["id"]
    sql(stack, "UPDATE models SET status='ready' WHERE id=%s", used)
    job = a.post("/v1/jobs", json={"dataset_id": dataset_a, "model": {"weights_id": used}}).json()["id"]
    assert_problem(a.delete(f"/v1/models/{used}"), 409, "model_in_use")
    assert blob_dir(stack, "models", used, "upload").is_file()
    a.post(f"/v1/jobs/{job}/cancel")
    assert a.delete(f"/v1/models/{used}").status_code == 204
    assert not blob_dir(stack, "models", used).exists()
    assert_problem(a.get(f"/v1/models/{used}"), 404, "not_found")
    assert used not in [m["id"] for m in a.get("/v1/models", params={"limit": 100}).json()["data"]]
    assert a.get(f"/v1/jobs/{job}").json()["model_id"] == used
    assert_problem(a.post("/v1/jobs", json={"dataset_id": dataset_a, "model": {"weights_id": used}}), 404, "not_found")
    # Deleting the last job that referenced it drops the hidden record too.
    assert sql(stack, "SELECT status FROM models WHERE id=%s", used) == [("deleted",)]
    assert a.delete(f"/v1/jobs/{job}").status_code == 204
    assert sql(stack, "SELECT count(*) FROM models WHERE id=%s", used) == [(0,)]


def test_job_delete_removes_rows_and_blobs(stack, a, b):
    dataset = ready_dataset(stack, a)
    job = a.post("/v1/jobs", json={"dataset_id": dataset}).json()["id"]
    # What a worker leaves: a work area, an artifact (blob and row), events.
    for key in (f"jobs/{job}/work/erm/epoch_1.pt", f"jobs/{job}/artifacts/metrics.json"):
        path = blob_dir(stack, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"{}")
    sql(stack, "INSERT INTO artifacts (job_id, name, blob_key, size_bytes, sha256, content_type, created_at) "
               "VALUES (%s, 'metrics.json', %s, 2, 'x', 'application/json', now())", job, f"jobs/{job}/artifacts/metrics.json")
    sql(stack, "INSERT INTO job_events (job_id, kind, message, created_at) VALUES (%s, 'info', 'hello', now())", job)

    for status in ("queued", "running", "cancelling"):
        sql(stack, "UPDATE jobs SET status=%s WHERE id=%s", status, job)
        assert_problem(a.delete(f"/v1/jobs/{job}"), 409, "job_active")
    assert_problem(b.delete(f"/v1/jobs/{job}"), 404, "not_found")
    sql(stack, "UPDATE jobs SET status='failed', finished_at=now() WHERE id=%s", job)
    assert_problem(b.delete(f"/v1/jobs/{job}"), 404, "not_found")
    assert blob_dir(stack, "jobs", job).exists()

    # The dataset goes first (kept hidden while the job references it), then the job.
    assert a.delete(f"/v1/datasets/{dataset}").status_code == 204
    assert a.delete(f"/v1/jobs/{job}").status_code == 204
    assert not blob_dir(stack, "jobs", job).exists()
    for table in ("jobs WHERE id", "job_events WHERE job_id", "artifacts WHERE job_id"):
        assert sql(stack, f"SELECT count(*) FROM {table}=%s", job) == [(0,)], table
    assert sql(stack, "SELECT count(*) FROM datasets WHERE id=%s", dataset) == [(0,)]
    assert_problem(a.get(f"/v1/jobs/{job}"), 404, "not_found")
    assert_problem(a.delete(f"/v1/jobs/{job}"), 404, "not_found")
    assert job not in [j["id"] for j in a.get("/v1/jobs", params={"limit": 100}).json()["data"]]


# ---------------------------------------------------------------------------- per-tenant limits

QUOTA = 20_000


@pytest.fixture(scope="module")
def limits_stack(tmp_path_factory):
    with running(tmp_path_factory.mktemp("api-limits"), MASKTUNE_MAX_ACTIVE_JOBS_PER_TENANT="2",
                 MASKTUNE_TENANT_STORAGE_QUOTA_BYTES=str(QUOTA)) as s:
        yield s


def test_active_job_limit(limits_stack):
    s = limits_stack
    with s.client(s.create_key("busy")) as busy, s.client(s.create_key("idle")) as idle:
        dataset = ready_dataset(s, busy)
        first = busy.post("/v1/jobs", json={"dataset_id": dataset}, headers={"Idempotency-Key": "one"})
        second = busy.post("/v1/jobs", json={"dataset_id": dataset, "seed": 1})
        assert (first.status_code, second.status_code) == (201, 201)
        r = busy.post("/v1/jobs", json={"dataset_id": dataset, "seed": 2})
        body = assert_problem(r, 429, "too_many_active_jobs")
        assert r.headers["retry-after"] == "30" and "2" in body["detail"]
        # Replaying an existing job is not a new job: never refused.
        again = busy.post("/v1/jobs", json={"dataset_id": dataset}, headers={"Idempotency-Key": "one"})
        assert again.status_code == 201 and again.json()["id"] == first.json()["id"]
        # Running and cancelling jobs count; finished ones do not.
        sql(s, "UPDATE jobs SET status='running' WHERE id=%s", first.json()["id"])
        sql(s, "UPDATE jobs SET status='cancelling' WHERE id=%s", second.json()["id"])
        assert_problem(busy.post("/v1/jobs", json={"dataset_id": dataset, "seed": 2}), 429, "too_many_active_jobs")
        # Another tenant has its own slots.
        assert idle.post("/v1/jobs", json={"dataset_id": ready_dataset(s, idle)}).status_code == 201
        sql(s, "UPDATE jobs SET status='succeeded' WHERE id=%s", first.json()["id"])
        sql(s, "UPDATE jobs SET status='cancelled' WHERE id=%s", second.json()["id"])

        # Many at once: exactly the limit gets through (the count and the insert are serialised).
        key = busy.headers["authorization"]
        barrier = threading.Barrier(8)
        codes: list[int] = []

        def post(seed: int) -> None:
            with httpx.Client(base_url=s.base_url, headers={"Authorization": key}, timeout=30) as client:
                barrier.wait()
                codes.append(client.post("/v1/jobs", json={"dataset_id": dataset, "seed": 10 + seed}).status_code)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(codes) == [201, 201] + [429] * 6, codes
        assert len(busy.get("/v1/jobs", params={"status": "queued"}).json()["data"]) == 2


def _stored_files(stack: Stack) -> list[Path]:
    return sorted(p for p in blob_dir(stack).rglob("*") if p.is_file())


def test_storage_quota(limits_stack):
    s = limits_stack
    key = s.create_key("hoarder")
    with s.client(key) as client, s.client(s.create_key("neighbour")) as neighbour:
        first = upload_dataset(client, data=b"d" * 8000)
        assert first.status_code == 201, first.text
        assert upload_model(client).status_code == 201  # 16 bytes
        used = 8000 + 16
        stored = _stored_files(s)

        # Content-Length already shows it: refused before the body is read (headers only here).
        answer = _declare_upload_without_body(s.port, key, 60000, until=b"storage_quota_exceeded")
        assert answer.startswith(b"HTTP/1.1 413") and b"storage_quota_exceeded" in answer
        body = assert_problem(upload_dataset(client, data=b"x" * 40_000), 413, "storage_quota_exceeded")
        assert str(QUOTA) in body["detail"] and str(used) in body["detail"]
        # Streamed without a Content-Length: cut off once it passes what is left.
        r = client.post("/v1/datasets", content=_multipart_chunks(QUOTA - used + 1),
                        headers={"Content-Type": "multipart/form-data; boundary=b0undary"})
        assert_problem(r, 413, "storage_quota_exceeded")
        # Under the Content-Length slack but over the quota: cut off while streaming too.
        assert_problem(upload_dataset(client, data=b"x" * (QUOTA - used + 1)), 413, "storage_quota_exceeded")
        assert _stored_files(s) == stored, "refused uploads leave nothing behind"
        assert len(client.get("/v1/datasets").json()["data"]) == 1

        # Artifacts of the tenant's jobs count too.
        sql(s, "UPDATE datasets SET status='ready' WHERE id=%s", first.json()["id"])
        job = client.post("/v1/jobs", json={"dataset_id": first.json()["id"]}).json()["id"]
        sql(s, "INSERT INTO artifacts (job_id, name, blob_key, size_bytes, sha256, content_type, created_at) "
               "VALUES (%s, 'model.safetensors', 'k', 10000, 'x', 'application/octet-stream', now())", job)
        left = QUOTA - used - 10_000
        assert_problem(upload_dataset(client, data=b"x" * (left + 1)), 413, "storage_quota_exceeded")
        assert upload_dataset(client, data=b"x" * left).status_code == 201  # exactly full is fine
        assert_problem(upload_dataset(client, data=b"x"), 413, "storage_quota_exceeded")
        # Another tenant has its own quota.
        assert upload_dataset(neighbour, data=b"n" * 10_000).status_code == 201

        # Deleting makes room again.
        client.post(f"/v1/jobs/{job}/cancel")
        assert client.delete(f"/v1/jobs/{job}").status_code == 204
        assert client.delete(f"/v1/datasets/{first.json()['id']}").status_code == 204

        # Concurrent uploads that each fit but not together: the check under the tenant lock lets one in.
        free = QUOTA - 16 - left
        size = free // 2 + 1
        barrier = threading.Barrier(4)
        codes: list[int] = []

        def upload() -> None:
            with s.client(key) as c:
                barrier.wait()
                codes.append(upload_dataset(c, data=b"c" * size).status_code)

        threads = [threading.Thread(target=upload) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(codes) == [201, 413, 413, 413], codes
        datasets = [d for d in client.get("/v1/datasets").json()["data"]]
        assert sorted(d["size_bytes"] for d in datasets) == sorted([left, size])
        # The refused ones left no bytes: every stored upload belongs to a dataset someone can see.
        uploads = [p for p in blob_dir(s, "datasets").rglob("*") if p.is_file()]
        assert sorted(p.parent.name for p in uploads) == sorted(
            row[0] for row in sql(s, "SELECT id FROM datasets WHERE status <> 'deleted'"))


# ---------------------------------------------------------------------------- slow uploads

@pytest.fixture(scope="module")
def slow_stack(tmp_path_factory):
    with running(tmp_path_factory.mktemp("api-slow"), MASKTUNE_UPLOAD_IDLE_TIMEOUT_S="1") as s:
        yield s


def _stall(port: int, key: str, path: str = "/v1/datasets") -> socket.socket:
    """Headers and the start of a body that promises 100 kB, then nothing."""
    if path == "/v1/jobs":
        content_type, start = "application/json", b'{"dataset_id": "ds_'
    else:
        content_type = "multipart/form-data; boundary=b0undary"
        filename = "slow.safetensors" if path == "/v1/models" else "slow.zip"
        start = (f'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n\r\n'.encode()
                 + b"s" * 3000)
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: 100000\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(head + start)
    return sock


def _answer(sock: socket.socket) -> str:
    answer = b""
    with sock:
        while b"}" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    return answer.decode(errors="replace")


def test_stalled_uploads_time_out_and_free_their_threads(slow_stack):
    import time

    s = slow_stack
    key = s.create_key("slowpoke")
    # More stalled uploads than upload threads (16): each is dropped after 1 s idle, freeing its thread
    # for the next, and every one of them is answered.
    started = time.monotonic()
    socks = [_stall(s.port, key) for _ in range(18)] + [_stall(s.port, key, "/v1/models"), _stall(s.port, key, "/v1/jobs")]
    with s.client(key) as client:
        # Meanwhile the server answers everyone else, uploads included.
        assert client.get("/v1/datasets").status_code == 200
        r = upload_dataset(client)
        assert r.status_code == 201, r.text
        answers = [_answer(sock) for sock in socks]
        for answer in answers:
            assert answer.startswith("HTTP/1.1 408") and PROBLEM in answer and '"code":"upload_timeout"' in answer, answer
        assert time.monotonic() - started < 15
        # Nothing of the stalled uploads is kept, and the server still serves uploads.
        files = [p for p in blob_dir(s).rglob("*") if p.is_file()]
        assert [p.parent.name for p in files] == [r.json()["id"]]
        assert [d["id"] for d in client.get("/v1/datasets").json()["data"]] == [r.json()["id"]]
        assert upload_model(client).status_code == 201


# ---------------------------------------------------------------------------- what fuzzing found

def test_fuzzing_regressions(stack, a):
    # Part headers in UTF-8 (non-latin-1 field and file names) were a 500 (UnicodeEncodeError).
    boundary = "b0undary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="名前"\r\n\r\nx\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="データ𝔁.zip"\r\n\r\n'
            f'PK\r\n--{boundary}--\r\n').encode()
    r = a.post("/v1/datasets", content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 201, r.text
    assert r.json()["filename"] == "データ𝔁.zip"
    # A JSON body that is not UTF-8 was a 400 the schema did not document: it is malformed JSON (422).
    r = a.post("/v1/jobs", content=b"\x11\xff\xfe", headers={"Content-Type": "application/json"})
    assert assert_problem(r, 422, "validation_error")["errors"][0]["type"] == "json_invalid"
    # Ids the database cannot even compare (NUL bytes, kilobytes) are unknown ids, not 500s.
    for bad in ("ds_%00", "x" * 5000):
        assert_problem(a.get(f"/v1/datasets/{bad}"), 404, "not_found")
        assert_problem(a.get("/v1/datasets", params={"after": bad.replace("%00", "\x00")}), 422, "invalid_cursor")
    assert_problem(a.post("/v1/jobs", json={"dataset_id": "ds_\x00"}), 404, "not_found")
    assert_problem(a.get("/v1/jobs/job_x/artifacts/%00"), 404, "not_found")
    assert_problem(a.get("/v1/jobs/job_x/events", params={"after": 2**64}), 422, "validation_error")
