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
    queues = f"{settings.jobs_queue},{settings.validation_queue}"
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", queues, "--loglevel", "INFO"],
        stdout=open(worker_log, "ab"), stderr=subprocess.STDOUT)
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.app:app", "--host", settings.api_host, "--port", str(settings.api_port)])
    url = f"http://{settings.api_host}:{settings.api_port}"
    print(f"""
MaskTune Service at {url}  (docs: {url}/docs)
  API key (tenant 'local'): {secret}
  export MASKTUNE_KEY={secret}
  database: {settings.database_url}
  blobs:    {settings.blob_url}
  broker:   {settings.broker_url}   worker log: {worker_log}
""", flush=True)

    def stop(*_):
        for proc in (api, worker):
            if proc.poll() is None:
                proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while api.poll() is None and worker.poll() is None:
        time.sleep(0.5)
    stop()
    for proc in (api, worker):
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0 if api.returncode in (0, -signal.SIGTERM, None) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
