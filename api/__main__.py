"""Run the API as deployed: ``python -m api`` (docker-compose.yml, scripts/serve.py).

uvicorn with MASKTUNE_API_WORKERS processes on MASKTUNE_API_HOST:MASKTUNE_API_PORT. Unless
MASKTUNE_MIGRATE_ON_START is false (compose: its one-shot ``migrate`` service does it), the
migrations are applied here, once, before the processes start; each process then finds the
schema current at start-up (``api.app``'s lifespan) instead of racing the others to create it.
With it false, the processes refuse to start on a schema that is not current.
"""

from __future__ import annotations

import uvicorn

from jobstore.db import check_schema, migrate
from jobstore.settings import get_settings


def main() -> None:
    settings = get_settings()
    (migrate if settings.migrate_on_start else check_schema)(settings.database_url)
    uvicorn.run("api.app:app", host=settings.api_host, port=settings.api_port, workers=settings.api_workers)


if __name__ == "__main__":
    main()
