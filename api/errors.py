"""RFC 7807 problem details: every error the API returns is ``application/problem+json``
with a stable machine-readable ``code``.

Raise :class:`ProblemError` (an HTTPException) anywhere in a route or dependency.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobstore.logs import annotate

log = logging.getLogger("api")

PROBLEM_MEDIA_TYPE = "application/problem+json"

# Code of errors raised without one (framework 404/405, plain HTTPException).
_DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "service_unavailable",
}


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="Where the error is, e.g. [\"body\", \"erm\", \"lr\"].")
    msg: str
    type: str


class Problem(BaseModel):
    """An RFC 7807 problem document."""

    type: str = Field("about:blank", description="A URI naming the problem type; about:blank: see title and code.")
    title: str = Field(description="The HTTP status phrase.")
    status: int
    detail: str = Field(description="What went wrong, for a human.")
    code: str = Field(description="Stable machine-readable error code, e.g. not_found, validation_error.")
    errors: list[FieldError] | None = Field(None, description="Per-field errors (validation errors only).")


class ProblemError(StarletteHTTPException):
    """An HTTP error with a stable code; rendered as problem+json."""

    def __init__(self, status: int, code: str, detail: str, *, errors: list[dict] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status_code=status, detail=detail, headers=headers)
        self.code = code
        self.errors = errors


def problem_body(status: int, code: str, detail: str, errors: list[dict] | None = None) -> dict[str, Any]:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body = Problem(title=title, status=status, detail=detail, code=code,
                   errors=[FieldError(**e) for e in errors] if errors is not None else None)
    return body.model_dump(exclude_none=True)


def problem_response(status: int, code: str, detail: str, *, errors: list[dict] | None = None,
                     headers: dict[str, str] | None = None) -> JSONResponse:
    annotate(problem=code)  # on the request's access line, and counted for rejected uploads (api.metrics)
    return JSONResponse(problem_body(status, code, detail, errors), status_code=status, headers=headers,
                        media_type=PROBLEM_MEDIA_TYPE)


def validation_problem(errors: list[dict], detail: str | None = None) -> ProblemError:
    """A 422 validation_error from (loc, msg, type) dicts, e.g. for hand-parsed form fields."""
    return ProblemError(422, "validation_error", detail or _summary(errors), errors=errors)


def _clean_errors(raw: list[Any]) -> list[dict]:
    # Keep loc/msg/type only: `input` may echo large or sensitive bodies, `ctx` may hold exceptions.
    return [{"loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
             "msg": str(e.get("msg", "")), "type": str(e.get("type", "value_error"))} for e in raw]


def _summary(errors: list[dict]) -> str:
    if not errors:
        return "The request is not valid."
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}" if where else first["msg"] + more


async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if type(exc) is StarletteHTTPException and exc.status_code == 400 and exc.__cause__ is not None:
        # FastAPI could not decode a JSON body it was told is JSON (not UTF-8, nested too deep):
        # malformed JSON, answered like any other malformed JSON.
        errors = [{"loc": ["body"], "msg": "The body is not valid JSON (UTF-8).", "type": "json_invalid"}]
        return problem_response(422, "validation_error", _summary(errors), errors=errors)
    code = getattr(exc, "code", None) or _DEFAULT_CODES.get(exc.status_code, f"http_{exc.status_code}")
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).description
    return problem_response(exc.status_code, code, detail, errors=getattr(exc, "errors", None),
                            headers=getattr(exc, "headers", None))


async def _validation_exception(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = _clean_errors(list(exc.errors()))
    return problem_response(422, "validation_error", _summary(errors), errors=errors)


async def _unexpected_exception(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the server log only (Starlette re-raises for uvicorn to log it).
    log.error("unhandled error on %s %s: %r", request.method, request.url.path, exc)
    return problem_response(500, "internal_error", "An unexpected error occurred; it has been logged.")


def install(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_exception)
    app.add_exception_handler(Exception, _unexpected_exception)


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting problem bodies for these statuses."""
    return {s: {"model": Problem, "description": HTTPStatus(s).phrase} for s in statuses}
