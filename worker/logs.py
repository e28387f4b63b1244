"""JSON log lines for a Celery worker (MASKTUNE_LOG_FORMAT=json): Celery sets its handlers up as
usual, these hooks give them the JSON formatter and the context's fields (job_id and stage in a
job's process, see worker.metrics.job_run). Text keeps Celery's own format."""

from __future__ import annotations

import logging

from celery import signals

from jobstore.logs import use_format
from jobstore.settings import get_settings


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _json_lines(logger: logging.Logger, **_) -> None:
    if get_settings().log_format == "json":
        for handler in logger.handlers:
            use_format(handler, "json")
