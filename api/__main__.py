"""Run the API as deployed: ``python -m api`` (docker-compose.yml, scripts/serve.py).

uvicorn with MASKTUNE_API_WORKERS processes on MASKTUNE_API_HOST:MASKTUNE_API_PORT. Unless
MASKTUNE_MIGRATE_ON_START is false (compose: its one-shot ``migrate`` service does it), the
migrations are applied here, once, before the processes start; each process then finds the
schema current at start-up (``api.app``'s lifespan) instead of racing the others to create it.
With it false, the processes refuse to start on a schema that is not current.

With several processes, their metrics go to a fresh folder (PROMETHEUS_MULTIPROC_DIR, set
here before they start, removed when they stop), so a scrape of any of them counts all.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import uvicorn

from jobstore.db import check_schema, migrate
from jobstore.settings import get_settings

from .metrics import MULTIPROC_DIR_ENV
from .observability import configure_logging, logging_config


def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_format)
    (migrate if settings.migrate_on_start else check_schema)(settings.database_url)
    # A temporary folder of this start, not one under the data dir, which API and worker
    # containers may share: another process's files must never be counted, nor a past run's.
    own_dir = None
    if settings.api_workers > 1 and MULTIPROC_DIR_ENV not in os.environ:
        own_dir = os.environ[MULTIPROC_DIR_ENV] = tempfile.mkdtemp(prefix="masktune-api-metrics-")
    try:
        uvicorn.run("api.app:app", host=settings.api_host, port=settings.api_port, workers=settings.api_workers,
                    log_config=logging_config(settings.log_format))
    finally:
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
