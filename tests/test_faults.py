"""Crash safety with real processes: each test does the bad thing for real (SIGKILL, SIGSTOP, a
restarted API, a Redis that forgot everything, 20 jobs racing over 2 workers) and then checks
that every job ended once, with the right attempts, events and artifacts.

One stack for the module (PostgreSQL, Redis, uvicorn, and one Celery worker that is also the
stack's celery beat and consumes only the validation queue, like compose's ``beat`` service);
each test starts and kills its own job workers. Heartbeats come every second and time out after
4 s, and the reconciler runs every second, so recoveries take seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from jobstore.blobs import BlobStore
from stack import REDIS_URL, Stack
from test_service_e2e import upload_dataset, zip_dir

TERMINAL = {"succeeded", "failed", "cancelled"}
ARTIFACTS = {"metrics.json", "model.safetensors", "erm.safetensors", "report.png", "previews.png", "config.json",
             "model_card.json"}
# One ERM epoch: most tests are about what happens around a job, and the 20-job race pays for each epoch 20 times.
JOB = {"erm": {"epochs": 1, "batch_size": 32}, "masking": {"batch_size": 64}, "preview_count": 2}
# Smaller ERM batches: most of a second per epoch here, so a kill lands between two epochs.
SLOW_JOB = {**JOB, "erm": {"epochs": 6, "batch_size": 4}}
SHORT_SLOW_JOB = {**JOB, "erm": {"epochs": 3, "batch_size": 4}}  # room for one kill between two epochs
HEARTBEAT_TIMEOUT_S = 4
MAX_ATTEMPTS = 2
RETENTION_S = 3


# ---------------------------------------------------------------- helpers


def submit(client: httpx.Client, dataset: dict, body: dict) -> str:
    response = client.post("/v1/jobs", json={"dataset_id": dataset["id"], **body})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def events(client: httpx.Client, job_id: str) -> list[dict]:
    return client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]


def wait_job(client: httpx.Client, job_id: str, done, timeout: float = 90, what: str = "") -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if done(job):
            return job
        assert time.monotonic() < deadline, f"timed out waiting for {what or done}: {job}"
        time.sleep(0.2)


def finished(client: httpx.Client, job_id: str, timeout: float = 90) -> dict:
    return wait_job(client, job_id, lambda j: j["status"] in TERMINAL, timeout, "a terminal status")


def wait_erm_epoch(client: httpx.Client, job_id: str, timeout: float = 60) -> int:
    """Block until the job reports a finished ERM epoch; returns the newest one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        epochs = [e["data"]["epoch"] for e in events(client, job_id) if e["kind"] == "epoch" and e["data"]["phase"] == "erm"]
        if epochs:
            return max(epochs)
        time.sleep(0.1)
    raise AssertionError(f"no ERM epoch within {timeout}s: {events(client, job_id)}")


def status_events(client: httpx.Client, job_id: str) -> list[dict]:
    return [e for e in events(client, job_id) if e["kind"] == "status"]


def assert_ran_once(client: httpx.Client, job_id: str, attempts: int = 1) -> dict:
    """Succeeded exactly once: one terminal status event, one start per attempt, every artifact whole."""
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["attempts"] == attempts, job
    statuses = status_events(client, job_id)
    assert [e["data"]["status"] for e in statuses if e["data"]["status"] in TERMINAL] == ["succeeded"], statuses
    assert [e["data"]["attempt"] for e in statuses if "attempt" in e["data"]] == list(range(1, attempts + 1)), statuses
    listed = client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    assert {a["name"] for a in listed} == ARTIFACTS
    for artifact in listed:
        body = client.get(f"/v1/jobs/{job_id}/artifacts/{artifact['name']}").content
        assert hashlib.sha256(body).hexdigest() == artifact["sha256"] and len(body) == artifact["size_bytes"]
    return job


def artifact(client: httpx.Client, job_id: str, name: str) -> bytes:
    response = client.get(f"/v1/jobs/{job_id}/artifacts/{name}")
    assert response.status_code == 200, response.text
    return response.content


