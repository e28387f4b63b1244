"""Run the API as deployed: ``python -m api`` (docker-compose.yml, scripts/serve.py).

uvicorn with MASKTUNE_API_WORKERS processes on MASKTUNE_API_HOST:MASKTUNE_API_PORT. The
migrations are applied here, once, before the processes start: each process applies them
again at start-up (``api.app``'s lifespan, for a bare ``uvicorn api.app:app``), which is then
a read of the schema version instead of several processes racing to create the same tables.
"""

from __future__ import annotations

import uvicorn

from jobstore.db import migrate
from jobstore.settings import get_settings


def main() -> None:
    settings = get_settings()
    migrate(settings.database_url)
    uvicorn.run("api.app:app", host=settings.api_host, port=settings.api_port, workers=settings.api_workers)


if __name__ == "__main__":
    main()
