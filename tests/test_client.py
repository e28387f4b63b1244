"""The Python client (masktune_client) and the ``masktune`` command against a live stack: every
route, retries after Retry-After, one Idempotency-Key across a retry, a dropped event stream
resumed, and ``masktune run`` end to end with the exit codes scripts test."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import tomllib
from contextlib import contextmanager
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from jobstore import statuses as service_statuses
from masktune_client import ApiError, ArchitectureList, Dataset, Event, Job, MaskTuneClient
from masktune_client import statuses as client_statuses
from stack import ROOT, running
from test_service_e2e import zip_dir

FAST_JOB = {"erm": {"epochs": 2, "batch_size": 64}, "masking": {"batch_size": 64}, "preview_count": 2}
ARTIFACTS = {"metrics.json", "model.safetensors", "erm.safetensors", "report.png", "previews.png", "config.json",
             "model_card.json"}


def masktune(*args, env: dict[str, str] | None = None, wait: bool = True):
    """The CLI as a script runs it (``python -m masktune_client`` is the ``masktune`` script's main)."""
    command = [sys.executable, "-m", "masktune_client", *map(str, args)]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MASKTUNE_")} | (env or {})
    proc = subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return finish(proc) if wait else proc


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


# ---------------------------------------------------------------------- loopback servers

@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def flaky_proxy(upstream: str, seen: list[dict]):
    """A proxy in front of the API that loses the answer to the first POST /v1/jobs (after the API
    created the job) and cuts the first event stream after its first event."""

    class Proxy(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _forward(self):
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")}
            record = {"method": self.command, "path": self.path, "headers": dict(self.headers)}
            seen.append(record)
            first = sum(1 for r in seen if r["method"] == self.command and r["path"].split("?")[0] == self.path.split("?")[0]) == 1
            streaming = "text/event-stream" in self.headers.get("accept", "")
            with httpx.Client(base_url=upstream, timeout=60) as client, \
                    client.stream(self.command, self.path, content=body, headers=headers) as response:
                if self.command == "POST" and self.path == "/v1/jobs" and first:
                    record["answer_lost"] = json.loads(response.read())
                    return  # the connection closes without an answer
                self.send_response(response.status_code)
                for name, value in response.headers.items():
                    if name.lower() not in ("transfer-encoding", "connection", "date", "server"):
                        self.send_header(name, value)
                self.end_headers()
                sent = b""
                for chunk in response.iter_raw():
                    if streaming and first:
                        sent += chunk
                        end = re.search(rb"\r?\n\r?\n", sent[sent.find(b"id:"):]) if b"id:" in sent else None
                        if end is not None:  # one whole event, then the connection drops
                            self.wfile.write(sent[:sent.find(b"id:") + end.end()])
                            record["cut_after"] = sent
                            return
                        continue
                    self.wfile.write(chunk)
                    self.wfile.flush()

        do_GET = do_POST = do_DELETE = _forward

    return serving(Proxy)


def test_retries_honour_retry_after_and_end_with_the_problem():
    times: list[float] = []

    class Busy(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            times.append(time.monotonic())
            if len(times) == 1 or self.path.startswith("/v1/jobs/job_busy"):
                body = json.dumps({"type": "about:blank", "title": "Service Unavailable", "status": 503,
                                   "detail": "The task queue is unreachable.", "code": "queue_unavailable"}).encode()
                self.send_response(503)
                self.send_header("Retry-After", "1")
                self.send_header("Content-Type", "application/problem+json")
            else:
                body = json.dumps({"status": "ok"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with serving(Busy) as url:
        with MaskTuneClient(url, "k", backoff_s=0.01) as client:
            assert client.healthz().status == "ok"
            assert len(times) == 2 and times[1] - times[0] >= 0.95  # waited the Retry-After, not the 0.01 s backoff
        times.clear()
        with MaskTuneClient(url, "k", max_retries=1, backoff_s=0.01) as client, pytest.raises(ApiError) as raised:
            client.get_job("job_busy")
    assert len(times) == 2  # the first try and one retry
    problem = raised.value
    assert (problem.status, problem.code, problem.detail) == (503, "queue_unavailable", "The task queue is unreachable.")
    assert problem.retry_after == 1


def test_the_package_declares_the_masktune_script_and_imports_no_service_code():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["masktune"].partition(":")
    assert callable(getattr(importlib.import_module(module), name))
    # None of the service's code comes along: the client installs and runs alone.
    probe = ("import sys, masktune_client, masktune_client.cli; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'api', 'worker', 'masktune_core', "
             "'jobstore', 'jobspec', 'fastapi', 'sqlalchemy', 'celery')))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


def test_the_clients_status_values_are_the_services():
    assert {s.value for s in client_statuses.JobStatus} == {s.value for s in service_statuses.JobStatus}
    assert set(client_statuses.TERMINAL) == set(service_statuses.TERMINAL)
    visible = {s.value for s in service_statuses.UploadStatus} - {service_statuses.UploadStatus.DELETED}
    assert {s.value for s in client_statuses.UploadStatus} == visible  # a deleted upload is never shown


def test_unreachable_api_and_usage_errors_have_their_exit_codes(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    runs = {
        4: masktune("jobs", "list", "--url", "http://127.0.0.1:9", "--retries", "0", wait=False),
        2: masktune("jobs", "create", "--dataset", "ds_x", "--config", tmp_path / "bad.json", wait=False),
    }
    unknown = masktune("jobs", "frobnicate")
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr
    results = {code: finish(proc) for code, proc in runs.items()}
    for code, result in results.items():
        assert result.returncode == code and "Traceback" not in result.stderr, (code, result.stderr)
    assert "Connection refused" in results[4].stderr and "not valid JSON" in results[2].stderr


# ---------------------------------------------------------------------- against the live stack

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # One active job per tenant, so the 429 path is real; streams read every 0.2 s.
    with running(tmp_path_factory.mktemp("stack"), worker=True, MASKTUNE_EVENTS_POLL_INTERVAL_S="0.2",
                 MASKTUNE_EVENTS_KEEPALIVE_S="1", MASKTUNE_MAX_ACTIVE_JOBS_PER_TENANT="1") as stack:
        yield stack


@pytest.fixture(scope="module")
def key(stack):
    return stack.create_key("acme")


@pytest.fixture(scope="module")
def api(stack, key):
    with MaskTuneClient(stack.base_url, key) as client:
        yield client


@pytest.fixture(scope="module")
def cli_env(stack, key):
    return {"MASKTUNE_URL": stack.base_url, "MASKTUNE_API_KEY": key}


@pytest.fixture(scope="module")
def archive(tiny_digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("archive") / "digits.zip"
    path.write_bytes(zip_dir(tiny_digits))
    return path


@pytest.fixture(scope="module")
def upload(api, archive) -> dict:
    """The tiny digits uploaded by the client, with the progress it reported."""
    progress: list[tuple[int, int]] = []
    dataset = api.upload_dataset(archive, on_progress=lambda sent, total: progress.append((sent, total)))
    return {"dataset": dataset, "progress": progress}


@pytest.fixture(scope="module")
def ready_dataset(api, upload) -> Dataset:
    dataset = api.wait_dataset(upload["dataset"].id, timeout=60)
    assert dataset.status == "ready", dataset
    return dataset


@pytest.fixture(scope="module")
def run(stack, key, api, archive, ready_dataset, tmp_path_factory) -> dict:
    """The module's one job: ``masktune run`` on the tiny digits through a proxy that loses the
    job's creation answer and cuts its event stream; meanwhile the tenant asks for another job."""
    tmp = tmp_path_factory.mktemp("run")
    (tmp / "config.json").write_text(json.dumps(FAST_JOB))
    seen: list[dict] = []
    with flaky_proxy(stack.base_url, seen) as url:
        proc = masktune("run", archive, "--config", tmp / "config.json", "--to", tmp / "results", "-o", "json",
                        env={"MASKTUNE_URL": url, "MASKTUNE_API_KEY": key}, wait=False)
        deadline = time.monotonic() + 120
        while not api.list_jobs().data:
            assert proc.poll() is None and time.monotonic() < deadline, finish(proc).stderr
            time.sleep(0.2)
        # The tenant may have one active job: while the run's is, another is refused with Retry-After.
        with MaskTuneClient(stack.base_url, key, max_retries=0) as impatient, pytest.raises(ApiError) as busy:
            impatient.create_job(ready_dataset.id, FAST_JOB)
        result = finish(proc)
    assert result.returncode == 0, (result.stderr, stack.log_tail("worker"))
    return {"result": result, "output": json.loads(result.stdout), "seen": seen, "busy": busy.value, "to": tmp / "results"}


@pytest.fixture(scope="module")
def finished_job(api, run) -> Job:
    return api.get_job(run["output"]["job"]["id"])


def test_health_readiness_and_architectures(api):
    assert api.healthz().status == "ok"
    ready = api.readyz()
    assert ready.ready and ready.database == "ok"
    assert all(w.device == "cpu" for w in api.workers().data)
    listing = api.architectures()
    assert isinstance(listing, ArchitectureList) and "timm/<name>" in listing.timm
    assert listing.data == [] and listing.reported_at is None  # this stack's workers do not report


def test_dataset_upload_streams_with_progress(api, archive, upload, ready_dataset):
    dataset, progress, size = upload["dataset"], upload["progress"], archive.stat().st_size
    assert dataset.status == "validating" and dataset.size_bytes == size and dataset.filename == "digits.zip"
    assert dataset.sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert len(progress) > 1 and progress[-1] == (size, size)  # streamed in chunks
    assert [p[0] for p in progress] == sorted(p[0] for p in progress)
    assert isinstance(dataset.created_at, datetime) and dataset.created_at.tzinfo is not None
    assert ready_dataset.summary["classes"] == ["0", "1"] and api.get_dataset(dataset.id) == ready_dataset
    with pytest.raises(ApiError) as refused:
        api.register_dataset("s3://elsewhere/data/")
    assert (refused.value.status, refused.value.code) == (422, "dataset_url_not_allowed")


def test_cli_run_uploads_runs_follows_and_downloads(run, finished_job):
    output, stderr = run["output"], run["result"].stderr
    assert output["dataset"]["status"] == "ready" and output["job"]["status"] == "succeeded"
    assert output["job"]["config"]["erm"]["epochs"] == 2 and finished_job.metrics["verdict"]["message"]
    assert {p.name for p in run["to"].iterdir()} == ARTIFACTS
    assert sorted(a["path"] for a in output["artifacts"]) == sorted(str(p) for p in run["to"].iterdir())
    assert "upload digits.zip" in stderr and "validating" in stderr and finished_job.metrics["verdict"]["message"] in stderr
    # One bar per stage, one line per epoch: the resumed stream repeated nothing.
    for stage in ("prepare", "erm", "saliency", "finetune", "evaluate", "export"):
        assert stage in stderr
    for epoch in (r"erm\s+epoch 1/2", r"erm\s+epoch 2/2", r"finetune\s+epoch 1/1"):
        assert len(re.findall(epoch + r"\s+loss \d\.\d{4}\s+acc \d\.\d{4}\s+val_acc \d\.\d{4}", stderr)) == 1, stderr


def test_a_job_created_through_a_lost_answer_exists_once(api, run, finished_job):
    posts = [r for r in run["seen"] if r["method"] == "POST" and r["path"] == "/v1/jobs"]
    assert len(posts) == 2 and posts[0]["answer_lost"]["id"] == finished_job.id  # the retry got the job the first made
    assert posts[0]["headers"]["Idempotency-Key"] == posts[1]["headers"]["Idempotency-Key"]
    assert posts[0]["headers"]["Idempotency-Key"].startswith("masktune-client-")
    assert [j.id for j in api.list_jobs().data] == [finished_job.id]
    busy = run["busy"]
    assert (busy.status, busy.code, busy.retry_after) == (429, "too_many_active_jobs", 30)


def test_a_dropped_event_stream_is_resumed(run, finished_job):
    streams = [r for r in run["seen"] if r["path"] == f"/v1/jobs/{finished_job.id}/events"]
    got = re.search(rb"id: ?(\d+)", streams[0]["cut_after"]).group(1).decode()
    assert "Last-Event-ID" not in streams[0]["headers"] and streams[1]["headers"]["Last-Event-ID"] == got


def test_wait_replays_every_event_once_through_a_cut_stream(stack, key, api, finished_job):
    events: list[Event] = []
    seen: list[dict] = []
    with flaky_proxy(stack.base_url, seen) as url, MaskTuneClient(url, key, backoff_s=0.05) as client:
        assert client.wait(finished_job.id, on_event=events.append, timeout=60) == finished_job
    streams = [r for r in seen if r["path"] == f"/v1/jobs/{finished_job.id}/events"]
    assert len(streams) == 2 and streams[1]["headers"]["Last-Event-ID"] == str(events[0].id)
    every = api.list_events(finished_job.id, limit=1000)
    assert [e.id for e in events] == [e.id for e in every.data] and every.next_cursor == events[-1].id
    assert [e.stage for e in events if e.kind == "stage"] == ["prepare", "erm", "saliency", "finetune", "evaluate", "export"]
    assert [(e.data["phase"], e.data["epoch"]) for e in events if e.kind == "epoch"] == [("erm", 1), ("erm", 2), ("finetune", 1)]
    assert events[-1].kind == "status" and events[-1].data == {"status": "succeeded"}
    assert [e.id for e in api.list_events(finished_job.id, after=events[1].id, limit=2).data] == [e.id for e in events[2:4]]


def test_artifacts_download_and_a_model_from_them(api, finished_job, tmp_path):
    artifacts = {a.name: a for a in api.list_artifacts(finished_job.id)}
    assert set(artifacts) == ARTIFACTS
    paths = api.download_artifacts(finished_job.id, tmp_path / "out")
    assert {p.name for p in paths} == ARTIFACTS and not list((tmp_path / "out").glob("*.part"))
    for path in paths:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == artifacts[path.name].sha256
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["verdict"] == finished_job.metrics["verdict"]
    with pytest.raises(ApiError) as missing:
        api.download_artifact(finished_job.id, "nope.bin", tmp_path)
    assert missing.value.code == "not_found" and not (tmp_path / "nope.bin").exists()

    # The finetuned weights go back in as a model to start from.
    model = api.wait_model(api.upload_model(tmp_path / "out" / "model.safetensors", architecture="small_cnn",
                                            num_classes=2).id, timeout=60)
    assert model.status == "ready" and model.architecture == "small_cnn", model
    assert [m.id for m in api.list_models().data] == [model.id] and api.get_model(model.id) == model
    api.delete_model(model.id)
    assert api.list_models().data == []


def test_cli_lists_gets_waits_for_and_downloads_a_job(finished_job, cli_env, tmp_path):
    listed, got, waited, downloaded = (
        masktune("jobs", "list", "-o", "json", env=cli_env, wait=False),
        masktune("jobs", "get", finished_job.id, "-o", "json", env=cli_env, wait=False),
        masktune("jobs", "wait", finished_job.id, env=cli_env, wait=False),
        masktune("jobs", "download", finished_job.id, "--to", tmp_path / "dl", "-o", "json", env=cli_env, wait=False))
    listed, got, waited, downloaded = map(finish, (listed, got, waited, downloaded))
    assert listed.returncode == 0, listed.stderr
    assert [j["id"] for j in json.loads(listed.stdout)["data"]] == [finished_job.id]
    assert json.loads(got.stdout)["status"] == "succeeded"
    assert waited.returncode == 0, waited.stderr
    assert re.search(r"erm\s+epoch 2/2\s+loss \d\.\d{4}\s+acc \d\.\d{4}\s+val_acc \d\.\d{4}", waited.stderr), waited.stderr
    assert "saliency" in waited.stderr and "succeeded" in waited.stderr and "status" in waited.stdout
    assert downloaded.returncode == 0, downloaded.stderr
    files = json.loads(downloaded.stdout)
    assert {f["name"] for f in files} == ARTIFACTS and all(Path(f["path"]).is_file() for f in files)


def test_cli_failures_have_their_exit_codes(cli_env, tmp_path):
    (tmp_path / "bad.zip").write_bytes(b"this is not a zip")
    bad_key = {**cli_env, "MASKTUNE_API_KEY": "mt_wrong"}
    cases = {  # (exit code, what stderr must say); they run at once
        "bad key": (masktune("datasets", "list", env=bad_key, wait=False), 3, "API error 401 unauthorized"),
        "no dataset": (masktune("jobs", "create", "--dataset", "ds_missing", env=cli_env, wait=False), 3,
                       "API error 404 not_found"),
        "no file": (masktune("run", tmp_path / "absent.zip", env=cli_env, wait=False), 2, "no such file"),
        "invalid dataset": (masktune("run", tmp_path / "bad.zip", "-o", "json", env=cli_env, wait=False), 1, "invalid"),
    }
    for name, (proc, code, says) in cases.items():
        done = finish(proc)
        assert done.returncode == code and says in done.stderr and "Traceback" not in done.stderr, (name, done.stderr)
    assert json.loads(done.stdout)["dataset"]["status"] == "invalid" and json.loads(done.stdout)["job"] is None


def test_cli_cancel_then_delete(api, ready_dataset, cli_env):
    created = masktune("jobs", "create", "--dataset", ready_dataset.id, "-o", "json", env=cli_env)
    assert created.returncode == 0, created.stderr
    job_id = json.loads(created.stdout)["id"]
    cancelled = masktune("jobs", "cancel", job_id, "-o", "json", env=cli_env)
    assert json.loads(cancelled.stdout)["status"] in ("cancelled", "cancelling")
    waited = masktune("jobs", "wait", job_id, "-o", "json", "--timeout", "120", env=cli_env)
    assert waited.returncode == 1 and json.loads(waited.stdout)["status"] == "cancelled", waited.stderr
    api.delete_job(job_id)
    with pytest.raises(ApiError) as gone:
        api.cancel_job(job_id)
    assert gone.value.status == 404


def test_job_fields_metadata_filter_and_webhook_routes(api, ready_dataset, run):
    job = api.create_job(ready_dataset.id, FAST_JOB, metadata={"team": "vision", "ticket": "ML-7"}, max_runtime_s=600)
    try:
        assert job.metadata == {"team": "vision", "ticket": "ML-7"} and job.max_runtime_s == 600
        assert [j.id for j in api.list_jobs(metadata={"team": "vision", "ticket": "ML-7"}).data] == [job.id]
        assert api.list_jobs(metadata={"team": "audio"}).data == []
        assert api.list_webhook_deliveries(job.id).data == []  # no webhook_url: no message
    finally:
        api.cancel_job(job.id)
    assert api.get_webhook_secret().exists is False
    created = api.create_webhook_secret()
    assert created.secret.startswith("whsec_")
    shown = api.get_webhook_secret()
    assert shown.exists and shown.secret is None and shown.created_at == created.created_at  # never shown again
    with pytest.raises(ApiError) as refused:
        api.create_job(ready_dataset.id, FAST_JOB, webhook_url="http://10.0.0.1/hook")  # a private address
    assert refused.value.status == 422 and refused.value.code == "webhook_url_not_allowed"


def test_datasets_page_and_delete(api, ready_dataset, run):
    everything = [d.id for d in api.list_datasets(limit=100).data]
    assert {ready_dataset.id, run["output"]["dataset"]["id"]} <= set(everything)
    paged, cursor = [], None
    while True:
        page = api.list_datasets(limit=1, after=cursor)
        paged += [d.id for d in page.data]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert paged == everything  # newest first, one per page
    # The run's dataset: a finished job uses it, so it stays as a hidden record and answers 404.
    api.delete_dataset(run["output"]["dataset"]["id"])
    with pytest.raises(ApiError) as gone:
        api.get_dataset(run["output"]["dataset"]["id"])
    assert (gone.value.status, gone.value.code) == (404, "not_found")
    assert run["output"]["dataset"]["id"] not in [d.id for d in api.list_datasets().data]