def pool_children(pid: int) -> list[int]:
    """The prefork pool processes of a Celery worker (its children)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def start_worker(stack: Stack, name: str, concurrency: int = 1):
    """A job worker (the jobs queue only: validation and the reconciler are the beat worker's), once ready."""
    proc = stack.start_worker(name, concurrency, queues=[stack.queues[0]])
    deadline = time.monotonic() + 60
    while " ready." not in stack.log_tail(name):
        assert proc.poll() is None and time.monotonic() < deadline, stack.log_tail(name)
        time.sleep(0.1)
    return proc


def drops(stack: Stack) -> int:
    """Deliveries the workers acknowledged without running them (they could not claim the job)."""
    return sum(stack.logs[name].read_text(errors="replace").count("dropping this delivery") for name in stack.logs)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("faults"), MASKTUNE_HEARTBEAT_INTERVAL_S="1",
                  MASKTUNE_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_TIMEOUT_S),
                  MASKTUNE_RECONCILE_INTERVAL_S="1", MASKTUNE_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
                  MASKTUNE_WORK_RETENTION_S=str(RETENTION_S), MASKTUNE_MAX_ACTIVE_JOBS_PER_TENANT="100",
                  OMP_NUM_THREADS="1")  # a few workers on two cores: more threads only make them spin
    try:
        stack.start_api()
        stack.start_worker("beat", queues=[stack.queues[1]], beat=True)
        yield stack
    finally:
        stack.close()


@pytest.fixture
def workers(stack):
    """Start job workers by name; whatever is left of them is killed after the test."""
    started: list[str] = []

    def start(name: str, concurrency: int = 1):
        started.append(name)
        return start_worker(stack, name, concurrency)

    yield start
    for name in started:
        stack.stop(name)


@pytest.fixture(scope="module")
def reference(stack, client, dataset):
    """SLOW_JOB run once without trouble: what every interrupted run of it must reproduce."""
    start_worker(stack, "reference")
    try:
        job_id = submit(client, dataset, SLOW_JOB)
        assert finished(client, job_id)["status"] == "succeeded", stack.log_tail("reference")
    finally:
        stack.stop("reference")
    return {"id": job_id, "metrics": json.loads(artifact(client, job_id, "metrics.json")),
            "weights": artifact(client, job_id, "model.safetensors")}


# ---------------------------------------------------------------- tests


def test_sigkill_mid_erm_resumes_from_the_last_checkpoint(stack, client, dataset, reference, workers):
    job_id = submit(client, dataset, SLOW_JOB)
    worker = workers("doomed")
    seen = wait_erm_epoch(client, job_id)
    os.killpg(worker.pid, signal.SIGKILL)  # the whole worker: parent and pool process, mid-ERM
    killed_at = max(e["data"]["epoch"] for e in events(client, job_id) if e["kind"] == "epoch")
    assert 1 <= seen <= killed_at < 6, "the kill missed ERM"
    workers("rescuer")

    job = finished(client, job_id)
    assert job["status"] == "succeeded", (job, stack.log_tail("rescuer"))
    assert_ran_once(client, job_id, attempts=2)
    log = events(client, job_id)
    takeover = next(i for i, e in enumerate(log) if e["data"] and e["data"].get("attempt") == 2)
    resumed = [e["data"]["resumed_from_epoch"] for e in log if "resumed_from_epoch" in (e["data"] or {})]
    assert len(resumed) == 1 and 1 <= killed_at <= resumed[0] <= 6, log  # not from scratch: after the last stored epoch
    after = [e["data"]["epoch"] for e in log[takeover:] if e["kind"] == "epoch" and e["data"]["phase"] == "erm"]
    assert after == list(range(resumed[0] + 1, 7))
    # Bit for bit the run that was never interrupted (same seed, CPU).
    assert json.loads(artifact(client, job_id, "metrics.json")) == reference["metrics"]
    assert artifact(client, job_id, "model.safetensors") == reference["weights"]
    print(f"\nresumed from ERM epoch {resumed[0]} (killed after epoch {killed_at} was reported); attempts {job['attempts']}")


