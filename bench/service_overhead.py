"""Service overhead: the README walkthrough job through the HTTP API vs the same run as a library call.

    .venv/bin/python bench/service_overhead.py [--epochs 10] [--repeats 1] [--sample PATH.zip] [--keep]

1. Starts the embedded service (`scripts/serve.py`: API + Celery worker, SQLite, filesystem
   broker, local blobs) with MASKTUNE_DATA_DIR = a temp dir and a free port, writes the
   biased-digits sample zip (6000/1000/2000 images; or reuses --sample), uploads it, waits for
   `ready`, POSTs the walkthrough job `{"dataset_id": ..., "erm": {"epochs": N}}`, polls
   `GET /v1/jobs/{id}` every 0.5 s until terminal and downloads `model.safetensors`.
   The per-stage split comes from `GET /v1/jobs/{id}/events` (`created_at` of the stage
   events; the last `status` event is the end).
2. Runs `masktune_core.run_masktune` on the same zip and config in this process (device cpu,
   fresh out dir), timing each stage from the `on_event` stage events (time.perf_counter).
   Service first, then direct; with --repeats the pair alternates (the dataset is uploaded once).
3. Compares the service's `metrics.json` (and `model.safetensors`) with the direct run's.

The machine is shared and noisy: absolute seconds move between runs, the ratios less so.
Writes the tables to bench/results/service_overhead.md. Cleans up its temp dir unless --keep.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from jobspec import JobConfig
from masktune_core import run_masktune

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
STAGES = ("prepare", "erm", "saliency", "finetune", "evaluate", "export")
TERMINAL = {"succeeded", "failed", "cancelled"}
POLL_S = 0.5
CLK_TCK = os.sysconf("SC_CLK_TCK")


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def ts(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def secs(a: dt.datetime, b: dt.datetime) -> float:
    return (b - a).total_seconds()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


# ------------------------------------------------------------------ process sampling


def session_processes(sid: int) -> dict[int, dict]:
    """pid -> {cmd, threads, cpu_s} for the processes of the service's session."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) != sid:  # fields[3] = session id (field 6 of stat)
                continue
            cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
            threads = int(fields[17])
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue
        found[int(entry.name)] = {"cmd": cmd, "threads": threads, "cpu_s": cpu}
    return found


class Sampler:
    """Remembers the last sample of every service process, so the job's process (a Celery
    child that exits after its one task) leaves its CPU time and thread count behind."""

    def __init__(self, sid: int):
        self.sid = sid
        self.first: dict[int, dict] = {}
        self.last: dict[int, dict] = {}

    def sample(self) -> None:
        for pid, info in session_processes(self.sid).items():
            self.first.setdefault(pid, info)
            info["max_threads"] = max(info["threads"], self.last[pid]["max_threads"] if pid in self.last else 0)
            self.last[pid] = info

    def busiest(self) -> dict | None:
        """The process that worked most (the job's): its CPU seconds since first seen and most OS
        threads seen, and the CPU seconds all the other service processes used meanwhile."""
        used = {pid: info["cpu_s"] - self.first[pid]["cpu_s"] for pid, info in self.last.items()}
        if not used:
            return None
        pid = max(used, key=used.get)
        return {"pid": pid, "cpu_s": used[pid], "threads": self.last[pid]["max_threads"], "cmd": self.last[pid]["cmd"],
                "others_cpu_s": sum(v for p, v in used.items() if p != pid)}


# ------------------------------------------------------------------ the service


