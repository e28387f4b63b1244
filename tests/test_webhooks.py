"""Signed webhooks against a live stack: a receiver on loopback verifies every request with the
standardwebhooks library (and refuses stale timestamps), and fails the first attempts on purpose."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from jobstore import webhook_urls
from stack import running
from test_service_e2e import SMALL_JOB, wait_for

DEFAULT_EVENTS = ["job.succeeded", "job.failed", "job.cancelled"]
FAST_JOB = {**SMALL_JOB, "erm": {"epochs": 1, "batch_size": 64}}
FAILURES_BEFORE_OK = 2  # /flaky answers 500 to a message's first attempts


class Receiver(ThreadingHTTPServer):
    """POST /ok answers 200, /flaky 500 to each message's first FAILURES_BEFORE_OK attempts and then 200;
    a request whose signature does not verify (or is older than 5 minutes) gets 401."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.secret: str | None = None
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def of_job(self, job_id: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["payload"] and r["payload"]["data"]["id"] == job_id]


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        server: Receiver = self.server
        body = self.rfile.read(int(self.headers["Content-Length"]))
        try:
            payload, verified = Webhook(server.secret).verify(body, dict(self.headers)), True
        except WebhookVerificationError:
            payload, verified = None, False
        with server.lock:
            tries = sum(1 for r in server.requests if r["id"] == self.headers.get("webhook-id") and r["verified"])
            answer = 401 if not verified else 500 if self.path == "/flaky" and tries < FAILURES_BEFORE_OK else 200
            server.requests.append({"path": self.path, "host": self.headers.get("Host"), "id": self.headers.get("webhook-id"),
                                    "verified": verified,
                                    "timestamp": self.headers.get("webhook-timestamp"), "payload": payload,
                                    "answer": answer, "at": time.time()})
        self.send_response(answer)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def receiver():
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # Loopback allowed for the receiver; short backoff. Jobs and deliveries on workers of their own,
    # so a message of a cancelled queued job goes out while another job runs.
    with running(tmp_path_factory.mktemp("stack"), MASKTUNE_WEBHOOK_ALLOWED_NETWORKS='["127.0.0.0/8"]',
                 MASKTUNE_WEBHOOK_RETRY_BASE_S="0.3", MASKTUNE_WEBHOOK_TIMEOUT_S="5") as stack:
        jobs_queue, validation_queue = stack.queues
        stack.start_worker("jobs", queues=[jobs_queue])
        stack.start_worker("hooks", queues=[validation_queue])
        yield stack


@pytest.fixture(scope="module")
def secret(client, receiver):
    response = client.post("/v1/webhook-secret")
    assert response.status_code == 201, response.text
    receiver.secret = response.json()["secret"]
    return receiver.secret


def deliveries(client: httpx.Client, job_id: str, count: int) -> list[dict]:
    """The job's webhook messages once ``count`` of them exist and none is pending."""
    done = lambda body: len(body["data"]) >= count and all(d["status"] != "pending" for d in body["data"])  # noqa: E731
    return wait_for(client, f"/v1/jobs/{job_id}/webhook-deliveries", done, timeout=30)["data"]


def test_secret_shown_once_and_required(client, receiver):
    assert client.get("/v1/webhook-secret").json() == {"object": "webhook_secret", "exists": False, "created_at": None}
    refused = client.post("/v1/jobs", json={"dataset_id": "ds_00000000000000000000", "webhook_url": receiver.url("/ok")})
    assert refused.status_code == 422 and refused.json()["code"] == "webhook_secret_missing", refused.text
    first = client.post("/v1/webhook-secret").json()
    assert first["secret"].startswith("whsec_") and len(Webhook(first["secret"])._whsecret) == 32
    shown = client.get("/v1/webhook-secret").json()
    assert shown["exists"] is True and "secret" not in shown
    assert client.post("/v1/webhook-secret").json()["secret"] != first["secret"]  # rotated


