"""Scale-out and recovery: the same jobs through 1 and then 2 worker processes, and a worker child
killed mid-ERM with the default heartbeat and reconciler settings.

    .venv/bin/python bench/scale_out.py [--jobs 8] [--epochs 2] [--rounds 2] [--kill-epochs 6]

1. Throughput (PostgreSQL + Redis, one stack: API, the beat/validation worker, job workers of
   concurrency 1): the biased-digits sample (6000/1000/2000 images, small_cnn) is uploaded and one
   warm-up job decodes it; then --jobs jobs are POSTed at once to 1 worker (torch's default threads,
   all cores), and again to 2 workers with OMP_NUM_THREADS = cores / 2 each, so that together they
   use the cores once; --rounds times, alternating, so that other load on the machine hits both.
   Wall time is the first POST to the last `succeeded` seen (polling every 0.5 s); per-job time is
   the job's `attempt 1 started` -> final status events.
2. Recovery, once embedded (SQLite + filesystem broker) and once on PostgreSQL + Redis, every
   recovery setting at its default: a job with --kill-epochs ERM epochs; after its first epoch event,
   SIGKILL of the job worker's pool process (what the OOM killer does; the worker lives on); then
   the time until the job is `running` under attempt 2, and until it `succeeded`.
3. Heartbeat gaps: the worker logs every gap of more than two heartbeat intervals; their count over
   all the runs above (the warm-up job decodes the dataset in a fork pool inside the Celery child).

Prints the tables and writes them to bench/results/scale_out.md. The machine is shared and noisy:
read the ratios.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import signal
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's code, whatever the environment has installed
from stack import Stack  # noqa: E402  (the test suite's real stack: its own database, queues and folders)

from jobstore.settings import Settings  # noqa: E402
from masktune_core.sample_data import write_biased_digits  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "scale_out.md"
TERMINAL = {"succeeded", "failed", "cancelled"}
POLL_S = 0.5
CORES = os.cpu_count() or 1
LATE_BEAT = "between two heartbeats"  # worker.heartbeat's warning


def ts(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def wait(what: str, check, timeout: float, every: float = POLL_S):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def start_job_worker(stack: Stack, name: str, threads: int | None) -> int:
    """A worker of concurrency 1 on the jobs queue, once ready; ``threads``: its OMP_NUM_THREADS (None: torch's default)."""
    stack.env.pop("OMP_NUM_THREADS", None)
    if threads:
        stack.env["OMP_NUM_THREADS"] = str(threads)  # read by torch at import in the new process only
    proc = stack.start_worker(name, 1, queues=[stack.queues[0]])
    wait(f"{name} ready", lambda: " ready." in stack.log_tail(name) or proc.poll() is not None, 120, 0.2)
    if proc.poll() is not None:
        raise SystemExit(stack.log_tail(name))
    return proc.pid


def upload(client: httpx.Client, archive: Path) -> str:
    with open(archive, "rb") as fh:
        response = client.post("/v1/datasets", files={"file": (archive.name, fh, "application/zip")})
    response.raise_for_status()
    url = f"/v1/datasets/{response.json()['id']}"
    dataset = wait("validation", lambda: (d := client.get(url).json())["status"] != "validating" and d, 300)
    if dataset["status"] != "ready":
        raise SystemExit(f"dataset {dataset['status']}: {dataset.get('error')}")
    return dataset["id"]


def submit(client: httpx.Client, body: dict) -> str:
    response = client.post("/v1/jobs", json=body)
    if response.status_code != 201:
        raise SystemExit(f"POST /v1/jobs: {response.status_code} {response.text}")
    return response.json()["id"]


def events(client: httpx.Client, job_id: str) -> list[dict]:
    return client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]


def run_time(client: httpx.Client, job_id: str) -> float:
    statuses = [e for e in events(client, job_id) if e["kind"] == "status"]
    return (ts(statuses[-1]["created_at"]) - ts(statuses[0]["created_at"])).total_seconds()


def batch(client: httpx.Client, body: dict, n: int) -> dict:
    """POST n jobs at once; wall time to the last terminal status seen, and each job's run time."""
    t0 = time.monotonic()
    ids = [submit(client, body) for _ in range(n)]

    def all_done():
        jobs = [client.get(f"/v1/jobs/{job_id}").json() for job_id in ids]
        return all(j["status"] in TERMINAL for j in jobs) and jobs

    jobs = wait(f"{n} jobs", all_done, 3600)
    wall = time.monotonic() - t0
    failed = [j for j in jobs if j["status"] != "succeeded"]
    if failed:
        raise SystemExit(f"{len(failed)} jobs did not succeed: {failed[0]}")
    return {"wall_s": wall, "run_s": [run_time(client, job_id) for job_id in ids]}


def folder(path: Path) -> Path:
    path.mkdir()
    return path


