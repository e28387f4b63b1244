"""The client's errors: the API's RFC 7807 problems, and downloads that arrive corrupted.

Failures to reach the API at all are httpx's own ``httpx.TransportError`` (``ConnectError``,
``ReadTimeout`` ...), raised once the retries are spent.
"""

from __future__ import annotations

from email.utils import parsedate_to_datetime
from datetime import datetime, timezone
from typing import Any

import httpx


class ApiError(Exception):
    """An error answer of the API: its problem document (``status``, ``code``, ``detail``).

    ``code`` is the API's stable machine-readable code (``not_found``, ``validation_error``,
    ``too_many_active_jobs`` ...); ``errors`` the per-field errors of a 422; ``retry_after``
    the seconds the API asked to wait (429, 503), else None.
    """

    def __init__(self, status: int, code: str, detail: str, *, title: str | None = None,
                 errors: list[dict[str, Any]] | None = None, retry_after: float | None = None,
                 problem: dict[str, Any] | None = None):
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title
        self.errors = errors
        self.retry_after = retry_after
        self.problem = problem or {}

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        status = response.status_code
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):  # not the API's answer (a proxy's error page, say)
            text = response.text.strip()[:300] or response.reason_phrase
            return cls(status, f"http_{status}", text, retry_after=retry_after(response))
        detail = body.get("detail")
        if not isinstance(detail, str):
            detail = response.reason_phrase if detail is None else str(detail)
        return cls(status, str(body.get("code") or f"http_{status}"), detail, title=body.get("title"),
                   errors=body.get("errors"), retry_after=retry_after(response), problem=body)


class TransferError(Exception):
    """A download whose bytes do not match the sha256 the API gave for them (its ETag)."""


def retry_after(response: httpx.Response) -> float | None:
    """The Retry-After header in seconds (it may be a number or an HTTP date), None without one."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
