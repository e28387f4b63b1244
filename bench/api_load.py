"""API load: 50 pollers of `GET /v1/jobs/{id}`, and one 1 GB upload, against the API started as deployed.

    .venv/bin/python bench/api_load.py [--before DIR] [--workers 1 2] [--clients 50] [--duration 10]
                                       [--backends sqlite postgres] [--upload-mb 1024]

For each backend (`sqlite`: the embedded defaults, SQLite + filesystem broker; `postgres`: the
local PostgreSQL + Redis, a fresh database) and each code version (this tree, started the way
docker-compose.yml and scripts/serve.py start it: `python -m api` with MASKTUNE_API_WORKERS
processes; with --before DIR, also the code in DIR, e.g. a worktree of an older commit, started
as that code's Dockerfile does, `uvicorn api.app:app`, one process):

1. creates a tenant key (`python -m api.manage create-key`), uploads a tiny dataset, marks it
   ready in the database (no Celery worker runs: the jobs stay queued, nothing else uses CPU)
   and creates one job per client (`POST /v1/jobs`);
2. runs the load generator in its own process (asyncio + aiohttp, uvloop): every client polls
   its own job with the one key, either in a closed loop (as fast as answers come: saturation,
   where latency ~ clients / throughput) or at a fixed interval (each client once per interval);
   the first second is warm-up and not counted;
3. reports requests/s, p50/p99 latency, errors (non-200 or transport errors) and the CPU that the
   API processes, the load generator and the whole machine (the database, and anything else on
   this shared machine) used meanwhile. Every version's API is up during its backend's part and
   the rows are interleaved, so a change in the machine's other load falls on each version alike.

Then one upload of --upload-mb MiB (a generated archive-like file, streamed from a generator so
the client holds 1 MiB at a time) to the embedded start of each code version: MB/s and the growth
of the API processes' RSS (sampled every 50 ms, summed over the API's processes). Validation
never runs.

Writes the tables to bench/results/api_load.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import psutil
import psycopg
import redis
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
WARMUP_S = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for cls in ("a", "b"):
            zf.writestr(f"train/{cls}/0.png", b"not decoded: validation never runs here")
    return buf.getvalue()


# ------------------------------------------------------------------ the API under test

@dataclass
class Server:
    name: str  # "before" | "after"
    root: Path
    backend: str
    workers: int
    env: dict[str, str]
    port: int
    proc: subprocess.Popen
    db_name: str | None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def processes(self) -> list[psutil.Process]:
        parent = psutil.Process(self.proc.pid)
        return [parent, *parent.children(recursive=True)]


@contextmanager
def serve(name: str, root: Path, backend: str, workers: int, tmp: Path) -> Iterator[Server]:
    port = free_port()
    data = tmp / f"{name}-{backend}-{workers}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASKTUNE_")}
    env.update(MASKTUNE_DATA_DIR=str(data), MASKTUNE_API_PORT=str(port), MASKTUNE_API_WORKERS=str(workers),
               MASKTUNE_MAX_ACTIVE_JOBS_PER_TENANT="1000", PYTHONUNBUFFERED="1")
    db_name = None
    if backend == "postgres":
        db_name = f"mt_bench_{secrets.token_hex(4)}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{db_name}"')
        tag = secrets.token_hex(4)
        env.update(MASKTUNE_DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:5432/{db_name}",
                   MASKTUNE_BROKER_URL=REDIS_URL, MASKTUNE_JOBS_QUEUE=f"bench.jobs.{tag}",
                   MASKTUNE_VALIDATION_QUEUE=f"bench.validation.{tag}")
    if name == "before":
        # The older code's own start (its Dockerfile CMD and scripts/serve.py): one uvicorn process.
        command = [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1", "--port", str(port)]
    else:
        command = [sys.executable, "-m", "api"]
    data.mkdir(parents=True)
    log = open(data.parent / f"{data.name}.log", "wb")
    proc = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(name, root, backend, workers, env, port, proc, db_name)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} API did not start: {(data.parent / f'{data.name}.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if db_name:
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
            redis.Redis.from_url(REDIS_URL).delete(env["MASKTUNE_JOBS_QUEUE"], env["MASKTUNE_VALIDATION_QUEUE"])


def database_url(server: Server) -> str:
    return server.env.get("MASKTUNE_DATABASE_URL") or f"sqlite:///{Path(server.env['MASKTUNE_DATA_DIR']) / 'masktune.db'}"


def create_key(server: Server) -> str:
    out = subprocess.run([sys.executable, "-m", "api.manage", "create-key", "--tenant", "bench"], cwd=server.root,
                         env=server.env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["secret"]


def create_jobs(server: Server, key: str, count: int) -> list[str]:
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
        response = client.post("/v1/datasets", files={"file": ("tiny.zip", tiny_zip(), "application/zip")})
        response.raise_for_status()
        dataset = response.json()["id"]
        engine = create_engine(database_url(server))
        with engine.begin() as conn:  # as a validating worker would
            conn.execute(text("UPDATE datasets SET status = 'ready', summary = :s WHERE id = :id"),
                         {"s": json.dumps({"classes": ["a", "b"]}), "id": dataset})
        engine.dispose()
        jobs = []
        for _ in range(count):
            response = client.post("/v1/jobs", json={"dataset_id": dataset})
            response.raise_for_status()
            jobs.append(response.json()["id"])
        return jobs


# ------------------------------------------------------------------ the load generator (its own process)

async def _poll(url: str, key: str, jobs: list[str], duration: float, interval: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    counted_from = start + WARMUP_S
    end = counted_from + duration
    headers = {"Authorization": f"Bearer {key}"}

    async def poller(session: aiohttp.ClientSession, job: str, offset: float) -> None:
        nonlocal errors
        # Interval mode: the clients' polls are spread evenly over the interval, each on a fixed schedule.
        next_start = start + offset
        while True:
            if interval:
                delay = next_start - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_start = max(next_start + interval, time.perf_counter())
            sent = time.perf_counter()
            if sent >= end:
                return
            try:
                async with session.get(f"{url}/v1/jobs/{job}", headers=headers) as response:
                    await response.read()
                    ok = response.status == 200
            except aiohttp.ClientError:
                ok = False
            if sent >= counted_from:
                latencies.append(time.perf_counter() - sent)
                errors += not ok

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(poller(session, job, interval * i / len(jobs)) for i, job in enumerate(jobs)))
    latencies.sort()
    return {"requests": len(latencies), "errors": errors, "seconds": duration,
            "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else None}


def loadgen_main(args: list[str]) -> None:
    url, key, jobs, duration, interval = args[0], args[1], args[2].split(","), float(args[3]), float(args[4])
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(_poll(url, key, jobs, duration, interval))))


def run_load(server: Server, key: str, jobs: list[str], duration: float, interval: float) -> dict:
    api = server.processes()
    gen = subprocess.Popen([sys.executable, __file__, "--_loadgen", server.url, key, ",".join(jobs), str(duration), str(interval)],
                           stdout=subprocess.PIPE, text=True)
    gen_proc = psutil.Process(gen.pid)
    # CPU over the counted window only: sample at the end of the warm-up and just before the generator ends.
    time.sleep(WARMUP_S)
    api_start = sum(sum(p.cpu_times()[:2]) for p in api)
    gen_start = sum(gen_proc.cpu_times()[:2])
    machine_start = psutil.cpu_times()
    time.sleep(duration - 0.05)
    machine = psutil.cpu_times()
    machine_busy = sum(getattr(machine, f) - getattr(machine_start, f) for f in ("user", "system", "nice", "irq", "softirq"))
    api_cpu = sum(sum(p.cpu_times()[:2]) for p in api) - api_start
    try:
        gen_cpu = sum(gen_proc.cpu_times()[:2]) - gen_start
    except psutil.NoSuchProcess:
        gen_cpu = float("nan")
    out, _ = gen.communicate(timeout=120)
    result = json.loads(out)
    result.update(api_cpu=api_cpu / duration, gen_cpu=gen_cpu / duration, machine_cpu=machine_busy / duration)
    return result


# ------------------------------------------------------------------ the 1 GB upload

def multipart_body(size: int, boundary: str) -> tuple[int, Iterator[bytes]]:
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.zip\"\r\n"
            f"Content-Type: application/zip\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    block = os.urandom(1 << 20)

    def chunks() -> Iterator[bytes]:
        yield head
        left = size
        while left > 0:
            yield block[: min(left, len(block))]
            left -= len(block)
        yield tail

    return len(head) + size + len(tail), chunks()


def upload(server: Server, key: str, size: int) -> dict:
    procs = server.processes()
    rss = lambda: sum(p.memory_info().rss for p in procs)  # noqa: E731
    baseline = rss()
    peak = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    boundary = secrets.token_hex(8)
    length, body = multipart_body(size, boundary)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": f"multipart/form-data; boundary={boundary}",
               "Content-Length": str(length)}
    started = time.perf_counter()
    response = httpx.post(f"{server.url}/v1/datasets", content=body, headers=headers, timeout=600)
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    return {"status": response.status_code, "seconds": seconds, "mb_s": size / 1e6 / seconds,
            "rss_before_mb": baseline / 2**20, "rss_growth_mb": (peak - baseline) / 2**20}


# ------------------------------------------------------------------ the run

def commit(root: Path) -> str:
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + (" with uncommitted changes" if dirty else "")


def cpu_ms_per_request(row: dict) -> float:
    """The API's CPU time per answered request: what the machine's other load changes least."""
    return 1000 * row["api_cpu"] * row["seconds"] / row["requests"]


def fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="a checkout of older code to measure the same way, side by side")
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    parser.add_argument("--workers", nargs="*", type=int, default=[1, 2], help="MASKTUNE_API_WORKERS values for this tree")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=10.0, help="counted seconds per run (after 1 s of warm-up)")
    parser.add_argument("--intervals", nargs="+", type=float, default=[0.0, 1.0, 0.1],
                        help="seconds between one client's polls; 0 = closed loop")
    parser.add_argument("--upload-mb", type=int, default=1024, help="0 skips the upload")
    args = parser.parse_args()

    started = dt.datetime.now(dt.timezone.utc)
    load_start = os.getloadavg()[0]
    versions = [("after", ROOT, w) for w in args.workers]
    if args.before:
        versions.insert(0, ("before", args.before.resolve(), 1))
    rows = []
    with tempfile.TemporaryDirectory(prefix="api-load-") as tmp:
        for backend in args.backends:
            # Every version's API up at once (idle between its rows), and the rows interleaved, so a
            # change in the machine's other load hits every version alike.
            with ExitStack() as stack:
                targets = []
                for name, root, workers in versions:
                    server = stack.enter_context(serve(name, root, backend, workers, Path(tmp)))
                    key = create_key(server)
                    targets.append((name, workers, server, key, create_jobs(server, key, args.clients)))
                for interval in args.intervals:
                    for name, workers, server, key, jobs in targets:
                        result = run_load(server, key, jobs, args.duration, interval)
                        rows.append({"code": name, "backend": backend, "workers": workers, "interval": interval, **result})
                        print(json.dumps(rows[-1]), flush=True)
        uploads = []
        if args.upload_mb:
            for name, root, workers in versions[:2 if args.before else 1]:
                with serve(name, root, "sqlite", workers, Path(tmp) / "upload") as server:
                    uploads.append({"code": name, "workers": workers, **upload(server, create_key(server), args.upload_mb << 20)})
                    print(json.dumps(uploads[-1]), flush=True)

    cores = os.cpu_count()
    lines = [
        "# API load: pollers of `GET /v1/jobs/{id}`, and a 1 GB upload",
        "",
        f"- command: `python bench/api_load.py {' '.join(sys.argv[1:])}`",
        f"- date: {started:%Y-%m-%d %H:%M} UTC; python {platform.python_version()}, {cores} CPUs shared by the API, "
        f"the database and the load generator; 1-min load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end",
        f"- {args.clients} clients, one key, each polling its own queued job; {args.duration:g} s counted per row after "
        f"{WARMUP_S:g} s of warm-up. *closed loop*: each client sends its next request when the answer arrives "
        "(saturation: latency ≈ clients / throughput); *every N s*: each client polls on a fixed schedule.",
        "- *before*: " + (f"`{args.before}` (commit {commit(args.before)}) started as its Dockerfile does "
                          "(`uvicorn api.app:app`, one process)"
                          if args.before else "not measured")
        + f"; *after*: this tree (commit {commit(ROOT)}), `python -m api` with `MASKTUNE_API_WORKERS` processes (as docker-compose.yml runs it).",
        f"- CPU columns: CPU seconds per second (1.00 = one core busy, {cores} at most) of the API processes, of the load "
        "generator, and of the whole machine (the database and whatever else runs on this shared machine included).",
        "",
        "| backend | polling | code | API processes | req/s | p50 ms | p99 ms | errors | API CPU ms per request | API CPU | load gen CPU | machine CPU |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mode = "closed loop" if not r["interval"] else f"every {r['interval']:g} s"
        lines.append(f"| {r['backend']} | {mode} | {r['code']} | {r['workers']} | {r['requests'] / r['seconds']:,.0f} | "
                     f"{fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | {r['errors']} | "
                     f"{cpu_ms_per_request(r):.2f} | {r['api_cpu']:.2f} | {r['gen_cpu']:.2f} | "
                     f"{r['machine_cpu']:.2f} |")
    if args.before:
        lines += ["", "Ratios after / before (same backend and polling; req/s: higher is better, p99 and API CPU per "
                      "request: lower is better):", "",
                  "| backend | API processes | polling | req/s × | p99 × | API CPU per request × |", "|---|---:|---|---:|---:|---:|"]
        for r in rows:
            if r["code"] != "after":
                continue
            base = next(b for b in rows if b["code"] == "before" and b["backend"] == r["backend"] and b["interval"] == r["interval"])
            mode = "closed loop" if not r["interval"] else f"every {r['interval']:g} s"
            lines.append(f"| {r['backend']} | {r['workers']} | {mode} | {(r['requests'] / base['requests']):.2f} | "
                         f"{r['p99_ms'] / base['p99_ms']:.2f} | {cpu_ms_per_request(r) / cpu_ms_per_request(base):.2f} |")
    if uploads:
        lines += ["", f"**Upload**: one `POST /v1/datasets` of {args.upload_mb} MiB (multipart, streamed by the client), "
                      "embedded start (SQLite, local blobs); RSS summed over the API's processes, sampled every 50 ms.", "",
                  "| code | API processes | HTTP | seconds | MB/s | API RSS before MiB | peak RSS growth MiB |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for u in uploads:
            lines.append(f"| {u['code']} | {u['workers']} | {u['status']} | {u['seconds']:.1f} | {u['mb_s']:.0f} | "
                         f"{u['rss_before_mb']:.0f} | {u['rss_growth_mb']:.1f} |")
    text_out = "\n".join(lines) + "\n"
    print("\n" + text_out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "api_load.md").write_text(text_out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--_loadgen"]:
        loadgen_main(sys.argv[2:])
    else:
        main()
