"""Embedded start: API + worker on this machine, SQLite, a local blob folder and a broker
that needs no server (kombu's filesystem transport), unless MASKTUNE_* settings say otherwise.

The worker is the same Celery worker production runs; only the settings differ.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from jobstore.db import migrate, session_scope
from jobstore.settings import get_settings
from jobstore.tenants import create_key


def local_key(settings) -> str:
    """The key of the 'local' tenant, created on the first start and kept in data_dir."""
    path = settings.data_dir / "local-api-key.json"
    if path.exists():
        return json.loads(path.read_text())["secret"]
    with session_scope(settings.database_url) as session:
        key_id, secret = create_key(session, "local")
    path.write_text(json.dumps({"key_id": key_id, "tenant": "local", "secret": secret}))
    path.chmod(0o600)
    return secret


def main() -> int:
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.database_url)
    secret = local_key(settings)
    worker_log = settings.data_dir / "worker.log"
    celery = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel", "INFO"]
    # Two workers: one runs jobs (one at a time, the GPU's), the other validates uploads and, with
    # -B, is the one celery beat that sends the reconciler; neither waits behind a long job.
    workers = [
        subprocess.Popen([*celery, "-Q", settings.jobs_queue, "-n", "jobs@%h"],
                         stdout=open(worker_log, "ab"), stderr=subprocess.STDOUT),
        subprocess.Popen([*celery, "-Q", settings.validation_queue, "-n", "validation@%h", "-B"],
                         stdout=open(settings.data_dir / "validation-worker.log", "ab"), stderr=subprocess.STDOUT),
    ]
    # MASKTUNE_API_WORKERS processes, as in production: SQLite serves several processes on one
    # machine (WAL, busy timeout), as it already serves the API and the workers.
    api = subprocess.Popen([sys.executable, "-m", "api"])
    url = f"http://{settings.api_host}:{settings.api_port}"
    print(f"""
MaskTune Service at {url}  (docs: {url}/docs)
  API key (tenant 'local'): {secret}
  export MASKTUNE_URL={url} MASKTUNE_API_KEY={secret}   # read by the masktune CLI and client
  database: {settings.database_url}
  blobs:    {settings.blob_url}
  broker:   {settings.broker_url}   worker logs: {worker_log}, {settings.data_dir / "validation-worker.log"}
""", flush=True)

    def stop(*_):
        for proc in (api, *workers):
            if proc.poll() is None:
                proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while all(proc.poll() is None for proc in (api, *workers)):
        time.sleep(0.5)
    stop()
    for proc in (api, *workers):
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0 if api.returncode in (0, -signal.SIGTERM, None) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
