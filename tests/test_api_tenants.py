"""Tenants and keys against the real API (tests/stack.py): tenant B walks every route that takes an
id with tenant A's objects and gets 404 each time; keys are stored hashed, revocable, and record
their last use.

The walk is built from the OpenAPI schema and checked against ``app.routes``, so a new route
with an id in its path is walked (or fails this test) without anyone remembering to add it.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from stack import ROOT, Stack, running
from test_api import PROBLEM, assert_problem, blob_dir, ready_dataset, sql, upload_model

METHODS = {"get", "post", "put", "patch", "delete"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running(tmp_path_factory.mktemp("api-tenants")) as s:
        yield s


def manage(stack: Stack, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "api.manage", *args], cwd=ROOT, env=stack.env, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def objects_of_a(stack):
    """Tenant A's key and objects: a ready dataset, a ready model, a queued job and a succeeded job
    with an artifact (so an owner's DELETE or download of them would succeed)."""
    key = stack.create_key("tenant-a")
    with stack.client(key) as a:
        dataset = ready_dataset(stack, a)
        model = upload_model(a).json()["id"]
        sql(stack, "UPDATE models SET status='ready' WHERE id=%s", model)
        queued = a.post("/v1/jobs", json={"dataset_id": dataset, "model": {"weights_id": model}}).json()["id"]
        done = a.post("/v1/jobs", json={"dataset_id": dataset, "seed": 1}).json()["id"]
    sql(stack, "UPDATE jobs SET status='succeeded', finished_at=now() WHERE id=%s", done)
    for job in (queued, done):
        key_ = f"jobs/{job}/artifacts/metrics.json"
        path = blob_dir(stack, key_)
        path.parent.mkdir(parents=True)
        path.write_bytes(b"{}")
        sql(stack, "INSERT INTO artifacts (job_id, name, blob_key, size_bytes, sha256, content_type, created_at) "
                   "VALUES (%s, 'metrics.json', %s, 2, %s, 'application/json', now())", job, key_,
            hashlib.sha256(b"{}").hexdigest())
        sql(stack, "INSERT INTO job_events (job_id, kind, message, created_at) VALUES (%s, 'info', 'x', now())", job)
    return {"key": key, "dataset_id": [dataset], "model_id": [model], "job_id": [queued, done], "name": ["metrics.json"]}


def _path_params(path: str) -> list[str]:
    return re.findall(r"{([^}]+)}", path)


def _fill(path: str, values: dict[str, str]) -> str:
    return re.sub(r"{([^}]+)}", lambda m: values[m.group(1)], path)


def _variants(path: str, objects: dict) -> list[dict[str, str]]:
    """Every combination of A's objects for the path's parameters."""
    combos: list[dict[str, str]] = [{}]
    for name in _path_params(path):
        assert name in objects, f"the walk has no object of tenant A for {{{name}}} in {path}: add one"
        combos = [{**c, name: value} for c in combos for value in objects[name]]
    return combos


def test_another_tenants_key_gets_404_on_every_route_with_an_id(stack, objects_of_a):
    from api.app import app

    with stack.client(None) as anon:
        schema = anon.get("/openapi.json").json()
    documented = {(method.upper(), path) for path, item in schema["paths"].items() if "{" in path
                  for method in item if method in METHODS}
    try:  # FastAPI >= 0.13x keeps included routers as such in app.routes: flatten them
        from fastapi.routing import iter_route_contexts
        routes = list(iter_route_contexts(app.routes))
    except ImportError:
        routes = list(app.routes)
    routed = {(method, route.path) for route in routes if "{" in getattr(route, "path", "")
              for method in (getattr(route, "methods", None) or ()) if method != "HEAD"}
    assert routed == documented, "every route with an id must be in the schema (and so in this walk)"
    assert len(documented) >= 9

    walked: set[tuple[str, str]] = set()
    with stack.client(stack.create_key("tenant-b")) as b, stack.client(objects_of_a["key"]) as a:
        for method, path in sorted(documented):
            for values in _variants(path, objects_of_a):
                url = _fill(path, values)
                if method == "GET":  # the ids are real: the owner gets them
                    assert a.get(url).status_code == 200, url
                r = b.request(method, url)
                body = assert_problem(r, 404, "not_found")
                for object_id in values.values():
                    assert object_id not in r.headers.get("location", "")
                assert body["detail"], url
            walked.add((method, path))
        assert walked == documented

        # Nothing of A's changed: the queued job is still queued, every object and file is there.
        dataset, model = objects_of_a["dataset_id"][0], objects_of_a["model_id"][0]
        queued, done = objects_of_a["job_id"]
        assert a.get(f"/v1/datasets/{dataset}").json()["status"] == "ready"
        assert a.get(f"/v1/models/{model}").json()["status"] == "ready"
        assert a.get(f"/v1/jobs/{queued}").json()["status"] == "queued"
        assert a.get(f"/v1/jobs/{done}").json()["status"] == "succeeded"
        for job in (queued, done):
            assert a.get(f"/v1/jobs/{job}/artifacts/metrics.json").content == b"{}"
            assert len(a.get(f"/v1/jobs/{job}/events").json()["data"]) >= 1
        assert blob_dir(stack, "datasets", dataset, "upload").is_file()
        assert blob_dir(stack, "models", model, "upload").is_file()
        # And B's listings show none of it.
        for listing in ("/v1/datasets", "/v1/models", "/v1/jobs"):
            assert b.get(listing).json()["data"] == []


def test_routes_scope_queries_through_the_one_dependency():
    """Queries are scoped by tenant in api/deps.py only, not by hand in a route."""
    for path in sorted((ROOT / "api" / "routes").glob("*.py")):
        text = path.read_text()
        assert not re.search(r"tenant_id\s*==", text), f"{path.name} filters by tenant by hand: use api.deps"


def test_keys_are_stored_hashed(stack):
    created = manage(stack, "create-key", "--tenant", "hashed")
    secret = created["secret"]
    rows = sql(stack, "SELECT id, key_hash FROM api_keys")
    assert rows and all(re.fullmatch(r"[0-9a-f]{64}", key_hash) for _, key_hash in rows)
    assert (created["key_id"], hashlib.sha256(secret.encode()).hexdigest()) in rows
    for table in ("api_keys", "tenants"):
        dump = " ".join(row[0] for row in sql(stack, f"SELECT row_to_json(t)::text FROM {table} t"))
        assert secret not in dump and secret[3:] not in dump, table
    with stack.client(secret) as client:
        assert client.get("/v1/jobs").status_code == 200


def test_revoked_key_gets_401_and_last_used_at_is_recorded_once_a_minute(stack):
    created = manage(stack, "create-key", "--tenant", "revocable")
    assert sql(stack, "SELECT last_used_at FROM api_keys WHERE id=%s", created["key_id"]) == [(None,)]
    before = datetime.now(timezone.utc) - timedelta(seconds=5)
    with stack.client(created["secret"]) as client:
        assert client.get("/v1/datasets").status_code == 200
        [(used,)] = sql(stack, "SELECT last_used_at FROM api_keys WHERE id=%s", created["key_id"])
        assert used is not None and used >= before
        # Recorded at most once a minute: requests are reads, not writes.
        assert client.get("/v1/jobs/job_x").status_code == 404
        assert sql(stack, "SELECT last_used_at FROM api_keys WHERE id=%s", created["key_id"]) == [(used,)]
        sql(stack, "UPDATE api_keys SET last_used_at = now() - interval '61 seconds' WHERE id=%s", created["key_id"])
        assert client.get("/v1/jobs/job_x").status_code == 404  # the polling routes record it too
        [(used,)] = sql(stack, "SELECT last_used_at FROM api_keys WHERE id=%s", created["key_id"])
        assert used >= before
        assert manage(stack, "revoke-key", created["key_id"])["revoked"] is True
        for method, path in (("GET", "/v1/datasets"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/job_x")):
            r = client.request(method, path)
            assert r.status_code == 401 and r.headers["content-type"].startswith(PROBLEM), (method, path)
            assert r.json()["code"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
    # A revoked key's use is not recorded any more.
    assert sql(stack, "SELECT last_used_at FROM api_keys WHERE id=%s", created["key_id"]) == [(used,)]
    assert sql(stack, "SELECT revoked_at IS NOT NULL FROM api_keys WHERE id=%s", created["key_id"]) == [(True,)]