def _killed_mid_erm_with_the_defaults(tmp_path: Path, tiny_digits: Path, embedded: bool) -> tuple[dict, list, float, float]:
    """On a stack of its own with every recovery setting at its default: SIGKILL the pool process mid-ERM
    (its worker lives on, as after the OOM killer) and follow the job to its end. Returns the job, its
    events, and the seconds from the kill to attempt 2 running and to the end."""
    tmp_path.mkdir()
    stack = Stack(tmp_path, embedded=embedded, OMP_NUM_THREADS="1")
    try:
        stack.start_api()
        stack.start_worker("beat", queues=[stack.queues[1]], beat=True)
        worker = start_worker(stack, "oom-victim")
        with stack.client(stack.create_key("acme")) as client:
            job_id = submit(client, upload_dataset(client, zip_dir(tiny_digits)), SHORT_SLOW_JOB)
            wait_erm_epoch(client, job_id)
            [child] = pool_children(worker.pid)
            os.kill(child, signal.SIGKILL)
            killed = time.monotonic()
            wait_job(client, job_id, lambda j: j["attempts"] == 2 and j["status"] == "running", 60, "attempt 2 within 60 s")
            ran_again = time.monotonic() - killed
            job = finished(client, job_id)
            done = time.monotonic() - killed
            assert job["status"] == "succeeded", (job, stack.log_tail("oom-victim"))
            assert_ran_once(client, job_id, attempts=2)
            return job, events(client, job_id), ran_again, done
    finally:
        stack.close()


def test_a_worker_child_killed_mid_erm_runs_again_within_60_s_with_the_default_settings(tmp_path, tiny_digits):
    """Embedded (SQLite + filesystem broker) and PostgreSQL + Redis, side by side: most of each run is
    the 30 s wait for the dead attempt's heartbeat to go stale, which the two stacks share."""
    backends = {"sqlite-filesystem": True, "postgresql-redis": False}
    with ThreadPoolExecutor(len(backends)) as pool:
        runs = {name: pool.submit(_killed_mid_erm_with_the_defaults, tmp_path / name, tiny_digits, embedded)
                for name, embedded in backends.items()}
        results = {name: run.result() for name, run in runs.items()}
    for name, (job, log, ran_again, done) in results.items():
        takeover = next(i for i, e in enumerate(log) if (e["data"] or {}).get("attempt") == 2)
        killed_at = max(e["data"]["epoch"] for e in log[:takeover] if e["kind"] == "epoch" and e["data"]["phase"] == "erm")
        resumed = [e["data"]["resumed_from_epoch"] for e in log if "resumed_from_epoch" in (e["data"] or {})]
        assert killed_at < 3 and resumed and resumed[0] >= 1, (name, log)
        print(f"\n{name}: killed after ERM epoch {killed_at}: running again after {ran_again:.1f} s, resumed from "
              f"epoch {resumed[0]}, succeeded after {done:.1f} s")


def test_a_worker_presumed_dead_that_comes_back_cannot_overwrite_its_successor(stack, client, dataset, reference, workers):
    job_id = submit(client, dataset, SLOW_JOB)
    frozen = workers("frozen")
    wait_erm_epoch(client, job_id)
    os.killpg(frozen.pid, signal.SIGSTOP)  # alive but silent: no heartbeat
    try:
        workers("successor")
        wait_job(client, job_id, lambda j: j["attempts"] == 2 and j["status"] == "running", 60, "the successor's claim")
    finally:
        os.killpg(frozen.pid, signal.SIGCONT)  # back, in the middle of an epoch, still holding an old token
    job = finished(client, job_id)
    assert job["status"] == "succeeded", (job, stack.log_tail("successor"))
    assert_ran_once(client, job_id, attempts=2)
    log = events(client, job_id)
    # The successor took over from a re-sent message or a requeue, whichever came first; from its
    # start on, only it reported (no epoch twice).
    takeover = next(i for i, e in enumerate(log) if e["data"] and e["data"].get("attempt") == 2)
    after = [(e["data"]["phase"], e["data"]["epoch"]) for e in log[takeover:] if e["kind"] == "epoch"]
    assert len(after) == len(set(after)), after
    assert json.loads(artifact(client, job_id, "metrics.json")) == reference["metrics"]
    deadline = time.monotonic() + 20
    while "claim" not in stack.log_tail("frozen") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"job {job_id}: claim" in stack.log_tail("frozen", 20000) and "lost" in stack.log_tail("frozen", 20000)