class Service:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.port = free_port()
        self.log_path = data_dir.parent / "serve.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MASKTUNE_")}
        env.update(MASKTUNE_DATA_DIR=str(data_dir), MASKTUNE_API_PORT=str(self.port))
        self.log = open(self.log_path, "wb")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "scripts/serve.py"], cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        key_file = data_dir / "local-api-key.json"
        deadline = time.monotonic() + 120
        while True:
            try:
                if key_file.exists() and httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise SystemExit(f"the service did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        self.startup_s = time.perf_counter() - t0
        self.secret = json.loads(key_file.read_text())["secret"]
        self.client = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.secret}"}, timeout=120)
        self.sampler = Sampler(self.proc.pid)

    def worker_log_tail(self) -> str:
        path = self.data_dir / "worker.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no worker log)"

    def poll(self, url: str, done) -> tuple[dict, dt.datetime]:
        while True:
            self.sampler.sample()
            body = self.client.get(url).json()
            if done(body):
                return body, now()
            time.sleep(POLL_S)

    def upload(self, zip_path: Path) -> dict:
        t0 = time.perf_counter()
        with open(zip_path, "rb") as fh:
            response = self.client.post("/v1/datasets", files={"file": (zip_path.name, fh, "application/zip")})
        upload_s = time.perf_counter() - t0
        if response.status_code != 201:
            raise SystemExit(f"upload failed: {response.status_code} {response.text}")
        dataset, _ = self.poll(f"/v1/datasets/{response.json()['id']}", lambda d: d["status"] != "validating")
        validation_seen_s = time.perf_counter() - t0 - upload_s
        if dataset["status"] != "ready":
            raise SystemExit(f"dataset {dataset['status']}: {dataset.get('error')}\n{self.worker_log_tail()}")
        return {"dataset": dataset, "upload_s": upload_s, "validation_seen_s": validation_seen_s,
                "validation_server_s": secs(ts(dataset["created_at"]), ts(dataset["updated_at"]))}

    def events(self, job_id: str) -> list[dict]:
        events, after = [], None
        while True:
            params = {"limit": 1000, **({"after": after} if after is not None else {})}
            page = self.client.get(f"/v1/jobs/{job_id}/events", params=params).json()
            events += page["data"]
            if len(page["data"]) < 1000:
                return events
            after = page["next_cursor"]

    def run_job(self, dataset_id: str, epochs: int) -> dict:
        self.sampler = Sampler(self.proc.pid)
        self.sampler.sample()
        sent, t0, cpu0 = now(), time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        response = self.client.post("/v1/jobs", json={"dataset_id": dataset_id, "erm": {"epochs": epochs}})
        if response.status_code != 201:
            raise SystemExit(f"POST /v1/jobs failed: {response.status_code} {response.text}")
        job_id = response.json()["id"]
        job, seen = self.poll(f"/v1/jobs/{job_id}", lambda j: j["status"] in TERMINAL)
        wall_s = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        client_cpu_s = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
        if job["status"] != "succeeded":
            raise SystemExit(f"job {job['status']}: {job.get('error')}\n{self.worker_log_tail()}")
        t1 = time.perf_counter()
        model = self.client.get(f"/v1/jobs/{job_id}/artifacts/model.safetensors")
        download_s = time.perf_counter() - t1
        metrics = self.client.get(f"/v1/jobs/{job_id}/artifacts/metrics.json").json()
        events = self.events(job_id)

        started = next(e for e in events if e["kind"] == "status" and e["data"].get("status") == "running")
        stage_at = {e["stage"]: ts(e["created_at"]) for e in events if e["kind"] == "stage"}
        finished = ts([e for e in events if e["kind"] == "status"][-1]["created_at"])
        rows = {"queue": secs(sent, ts(started["created_at"])), "setup": secs(ts(started["created_at"]), stage_at["prepare"])}
        bounds = [stage_at[s] for s in STAGES] + [finished]
        for stage, a, b in zip(STAGES, bounds, bounds[1:]):
            rows[stage] = secs(a, b)
        rows["poll"] = secs(finished, seen)
        epochs_at = [ts(e["created_at"]) for e in events if e["kind"] == "epoch" and e["data"].get("phase") == "erm"]
        return {
            "job": job, "wall_s": wall_s, "rows": rows, "metrics": metrics, "model": model.content,
            "download_s": download_s, "events": len(events),
            "epoch_s": [secs(a, b) for a, b in zip([stage_at["erm"]] + epochs_at, epochs_at)],
            "synced_bytes": dir_bytes(self.data_dir / "blobs" / "jobs" / job_id / "work"),
            "worker": self.sampler.busiest(), "client_cpu_s": client_cpu_s,
        }

    def stop(self) -> None:
        if getattr(self, "client", None) is not None:
            self.client.close()
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


# ------------------------------------------------------------------ the library


def run_direct(zip_path: Path, out: Path, epochs: int) -> dict:
    marks: list[tuple[str, str, float]] = []

    def on_event(event) -> None:
        if event.kind in ("stage", "epoch"):
            marks.append((event.kind, event.stage, time.perf_counter()))

    shutil.rmtree(out, ignore_errors=True)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    run_masktune(zip_path, out, JobConfig.model_validate({"erm": {"epochs": epochs}}), device="cpu", on_event=on_event)
    end = time.perf_counter()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    stage_at = {stage: t for kind, stage, t in marks if kind == "stage"}
    rows = {"setup": stage_at["prepare"] - t0}
    bounds = [stage_at[s] for s in STAGES] + [end]
    for stage, a, b in zip(STAGES, bounds, bounds[1:]):
        rows[stage] = b - a
    epochs_at = [t for kind, stage, t in marks if kind == "epoch" and stage == "erm"]
    return {
        "wall_s": end - t0, "rows": rows,
        "metrics": json.loads((out / "metrics.json").read_text()),
        "model": (out / "model.safetensors").read_bytes(),
        "epoch_s": [b - a for a, b in zip([stage_at["erm"]] + epochs_at, epochs_at)],
        "cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
        "threads": len(os.listdir("/proc/self/task")),
    }