def test_webhook_url_rules(client, dataset, secret):
    for url in ("file:///etc/passwd", "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "http://[::1]/",
                "http://user:pw@127.0.0.1/", "ftp://127.0.0.1/"):
        response = client.post("/v1/jobs", json={"dataset_id": dataset["id"], **SMALL_JOB, "webhook_url": url})
        assert response.status_code == 422 and response.json()["code"] == "webhook_url_not_allowed", (url, response.text)
    bad_filter = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "webhook_url": "http://127.0.0.1:9/",
                                               "webhook_events_filter": ["job.created"]})
    assert bad_filter.status_code == 422 and bad_filter.json()["code"] == "validation_error"
    # Without MASKTUNE_WEBHOOK_ALLOWED_NETWORKS (the default) loopback names are refused too.
    with pytest.raises(webhook_urls.WebhookUrlError, match="public addresses only"):
        webhook_urls.check("http://localhost:8000/hook", [])


def test_receiver_refuses_forged_and_stale_signatures(receiver, secret):
    body = json.dumps({"type": "job.succeeded", "timestamp": "2026-01-01T00:00:00Z", "data": {"id": "job_forged"}})
    now = datetime.now(timezone.utc)

    def send(signer: Webhook, at: datetime, msg_id: str) -> int:
        headers = {"webhook-id": msg_id, "webhook-timestamp": str(int(at.timestamp())),
                   "webhook-signature": signer.sign(msg_id, at, body), "content-type": "application/json"}
        return httpx.post(receiver.url("/ok"), content=body, headers=headers).status_code

    forger = Webhook("whsec_" + "QUFB" * 11)  # a well-formed secret that is not the tenant's
    assert send(forger, now, "msg_forged") == 401
    assert send(Webhook(secret), now - timedelta(minutes=6), "msg_stale") == 401  # replayed from 6 minutes ago
    assert send(Webhook(secret), now, "msg_fresh") == 200  # the same signer, on time: accepted
    assert [r["verified"] for r in receiver.requests[-3:]] == [False, False, True]


def test_each_attempt_checks_the_addresses_and_sends_to_a_checked_one(receiver, secret, monkeypatch):
    """What the worker does before every attempt: resolve, keep the allowed addresses, connect to one of them
    (never the name again), with the URL's host as the Host header."""
    import socket

    from jobstore import webhooks

    monkeypatch.setattr(webhooks, "_sender", webhooks._sender)  # importing the worker installs its own: undone after
    from worker.webhooks import post
    Attempt = webhooks.Attempt

    port = receiver.server_address[1]
    answers = {"hooks.example": ["169.254.169.254", "127.0.0.1"], "rebound.example": ["169.254.169.254", "10.0.0.1"]}
    real_getaddrinfo = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answers[host]] if host in answers
        else real_getaddrinfo(host, *a, **k))
    body = json.dumps({"type": "job.stage", "timestamp": "2026-01-01T00:00:00Z", "data": {"id": "job_pinned"}})

    def attempt(host: str) -> Attempt:
        return Attempt("msg_pinned", 1, f"http://{host}:{port}/ok", body, secret, datetime.now(timezone.utc))

    sent = post(attempt("hooks.example"), timeout_s=5, allowed_networks=["127.0.0.0/8"])
    (received,) = receiver.of_job("job_pinned")
    assert sent.http_status == 200 and received["verified"] and received["host"] == f"hooks.example:{port}"
    refused = post(attempt("rebound.example"), timeout_s=5, allowed_networks=["127.0.0.0/8"])
    assert refused.http_status is None and refused.final and "169.254.169.254" in refused.error
    assert len(receiver.of_job("job_pinned")) == 1  # nothing was sent for the refused one


