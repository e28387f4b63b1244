"""Log lines of the API and the workers: text, or one JSON object per line (MASKTUNE_LOG_FORMAT),
carrying the fields of the work at hand (request_id and tenant in the API, job_id and stage in a
job's worker process).

The fields live in one dict per request or job run, held by a context variable: start it with
:func:`log_context`, add to it with :func:`annotate`. The threads and tasks a request starts see
the same dict (they copy the context, not the dict), so a tenant found in a worker thread shows
on the request's later lines too.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Record attributes that are no field of a JSON line: the standard ones, and uvicorn's coloured copy of its message.
NOT_FIELDS = [*RESERVED_ATTRS, "color_message"]

_fields: ContextVar[dict[str, Any] | None] = ContextVar("masktune_log_fields", default=None)


@contextmanager
def log_context(**fields: Any) -> Iterator[dict[str, Any]]:
    """The fields every record logged inside the block carries (a fresh dict, yielded)."""
    current = dict(fields)
    token = _fields.set(current)
    try:
        yield current
    finally:
        _fields.reset(token)


def annotate(**fields: Any) -> None:
    """Add fields to the current context's records; nothing outside a :func:`log_context`."""
    current = _fields.get()
    if current is not None:
        current.update(fields)


class ContextFilter(logging.Filter):
    """Copies the context's fields onto each record, where a JSON formatter finds them."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_fields.get() or {}).items():
            record.__dict__.setdefault(key, value)
        return True


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        # Every attribute a record has beyond the standard ones (the context's fields, `extra=`) is a key.
        return JsonFormatter("{levelname}{name}{message}{process}", style="{", timestamp=True, reserved_attrs=NOT_FIELDS,
                             rename_fields={"levelname": "level", "name": "logger", "process": "pid"})
    return logging.Formatter(TEXT_FORMAT)


def use_format(handler: logging.Handler, log_format: str) -> None:
    """Format the handler's records as ``log_format`` (text | json), with the context's fields."""
    handler.setFormatter(formatter(log_format))
    if not any(isinstance(f, ContextFilter) for f in handler.filters):
        handler.addFilter(ContextFilter())