# ------------------------------------------------------------------ comparison and report


def diff(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                out.append(f"{path}/{key}: only in {'service' if key in a else 'direct'}")
            else:
                out += diff(a[key], b[key], f"{path}/{key}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: service {a!r} vs direct {b!r}"]


def med(values: list[float]) -> float:
    return statistics.median(values)


def fmt_range(values: list[float], unit: str = "") -> str:
    text = f"{med(values):.2f}{unit}"
    return text + (f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else "")


def report(args, info: dict, upload: dict, services: list[dict], directs: list[dict], checks: list[str]) -> str:
    n = len(services)
    svc_wall = [s["wall_s"] for s in services]
    dir_wall = [d["wall_s"] for d in directs]
    ratios = [s / d for s, d in zip(svc_wall, dir_wall)]
    job = services[-1]["job"]
    splits = upload["dataset"]["summary"]["splits"]
    sizes = "/".join(str(splits[k]["images"]) for k in ("train", "val", "test") if k in splits)
    origin = f"reused {args.sample}" if args.sample else f"generated in {info['sample_s']:.1f} s"
    lines = [
        "# Service overhead: the README walkthrough job via the HTTP API vs `run_masktune`",
        "",
        f"- command: `{info['command']}`",
        f"- date: {info['date']}",
        f"- torch {torch.__version__}, python {platform.python_version()}, torch threads {torch.get_num_threads()} "
        f"(benchmark process), {os.cpu_count()} CPUs; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
        f"1-min load average {info['load_start']:.2f} at start, {info['load_end']:.2f} at end",
        "- **shared, noisy machine**: absolute seconds move from run to run (other test suites may be running); "
        "the service/direct ratios and the per-stage split are the figures to read.",
        f"- dataset: biased-digits sample zip ({info['zip_mb']:.1f} MB, {sizes} train/val/test images), {origin}; "
        f"job body `{{\"dataset_id\": ..., \"erm\": {{\"epochs\": {args.epochs}}}}}` (all other fields default), CPU.",
        f"- service: `scripts/serve.py` embedded defaults (SQLite, filesystem broker, local blobs, "
        f"MASKTUNE_PROGRESS_INTERVAL_S default), started in {info['startup_s']:.1f} s; client polls every {POLL_S} s. "
        f"Order: {'service then direct' if n == 1 else f'service, direct alternating, {n} pairs (median, min-max)'}; "
        "the direct run is in the benchmark process while the idle service stays up.",
        "",
        "## Walkthrough (as a user does it)",
        "",
        "| step | seconds |",
        "|---|---:|",
        f"| upload (`POST /v1/datasets`, {info['zip_mb']:.1f} MB, until 201) | {upload['upload_s']:.2f} |",
        f"| validation (201 -> `ready` seen by polling) | {upload['validation_seen_s']:.2f} |",
        f"| &nbsp;&nbsp;validation server side (dataset created_at -> updated_at) | {upload['validation_server_s']:.2f} |",
        f"| job wall time (`POST /v1/jobs` -> `succeeded` seen by polling) | {fmt_range(svc_wall)} |",
        f"| download `model.safetensors` ({len(services[-1]['model']) / 1024:.0f} KiB) | {services[-1]['download_s']:.3f} |",
        "",
        f"Verdict (job metrics): {job['metrics']['verdict']['message']}",
        "",
        "## Per stage: service vs library",
        "",
        "Service rows come from the job's events (`created_at`): *queue* = POST sent -> `attempt 1 started`; "
        "*setup* = that -> `prepare` stage event (dataset blob copy, hashing); each stage runs to the next stage event "
        "(so it includes the worker's workspace sync of its outputs, done before the next event is written, and the "
        "per-epoch checkpoint syncs + DB writes); *export* ends at the final `status` event (artifact upload included); "
        "*poll* = that -> `succeeded` seen by the client. Direct rows: perf_counter at the `on_event` stage events; "
        "*setup* = call -> `prepare` event (dataset hashing).",
        "",
        "| part | service s | service % | direct s | direct % | service / direct |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for part in ("queue", "setup", *STAGES, "poll"):
        s = [x["rows"][part] for x in services]
        d = [x["rows"][part] for x in directs] if part in directs[0]["rows"] else None
        s_pct = med([x["rows"][part] / x["wall_s"] * 100 for x in services])
        if d is None:
            lines.append(f"| {part} | {fmt_range(s)} | {s_pct:.1f}% | – | – | – |")
        else:
            d_pct = med([x["rows"][part] / x["wall_s"] * 100 for x in directs])
            r = [a / b for a, b in zip(s, d) if b > 0]
            lines.append(f"| {part} | {fmt_range(s)} | {s_pct:.1f}% | {fmt_range(d)} | {d_pct:.1f}% | "
                         f"{fmt_range(r, 'x') if r else '–'} |")
    lines.append(f"| **total** | **{fmt_range(svc_wall)}** | 100% | **{fmt_range(dir_wall)}** | 100% | **{fmt_range(ratios, 'x')}** |")
    svc_epoch = [e for s in services for e in s["epoch_s"]]
    dir_epoch = [e for d in directs for e in d["epoch_s"]]
    worker = services[-1]["worker"]
    lines += [
        "",
        f"**Service / direct wall time: {fmt_range(ratios, 'x')}** "
        f"(overhead {med([s - d for s, d in zip(svc_wall, dir_wall)]):.1f} s on a {med(dir_wall):.1f} s run).",
        "",
        f"- ERM epoch (median of all epochs, first includes the model set-up): service {med(svc_epoch):.2f} s, "
        f"direct {med(dir_epoch):.2f} s.",
        f"- worker: {services[-1]['events']} events written; {services[-1]['synced_bytes'] / 2**20:.1f} MiB of work files "
        f"synced to blob storage per job.",
    ]
    if worker:
        lines.append(f"- CPU seconds: the job's worker process ~{med([s['worker']['cpu_s'] for s in services]):.1f} "
                     f"(from /proc, sampled every {POLL_S} s, so a little is missed at its exit) vs the direct run "
                     f"{med([d['cpu_s'] for d in directs]):.1f}; meanwhile the other service processes (serve.py, API, "
                     f"Celery parent) used {med([s['worker']['others_cpu_s'] for s in services]):.1f} and the polling "
                     f"client {med([s['client_cpu_s'] for s in services]):.1f}.")
    lines += ["", "## Same result?", ""] + [f"- {c}" for c in checks]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1, help="service/direct pairs, alternating")
    ap.add_argument("--sample", type=Path, help="reuse this biased-digits zip instead of generating one")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (service data, direct output)")
    args = ap.parse_args()
    info = {"command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
            "date": now().strftime("%Y-%m-%d %H:%M UTC"), "load_start": os.getloadavg()[0]}
    tmp = Path(tempfile.mkdtemp(prefix="masktune-service-bench-"))
    service = None
    try:
        if args.sample:
            zip_path, info["sample_s"] = args.sample.resolve(), 0.0
        else:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "masktune_core.sample_data", str(tmp / "biased-digits"), "--zip"],
                           cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            info["sample_s"] = time.perf_counter() - t0
            zip_path = tmp / "biased-digits.zip"
        info["zip_mb"] = zip_path.stat().st_size / 2**20
        print(f"dataset {zip_path} ({info['zip_mb']:.1f} MB)", file=sys.stderr)

        service = Service(tmp / "svc")
        info["startup_s"] = service.startup_s
        upload = service.upload(zip_path)
        print(f"uploaded in {upload['upload_s']:.2f} s, ready after {upload['validation_seen_s']:.2f} s", file=sys.stderr)
        services, directs = [], []
        for i in range(args.repeats):
            services.append(service.run_job(upload["dataset"]["id"], args.epochs))
            print(f"[{i + 1}/{args.repeats}] service job {services[-1]['wall_s']:.1f} s", file=sys.stderr)
            directs.append(run_direct(zip_path, tmp / f"direct-{i}", args.epochs))
            print(f"[{i + 1}/{args.repeats}] direct run  {directs[-1]['wall_s']:.1f} s", file=sys.stderr)
    finally:
        if service is not None:
            service.stop()
    info["load_end"] = os.getloadavg()[0]

    checks = []
    for i, (s, d) in enumerate(zip(services, directs)):
        label = f"pair {i + 1}: " if len(services) > 1 else ""
        differences = diff(s["metrics"], d["metrics"])
        if differences:
            checks.append(f"{label}metrics.json: {len(differences)} differences: " + "; ".join(differences[:8])
                          + (" ..." if len(differences) > 8 else ""))
        else:
            checks.append(f"{label}metrics.json: identical")
        same_model = sha256(s["model"]) == sha256(d["model"])
        checks.append(f"{label}model.safetensors: {'identical bytes' if same_model else 'different bytes'} "
                      f"(sha256 {sha256(s['model'])[:12]} vs {sha256(d['model'])[:12]})")
    worker = services[-1]["worker"]
    if worker:
        checks.append(f"threads: benchmark process torch.get_num_threads() = {torch.get_num_threads()} "
                      f"({directs[-1]['threads']} OS threads after the direct run); the job's worker process "
                      f"(a forked Celery child) had at most {worker['threads']} OS threads (main + torch's intra-op pool).")

    text = report(args, info, upload, services, directs, checks)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "service_overhead.md").write_text(text)
    print(text)
    if args.keep:
        print(f"kept {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
