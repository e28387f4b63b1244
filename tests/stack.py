"""The real service for tests: PostgreSQL database, Redis broker, uvicorn and Celery subprocesses.

Each Stack gets its own database, blob directory and queue names, so runs never see
each other's rows or messages.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import psycopg
import redis

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_database() -> tuple[str, str]:
    name = f"mt_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Stack:
    def __init__(self, tmp: Path, *, embedded: bool = False, **extra_env: str):
        self.tmp = tmp
        self.embedded = embedded
        self.db_name = None
        tag = secrets.token_hex(4)
        self.env = {**os.environ, "MASKTUNE_DATA_DIR": str(tmp / "data"), "PYTHONUNBUFFERED": "1"}
        if not embedded:
            self.db_name, url = create_database()
            self.env.update(
                MASKTUNE_DATABASE_URL=url,
                MASKTUNE_BROKER_URL=REDIS_URL,
                MASKTUNE_JOBS_QUEUE=f"test.jobs.{tag}",
                MASKTUNE_VALIDATION_QUEUE=f"test.validation.{tag}",
            )
        # The architecture report costs a worker start ~20 s of CPU; tests of it turn it back on.
        self.env.update({"MASKTUNE_PROGRESS_INTERVAL_S": "0.2", "MASKTUNE_REPORT_CATALOG": "0", **extra_env})
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        self.logs[name] = log
        proc = subprocess.Popen(args, cwd=ROOT, env=self.env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_api(self) -> None:
        self._spawn("api", [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1", "--port", str(self.port)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.procs["api"].poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"API did not start:\n{self.logs['api'].read_text()[-3000:]}")

    @property
    def queues(self) -> list[str]:
        return [self.env.get("MASKTUNE_JOBS_QUEUE", "masktune.jobs"), self.env.get("MASKTUNE_VALIDATION_QUEUE", "masktune.validation")]

    def start_worker(self, name: str = "worker", concurrency: int = 1, *, queues: list[str] | None = None,
                     beat: bool = False) -> subprocess.Popen:
        """A Celery worker on both queues (or ``queues``); ``beat``: also the stack's one celery beat (-B)."""
        args = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", ",".join(queues or self.queues),
                "--pool", "prefork", "--concurrency", str(concurrency), "--loglevel", "INFO",
                "-n", f"{name}-{secrets.token_hex(3)}@%h"]
        return self._spawn(name, args + (["-B"] if beat else []))

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def create_key(self, tenant: str) -> str:
        out = subprocess.run([sys.executable, "-m", "api.manage", "create-key", "--tenant", tenant], cwd=ROOT, env=self.env,
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["secret"]

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name, signal.SIGKILL)
        if self.db_name:
            drop_database(self.db_name)
            queues = [self.env["MASKTUNE_JOBS_QUEUE"], self.env["MASKTUNE_VALIDATION_QUEUE"]]
            redis.Redis.from_url(REDIS_URL).delete(*queues)

    def log_tail(self, name: str, chars: int = 4000) -> str:
        return self.logs[name].read_text(errors="replace")[-chars:] if name in self.logs else ""


@contextmanager
def running(tmp: Path, *, worker: bool = False, **extra_env: str) -> Iterator[Stack]:
    """A Stack with its API (and a worker) started, closed however the block ends."""
    stack = Stack(tmp, **extra_env)
    try:
        stack.start_api()
        if worker:
            stack.start_worker()
        yield stack
    finally:
        stack.close()