def test_succeeded_job_sends_one_message_retried_until_2xx(client, dataset, secret, receiver):
    created = client.post("/v1/jobs", json={"dataset_id": dataset["id"], **FAST_JOB, "webhook_url": receiver.url("/flaky"),
                                            "metadata": {"run": "webhooks"}})
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["webhook_url"] == receiver.url("/flaky") and job["webhook_events_filter"] == DEFAULT_EVENTS
    job = wait_for(client, f"/v1/jobs/{job['id']}", lambda j: j["status"] in ("succeeded", "failed"))
    assert job["status"] == "succeeded", job

    (message,) = deliveries(client, job["id"], 1)  # the default filter: terminal events only, no stages
    assert message["type"] == "job.succeeded" and message["status"] == "delivered"
    assert [a["http_status"] for a in message["attempts"]] == [500, 500, 200]
    assert [a["attempt"] for a in message["attempts"]] == [1, 2, 3]
    data = message["payload"]["data"]
    assert data["id"] == job["id"] and data["status"] == "succeeded" and data["metrics"] == job["metrics"]
    assert data["metadata"] == {"run": "webhooks"}

    received = receiver.of_job(job["id"])
    assert [(r["answer"], r["verified"], r["id"]) for r in received] == [(500, True, message["id"])] * 2 + [(200, True, message["id"])]
    assert [r["payload"]["type"] for r in received if r["answer"] == 200] == ["job.succeeded"]
    print("".join(f"\n{message['type']} {r['id']} attempt {a['attempt']}: HTTP {a['http_status']} in {a['duration_ms']:.0f} ms, "
                  f"webhook-timestamp {r['timestamp']}, +{r['at'] - received[0]['at']:.2f} s, verified: {r['verified']}"
                  for a, r in zip(message["attempts"], received)))


def test_cancelled_jobs_and_stage_events(client, dataset, secret, receiver, stack):
    # A long job that also asks for stage events; a second job waits queued behind it and is cancelled there.
    running_job = client.post("/v1/jobs", json={
        "dataset_id": dataset["id"], **SMALL_JOB, "erm": {"epochs": 500, "batch_size": 16},
        "webhook_url": receiver.url("/ok"), "webhook_events_filter": ["job.stage", "job.cancelled"]}).json()
    assert running_job["webhook_events_filter"] == ["job.stage", "job.cancelled"]
    wait_for(client, f"/v1/jobs/{running_job['id']}", lambda j: j["stage"] == "erm", 60)
    queued = client.post("/v1/jobs", json={"dataset_id": dataset["id"], **SMALL_JOB, "webhook_url": receiver.url("/ok")}).json()
    assert client.post(f"/v1/jobs/{queued['id']}/cancel").json()["status"] == "cancelled"  # the one job worker is busy
    (message,) = deliveries(client, queued["id"], 1)
    assert message["type"] == "job.cancelled" and message["status"] == "delivered"
    assert message["payload"]["data"]["status"] == "cancelled"
    assert client.get(f"/v1/jobs/{running_job['id']}").json()["status"] == "running"  # sent while the other job runs

    client.post(f"/v1/jobs/{running_job['id']}/cancel")
    wait_for(client, f"/v1/jobs/{running_job['id']}", lambda j: j["status"] == "cancelled", 60)
    messages = deliveries(client, running_job["id"], 3)
    assert [(m["type"], m["payload"]["data"]["stage"]) for m in messages] == [
        ("job.stage", "prepare"), ("job.stage", "erm"), ("job.cancelled", "erm")]
    for job_id, count in ((queued["id"], 1), (running_job["id"], 3)):
        received = receiver.of_job(job_id)
        assert len(received) == count and all(r["verified"] and r["answer"] == 200 for r in received)
    assert {r["payload"]["type"] for r in receiver.of_job(running_job["id"])} == {"job.stage", "job.cancelled"}
    print("".join(f"\n{m['type']} ({m['payload']['data']['status']}, {m['payload']['data']['stage']}) {m['id']}: "
                  f"{m['status']}, HTTP {[a['http_status'] for a in m['attempts']]}" for m in [message, *messages]))

    with stack.client(stack.create_key("intruder")) as other:  # deliveries are the tenant's, like the job
        assert other.get(f"/v1/jobs/{running_job['id']}/webhook-deliveries").status_code == 404


