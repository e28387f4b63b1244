"""The Celery *producer*: the API only sends tasks by name (the worker registers them).

Settings come from ``Settings.celery_config()``, whose task_routes pick the queue,
so the API and the worker cannot disagree about where a task goes.
"""

from __future__ import annotations

import threading

from celery import Celery

from jobstore.settings import COMMAND_REPORT_DEVICE, TASK_DELIVER_WEBHOOK, Settings, get_settings

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


def send_webhooks(delivery_ids: list[str]) -> None:
    """Queue the delivery of webhook messages just committed (jobstore.webhooks.send_after_commit)."""
    for delivery_id in delivery_ids:
        send_task(get_settings(), TASK_DELIVER_WEBHOOK, delivery_id)


def check_broker(settings: Settings) -> None:
    """Raise if the broker cannot be reached (for /readyz)."""
    with celery_app(settings).connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=3)


def live_workers(settings: Settings, timeout: float) -> list[dict]:
    """The workers that answer a broadcast within ``timeout`` seconds and consume this deployment's
    queues: name, device and queues each. Empty when none answers."""
    ours = {settings.jobs_queue, settings.validation_queue}
    replies = celery_app(settings).control.broadcast(COMMAND_REPORT_DEVICE, reply=True, timeout=timeout)
    workers = [{"name": name, **report} for reply in replies for name, report in reply.items()
               if isinstance(report, dict) and ours & set(report.get("queues", []))]
    return sorted(workers, key=lambda w: w["name"])