def test_a_job_that_kills_its_worker_every_time_fails_after_max_attempts(stack, client, dataset, workers):
    job_id = submit(client, dataset, SLOW_JOB)
    first = workers("victim-1")
    wait_job(client, job_id, lambda j: j["status"] == "running" and j["attempts"] == 1, 60, "attempt 1")
    os.killpg(first.pid, signal.SIGKILL)  # the whole worker dies
    second = workers("victim-2")
    wait_job(client, job_id, lambda j: j["status"] == "running" and j["attempts"] == 2, 60, "attempt 2")
    for child in pool_children(second.pid):
        os.kill(child, signal.SIGKILL)  # like the OOM killer: the pool process dies, the worker lives on

    job = finished(client, job_id, 60)
    assert job["status"] == "failed" and job["attempts"] == MAX_ATTEMPTS, job
    assert job["error"]["code"] == "too_many_attempts"
    assert f"MASKTUNE_MAX_ATTEMPTS={MAX_ATTEMPTS}" in job["error"]["message"]
    time.sleep(3)  # several reconciler passes and a live worker: nothing starts it again
    again = client.get(f"/v1/jobs/{job_id}").json()
    assert (again["status"], again["attempts"], again["finished_at"]) == ("failed", MAX_ATTEMPTS, job["finished_at"])
    statuses = [e["data"]["status"] for e in status_events(client, job_id)]
    # "queued" in between when the reconciler requeued it, not when a re-sent message came first.
    assert [s for s in statuses if s != "queued"] == ["running", "running", "failed"], statuses


def test_restarting_the_api_mid_job_loses_and_duplicates_nothing(stack, client, dataset, workers):
    workers("steady")
    job_id = submit(client, dataset, SLOW_JOB)
    wait_erm_epoch(client, job_id)
    stack.stop("api", signal.SIGTERM)
    stack.start_api()
    second = submit(client, dataset, JOB)  # the restarted API queues work too
    for job in (job_id, second):
        assert finished(client, job)["status"] == "succeeded", stack.log_tail("steady")
        assert_ran_once(client, job)


def _stack_pids(stack: Stack) -> set[int]:
    groups = {proc.pid for proc in stack.procs.values()}  # each process was started in its own session
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in groups:
            pids.add(int(stat.parent.name))
    return pids


