"""Run the API as deployed: ``python -m api`` (docker-compose.yml, scripts/serve.py).

uvicorn with MASKTUNE_API_WORKERS processes on MASKTUNE_API_HOST:MASKTUNE_API_PORT. The
migrations are applied here, once, before the processes start: each process applies them
again at start-up (``api.app``'s lifespan, for a bare ``uvicorn api.app:app``), which is then
a read of the schema version instead of several processes racing to create the same tables.

With several processes, their metrics go to a fresh folder (PROMETHEUS_MULTIPROC_DIR, set
here before they start, removed when they stop), so a scrape of any of them counts all.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import uvicorn

from jobstore.db import migrate
from jobstore.settings import get_settings

from .metrics import MULTIPROC_DIR_ENV
from .observability import configure_logging, logging_config


def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_format)
    migrate(settings.database_url)
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