def throughput(tmp: Path, archive: Path, args) -> tuple[list[dict], int]:
    stack = Stack(folder(tmp / "throughput"), MASKTUNE_PROGRESS_INTERVAL_S="1.0", MASKTUNE_MAX_ACTIVE_JOBS_PER_TENANT="1000")
    rows = []
    try:
        stack.start_api()
        stack.start_worker("beat", queues=[stack.queues[1]], beat=True)
        with stack.client(stack.create_key("bench")) as client:
            body = {"dataset_id": upload(client, archive), "erm": {"epochs": args.epochs}}
            for round_ in range(args.rounds):
                for workers, threads in ((1, None), (2, max(1, CORES // 2))):
                    names = [f"r{round_}-w{workers}-{i}" for i in range(workers)]
                    for name in names:
                        start_job_worker(stack, name, threads)
                    if not rows:
                        batch(client, body, 1)  # warm-up: decodes the dataset once for every later job
                    result = batch(client, body, args.jobs)
                    rows.append({"round": round_, "workers": workers, "threads": threads or "default", **result})
                    print(f"round {round_ + 1}, {workers} workers: {result['wall_s']:.1f} s", flush=True)
                    for name in names:
                        stack.stop(name)
        late = sum(stack.log_tail(name, 10**8).count(LATE_BEAT) for name in stack.logs)
    finally:
        stack.close()
    return rows, late


def recovery(tmp: Path, archive: Path, embedded: bool, args) -> dict:
    """SIGKILL of the job worker's pool process after the first ERM epoch, every recovery setting at its default."""
    stack = Stack(folder(tmp / ("embedded" if embedded else "redis")), embedded=embedded, MASKTUNE_PROGRESS_INTERVAL_S="1.0")
    try:
        stack.start_api()
        stack.start_worker("beat", queues=[stack.queues[1]], beat=True)
        worker = start_job_worker(stack, "victim", None)
        with stack.client(stack.create_key("bench")) as client:
            job_id = submit(client, {"dataset_id": upload(client, archive), "erm": {"epochs": args.kill_epochs}})
            wait("the first ERM epoch", lambda: any(e["kind"] == "epoch" for e in events(client, job_id)), 600, 0.1)
            [child] = Path(f"/proc/{worker}/task/{worker}/children").read_text().split()
            os.kill(int(child), signal.SIGKILL)
            killed = time.monotonic()
            epoch = max(e["data"]["epoch"] for e in events(client, job_id) if e["kind"] == "epoch")
            url = f"/v1/jobs/{job_id}"
            wait("attempt 2", lambda: (j := client.get(url).json())["attempts"] == 2 and j["status"] == "running", 600, 0.1)
            running_s = time.monotonic() - killed
            job = wait("the end", lambda: (j := client.get(url).json())["status"] in TERMINAL and j, 600, 0.1)
            done_s = time.monotonic() - killed
            resumed = [e["data"]["resumed_from_epoch"] for e in events(client, job_id)
                       if "resumed_from_epoch" in (e["data"] or {})]
        late = sum(stack.log_tail(name, 10**8).count(LATE_BEAT) for name in stack.logs)
    finally:
        stack.close()
    print(f"recovery ({'embedded' if embedded else 'redis'}): running again after {running_s:.1f} s, "
          f"{job['status']} after {done_s:.1f} s", flush=True)
    return {"embedded": embedded, "killed_after_epoch": epoch, "running_s": running_s, "done_s": done_s,
            "status": job["status"], "attempts": job["attempts"], "resumed": resumed[0] if resumed else None, "late": late}


def report(args, rows: list[dict], recoveries: list[dict], late: int, info: dict) -> str:
    one = {row["round"]: row["wall_s"] for row in rows if row["workers"] == 1}
    defaults = Settings()
    lines = [
        "# Scale-out and recovery",
        "",
        f"- command: `{info['command']}`",
        f"- date: {info['date']}; {CORES} CPUs, no GPU; 1-min load average {info['load_start']:.2f} at start, "
        f"{info['load_end']:.2f} at end (**shared, noisy machine**: read the ratios)",
        f"- data: biased-digits sample (6000/1000/2000 images), small_cnn, job body `{{\"erm\": {{\"epochs\": {args.epochs}}}}}` "
        "(the rest default); one warm-up job decoded the dataset before the timed runs",
        "",
        f"## {args.jobs} jobs through 1 and 2 workers (PostgreSQL + Redis, concurrency 1 each)",
        "",
        "| round | job workers | torch threads each | wall s | jobs/hour | jobs/hour vs 1 worker (same round) | job run s (median) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['round'] + 1} | {row['workers']} | {row['threads']} | {row['wall_s']:.1f} | "
                     f"{args.jobs / row['wall_s'] * 3600:.0f} | {one[row['round']] / row['wall_s']:.2f}x | "
                     f"{statistics.median(row['run_s']):.1f} |")
    lines += [
        "",
        f"## Recovery: a worker child SIGKILLed mid-ERM, default settings (heartbeat every {defaults.heartbeat_interval_s:g} s, "
        f"stale after {defaults.heartbeat_timeout_s:g} s, reconciler every {defaults.reconcile_interval_s:g} s)",
        "",
        "| stack | killed after ERM epoch | kill -> running again (attempt 2) | kill -> succeeded | resumed from epoch |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in recoveries:
        name = "SQLite + filesystem broker" if r["embedded"] else "PostgreSQL + Redis"
        lines.append(f"| {name} | {r['killed_after_epoch']} | {r['running_s']:.1f} s | {r['done_s']:.1f} s "
                     f"({r['status']}, {r['attempts']} attempts) | {r['resumed']} |")
    lines += ["", f"Heartbeat gaps of more than two intervals logged by the workers over all these runs: "
                  f"{late + sum(r['late'] for r in recoveries)}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2, help="ERM epochs of each throughput job")
    ap.add_argument("--rounds", type=int, default=2, help="1-worker / 2-worker pairs, alternating")
    ap.add_argument("--kill-epochs", type=int, default=6, help="ERM epochs of the job killed in the recovery runs")
    args = ap.parse_args()
    info = {"command": shlex.join(["python", "bench/scale_out.py", *sys.argv[1:]]),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "load_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = write_biased_digits(tmp / "biased-digits")
        archive = tmp / "biased-digits.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for path in sorted(data.rglob("*")):
                if path.is_file():
                    zf.write(path, path.relative_to(data))
        rows, late = throughput(tmp, archive, args)
        recoveries = [recovery(tmp, archive, embedded, args) for embedded in (True, False)]
    info["load_end"] = os.getloadavg()[0]
    text = report(args, rows, recoveries, late, info)
    print(text)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