def _redis_client_ports(pids: set[int]) -> set[int]:
    """Local ports of the TCP connections these processes hold to Redis."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in inodes and remote.endswith(":18EB"):  # 6379
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def restart_redis(stack: Stack) -> dict:
    """What a Redis restart without persistence does to this stack, and to nobody else on the server:
    its queues, bindings and unacknowledged messages vanish and its connections drop."""
    r = redis.Redis.from_url(REDIS_URL)
    queues = stack.queues
    keys = {key for q in queues for pattern in (f"{q}*", f"_kombu.binding*{q}*") for key in r.scan_iter(match=pattern)}
    lost_unacked = []
    for tag, raw in r.hgetall("unacked").items():
        _, exchange, routing_key = json.loads(raw)
        if routing_key in queues or exchange in queues:
            lost_unacked.append(tag)
    if keys:
        r.delete(*keys)
    for tag in lost_unacked:
        r.hdel("unacked", tag)
        r.zrem("unacked_index", tag)
    ports = _redis_client_ports(_stack_pids(stack))
    killed = 0
    for client in r.client_list():
        if int(client["addr"].rsplit(":", 1)[1]) in ports:
            killed += r.client_kill_filter(_id=client["id"])
    return {"keys": len(keys), "unacked": len(lost_unacked), "connections": killed}


def test_restarting_redis_mid_job_loses_and_duplicates_nothing(stack, client, dataset, tiny_digits, workers):
    stack.stop("beat", signal.SIGKILL)  # no validation consumer, no reconciler until "after the restart"
    try:
        workers("survivor")
        running = submit(client, dataset, SLOW_JOB)
        wait_erm_epoch(client, running)
        waiting = [submit(client, dataset, JOB) for _ in range(2)]  # behind the running job, in Redis only
        response = client.post("/v1/datasets", files={"file": ("again.zip", zip_dir(tiny_digits), "application/zip")})
        assert response.status_code == 201, response.text
        upload = response.json()["id"]
        lost = restart_redis(stack)
        assert lost["keys"] >= 2 and lost["unacked"] >= 1 and lost["connections"] >= 2, lost
    finally:
        stack.start_worker("beat", queues=[stack.queues[1]], beat=True)

    jobs = [running, *waiting]
    for job_id in jobs:
        assert finished(client, job_id, 120)["status"] == "succeeded", stack.log_tail("survivor")
        assert_ran_once(client, job_id)
    assert client.get(f"/v1/datasets/{upload}").json()["status"] in {"ready", "validating"}
    deadline = time.monotonic() + 30
    while client.get(f"/v1/datasets/{upload}").json()["status"] == "validating":
        assert time.monotonic() < deadline, "the lost validation was never re-sent"
        time.sleep(0.2)
    assert client.get(f"/v1/datasets/{upload}").json()["status"] == "ready"
    after = submit(client, dataset, JOB)  # the API's publisher reconnected
    assert finished(client, after)["status"] == "succeeded"
    assert "re-sent" in stack.log_tail("beat", 50000)


def test_twenty_jobs_on_two_workers_each_succeed_exactly_once(stack, client, dataset, workers):
    workers("pool-a")
    workers("pool-b")
    dropped_before = drops(stack)
    with ThreadPoolExecutor(20) as pool:
        ids = list(pool.map(lambda _: submit(client, dataset, JOB), range(20)))
    assert len(set(ids)) == 20
    for job_id in ids:
        assert finished(client, job_id, 240)["status"] == "succeeded", (stack.log_tail("pool-a"), stack.log_tail("pool-b"))
    for job_id in ids:
        assert_ran_once(client, job_id)
    ran = {name: stack.log_tail(name, 10**6).count("masktune.run_job[") for name in ("pool-a", "pool-b")}
    assert all(ran.values()), ran  # both workers took part
    print(f"\n20 jobs: deliveries dropped as duplicates {drops(stack) - dropped_before}; run_job log lines {ran}")


def test_old_work_areas_expire_but_artifacts_stay(stack, client, dataset, workers):
    workers("keeper")
    job_id = submit(client, dataset, JOB)
    assert finished(client, job_id)["status"] == "succeeded"
    stored = stack.tmp / "data" / "blobs" / "jobs" / job_id
    assert (stored / "work" / "state.json").exists()  # kept for a while after the job finished...
    weights = artifact(client, job_id, "model.safetensors")
    deadline = time.monotonic() + RETENTION_S + 10
    while (stored / "work").exists():  # ...then expired by the reconciler
        assert time.monotonic() < deadline, sorted(p.name for p in (stored / "work").rglob("*"))
        time.sleep(0.2)
    assert {p.name for p in (stored / "artifacts").iterdir()} == ARTIFACTS
    assert artifact(client, job_id, "model.safetensors") == weights
    assert_ran_once(client, job_id)


def test_a_reader_never_sees_half_an_artifact(tmp_path):
    store = BlobStore(str(tmp_path / "blobs"))
    key = "jobs/job_x/artifacts/model.safetensors"
    old, new = os.urandom(1 << 20), os.urandom(8 << 20)
    store.write_stream(key, [old])
    whole = {hashlib.sha256(old).hexdigest(): "old", hashlib.sha256(new).hexdigest(): "new"}

    def slowly():
        for start in range(0, len(new), 64 << 10):
            time.sleep(0.004)
            yield new[start:start + (64 << 10)]

    writer = threading.Thread(target=store.write_stream, args=(key, slowly()))
    writer.start()
    seen = []
    while writer.is_alive() or not seen or seen[-1] != "new":
        with store.open(key) as handle:
            data = handle.read()
        assert hashlib.sha256(data).hexdigest() in whole, f"a reader saw {len(data)} bytes"
        seen.append(whole[hashlib.sha256(data).hexdigest()])
    writer.join()
    assert seen[0] == "old" and seen[-1] == "new" and seen.count("old") > 10, seen[:3]
    assert store.list("jobs/job_x") == [key]  # no temporary name left behind


# ---------------------------------------------------------------- the claim rules themselves


def test_claim_rules_on_sqlite(tmp_path):
    """The transitions behind the tests above, on the embedded database: who may write, when a
    job is taken over, when it is given up."""
    from datetime import timedelta

    from sqlalchemy import select, update

    from jobstore.db import migrate, session_scope
    from jobstore.jobs import claim_job, fresh_claim, recover_lost, update_job
    from jobstore.models import Dataset, Job, JobEvent, Tenant, utcnow

    url = f"sqlite:///{tmp_path / 'claims.db'}"
    migrate(url)
    rules = {"heartbeat_timeout_s": 60, "max_attempts": 2}

    def row(s, job_id):
        return s.scalar(select(Job).where(Job.id == job_id))

    def stale(job_id):  # its worker stopped beating two minutes ago
        with session_scope(url) as s:
            s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=120)))

    with session_scope(url) as s:
        s.add(Tenant(id="ten_a", name="a"))
        s.flush()
        s.add(Dataset(id="ds_a", tenant_id="ten_a", filename="d.zip", size_bytes=1, sha256="0" * 64, blob_key="k", status="ready"))
        s.flush()
        for job_id in ("job_a", "job_b"):
            s.add(Job(id=job_id, tenant_id="ten_a", dataset_id="ds_a", config={}))
    with session_scope(url) as s:
        assert claim_job(s, "job_a", "first", **rules) == "claimed"
        assert claim_job(s, "job_a", "duplicate", **rules) == "busy"  # a second delivery; the owner is alive
        holder, stale_in = fresh_claim(s, "job_a", rules["heartbeat_timeout_s"])  # ...so it comes back when that is stale
        assert holder == "first" and 55 < stale_in <= 60
        assert not update_job(s, "job_a", "duplicate", progress=0.5)
        assert update_job(s, "job_a", "first", progress=0.5)
        assert recover_lost(s, "job_a", **rules) is None
    stale("job_a")
    with session_scope(url) as s:
        assert fresh_claim(s, "job_a", rules["heartbeat_timeout_s"]) is None
        assert claim_job(s, "job_a", "second", **rules) == "claimed"  # a redelivery takes over from a vanished worker
        assert not update_job(s, "job_a", "first", status="succeeded")  # the old owner, back, writes nothing
        assert row(s, "job_a").attempts == 2
    stale("job_a")
    with session_scope(url) as s:
        assert claim_job(s, "job_a", "third", **rules) == "exhausted"
        job = row(s, "job_a")
        assert (job.status, job.error_code, job.attempts, job.claim_token) == ("failed", "too_many_attempts", 2, None)
        assert claim_job(s, "job_a", "fourth", **rules) == "busy"  # terminal stays terminal
        assert claim_job(s, "job_b", "w1", **rules) == "claimed"
    stale("job_b")
    with session_scope(url) as s:
        assert recover_lost(s, "job_b", **rules) == "requeued"
        job = row(s, "job_b")
        assert (job.status, job.claim_token, job.attempts) == ("queued", None, 1)
        assert not update_job(s, "job_b", "w1", progress=0.9)
        assert claim_job(s, "job_b", "w2", **rules) == "claimed"
        s.execute(update(Job).where(Job.id == "job_b").values(status="cancelling", cancel_requested=True))
    stale("job_b")
    with session_scope(url) as s:
        assert recover_lost(s, "job_b", **rules) == "cancelled"  # asked to stop, and its worker is gone
        messages = list(s.scalars(select(JobEvent.message).where(JobEvent.job_id == "job_a").order_by(JobEvent.seq)))
    assert messages[:2] == ["attempt 1 started", "attempt 2 started"] and "MASKTUNE_MAX_ATTEMPTS=2" in messages[2]


def test_concurrent_claims_on_postgresql_have_one_winner(stack, client, dataset):
    """Ten deliveries of one job racing for it on PostgreSQL: one claim wins."""
    from jobstore.db import session_scope
    from jobstore.jobs import claim_job, update_job

    url = stack.env["MASKTUNE_DATABASE_URL"]
    job_id = submit(client, dataset, JOB)  # no job worker runs now: it stays queued
    barrier = threading.Barrier(10)

    def claim(token: str) -> str:
        barrier.wait()
        with session_scope(url) as session:
            return claim_job(session, job_id, token, heartbeat_timeout_s=60, max_attempts=MAX_ATTEMPTS)

    with ThreadPoolExecutor(10) as pool:
        outcomes = list(pool.map(claim, [f"token-{i}" for i in range(10)]))
    assert sorted(outcomes) == ["busy"] * 9 + ["claimed"], outcomes
    winner = f"token-{outcomes.index('claimed')}"
    with session_scope(url) as session:
        assert update_job(session, job_id, winner, status="cancelled", cancel_requested=True)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["attempts"] == 1
    assert [e["data"]["attempt"] for e in status_events(client, job_id) if "attempt" in e["data"]] == [1]
