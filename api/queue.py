"""The Celery *producer*: the API only sends tasks by name (the worker registers them).

Settings come from ``Settings.celery_config()``, whose task_routes pick the queue,
so the API and the worker cannot disagree about where a task goes.
"""

from __future__ import annotations

import threading

from celery import Celery

from jobstore.settings import Settings

# Fail a request within seconds when the broker is down instead of hanging on retries.
_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


_apps: dict[str, Celery] = {}
_lock = threading.Lock()


def celery_app(settings: Settings) -> Celery:
    """One producer app (and connection pool) per distinct settings."""
    key = settings.model_dump_json()
    with _lock:
        app = _apps.get(key)
        if app is None:
            app = _apps[key] = Celery("masktune-api", set_as_current=False)
            app.conf.update(settings.celery_config())
        return app


def send_task(settings: Settings, name: str, object_id: str) -> None:
    """Queue task ``name`` with its single argument, the object id. Raises if the broker is unreachable."""
    celery_app(settings).send_task(name, args=[object_id], retry=True, retry_policy=_PUBLISH_RETRY)


def check_broker(settings: Settings) -> None:
    """Raise if the broker cannot be reached (for /readyz)."""
    with celery_app(settings).connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=3)