def test_outbox_rows_attempts_and_retry_policy(tmp_path, monkeypatch):
    """In process on SQLite: the message is written by the status event's transaction and handed to the
    sender after the commit only; one attempt at a time; what each answer leads to; the reconciler's pick."""
    from sqlalchemy import select, update

    from jobstore import webhooks
    from jobstore.db import migrate, session_scope
    from jobstore.jobs import add_event, update_job
    from jobstore.models import Dataset, Job, Tenant, WebhookDelivery, WebhookSecret

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    migrate(url)
    sent: list[str] = []
    monkeypatch.setattr(webhooks, "_sender", sent.extend)
    with session_scope(url) as session:
        for row in (Tenant(id="ten_1", name="t"), WebhookSecret(tenant_id="ten_1", secret=webhooks.new_secret()),
                    Dataset(id="ds_1", tenant_id="ten_1", filename="d.zip", size_bytes=1, sha256="0" * 64),
                    *(Job(id=j, tenant_id="ten_1", dataset_id="ds_1", config={}, webhook_url="http://127.0.0.1:9/")
                      for j in ("job_1", "job_2"))):
            session.add(row)
            session.flush()  # no relationships: the rows go in the order they are flushed
    with session_scope(url) as session:
        update_job(session, "job_1", status="failed", error_code="internal_error", error_message="boom")
        add_event(session, "job_1", "status", "failed", data={"status": "failed"})
        add_event(session, "job_1", "stage", "erm started", stage="erm")  # not in the default filter
        assert sent == []  # nothing leaves before the commit
    (message_id,) = sent
    with pytest.raises(RuntimeError), session_scope(url) as session:  # a rolled-back change announces nothing
        update_job(session, "job_2", status="cancelled")
        add_event(session, "job_2", "status", "cancelled", data={"status": "cancelled"})
        raise RuntimeError
    assert sent == [message_id]

    def attempt(message: str, http_status: int | None, max_attempts: int = 8) -> tuple[webhooks.Attempt, float | None]:
        with session_scope(url) as session:
            taken = webhooks.start_attempt(session, message, lease_s=60)
            assert taken is not None and webhooks.start_attempt(session, message, lease_s=60) is None  # leased
            retry_in = webhooks.record_attempt(session, taken, webhooks.Outcome(http_status, None, 1.0),
                                               max_attempts=max_attempts, retry_base_s=15)
        with session_scope(url) as session:  # no waiting here: the next attempt is due at once
            session.execute(update(WebhookDelivery).where(WebhookDelivery.status == "pending")
                            .values(next_attempt_at=webhooks.utcnow() - timedelta(seconds=1)))
        return taken, retry_in

    def state(message: str) -> tuple[str, int]:
        with session_scope(url) as session:
            row = session.scalar(select(WebhookDelivery).where(WebhookDelivery.id == message))
            return row.status, row.attempts

    first, retry_in = attempt(message_id, 500)
    assert json.loads(first.body)["data"]["error"] == {"code": "internal_error", "message": "boom"} and retry_in == 15
    assert [attempt(message_id, s)[1] for s in (None, 429, 408)] == [30, 60, 120]  # no answer, rate limited, timeout
    with session_scope(url) as session:  # a message due for longer than the reconcile interval is re-sent, once
        session.execute(update(WebhookDelivery).values(next_attempt_at=webhooks.utcnow() - timedelta(minutes=5)))
    with session_scope(url) as session:
        assert webhooks.due_messages(session, overdue_s=60, limit=10) == [message_id]
        assert webhooks.due_messages(session, overdue_s=60, limit=10) == []
    assert attempt(message_id, 503, max_attempts=5)[1] is None and state(message_id) == ("failed", 5)  # out of attempts

    with session_scope(url) as session:
        update_job(session, "job_2", status="cancelled")
        add_event(session, "job_2", "status", "cancelled", data={"status": "cancelled"})
    refused_id = sent[-1]
    assert attempt(refused_id, 404)[1] is None and state(refused_id) == ("failed", 1)  # the receiver refused it
