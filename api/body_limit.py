"""A cap on every request body, with or without Content-Length, and an idle timeout that drops
stalled ones: the first thing a request meets (pure ASGI, before any route reads a byte)."""

from __future__ import annotations

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ProblemError, problem_response

# Multipart framing and the small fields around the file: allowed on top of max_upload_bytes.
MULTIPART_OVERHEAD = 16 * 1024
# Bodies of routes that take no upload (JSON) are small.
JSON_BODY_LIMIT = 1 << 20


def too_large(limit: int) -> ProblemError:
    return ProblemError(413, "payload_too_large", f"The upload exceeds the limit of {limit} bytes.")


def upload_timeout(seconds: float) -> ProblemError:
    return ProblemError(408, "upload_timeout", f"No part of the request body arrived for {seconds:g} s; "
                                               "the request was dropped and nothing was kept.",
                        headers={"Connection": "close"})


class BodyLimitMiddleware:
    """Pure ASGI: cap every request body, with or without Content-Length, and drop stalled ones.

    Upload routes may send ``max_upload_bytes`` plus multipart overhead; every other route
    JSON_BODY_LIMIT. A declared Content-Length over the cap is refused before the body is
    read; a chunked body fails with 413 as soon as it passes the cap.

    While the body is incomplete, a read that waits more than ``idle_timeout_s`` for the next
    chunk fails with 408 ``upload_timeout``: the route (and the upload thread reading for it)
    gets the error at once, cleans up, and the thread is free again. Reads after the body or
    after the response has started (Starlette listening for a disconnect during a long
    download) are not timed.
    """

    def __init__(self, app: ASGIApp, max_upload_bytes: int, upload_paths: tuple[str, ...],
                 idle_timeout_s: float | None = None):
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.upload_paths = upload_paths
        self.idle_timeout_s = idle_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope["path"].rstrip("/") in self.upload_paths
        cap = self.max_upload_bytes + MULTIPART_OVERHEAD if upload else JSON_BODY_LIMIT
        reported = self.max_upload_bytes if upload else cap
        length = content_length(scope)
        if length is not None and length > cap:
            await problem_response(413, "payload_too_large",
                                   f"The request body exceeds the limit of {reported} bytes.")(scope, receive, send)
            return
        received = 0
        body_done = False
        timeout = self.idle_timeout_s

        async def watched_send(message: Message) -> None:
            nonlocal body_done
            if message["type"] == "http.response.start":
                body_done = True  # answered: later reads only listen for a disconnect
            await send(message)

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                with anyio.fail_after(timeout):  # None: no timeout
                    message = await receive()
            except TimeoutError:
                # An HTTPException: the route's error handling turns it into a 408 problem.
                raise upload_timeout(timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise too_large(reported)
                body_done = not message.get("more_body", False)
            else:
                body_done = True  # http.disconnect
            return message

        await self.app(scope, limited_receive, watched_send)


def content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
